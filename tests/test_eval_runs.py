"""`icp eval RUN` and `icp leaderboard RUN` on the main job's root (issue 28): the held-out shards,
embedder and resolution come from the run, the work shows a progress bar with an ETA, and the
record has the one metrics.json schema the leaderboard reads from a run directory of any kind."""

import json

import lightning as L
import pytest
import torch
import yaml

from icp.cli import main
from icp.eval.record import SCHEMA
from icp.models.embedder import IdentityEmbedderNet, export
from tests.test_leaderboard import NoisyTask

REL = "runs/quickstart/main"
QUICK = ["pairs.num_samples=4", "pairs.mask_ratio=0.5", "generation.num_steps=1", "generation.batch_size=2",
         "metrics.identity=[icp]", "metrics.fid=false"]


def _stage(main, stage, name, cfg):
    run = main / "stages" / stage / name
    (run / "checkpoints").mkdir(parents=True)
    # as runner.fit_config writes it: run.root relative to the folder `icp run` ran in
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": stage, "run": {"root": f"{REL}/stages"}, **cfg}))
    return run


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The main job's root as `icp run` leaves it (paths in its files relative to the folder it ran
    in), with a stand-in model whose samples are the true target plus noise."""
    from icp.data.shards.write import synth

    base = tmp_path_factory.mktemp("job")
    synth(base / "data_shards/qs/heldout", 4, 2, 32, seed=5, shard_size=2, first_identity=900, progress=False)
    main_dir = base / REL
    main_dir.mkdir(parents=True)
    (main_dir / "config.yaml").write_text(yaml.safe_dump(
        {"experiment": "quickstart", "run": {"root": "runs", "name": "main"}, "data": {"out": "data_shards/qs", "resolution": 32}}))
    emb = _stage(main_dir, "embedder", "cfg-e1", {})
    torch.manual_seed(0)
    export(IdentityEmbedderNet(dim=8, width=4, depth=2, input_size=16).eval(), emb / "embedder.pt")
    adapt = _stage(main_dir, "adaptation", "cfg-a1", {
        "security": {"allowed_targets": ["tests"]}, "data": {"resolution": 32, "val_shards": "data_shards/qs/heldout"},
        "model": {"_target_": "tests.test_leaderboard.NoisyTask", "sigma": 0.05}})
    torch.save({"state_dict": NoisyTask(0.05).state_dict(), "global_step": 6}, adapt / "checkpoints" / "last.ckpt")
    (main_dir / "stages.json").write_text(json.dumps(
        {s: {"result": {"run_dir": f"{REL}/stages/{s}/{n}"}} for s, n in (("embedder", "cfg-e1"), ("adaptation", "cfg-a1"))}))
    (main_dir / "stages" / "data.json").write_text(json.dumps({"heldout": "data_shards/qs/heldout", "key": "k"}))
    return base


def test_eval_main_root_takes_its_protocol_defaults_from_the_run(job, repo_root, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(job)
    # overrides before and after options (issue 28: any order)
    assert main(["eval", REL, *QUICK[:3], "--device", "cpu", *QUICK[3:]]) == 0
    out, err = capsys.readouterr()
    assert "held-out shards" in out and "identity embedder" in out and "from the run" in out
    assert "icp eval" in err and "batch" in err and "<" in err  # tqdm's bar: elapsed<remaining
    assert "8 images generated" in err  # method and other-identity arm of 4 pairs: life within a batch too
    record = json.loads((job / REL / "eval" / "metrics.json").read_text())
    assert record["schema"] == SCHEMA and record["source"] == "icp eval" and record["run"] == REL
    assert (job / record["dataset"]["shards"]).resolve() == (job / "data_shards/qs/heldout").resolve()
    assert record["extractors"]["identity_icp"]["file"].endswith("stages/embedder/cfg-e1/embedder.pt")
    assert record["checkpoint"].endswith("stages/adaptation/cfg-a1/checkpoints/last.ckpt")
    assert record["protocol"]["resolution"] == 32 and "id_cos_icp" in record["metrics"]
    assert {r["name"] for r in record["rows"]} >= {"psnr", "id_cos_icp"} and record["summary"].startswith("Identity")
    # the leaderboard takes the root itself, from here and from another folder (the record's
    # relative paths are found from where the record sits)
    assert main(["leaderboard", REL, "--out", str(tmp_path / "lb")]) == 0
    assert "| 1 | main |" in (tmp_path / "lb" / "leaderboard.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard", str(job / REL), "--out", str(tmp_path / "lb2")]) == 0


def test_a_given_value_wins_over_the_run(job, monkeypatch, tmp_path):
    monkeypatch.chdir(job)
    other = tmp_path / "held"
    from icp.data.shards.write import synth

    synth(other, 2, 2, 32, seed=9, shard_size=2, first_identity=800, progress=False)
    out = tmp_path / "m.json"
    assert main(["eval", f"{REL}/stages/adaptation/cfg-a1/checkpoints/last.ckpt", *QUICK, f"dataset.shards={other}",
                 "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads(out.read_text())
    assert record["dataset"]["shards"] == str(other) and record["samples"] == 4


def test_leaderboard_says_what_a_run_lacks(job, tmp_path, capsys):
    bare = tmp_path / "runs" / "x" / "cfg-1"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "config.yaml").write_text("experiment: x\n")
    assert main(["leaderboard", str(bare), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("icp: error:") and f"icp eval {bare}" in err
    # the main job's record before the one schema (its metrics were a list of rows): named, one line
    old = tmp_path / "old" / "evaluate"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text(json.dumps({"summary": "s", "metrics": [{"name": "psnr", "value": 1.0}]}))
    assert main(["leaderboard", str(old / "metrics.json"), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err
    assert SCHEMA in err and "--only evaluate report" in err


def test_a_sweep_is_evaluated_and_ranked_as_one_table(job, monkeypatch, tmp_path, capsys):
    """`icp eval SWEEP` evaluates every point; `icp leaderboard SWEEP` is one table, a row per point
    labelled by its axis values (the manifest written by icp.core.sweep, as `icp fit -m` writes it)."""
    from icp.core import sweep as sweeplib
    from tests.test_leaderboard import _run

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "toy"
    dirs = [_run(runs, f"cfg-{i}", sigma) for i, sigma in enumerate((0.4, 0.05))]
    plan = sweeplib.Plan(sweep=sweeplib.parse("toy.yaml", ["model.sigma=0.4,0.05"]), configs=[],
                         run_dirs=[d.relative_to(tmp_path) for d in dirs])
    manifest = sweeplib.write_manifest(plan)
    sweep = str(manifest.parent)
    assert main(["leaderboard", sweep, "--out", "lb"]) == 2
    assert "2 of 2 points" in capsys.readouterr().err
    held = job / "data_shards/qs/heldout"
    embedder = job / REL / "stages/embedder/cfg-e1/embedder.pt"
    assert main(["eval", sweep, *QUICK, f"dataset.shards={held}", f"metrics.embedder={embedder}", "--device", "cpu"]) == 0
    assert "sweep point 2/2: model.sigma=0.05" in capsys.readouterr().out
    assert main(["leaderboard", sweep, "--out", "lb", "--sort", "psnr"]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert md.index("| 1 | model.sigma=0.05 |") < md.index("| 2 | model.sigma=0.4 |")
    from icp.core.errors import ConfigError
    from icp.core.runs import resolve

    with pytest.raises(ConfigError, match="a sweep of 2 runs"):
        resolve(manifest)


class NoSampler(L.LightningModule):
    """A run whose model generates nothing (like the embedder or probe stage)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_a_run_that_generates_nothing_is_one_line(job, tmp_path, capsys):
    run = tmp_path / "runs" / "embedder" / "cfg-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": "embedder", "security": {"allowed_targets": ["tests"]},
                                                     "data": {"resolution": 32, "val_shards": str(job / "data_shards/qs/heldout")},
                                                     "model": {"_target_": "tests.test_eval_runs.NoSampler"}}))
    torch.save({"state_dict": NoSampler().state_dict(), "global_step": 1}, run / "checkpoints" / "last.ckpt")
    assert main(["eval", str(run), *QUICK, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("icp: error:") and "NoSampler run, which generates no portraits" in err


def test_leaderboard_directions_follow_the_evaluator():
    """Errors (yaw, landmarks, flow EPE) rank lower-is-better, like in every report."""
    from icp.eval.evaluator import LOWER_IS_BETTER
    from icp.eval.leaderboard import higher_is_better

    assert not any(higher_is_better(m) for m in ("yaw_err", "landmark_err", "flow_epe", "fid", "face_fail_dlib"))
    assert all(higher_is_better(m) for m in ("id_cos_icp", "psnr", "ssim", "silhouette_iou", "flow_pck"))
    assert all(not higher_is_better(m) for m in LOWER_IS_BETTER)
