"""The switches: defaults (read from experiments/perf/defaults.yaml), the plain path, checks.

A task takes ``perf`` as a plain mapping (YAML ``model.perf``); :func:`settings` merges it over
:data:`DEFAULTS` and checks it. Training and evaluation use the same switches.
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
    return dict(yaml.safe_load(DEFAULTS_FILE.read_text())["model"]["perf"])


DEFAULTS: dict[str, Any] = _read_defaults()
# The plain path: what a task did before the switches existed (the benchmark's "off" rows).
OFF: dict[str, Any] = {
    "bf16_frozen": False, "compile": "none", "compile_regional": True, "sdpa": "auto", "channels_last": False,
    "fused_optimizer": False, "batched_cfg": False, "cuda_graph_sampling": False, "sample_bf16": False,
    "wide_heads_matmul": False, "force_layout_opt": False,
}

# Switches removed for not paying >= 3% (issue 29; figures in docs/history/performance.md), with the
# value they had by default. A run's saved config from before still names them: at that value the
# key is dropped (the run loads as it trained); any other value is a ConfigError.
REMOVED = {"compile_dynamic": False, "compile_codec_whole": True, "fuse_qkv": False, "cudnn_benchmark": False,
           "foreach_ema": False, "lagged_progress_loss": False}
# The training override (``train``: switches over the top level for training only) paid +1.7% by
# default (round 7, under 3%) and was removed with its mechanism: training and evaluation now share
# the switches. A saved config may still hold it empty or at its old default (then it is dropped).
REMOVED_TRAIN = {"compile": "reduce-overhead", "compile_regional": False}


def _drop_removed(node: dict[str, Any], where: str) -> dict[str, Any]:
    for key in sorted(set(node) & set(REMOVED)):
        if node.pop(key) != REMOVED[key]:
            raise ConfigError(f"{where}.{key} was removed (it did not pay >= 3%: docs/history/performance.md); "
                              "delete the key")
    if "train" in node:
        train = node.pop("train")
        train = _drop_removed(dict(train), f"{where}.train") if isinstance(train, Mapping) else train
        if train not in (None, {}, REMOVED_TRAIN):
            raise ConfigError(f"{where}.train was removed (the training override paid +1.7%, under 3%: "
                              f"docs/history/performance.md); set those switches at the top level of {where}")
    return node


def settings(node: Mapping[str, Any] | None = None, where: str = "model.perf") -> dict[str, Any]:
    """``node`` merged over :data:`DEFAULTS`, checked: unknown keys and bad values are ConfigErrors."""
    node = _drop_removed(dict(node or {}), where)
    unknown = sorted(set(node) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a performance switch; known: {', '.join(DEFAULTS)}")
    return _checked({**DEFAULTS, **node}, where)


def _checked(out: dict[str, Any], where: str) -> dict[str, Any]:
    if out["compile"] is False:  # YAML `compile: false` reads as off
        out["compile"] = "none"
    if out["compile"] not in COMPILE_MODES:
        raise ConfigError(f"{where}.compile='{out['compile']}' is not one of "
                          f"{', '.join(str(m) for m in COMPILE_MODES)}")
    if out["sdpa"] not in SDPA_BACKENDS:
        raise ConfigError(f"{where}.sdpa='{out['sdpa']}' is not one of {', '.join(SDPA_BACKENDS)}")
    for key, value in out.items():
        if key == "channels_last" and value == "auto":
            continue
        if key not in ("compile", "sdpa") and not isinstance(value, bool):
            extra = ", or auto" if key == "channels_last" else ""
            raise ConfigError(f"{where}.{key}={value!r} must be true or false{extra}")
    return out


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
    (pytorch/pytorch#169545, open as of torch 2.11). So with accumulation the compile keeps its
    kernels and drops the graphs (``compile`` replaced). Returns ``s`` itself when nothing has to change."""
    if accumulate_grad_batches <= 1 or not uses_cudagraphs(s):
        return s
    return {**s, "compile": _WITHOUT_CUDAGRAPHS.get(s["compile"], "default")}
