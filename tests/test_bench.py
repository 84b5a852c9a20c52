"""eval/bench_train.py (icp.bench): rows built from model.perf, the FLOP fit, the budget guard,
the default plan, profiles and the targets' report (tiny, CPU)."""

from __future__ import annotations

import types

import pytest
import torch

from icp import perf
from icp.models.backbone import tiny
from tests.perf_helpers import RES
from tests.perf_helpers import _threads  # noqa: F401 (autouse: one thread, the SDPA kernel reset)


def test_benchmark_rows_run_tiny_on_cpu(tmp_path):
    """eval/bench_train.py builds its task rows from model.perf (off / the config's defaults)."""
    import json

    from icp.bench import train as bench_train

    variant = "d_task_defaults@channels_last=1;batched_cfg=0"
    ema = "b_task_defaults@ema_decay=0.9;foreach_ema=1"  # a task key and a switch
    bench_train.main(["--tiny", "--out", str(tmp_path), "--only",
                      f"b_task_off,b_task_defaults,d_task_defaults,{variant},{ema}",
                      "--profile", f"b_task_defaults,{variant}"])
    data = json.loads((tmp_path / "bench_train.json").read_text())
    assert not data["errors"], data["errors"]
    rows = {r["name"]: r for r in data["rows"]}
    named = "d_task_defaults+channels_last=1;batched_cfg=0"
    ema_row = rows.pop("b_task_defaults+ema_decay=0.9;foreach_ema=1")
    assert ema_row["settings"]["perf"] == {**perf.DEFAULTS, "foreach_ema": True}
    assert ema_row["settings"]["ema_decay"] == 0.9 and rows["b_task_defaults"]["settings"]["ema_decay"] == 0.0
    assert set(rows) == {"b_task_off", "b_task_defaults", "d_task_defaults", named}
    assert rows["b_task_off"]["settings"]["perf"] == perf.OFF
    assert rows["b_task_defaults"]["settings"]["perf"] == perf.DEFAULTS  # what experiments/*/sd15.yaml give
    assert rows[named]["settings"]["perf"] == {**perf.DEFAULTS, "channels_last": True, "batched_cfg": False}
    assert rows[named]["vs"] == "d_plain_controlnet" and list(data["profiles"]) == ["b_task_defaults", named]
    # A training row is profiled in its own Lightning loop, after its timed steps.
    assert data["profiles"]["b_task_defaults"].startswith("(the Lightning training step")
    assert "Optimizer.step#AdamW.step" in data["profiles"]["b_task_defaults"]
    # Sampling rows go through prepare_inference and are compared with one reference (fp32 on CPU).
    assert rows["d_task_defaults"]["settings"]["applied"]["inference"]
    assert rows[named]["images_vs_ref"]["rel_l1"] < 1e-4
    assert all(r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 for r in rows.values())


def test_flop_count_above_the_cap_is_fitted_exactly():
    """Rows above batch 64 count FLOPs from two smaller batches (an eager step at batch 112 did not
    fit an H200 beside the counter): the fit equals a direct count of a warm step."""
    from icp.bench import common, tasks

    task = tasks.DenoiseTask(tiny(resolution=RES, width=32, seed=4), train_unet="full")
    task.backbone.codec = tasks.LatentCodec(task.backbone.latent_channels, task.backbone.downscale)
    batch = tasks.image_batch(6, task.backbone.latent_channels, (8, 8), torch.device("cpu"))
    calls = []

    def step_at(n):
        calls.append(n)
        return lambda: tasks.manual_step(task, tasks.batch_head(batch, n), torch.device("cpu"))

    fitted = common.count_flops_fitted(step_at, 6, cap=4)
    assert calls == [1, 2, 4]  # an uncounted warm call, then the two counted ones
    direct = common.count_flops(step_at(6))
    assert direct > 0 and fitted == pytest.approx(direct, rel=1e-9)
    assert common.count_flops_fitted(step_at, 4, cap=4) == common.count_flops(step_at(4))  # up to the cap: direct


