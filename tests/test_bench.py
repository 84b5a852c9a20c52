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
    ema = "b_task_defaults@ema_decay=0.9;sdpa=math"  # a task key and a switch
    bench_train.main(["--tiny", "--out", str(tmp_path), "--only",
                      f"b_task_off,b_task_defaults,d_task_defaults,{variant},{ema}",
                      "--profile", f"b_task_defaults,{variant}"])
    data = json.loads((tmp_path / "bench_train.json").read_text())
    assert not data["errors"], data["errors"]
    rows = {r["name"]: r for r in data["rows"]}
    named = "d_task_defaults+channels_last=1;batched_cfg=0"
    ema_row = rows.pop("b_task_defaults+ema_decay=0.9;sdpa=math")
    assert ema_row["settings"]["perf"] == {**perf.DEFAULTS, "sdpa": "math"}
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

    args = bench_train.parse_args(["--cpu", "--out", str(tmp_path), "--budget", "100",
                                   "--tag", "t", "--profile="])
    bench = bench_train.Bench(args)
    bench.defaults = perf.settings()
    whole = "compile_regional=0;compile=reduce-overhead"
    for base in ("compile_regional=0", whole):
        bench.results.append(common.Result(f"b_task_defaults_bs128+{base}", "b", 128, 1.0, 1.0, 0.0))
    ran, seen = [], {}

    def row():
        ran.append(bench.suffix)
        seen["perf"], seen["variant"] = bench.perf_node("defaults"), dict(bench.variant)

    bench.guarded("b_task_defaults_bs128@compile_regional=0;ema_decay=0.9999", row)  # 150 s / 3 fits 100 s
    bench.guarded(f"b_task_defaults_bs128@{whole};ema_decay=0.9999", row)  # CUDA graphs: 100 s
    bench.guarded("b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999", row)  # no base
    assert ran == ["+compile_regional=0;ema_decay=0.9999"]
    assert "~100 s" in bench.errors[f"b_task_defaults_bs128@{whole};ema_decay=0.9999"]
    assert "skipped" in bench.errors["b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999"]
    assert "ema_decay" not in seen["perf"] and seen["variant"]["ema_decay"] == "0.9999"
    assert seen["perf"]["compile"] == "default" and seen["perf"]["compile_regional"] is False
    assert bench.uses_cudagraphs(bench_train.parse_settings(whole.replace(";", ","))) and not bench.uses_cudagraphs()


def test_the_default_plan_names_rows_switches_and_profiles_the_bench_knows(tmp_path):
    """A typo in a plan would cost a GPU call (its row fails there, after minutes of compile); here
    it fails on CPU: each row is a known row, each variant sets real switches or task keys with
    values model.perf accepts, and each profiled row is one a plan runs; every target has its
    rows (issue 29's ratios in the default plan, with both compiled peers); --tiny runs every row,
    --only all too."""
    from icp.bench import train as bench_train

    big = f"b_task_defaults_bs{bench_train.SIZES['full']['big_batch']}"
    ran = set()
    plans = [row for plan in bench_train.PLANS.values() for row in plan]
    for row in plans + bench_train.ALL_ROWS:
        base, _, spec = row.partition("@")
        assert bench_train.known_row(base), row
        switches = bench_train.parse_settings(spec.replace(";", ","))
        perf.settings({k: v for k, v in switches.items() if k not in bench_train.TASK_KEYS}, where=row)
    for row in plans:
        ran |= {row, big if row == "b_task_defaults_big" else row}
    profiled = set(filter(None, bench_train.PLAN_PROFILE.split(",")))
    assert profiled <= ran, profiled - ran
    for needed in ("peak", "a_peer_default_bs64", "a_peer_ro_bs48", "b_task_defaults_big"):
        assert needed in bench_train.PLAN, needed
    for needed in ("peak", "d_peer_default", "d_peer_ro", "d_task_defaults"):
        assert needed in bench_train.PLANS["peer_sample"], needed
    for needed in ("peak", "c_stitching_defaults", "c_adaptation_defaults"):
        assert needed in bench_train.PLANS["steps"], needed
    assert not [r for r in bench_train.ALL_ROWS if r.startswith("a_compile")]  # superseded by the peers
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


