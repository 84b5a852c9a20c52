"""W&B for the main job's evaluate and report steps (issue 28): headline metrics with intervals in
the summary, the per-pair scores as a table, the report's pictures as images (by pixels), all in
the run's group, read back from the `.wandb` log that `wandb sync` uploads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icp.core import config as cfglib
from icp.data import keys as K
from icp.eval import baselines as B
from icp.eval.evaluator import build_extractors
from icp.eval.grids import save_grid
from icp.eval.heldout import heldout_loader, take
from icp.eval.paired import evaluate_pairs
from icp.jobs import run as mainjob
from icp.jobs import wandb_log
from icp.eval.record import build_record
from icp.jobs.evaluate import notes, protocol_of, summary
from tests.wandb_records import complete_records, history, run_record
from tests.wandb_records import summary as run_summary

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 8


def noisy(batch, num_steps=20, guidance_scale=None, generator=None):
    """Generation stand-in (the evaluation around it is real): the true target plus seeded noise."""
    noise = torch.randn(batch[K.TARGET].shape, generator=generator, device=generator.device)
    return (batch[K.TARGET] + 0.2 * noise).clamp(-1, 1)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """What icp.jobs.evaluate returns (its record of a real paired evaluation) and grid.png."""
    from tests.tiny_eval import heldout_and_embedder

    root = tmp_path_factory.mktemp("heldout")
    heldout_and_embedder(root, 4, seed=3, first_identity=50, folder="shards")
    extractors = build_extractors(identity=["icp"], embedder=str(root / "embedder.pt"), fid=False)
    loader = heldout_loader(str(root / "shards"), mask_ratio=0.5, patch_size=8, pairs_per_identity=2, batch_size=4)
    result = evaluate_pairs(noisy, take(loader, PAIRS), extractors, "cpu", num_steps=1, grid_samples=2,
                            baselines=B.resolve(["other_identity", "copy_profile"]))
    relight = {arm: {"follow_shading": 0.01, "follow_colour": 0.02} for arm in ("method", "inpaint")}
    save_grid(root / "grid.png", result.grid_columns, row_labels=[f"id {i}" for i in result.grid_identities])
    cfg = cfglib.load(ROOT / "tests/configs/quickstart_ci.yaml")
    record = build_record(result, extractors, source="icp run", run=root, checkpoint=root / "last.ckpt",
                          checkpoint_sha256="0" * 64, task="Noisy", protocol=protocol_of(cfg), shards=root / "shards",
                          resolution=32, config_hash="0" * 10, flows={},
                          extra={"summary": summary(result, {}, relight), "relighting": relight, "flows": {},
                                 "notes": notes(relight), "reliability": {}})
    return json.loads(json.dumps(record, default=float)), root / "grid.png"


def offline_runs(run_dir: Path) -> dict[str, list]:
    """job type -> the records of its offline run folder under ``run_dir/wandb``."""
    out = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        recs = complete_records(folder)
        out[run_record(recs).job_type] = (folder, recs)
    return out


def test_evaluate_and_report_land_in_the_runs_group(evaluation, tmp_path, monkeypatch, one_thread):
    found, grid = evaluation
    cfg = cfglib.load(ROOT / "tests/configs/quickstart_ci.yaml", [f"run.root={tmp_path}/runs"])
    jobs = mainjob.plan(cfg)
    run_dir = tmp_path / "runs/quickstart/main"
    run_dir.mkdir(parents=True)

    def evaluate(cfg, run_dir, jobs, device):  # the paired evaluation above, as the step writes it
        (run_dir / "evaluate").mkdir(parents=True, exist_ok=True)
        (run_dir / "evaluate/grid.png").write_bytes(grid.read_bytes())
        return found

    monkeypatch.setattr("icp.jobs.evaluate.evaluate", evaluate)
    mainjob.execute(cfg, run_dir, jobs, jobs["evaluate"])
    mainjob.execute(cfg, run_dir, jobs, jobs["report"])
    runs = offline_runs(run_dir)
    assert set(runs) == {"evaluate", "report"}
    for folder, recs in runs.values():
        assert (run_record(recs).run_group, run_record(recs).project) == ("quickstart/main", "icp")

    # evaluate: the headline metrics with their intervals, baselines and paired differences
    folder, recs = runs["evaluate"]
    got = run_summary(recs)
    assert got["eval/psnr"] == pytest.approx(found["metrics"]["psnr"])
    assert (got["eval/id_cos_icp/lo"], got["eval/id_cos_icp/hi"]) == pytest.approx(
        (found["intervals"]["id_cos_icp"]["lo"], found["intervals"]["id_cos_icp"]["hi"]))
    assert got["eval/id_cos_icp/lo"] < got["eval/id_cos_icp"] < got["eval/id_cos_icp/hi"]
    assert got["eval/psnr@other_identity"] == pytest.approx(found["baselines"]["other_identity"]["psnr"])
    versus = found["comparisons"]["other_identity"]["id_cos_icp"]
    assert got["eval/id_cos_icp-other_identity"] == pytest.approx(versus["mean"])
    assert got["eval/id_cos_icp-other_identity/verdict"] == versus["verdict"]
    assert got["eval/summary"] == found["summary"]

    # ... and one table row per pair: identity, pair index, every per-pair metric and baseline
    [logged] = [row["eval/pairs"] for row in history(recs) if "eval/pairs" in row]
    table = json.loads((folder / "files" / logged["path"]).read_text())
    cols = table["columns"]
    assert len(table["data"]) == PAIRS == len(found["per_pair"]["method"])
    assert cols[:2] == ["identity", "pair"] and {"psnr", "id_cos_icp", "psnr@copy_profile", "id_cos_icp@other_identity"} <= set(cols)
    for i, cells in enumerate(table["data"]):
        cell = dict(zip(cols, cells))
        method, other = found["per_pair"]["method"][i], found["per_pair"]["other_identity"][i]
        assert (cell["identity"], cell["pair"]) == (method["identity"], i)
        assert cell["psnr"] == pytest.approx(method["psnr"]) and cell["psnr@other_identity"] == pytest.approx(other["psnr"])

    # report: every picture the report shows, as the file's pixels (uint8, not a black image)
    folder, recs = runs["report"]
    [images] = [row for row in history(recs) if "report/grid" in row]
    shown = {p.stem for p in (run_dir / "evaluate").glob("*.png")}
    assert {"grid", "pairs"} <= shown and {f"report/{s}" for s in shown} <= set(images)
    for stem in shown:
        logged = np.asarray(Image.open(folder / "files" / images[f"report/{stem}"]["path"]).convert("RGB"))
        source = np.asarray(Image.open(run_dir / "evaluate" / f"{stem}.png").convert("RGB"))
        assert np.array_equal(logged, source), stem
    assert logged.std() > 10


def test_nothing_is_logged_when_wandb_is_off(evaluation, tmp_path, monkeypatch):
    found, _ = evaluation
    cfg = cfglib.load(ROOT / "tests/configs/quickstart_ci.yaml", [f"run.root={tmp_path}/runs", "wandb=disabled"])
    jobs = mainjob.plan(cfg)
    run_dir = tmp_path / "runs/quickstart/main"
    monkeypatch.setattr("icp.jobs.evaluate.evaluate", lambda cfg, run_dir, jobs, device: found)
    mainjob.execute(cfg, run_dir, jobs, jobs["evaluate"])
    mainjob.execute(cfg, run_dir, jobs, jobs["report"])
    assert (run_dir / "report.html").is_file() and not (run_dir / "wandb").exists()
    assert mainjob.wandb_settings(cfg, jobs) is None


def test_interval_read_from_the_record_or_an_older_records_text():
    assert wandb_log._interval({"name": "m"}, {"m": {"mean": 0.4, "lo": 0.3, "hi": 0.5}}) == (0.3, 0.5)
    assert wandb_log._interval({"name": "m", "interval": "0.412 [0.380, 0.441] (n=64, 16 ids)"}, {}) == (0.380, 0.441)
    assert wandb_log._interval({"name": "m", "interval": "n/a (no valid sample)"}, {}) is None
