"""The switches: defaults (read from experiments/perf/defaults.yaml), the plain path, checks.

A task takes ``perf`` as a plain mapping (YAML ``model.perf``); :func:`settings` merges it over
:data:`DEFAULTS` and checks it. ``train`` holds switches over the top level for training runs
only (:func:`training_settings`); evaluation uses the top level.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from icp.core.errors import ConfigError
from icp.core.paths import EXPERIMENTS

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = (None, "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The one table of the switches, with a comment per switch: experiments include it, code reads it.
DEFAULTS_FILE = EXPERIMENTS / "perf" / "defaults.yaml"


def _read_defaults() -> dict[str, Any]:
    node = yaml.safe_load(DEFAULTS_FILE.read_text())["model"]["perf"]
    node["train"] = dict(node.get("train") or {})
    return node


DEFAULTS: dict[str, Any] = _read_defaults()
# The plain path: what a task did before the switches existed (the benchmark's "off" rows).
OFF: dict[str, Any] = {
    "bf16_frozen": False, "compile": "none", "compile_regional": True, "sdpa": "auto", "channels_last": False,
    "fused_optimizer": False, "batched_cfg": False, "cuda_graph_sampling": False, "sample_bf16": False,
    "wide_heads_matmul": False, "force_layout_opt": False, "train": {},
}

# Switches removed for not paying >= 3% (issue 29; figures in docs/history/performance.md), with the
# value they had by default. A run's saved config from before still names them: at that value the
# key is dropped (the run loads as it trained); any other value is a ConfigError.
REMOVED = {"compile_dynamic": False, "compile_codec_whole": True, "fuse_qkv": False, "cudnn_benchmark": False,
           "foreach_ema": False, "lagged_progress_loss": False}


def _drop_removed(node: dict[str, Any], where: str) -> dict[str, Any]:
    for key in sorted(set(node) & set(REMOVED)):
        if node.pop(key) != REMOVED[key]:
            raise ConfigError(f"{where}.{key} was removed (it did not pay >= 3%: docs/history/performance.md); "
                              "delete the key")
    return node


def settings(node: Mapping[str, Any] | None = None, where: str = "model.perf") -> dict[str, Any]:
    """``node`` merged over :data:`DEFAULTS`, checked: unknown keys and bad values are ConfigErrors.

    ``train`` (a mapping of the other switches) overrides them in a training run only
    (:func:`training_settings`); evaluation (``configure_inference``) uses the top level."""
    node = _drop_removed(dict(node or {}), where)
    unknown = sorted(set(node) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a performance switch; known: {', '.join(DEFAULTS)}")
    # A given ``train`` replaces the default one (``train: {}``: no training override).
    train = node.pop("train") if "train" in node else DEFAULTS["train"]
    train = {} if train is None else train
    if not isinstance(train, Mapping):
        raise ConfigError(f"{where}.train={train!r} must be a mapping of switches (e.g. {{compile: reduce-overhead}})")
    out = _checked({**DEFAULTS, **node, "train": {}}, where)
    if train:
        train = _drop_removed(dict(train), f"{where}.train")
        bad = sorted(set(train) - (set(DEFAULTS) - {"train"}))  # a nested "train" too
        if bad:
            raise ConfigError(f"{where}.train.{bad[0]} is not a performance switch; known: "
                              f"{', '.join(k for k in DEFAULTS if k != 'train')}")
        if out["compile"] == "none":
            # An off switch means off: `model.perf.compile=none` must not compile again in training
            # through the default training override (a 64-px GPU base hung in inductor that way).
            train = {k: v for k, v in train.items() if k not in ("compile", "compile_regional")}
        merged = _checked({**out, **dict(train)}, f"{where}.train")
        out["train"] = {key: merged[key] for key in train}
    return out


def _checked(out: dict[str, Any], where: str) -> dict[str, Any]:
    if out["compile"] is False:  # YAML `compile: false` reads as off
        out["compile"] = "none"
    if out["compile"] not in COMPILE_MODES:
        raise ConfigError(f"{where}.compile='{out['compile']}' is not one of "
                          f"{', '.join(str(m) for m in COMPILE_MODES)}")
    if out["sdpa"] not in SDPA_BACKENDS:
        raise ConfigError(f"{where}.sdpa='{out['sdpa']}' is not one of {', '.join(SDPA_BACKENDS)}")
    for key, value in out.items():
        if key == "train" or (key == "channels_last" and value == "auto"):
            continue
        if key not in ("compile", "sdpa") and not isinstance(value, bool):
            extra = ", or auto" if key == "channels_last" else ""
            raise ConfigError(f"{where}.{key}={value!r} must be true or false{extra}")
    return out


def training_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    """Checked settings (:func:`settings`) as a training run uses them: ``train`` applied over
    the top level (e.g. the whole UNet under inductor's CUDA graphs for the training step, while
    evaluation keeps by-block graphs and its own sampling graph)."""
    return {**s, **s.get("train", {})}


def use_channels_last(s: Mapping[str, Any], device) -> bool:
    """``channels_last`` resolved for a device: ``auto`` = where the nets are compiled (CUDA and
    ``compile`` on); eager NHWC GroupNorm is slower (0.92x on the plain loop)."""
    import torch

    value = s["channels_last"]
    if value == "auto":
        return torch.device(device).type == "cuda" and s["compile"] not in (None, "none")
    return bool(value)


def uses_cudagraphs(s: Mapping[str, Any]) -> bool:
    """Whether the compile mode records inductor's own CUDA graphs (reduce-overhead, max-autotune)."""
    if s["compile"] in (None, "none"):
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(s["compile"]).get("triton.cudagraphs", False))


# The same kernels without inductor's CUDA graphs.
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def guard_accumulation(s: dict[str, Any], accumulate_grad_batches: int) -> dict[str, Any]:
    """Checked settings (:func:`settings`) made safe for ``accumulate_grad_batches`` micro-batches.

    Inductor's CUDA graphs hand every replay the same output memory; the first micro-batch's
    gradient, which AccumulateGrad keeps as ``.grad`` without a copy, is then overwritten by the
    next backward: silently wrong gradients or an "overwritten by a subsequent run" error
    (pytorch/pytorch#169545, open as of torch 2.11). So with accumulation the training compile
    keeps its kernels and drops the graphs (``train.compile`` replaced; evaluation, which never
    accumulates, keeps the top level). Returns ``s`` itself when nothing has to change."""
    training = training_settings(s)
    if accumulate_grad_batches <= 1 or not uses_cudagraphs(training):
        return s
    return {**s, "train": {**s.get("train", {}), "compile": _WITHOUT_CUDAGRAPHS.get(training["compile"], "default")}}