def test_bench_costs_a_graph_neutral_variant_at_a_third_after_its_base(tmp_path):
    """The budget guard: a row that only adds graph-neutral keys (EMA, cuDNN search) to a row that
    already ran in the call reuses its compiled graphs, so it is costed at a third (two thirds
    after a row with inductor's CUDA graphs, whose code is dropped between rows); and a task key
    (ema_decay) reaches the task, not model.perf."""
    from icp.bench import common
    from icp.bench import train as bench_train

    args = bench_train.parse_args(["--cpu", "--out", str(tmp_path), "--budget", "100", "--plain-variants=",
                                   "--tag", "t", "--profile="])
    bench = bench_train.Bench(args)
    bench.defaults = perf.settings({"train": {}})  # no training override: variants say what trains
    whole = "compile_regional=0;compile=reduce-overhead"
    for base in ("compile_regional=0", whole):
        bench.results.append(common.Result(f"b_task_defaults_bs128+{base}", "b", 128, 1.0, 1.0, 0.0))
    ran, seen = [], {}

    def row():
        ran.append(bench.suffix)
        seen["perf"], seen["variant"] = bench.perf_node("defaults"), dict(bench.variant)

    bench.guarded("b_task_defaults_bs128@compile_regional=0;ema_decay=0.9999", row)  # 180 s / 3 fits 100 s
    bench.guarded(f"b_task_defaults_bs128@{whole};ema_decay=0.9999", row)  # CUDA graphs: 120 s
    bench.guarded("b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999", row)  # no base
    assert ran == ["+compile_regional=0;ema_decay=0.9999"]
    assert "~120 s" in bench.errors[f"b_task_defaults_bs128@{whole};ema_decay=0.9999"]
    assert "skipped" in bench.errors["b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999"]
    assert "ema_decay" not in seen["perf"] and seen["variant"]["ema_decay"] == "0.9999"
    assert seen["perf"]["compile"] == "default" and seen["perf"]["compile_regional"] is False
    assert bench.uses_cudagraphs(bench_train.parse_settings(whole.replace(";", ","))) and not bench.uses_cudagraphs()
    # With a train override in the defaults, a row's variant still decides what trains.
    bench.defaults = perf.settings({"train": {"compile": "reduce-overhead", "compile_regional": False}})
    bench.variant = {"compile_regional": True}
    row_perf = perf.training_settings(bench.perf_node("defaults"))
    assert row_perf["compile_regional"] is True and row_perf["compile"] == "reduce-overhead"
    bench.variant = {}


def test_the_default_plan_names_rows_switches_and_profiles_the_bench_knows(tmp_path):
    """A typo in the plan would cost a GPU call (its row fails there, after minutes of compile); here
    it fails on CPU: each row is a known row, each variant sets real switches or task keys with
    values model.perf accepts, and each profiled row is one the plan runs; every target has its
    rows; --tiny runs every row, --only all too."""
    from icp.bench import train as bench_train

    big = f"b_task_defaults_bs{bench_train.SIZES['full']['big_batch']}"
    ran = set()
    for row in bench_train.PLAN + bench_train.ALL_ROWS:
        base, _, spec = row.partition("@")
        assert base in bench_train.ROW_COST_S or bench_train.BATCH_ROW.fullmatch(base), row
        switches = bench_train.parse_settings(spec.replace(";", ","))
        perf.settings({k: v for k, v in switches.items() if k not in bench_train.TASK_KEYS}, where=row)
    for row in bench_train.PLAN:
        ran |= {row, big if row == "b_task_defaults_big" else row}
    profiled = set(filter(None, bench_train.PLAN_PROFILE.split(",")))
    assert profiled <= ran, profiled - ran
    for needed in ("peak", "a_plain", "b_task_off", "b_task_defaults_big", "c_stitching_defaults",
                   "c_adaptation_defaults", "d_plain_controlnet", "d_task_defaults", "e"):
        assert needed in bench_train.PLAN, needed
    assert set(bench_train.ALL_ROWS) == {r for rows in bench_train.SECTIONS.values() for r in rows}
    # b_task_defaults_big runs under its batch's name; the plan profiling it by either name gets it.
    bench = bench_train.Bench(bench_train.parse_args(["--cpu", "--out", str(tmp_path)]))
    assert bench.rows() == bench_train.PLAN
    assert bench.wants_profile(big)
    assert not bench.wants_profile("b_task_defaults")
    tiny = bench_train.Bench(bench_train.parse_args(["--tiny", "--out", str(tmp_path)]))
    assert tiny.rows() == bench_train.ALL_ROWS and not tiny.profile_rows
    only = bench_train.Bench(bench_train.parse_args(["--cpu", "--only", "all", "--out", str(tmp_path)]))
    assert only.rows() == bench_train.ALL_ROWS and not only.profile_rows


