"""icp.perf.switches: the defaults (one file, experiments/perf/defaults.yaml, that the configs
include), checks, the accumulation guard, the removed switches; each switch alone keeps
the loss and gradients of the plain path within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from icp import perf
from icp.core.errors import ConfigError
from tests.perf_helpers import _batch, _loss_and_grads, _norm_rel, _stitching
from tests.perf_helpers import _threads  # noqa: F401 (autouse: one thread, the SDPA kernel reset)


def test_settings_merge_over_defaults_and_refuse_bad_keys():
    assert perf.settings(None) == perf.DEFAULTS
    assert perf.settings({"compile": False})["compile"] == "none"
    assert set(perf.OFF) == set(perf.DEFAULTS)
    with pytest.raises(ConfigError, match="model.perf.turbo"):
        perf.settings({"turbo": True})
    with pytest.raises(ConfigError, match="model.perf.compile"):
        perf.settings({"compile": "fastest"})
    with pytest.raises(ConfigError, match="model.perf.sdpa"):
        perf.settings({"sdpa": "fastest"})
    with pytest.raises(ConfigError, match="model.perf.batched_cfg"):
        perf.settings({"batched_cfg": "yes"})
    with pytest.raises(ConfigError, match="model.perf.channels_last='sometimes' must be true or false, or auto"):
        perf.settings({"channels_last": "sometimes"})
    with pytest.raises(ConfigError, match="perf.sdpa"):
        perf.set_sdpa_backend("fastest")
    with pytest.raises(ConfigError, match="perf.compile"):
        perf.compile_module(torch.nn.Linear(2, 2), mode="turbo")


def test_perf_nodes_of_the_configs_are_the_defaults(repo_root):
    """One table: experiments/perf/defaults.yaml is what perf.DEFAULTS is read from and what the
    diffusion experiments include (never a copy of it); it lists every switch, each with a comment."""
    import re

    import yaml

    from icp.core import config as cfglib

    assert perf.DEFAULTS_FILE == repo_root / "experiments" / "perf" / "defaults.yaml"
    table = perf.DEFAULTS_FILE.read_text()
    assert yaml.safe_load(table)["model"]["perf"] == perf.DEFAULTS
    for key in perf.DEFAULTS:
        assert re.search(rf"^    {key}: .*# \S", table, re.M), key  # the table names every switch
    for path in ("stitching/tiny.yaml", "stitching/sd15.yaml", "adaptation/tiny.yaml", "adaptation/sd15.yaml"):
        cfg = cfglib.load(repo_root / "experiments" / path)
        assert perf.settings(dict(cfg.model.perf)) == perf.DEFAULTS, path
        assert list(cfg.model.perf) and set(cfg.model.perf) == set(perf.DEFAULTS), path  # every switch listed
    for path in (repo_root / "experiments").rglob("*.yaml"):
        if path != perf.DEFAULTS_FILE:
            assert not re.search(r"^\s+perf:", path.read_text(), re.M), path  # included, not copied


def test_channels_last_auto_means_where_compiled_on_cuda():
    auto = perf.settings({"channels_last": "auto"})
    assert perf.use_channels_last(auto, "cuda") and not perf.use_channels_last(auto, "cpu")
    assert not perf.use_channels_last({**auto, "compile": "none"}, "cuda")  # eager NHWC measured slower
    assert perf.use_channels_last(perf.settings({"channels_last": True}), "cpu")
    assert not perf.use_channels_last(perf.settings({"channels_last": False}), "cuda")
    task = _stitching()  # project defaults on CPU: weights stay NCHW
    assert task.configure_perf(precision="bf16-mixed", device="cpu")["channels_last"] is False
    assert task.backbone.unet.conv_in.weight.is_contiguous()


def test_training_and_evaluation_compile_with_the_same_switches(monkeypatch):
    """One set of switches: the training override (model.perf.train) was removed for paying +1.7%,
    so a training run and evaluation hand inductor the same mode and blocks."""
    assert "train" not in perf.DEFAULTS and not hasattr(perf, "training_settings")
    seen = []
    monkeypatch.setattr(perf.configure, "compile_module",
                        lambda net, mode, regional=True, **_: seen.append((net, mode, regional)) or 1)
    trained = _stitching()
    perf.configure_task(trained, trained.perf_config, device="cuda")  # the compile path, recorded
    assert (trained.backbone.unet, "default", True) in seen and all(m == "default" for _, m, _ in seen)
    seen.clear()
    evaluated = _stitching()
    perf.configure_inference(evaluated, evaluated.perf_config, device="cuda", bf16=False)
    assert (evaluated.backbone.unet, "default", True) in seen and all(m == "default" for _, m, _ in seen)
    assert trained.perf_config == evaluated.perf_config == perf.DEFAULTS


def test_training_steps_are_marked_for_inductor_cuda_graphs(monkeypatch):
    """compile: reduce-overhead (inductor's CUDA graphs) marks each training
    step's start; the compile mode "default" records no graphs and is left alone."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert perf.uses_cudagraphs(perf.settings({"compile": "reduce-overhead"}))
    assert not perf.uses_cudagraphs(perf.settings()) and not perf.uses_cudagraphs(perf.OFF)
    _stitching().on_train_batch_start(_batch(), 0)
    assert marks == []
    _stitching({"compile": "reduce-overhead"}).on_train_batch_start(_batch(), 0)
    assert marks == [1]


def test_accumulation_drops_inductors_cuda_graphs_from_the_training_compile():
    """CUDA graphs reuse output memory between replays, so gradients kept across micro-batches
    would be overwritten (pytorch/pytorch#169545): with accumulation, the compile keeps its kernels
    without graphs; modes without graphs are left alone."""
    graphs = perf.settings({"compile": "reduce-overhead", "compile_regional": False})
    guarded = perf.guard_accumulation(graphs, 2)
    assert guarded["compile"] == "default" and guarded["compile_regional"] is False
    assert not perf.uses_cudagraphs(guarded)
    top = perf.settings({"compile": "max-autotune"})
    assert perf.guard_accumulation(top, 4)["compile"] == "max-autotune-no-cudagraphs"
    for s, steps in ((graphs, 1), (perf.settings(), 8)):
        assert perf.guard_accumulation(s, steps) is s


# One row per switch: the plain path with only that switch at its project default.
SWITCHES = [k for k in perf.DEFAULTS if perf.DEFAULTS[k] != perf.OFF[k]] + ["sdpa=math", "channels_last=on"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_keeps_the_loss_within_bf16_tolerance(switch):
    key, _, value = switch.partition("=")
    node = {**perf.OFF, key: {"on": True, "": perf.DEFAULTS[key]}.get(value, value)}
    plain, fast = _stitching(perf.OFF), _stitching(node)
    plain.configure_perf(precision="bf16-mixed", device="cpu")
    applied = fast.configure_perf(precision="bf16-mixed", device="cpu")
    assert applied["compiled"] == 0  # compilation is for CUDA only
    if key == "bf16_frozen":
        assert applied["bf16_frozen"] > 0 and fast.backbone.unet.conv_in.weight.dtype == torch.bfloat16
        assert fast.appearance.net.conv_in.weight.dtype == torch.float32  # trained: stays fp32
    (a, ga), (b, gb) = _loss_and_grads(plain), _loss_and_grads(fast)
    assert abs(a - b) / a < 1e-2, (a, b)
    assert _norm_rel(gb, ga) < 5e-2
    # Not vacuous: another batch moves the gradient far more than the switch does.
    assert _norm_rel(_loss_and_grads(fast, seed=1)[1], gb) > 0.3


def test_bf16_frozen_only_under_a_bf16_precision():
    task = _stitching()
    assert task.configure_perf(precision="32-true", device="cpu")["bf16_frozen"] == 0
    assert task.backbone.unet.conv_in.weight.dtype == torch.float32


def test_a_removed_switch_at_its_old_default_is_dropped_and_set_otherwise_is_refused():
    """Switches removed for not paying >= 3% (issue 29) are gone from the table; a run's saved config
    from before names them at their old defaults (the training override too) and still loads;
    turning one on is a ConfigError."""
    old = {**perf.DEFAULTS, **perf.REMOVED, "train": {**perf.REMOVED_TRAIN, "lagged_progress_loss": False}}
    assert not set(perf.REMOVED) & set(perf.DEFAULTS) and not set(perf.REMOVED) & set(perf.OFF)
    assert not any(hasattr(perf, name) for name in ("fuse_qkv", "LaggedScalar", "CODEC"))  # their code went too
    assert perf.settings(old) == perf.DEFAULTS
    with pytest.raises(ConfigError, match=r"model.perf.fuse_qkv was removed .*docs/history/performance.md"):
        perf.settings({"fuse_qkv": True})
    with pytest.raises(ConfigError, match=r"model.perf.train.cudnn_benchmark was removed"):
        perf.settings({"train": {"cudnn_benchmark": True}})
    assert perf.settings({"train": {}}) == perf.settings({"train": None}) == perf.DEFAULTS
    for train in ({"compile": "max-autotune"}, "reduce-overhead"):
        with pytest.raises(ConfigError, match=r"model.perf.train was removed .*set those switches at the top level"):
            perf.settings({"train": train})


@pytest.mark.parametrize("config,override", [("experiments/stitching/tiny.yaml", "model.perf.compile=none"),
                                             ("experiments/base_pretrain.yaml", "+model.perf={compile: none}")])
def test_compile_none_is_off_in_training_too(repo_root, config, override):
    """A run whose config switches compile off (the claims and 64-px configs) trains uncompiled:
    a 64-px GPU base once hung in inductor when the training override compiled it again."""
    from icp.core import config as cfglib

    cfg = cfglib.load(repo_root / config, [override])
    from omegaconf import OmegaConf

    s = perf.settings(OmegaConf.to_container(cfg.model.perf, resolve=True))
    assert s["compile"] == "none" and not perf.uses_cudagraphs(s)