def _row(name, samples_per_s, mfu=0.4, gib=40.0, batch=32):
    return {"name": name, "samples_per_s": samples_per_s, "mfu": mfu, "peak_gib": gib, "batch": batch,
            "vs_baseline": float("nan")}


def test_targets_are_read_against_the_best_compiled_peer_under_the_memory_limit():
    """Issue 29: icp's training and sampling rows against the fastest peer row of the run (any mode,
    any batch that fits 80 GB), never the eager loop; a peer above the memory limit does not count."""
    from icp.bench.report import targets

    rules = {"training": {"vs_best_peer": 1.3, "mfu": 0.5, "max_peak_gib": 80}, "steps": {"mfu": 0.45},
             "sampling": {"vs_best_peer": 1.5}, "framework": {"within": 0.03}}
    bench = types.SimpleNamespace(profiles={}, loader={})
    peers = [_row("a_plain", 89.3, 0.28), _row("a_peer_default_bs32", 120.9), _row("a_peer_default_bs64", 133.4, batch=64),
             _row("a_peer_ro_bs48", 131.3, batch=48), _row("a_peer_ro_bs64", 150.0, gib=85.0, batch=64),
             _row("d_plain_controlnet", 2.27), _row("d_peer_default", 3.69, batch=8)]
    icp = [_row("b_task_defaults_bs72", 135.86, 0.429, 67.1, 72), _row("d_task_defaults", 4.76, batch=8),
           _row("d_task_off", 9.0, batch=8)]  # "off" is no candidate for the sampling target
    lines = targets(bench, peers + icp, rules)
    assert lines[0].startswith("- MISS training >= 1.30x the best compiled peer, >= 50% MFU: b_task_defaults_bs72 "
                               "(batch 72) 1.02x a_peer_default_bs64 (batch 64), MFU 42.9%")
    sampling = next(line for line in lines if "sampling" in line)
    assert sampling.startswith("- MISS sampling >= 1.50x the best compiled peer: d_task_defaults (batch 8) 1.29x "
                               "d_peer_default")
    fast = [_row("b_task_defaults_bs72", 180.0, 0.55, 67.1, 72), _row("d_task_defaults", 6.0, batch=8)]
    lines = targets(bench, peers + fast, rules)
    assert lines[0].startswith("- PASS training") and "1.35x a_peer_default_bs64" in lines[0]
    assert any(line.startswith("- PASS sampling") and "1.63x" in line for line in lines)
    # Without a compiled peer in the run there is no verdict, rather than one against the eager loop.
    lines = targets(bench, [_row("a_plain", 89.3)] + fast, rules)
    assert lines[0] == "- n/a training: no compiled peer row (a_peer_*) ran in this run"


def test_each_row_is_compared_with_the_best_peer_of_its_kind():
    """The table's "vs" column: icp's training rows vs the best a_peer row, sampling vs the best
    d_peer row, each peer vs the eager loop it compiles; the rows of a run without peers as before."""
    from icp.bench.common import Result
    from icp.bench.report import rows

    def result(name, ms, batch=32):
        return Result(name, name[0], batch, ms, 1e12, 40.0)

    bench = types.SimpleNamespace(peak=800.0, results=[
        result("a_plain", 360.0), result("a_peer_default_bs32", 265.0), result("a_peer_ro_bs48", 366.0, 48),
        result("b_task_off", 361.0), result("b_task_defaults_bs72", 530.0, 72), result("d_plain_controlnet", 3500.0, 8),
        result("d_peer_default", 2170.0, 8), result("d_task_defaults", 1680.0, 8), result("c_stitching_defaults", 673.0)])
    table = {r["name"]: r for r in rows(bench)}
    assert table["a_peer_ro_bs48"]["vs"] == "a_plain" and table["d_peer_default"]["vs"] == "d_plain_controlnet"
    assert table["b_task_defaults_bs72"]["vs"] == "a_peer_ro_bs48"  # 131.1 vs 120.8 samples/s
    assert table["b_task_off"]["vs"] == "a_plain"  # the framework's own cost, against the eager loop
    assert table["b_task_defaults_bs72"]["vs_baseline"] == pytest.approx((72 / 0.530) / (48 / 0.366))
    assert table["d_task_defaults"]["vs"] == "d_peer_default"
    assert table["c_stitching_defaults"]["vs"] == "c_stitching_off"
    bench.results = [r for r in bench.results if "peer" not in r.name]
    table = {r["name"]: r for r in rows(bench)}
    assert table["b_task_defaults_bs72"]["vs"] == "a_plain" and table["d_task_defaults"]["vs"] == "d_plain_controlnet"


