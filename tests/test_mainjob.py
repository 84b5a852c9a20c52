"""The main job end to end (issue: `icp run experiments/quickstart.yaml`, shortened for CI)."""

import json

import pytest

from icp import cli


@pytest.mark.slow
def test_quickstart_shortened_runs_end_to_end_and_caches(repo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["run", str(repo_root / "tests/configs/quickstart_ci.yaml"), f"run.root={tmp_path}/runs",
            f"data.out={tmp_path}/shards"]
    assert cli.main(args) == 0
    run_dir = tmp_path / "runs/quickstart/main"
    for name in ("report.html", "report.md", "stages.json", "evaluate/metrics.json", "evaluate/grid.png",
                 "evaluate/flows.png", "evaluate/relight.png", "evaluate/loss_curves.png", "evaluate/eval_curves.png",
                 "evaluate/pairs.png"):
        assert (run_dir / name).is_file(), name
    result = json.loads((run_dir / "evaluate/metrics.json").read_text())
    by_name = {row["name"]: row for row in result["rows"]}
    assert {"id_cos_icp", "psnr", "flow_epe", "flow_epe_zero", "landmark_err", "yaw_err", "silhouette_iou"} <= set(by_name)
    # every metric beside its trivial baselines (that the other identity is never the same person is
    # tests/test_paired.py's property test)
    assert set(result["arms"]) >= {"method", "other_identity", "copy_profile", "mirror_profile", "inpaint", "truth"}
    assert by_name["id_cos_icp"]["extractor"].startswith("icp-synthetic-embedder")
    assert "baseline" in result["summary"]
    html = (run_dir / "report.html").read_text()
    assert "id_cos_icp" in html and "evaluate/grid.png" in html
    # One metrics.json schema (issue 28): `icp eval` of the root (held-out set and embedder from the
    # run) writes what the evaluate stage wrote, and the leaderboard takes the root.
    assert result["schema"] == "icp-metrics/2" and result["source"] == "icp run"
    assert cli.main(["eval", str(run_dir), "pairs.num_samples=4", "generation.num_steps=1", "metrics.identity=[icp]",
                     "metrics.fid=false", "--device", "cpu"]) == 0
    record = json.loads((run_dir / "eval/metrics.json").read_text())
    assert set(result) - {"relighting", "flows", "notes", "reliability", "key"} == set(record)
    assert record["extractors"]["identity_icp"]["sha256"] == result["extractors"]["identity_icp"]["sha256"]
    assert record["checkpoint_sha256"] == result["checkpoint_sha256"]
    assert cli.main(["leaderboard", str(run_dir), "--out", str(tmp_path / "lb")]) == 0
    assert cli.main(["leaderboard", str(run_dir / "evaluate/metrics.json"), "--out", str(tmp_path / "lb2")]) == 0
    # The README's next steps on the root: generate on the example inputs the job writes, export.
    ex = run_dir / "evaluate/examples"
    assert cli.main(["generate", "--profile", str(ex / "profile.png"), "--target", str(ex / "target.png"),
                     "--checkpoint", str(run_dir), "--out", str(tmp_path / "out.png"), "--steps", "2",
                     "--device", "cpu"]) == 0
    assert (tmp_path / "out.png").is_file() and (tmp_path / "out.strip.png").is_file()
    assert cli.main(["export", str(run_dir), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported/model_index.json").is_file()
    # Re-running the same command skips every stage; changing one stage re-runs it and those after it.
    capsys.readouterr()
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 7
    assert cli.main(args + ["evaluate.steps=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 5 and "evaluate: done" in out and "report: done" in out
