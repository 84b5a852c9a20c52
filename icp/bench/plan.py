"""What eval/bench_train.py runs: sizes, rows and sections, the plans, each row's estimated cost
(the ``--budget`` guard) and the targets the report reads (experiments/perf/targets.yaml)."""

from __future__ import annotations

import re

import yaml

from icp.core.paths import EXPERIMENTS

SIZES = {
    "full": dict(res=512, batch=32, big_batch=72, canvas_batch=16, task_batch=32, sample_batch=8, steps=30,
                 warmup=3, iters=10, sample_iters=2, loader_ids=16, loader_views=4, loader_batch=16,
                 peer_batches=(32, 64)),
    "tiny": dict(res=32, batch=2, big_batch=3, canvas_batch=2, task_batch=2, sample_batch=2, steps=3,
                 warmup=1, iters=2, sample_iters=1, loader_ids=2, loader_views=3, loader_batch=2, peer_batches=(2,)),
}
# Estimated seconds per row on an H100/H200 with 16 cores (build + warm-up + timing; compile rows
# include torch.compile of their block shapes: 2-4 min for the UNet's fwd+bwd, measured on the
# H200: c_stitching_defaults 185-225 s of warm-up, b_task_defaults_bs48 120-138 s, d 86-114 s;
# H100: b_task_defaults_bs72 111-114 s of warm-up, its whole row ~135 s). c_adaptation_defaults
# after c_stitching_defaults reuses the frozen-UNet, VAE and trainable control-net graphs (same
# shapes): 35 s of warm-up. The compiled peers (the whole UNet fwd+bwd; UNet + control net + VAE
# decoder for sampling, no backward) are costed a little under icp's rows of the same nets, whose
# compile covers more (CUDA graphs, the codec, more nets); not yet measured by this bench.
ROW_COST_S = {
    "peak": 10, "a_plain": 25, "a_plain_canvas": 25,
    "a_peer": 120, "a_peer_default": 120, "a_peer_ro": 130, "d_peer_default": 90, "d_peer_ro": 100,
    "b_task_off": 30, "b_task_defaults": 200, "b_task_defaults_big": 150,
    "c_stitching_off": 35, "c_stitching_defaults": 270, "c_adaptation_off": 45, "c_adaptation_defaults": 120,
    "d_plain_unet": 20, "d_plain_controlnet": 25, "d_task_off": 40, "d_task_defaults": 150,
    "e": 100,
}
# Switches that leave the compiled graphs as they are: a variant of only these reuses the graphs of
# its base row (inductor's cache), so it costs a fraction of the base row.
GRAPH_NEUTRAL = {"ema_decay"}
# Row keys that are task arguments, not model.perf switches: ``ema_decay`` (what sd15.yaml trains
# with, 0.9999; the (a) loop and the plain rows have no EMA).
TASK_KEYS = {"ema_decay"}
BATCH_ROW = re.compile(r"b_task_defaults_bs(\d+)")  # (b) defaults at batch N, costed like _big
# The compiled peer (issue 29): the plain train step with torch.compile(unet) in a mode, at batch N,
# and the plain ControlNet sampling loop compiled (fullgraph, bf16 weights) in a mode.
PEER_TRAIN = re.compile(r"a_peer_(default|ro)_bs(\d+)")
PEER_SAMPLE = re.compile(r"d_peer_(default|ro)")
PEER_MODES = {"default": "default", "ro": "reduce-overhead"}
SECTIONS = {
    "peak": ["peak"], "a": ["a_plain", "a_plain_canvas"],
    "peer": ["a_peer", "d_peer_default", "d_peer_ro"],
    "b": ["b_task_off", "b_task_defaults", "b_task_defaults_big"],
    "c": ["c_stitching_off", "c_stitching_defaults", "c_adaptation_off", "c_adaptation_defaults"],
    "d": ["d_plain_unet", "d_plain_controlnet", "d_task_off", "d_task_defaults@compile=none",
          "d_task_defaults@cuda_graph_sampling=0", "d_task_defaults"],
    "e": ["e"],
}
# Every row, in section order: what --tiny runs (each code path on CPU) and ``--only all``.
ALL_ROWS = ["peak", *SECTIONS["a"], *SECTIONS["peer"], *SECTIONS["b"], *SECTIONS["c"], *SECTIONS["d"], "e"]
SECTIONS["all"] = ALL_ROWS
# The plans (``--plan``), each one GPU call of at most 9 minutes on an H100, compilation included
# (three or four compiled rows of ~2 minutes each fit one call, so issue 29's ratios take two),
# ordered by what the call must not miss: ``--budget`` skips a row that no longer fits and the
# report lists it. Each reads its verdict against the best peer of its own run. "peer_train" (the
# default): icp's training step at its best batch against the compiled peer at its best (batch 64
# in default mode; 48 under reduce-overhead, where 64 did not fit). "peer_sample": evaluation
# sampling against the compiled ControlNet loop in both modes. The eager loops last (cheap; their
# ratios only for context). "steps": the stitching / adaptation MFU targets; c_adaptation_defaults
# after c_stitching_defaults reuses its graphs (ROW_COST_S).
PLANS = {
    "peer_train": ["peak", "a_peer_default_bs64", "b_task_defaults_big", "a_peer_ro_bs48", "a_plain"],
    "peer_sample": ["peak", "d_peer_default", "d_task_defaults", "d_peer_ro", "d_plain_controlnet"],
    "steps": ["peak", "c_stitching_defaults", "c_adaptation_defaults", "b_task_off", "a_plain", "e"],
}
PLAN = PLANS["peer_train"]
PLAN_PROFILE = "b_task_defaults_big,c_adaptation_defaults,d_task_defaults"  # torch.profiler tables of these
TARGETS_FILE = EXPERIMENTS / "perf" / "targets.yaml"


def load_targets() -> dict:
    """The rules the verdicts are read by (experiments/perf/targets.yaml)."""
    return yaml.safe_load(TARGETS_FILE.read_text())


def known_row(base: str) -> bool:
    return base in ROW_COST_S or bool(BATCH_ROW.fullmatch(base) or PEER_TRAIN.fullmatch(base))


def row_cost(base: str) -> int:
    """Estimated seconds of a row (``base``: its name without ``@variant``); 60 when unknown."""
    if BATCH_ROW.fullmatch(base):
        return ROW_COST_S["b_task_defaults_big"]
    match = PEER_TRAIN.fullmatch(base)
    if match:
        return ROW_COST_S[f"a_peer_{match.group(1)}"]
    return ROW_COST_S.get(base, 60)


def parse_settings(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        out[key] = {"1": True, "0": False, "true": True, "false": False}.get(value, None if value == "none" else value)
    return out
