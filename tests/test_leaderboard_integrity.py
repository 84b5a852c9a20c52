"""Leaderboard entries are tied to the bytes they were measured on: the evaluated checkpoint and the
data-set manifest (sha256 in metrics.json); an entry whose files changed, or that lacks the hashes,
is refused. A checkpoint that needs unpickling is refused by `icp eval` unless trusted."""

import json

import pytest
import torch

from icp.cli import main
from icp.eval.leaderboard import LeaderboardError, build
from icp.eval.record import sha256_of
from tests.test_leaderboard import NoisyTask, _run


class Pickled:
    """Not a tensor or container: a weights_only load must refuse it."""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from tests.tiny_eval import heldout_and_embedder

    root = tmp_path_factory.mktemp("lbi")
    heldout_and_embedder(root, 2, seed=5, first_identity=900)
    run = _run(root, "entry", 0.1)
    return root, run


def _eval(repo_root, root, run, *extra):
    args = ["eval", str(run), f"dataset.shards={root / 'heldout'}", "pairs.num_samples=2", "pairs.mask_ratio=0.5",
            "generation.num_steps=1", "generation.batch_size=2", "metrics.identity=[icp]", "metrics.fid=false",
            f"metrics.embedder={root / 'embedder.pt'}", "--protocol", str(repo_root / "eval" / "protocol.yaml"),
            "--device", "cpu", *extra]
    return main(args)


def test_record_holds_checkpoint_and_manifest_sha256_and_leaderboard_rechecks_them(measured, repo_root, tmp_path):
    root, run = measured
    assert _eval(repo_root, root, run) == 0
    record = json.loads((run / "eval" / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    assert record["checkpoint_sha256"] == sha256_of(ckpt)
    assert record["dataset"]["manifest_sha256"] == sha256_of(root / "heldout" / "manifest.json")
    build([str(run)], tmp_path / "ok")  # untouched files: accepted

    # The weights file is swapped after evaluation: refused, naming what changed.
    original = ckpt.read_bytes()
    torch.save({"state_dict": NoisyTask(0.9).state_dict(), "global_step": 1}, ckpt)
    with pytest.raises(LeaderboardError, match="evaluated checkpoint .* changed since evaluation"):
        build([str(run)], tmp_path / "lb1")
    ckpt.write_bytes(original)
    build([str(run)], tmp_path / "ok2")

    # A manifest edited after evaluation (e.g. shards swapped and re-listed): refused.
    copy_dir = tmp_path / "heldout_copy"
    copy_dir.mkdir()
    (copy_dir / "manifest.json").write_text((root / "heldout" / "manifest.json").read_text())
    edited = dict(record, dataset=dict(record["dataset"], manifest=str(copy_dir / "manifest.json")))
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    build([str(path)], tmp_path / "ok3")
    (copy_dir / "manifest.json").write_text((root / "heldout" / "manifest.json").read_text() + " ")
    with pytest.raises(LeaderboardError, match="data-set manifest .* changed since evaluation"):
        build([str(path)], tmp_path / "lb2")

    # An entry without the weights' hash (hand-made or from an old icp) is refused, not trusted.
    stripped = {k: v for k, v in record.items() if k != "checkpoint_sha256"}
    path.write_text(json.dumps(stripped))
    with pytest.raises(LeaderboardError, match="sha256"):
        build([str(path)], tmp_path / "lb3")
    # A malformed record is one line, not a KeyError from deep inside.
    path.write_text(json.dumps({"schema": record["schema"], "metrics": {}}))
    assert main(["leaderboard", str(path), "--out", str(tmp_path / "lb4")]) == 2


def test_eval_refuses_a_pickled_checkpoint(measured, repo_root, tmp_path, capsys):
    root, run = measured
    evil = _run(tmp_path, "evil", 0.1)
    torch.save({"state_dict": NoisyTask(0.1).state_dict(), "global_step": 1, "extra": Pickled()}, evil / "checkpoints" / "last.ckpt")
    assert _eval(repo_root, root, evil) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refused" in err and "test_leaderboard_integrity.Pickled" in err and "--trust-checkpoint" in err and "runs pickled code" in err
    assert not (evil / "eval" / "metrics.json").exists()