def test_a_missed_target_says_where_time_went_and_what_was_tried():
    from icp.bench.report import targets

    table = [_row("a_peer_default_bs64", 133.4, 0.42), _row("b_task_defaults_bs64", 136.0, 0.427),
             _row("b_task_defaults_bs64+compile_regional=0", 135.0, 0.43), _row("c_stitching_defaults", 47.6, 0.414)]
    table[2]["vs_baseline"] = 135.0 / 133.4
    bench = types.SimpleNamespace(profiles={"b_task_defaults_bs64": "..."}, loader={})
    lines = targets(bench, table)
    assert lines[0].startswith("- MISS training") and "b_task_defaults_bs64 (batch 32) 1.02x" in lines[0]
    assert lines[1] == "  - where the time goes: 'Profile: b_task_defaults_bs64' below"
    assert lines[2] == "  - also tried in this run: b_task_defaults_bs64+compile_regional=0 1.01x"
    assert "docs/history/performance.md" in lines[3]
    assert lines[4].startswith("- MISS steps: c_stitching_defaults >= 45% MFU: MFU 41.4%")


def test_the_peer_rows_run_tiny_on_cpu(tmp_path):
    """The compiled peer's rows through dynamo (on CPU its eager backend: the same tracing, fullgraph
    for the sampling nets, no C++ build), FLOPs counted, read against the eager loops, and a results
    file that names its machine and lists the peer rows."""
    import json

    import torch._dynamo as dynamo

    from icp.bench import train as bench_train

    dynamo.reset()
    dynamo.utils.counters.clear()
    bench_train.main(["--tiny", "--out", str(tmp_path), "--only", "a_peer_default_bs2,d_peer_ro,a_plain"])
    data = json.loads((tmp_path / "bench_train.json").read_text())
    assert not data["errors"], data["errors"]
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"a_peer_default_bs2", "d_peer_ro", "a_plain"}
    assert rows["a_peer_default_bs2"]["settings"]["compile"] == "default" and rows["a_peer_default_bs2"]["batch"] == 2
    assert rows["d_peer_ro"]["settings"]["compile"] == "reduce-overhead"
    assert rows["a_peer_default_bs2"]["vs"] == "a_plain" and rows["a_peer_default_bs2"]["vs_baseline"] > 0
    # The same FLOPs per sample as the eager loop: counted on small batches and scaled.
    assert rows["a_peer_default_bs2"]["gflop_per_sample"] == pytest.approx(rows["a_plain"]["gflop_per_sample"])
    assert all(r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 for r in rows.values())
    assert dynamo.utils.counters["frames"]["ok"] > 0 and not dynamo.utils.counters["graph_break"]
    md = (tmp_path / "bench_train.md").read_text()
    assert "Machine: no GPU" in md and "## Against the compiled peer" in md
    assert "| Training | a_peer_default_bs2 | 2 |" in md and "| Sampling | d_peer_ro | 2 |" in md
    dynamo.reset()


def test_the_plain_step_flops_scale_from_small_batches():
    """The peer's FLOPs at batch 64 are counted on small batches (an eager step at 64 ran out of
    memory on the H100): the fitted count equals a direct count of the plain step."""
    from icp.bench import common, plain

    parts = tiny(resolution=RES, width=32, seed=4)
    step_at = lambda n: plain.PlainTrainStep(parts, n, (8, 8), torch.device("cpu"))  # noqa: E731
    fitted = common.count_flops_fitted(step_at, 6, cap=2)
    direct = common.count_flops(step_at(6))
    assert direct > 0 and fitted == pytest.approx(direct, rel=1e-9)
    assert common.count_flops(step_at(3)) != pytest.approx(direct)  # not vacuous: FLOPs grow with the batch