def test_bench_keeps_the_timed_steps_when_the_profiled_ones_fail(monkeypatch):
    from icp.bench import tasks

    task = tasks.DenoiseTask(tiny(resolution=RES, width=32, seed=4), train_unet="full")
    task.backbone.codec = tasks.LatentCodec(task.backbone.latent_channels, task.backbone.downscale)
    batch = tasks.image_batch(2, task.backbone.latent_channels, (8, 8), torch.device("cpu"))
    step = task.training_step

    def failing(batch, batch_idx):
        if batch_idx >= 3:  # warm-up 1 + 2 timed steps, then the profiled ones
            raise RuntimeError("profiler fault")
        return step(batch, batch_idx)

    monkeypatch.setattr(task, "training_step", failing)
    out = tasks.fit_and_time(task, batch, torch.device("cpu"), warmup=1, iters=2, precision="32-true",
                             profile_steps=2)
    assert out["iters"] == 2 and out["ms"] > 0
    assert out["profile"] == "profile failed: RuntimeError: profiler fault"
    with pytest.raises(RuntimeError, match="profiler fault"):  # a fault in the timed steps is not hidden
        tasks.fit_and_time(task, batch, torch.device("cpu"), warmup=4, iters=2, precision="32-true")


def test_profile_lists_data_movement_by_shape():
    """The bench's profile tells where copies come from by their shapes, most device time first."""
    import sys

    from icp.bench.report import copies_by_shape

    def evt(key, us, count, shapes):
        return types.SimpleNamespace(key=key, self_device_time_total=us, count=count, input_shapes=shapes)

    events = [evt("aten::copy_", 4000.0, 6, [[64, 640, 64, 64], [64, 640, 64, 64]]),
              evt("aten::mm", 9000.0, 10, [[8, 8], [8, 8]]),  # not data movement
              evt("aten::cat", 0.0, 2, [[1]]),  # no device time: left out
              evt("aten::upsample_nearest2d", 6000.0, 2, [[64, 1280, 16, 16]])]
    prof = types.SimpleNamespace(key_averages=lambda group_by_input_shape=False: events)
    lines = copies_by_shape(prof, steps=2).strip().splitlines()
    assert lines[0].startswith("Data movement per call")
    assert "upsample_nearest2d" in lines[1] and "3.00 ms" in lines[1] and "[64, 1280, 16, 16]" in lines[1]
    assert "aten::copy_" in lines[2] and "2.00 ms" in lines[2] and "3.0x" in lines[2]
    assert len(lines) == 3 and sys.modules["icp.bench.report"].COPY_OPS
    assert copies_by_shape(types.SimpleNamespace(key_averages=lambda **_: []), steps=1) == ""


def test_a_missed_target_says_where_time_went_and_what_was_tried():
    from icp.bench.report import targets

    def row(name, ratio, mfu):
        return {"name": name, "vs_baseline": ratio, "mfu": mfu, "samples_per_s": ratio * 100}

    table = [row("a_plain", float("nan"), 0.30), row("b_task_defaults_bs64", 1.39, 0.42),
             row("b_task_defaults_bs64+compile_regional=0", 1.41, 0.43), row("c_stitching_defaults", 1.7, 0.404)]
    bench = types.SimpleNamespace(profiles={"b_task_defaults_bs64": "..."}, loader={})
    lines = targets(bench, table)
    assert lines[0].startswith("- MISS (b)") and "compile_regional=0 1.41x" in lines[0]
    assert lines[1] == "  - where the time goes: 'Profile: b_task_defaults_bs64' below"
    assert lines[2] == "  - also tried in this run: b_task_defaults_bs64 1.39x"
    assert "docs/history/performance.md" in lines[3]
    assert lines[4].startswith("- PASS (c) c_stitching_defaults") and len(lines) == 5  # a pass adds nothing


def test_kernel_busy_time_leaves_out_annotated_ranges():
    from torch.autograd import DeviceType

    from icp.bench.report import kernel_time_us

    def evt(us, device=DeviceType.CUDA, annotation=False):
        span = types.SimpleNamespace(elapsed_us=lambda: us)
        return types.SimpleNamespace(device_type=device, is_user_annotation=annotation, time_range=span)

    # A compiled graph's annotated span over its two kernels, and a host-side op.
    events = [evt(100.0, annotation=True), evt(60.0), evt(40.0), evt(500.0, device=DeviceType.CPU)]
    assert kernel_time_us(events) == 100.0
