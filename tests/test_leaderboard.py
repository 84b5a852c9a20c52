"""`icp eval` writes a reproducible metrics.json; `icp leaderboard` ranks one protocol only and
refuses mixed protocols and entries whose weights changed."""

import json

import lightning as L
import pytest
import torch
import yaml

from icp.cli import main
from icp.data import keys as K
from icp.models.embedder import IdentityEmbedderNet, export
from icp.eval.leaderboard import LeaderboardError, build


class NoisyTask(L.LightningModule):
    """sample() = the true target + sigma * noise: lower sigma must rank higher on psnr."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(sigma)))

    def sample(self, batch, num_steps=20, guidance_scale=None, generator=None):
        noise = torch.randn(batch[K.TARGET].shape, generator=generator, device=generator.device)
        return (batch[K.TARGET] + self.scale.detach() * noise).clamp(-1, 1)


def _run(root, name, sigma):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"experiment": "toy", "security": {"allowed_targets": ["tests"]}, "data": {"resolution": 32},
           "model": {"_target_": "tests.test_leaderboard.NoisyTask", "sigma": sigma}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"state_dict": NoisyTask(sigma).state_dict(), "global_step": 1}, run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.tiny_eval import heldout_and_embedder

    root = tmp_path_factory.mktemp("lb")
    heldout_and_embedder(root, 4, seed=5, first_identity=900)
    runs = [_run(root, "good", 0.05), _run(root, "bad", 0.4)]
    return root, runs


def _eval(repo_root, root, run, *extra):
    overrides = [f"dataset.shards={root / 'heldout'}", "pairs.num_samples=4", "pairs.mask_ratio=0.5",
                 "generation.num_steps=1", "generation.batch_size=2", "metrics.identity=[icp,facenet]",
                 "metrics.fid=false", f"metrics.embedder={root / 'embedder.pt'}"]
    options = [a for a in extra if a.startswith("--")]
    overrides += [a for a in extra if not a.startswith("--")]
    args = ["eval", str(run), *overrides, "--protocol", str(repo_root / "eval" / "protocol.yaml"), "--device", "cpu",
            *options]
    assert main(args) == 0


def test_eval_then_leaderboard(setup, repo_root, tmp_path, capsys):
    root, (good, bad) = setup
    for run in (bad, good):
        _eval(repo_root, root, run)
    record = json.loads((good / "eval" / "metrics.json").read_text())
    for field in ("metrics", "extractors", "protocol_id", "config_hash", "code_version", "dataset"):
        assert field in record, field
    assert record["samples"] == 4 and len(record["dataset"]["manifest_sha256"]) == 64
    assert len(record["extractors"]["identity_icp"]["sha256"]) == 64
    assert record["extractors"]["identity_icp"]["label"] == "icp-synthetic-embedder, trained by icp"
    assert "eval.facenet_weights" in record["unavailable"]["id_cos_facenet"]  # absent weights: clear, not computed
    assert "id_cos_facenet" not in record["metrics"]
    bad_record = json.loads((bad / "eval" / "metrics.json").read_text())
    assert record["protocol_id"] == bad_record["protocol_id"]
    assert record["metrics"]["psnr"] > bad_record["metrics"]["psnr"] + 5

    assert main(["leaderboard", str(bad), str(good), "--out", str(tmp_path / "lb"), "--sort", "psnr"]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert md.index("| 1 | good") < md.index("| 2 | bad")
    assert "trained by icp" in md and record["protocol_id"] in md
    assert "<table" in (tmp_path / "lb" / "leaderboard.html").read_text()
    assert (tmp_path / "lb" / "leaderboard.png").stat().st_size > 1000


def test_leaderboard_refuses_mixed_protocols_and_changed_weights(setup, repo_root, tmp_path, capsys):
    root, (good, bad) = setup
    for run in (bad, good):
        if not (run / "eval" / "metrics.json").is_file():
            _eval(repo_root, root, run)
    other = tmp_path / "other.json"
    _eval(repo_root, root, bad, "pairs.num_samples=2", f"--out={other}")
    with pytest.raises(LeaderboardError, match="pairs.num_samples"):
        build([str(good), str(other)], tmp_path / "lb")
    # through the CLI: one line, exit status 2
    assert main(["leaderboard", str(good), str(other), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: other tests' log handlers)
    assert err.startswith("icp: error:") and "another protocol" in err and "pairs.num_samples" in err

    # the embedder file changes after evaluation: the entry is refused
    copy = tmp_path / "embedder.pt"
    copy.write_bytes((root / "embedder.pt").read_bytes())
    record = json.loads((good / "eval" / "metrics.json").read_text())
    record["extractors"]["identity_icp"]["file"] = str(copy)
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(record))
    build([str(moved)], tmp_path / "ok")  # unchanged copy: accepted
    torch.manual_seed(1)
    export(IdentityEmbedderNet(dim=8, width=4, depth=2, input_size=16), copy)
    with pytest.raises(LeaderboardError, match="changed since evaluation"):
        build([str(moved)], tmp_path / "lb2")


def test_eval_errors_are_one_line(setup, repo_root, tmp_path, capsys):
    root, (good, _) = setup
    assert main(["eval", str(tmp_path / "nothing"), "--protocol", str(repo_root / "eval" / "protocol.yaml")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["eval", str(good), "--protocol", str(tmp_path / "missing.yaml")]) == 2
    assert "protocol file" in capsys.readouterr().err
    assert main(["eval", str(good), f"dataset.shards={tmp_path}",
                 "--protocol", str(repo_root / "eval" / "protocol.yaml")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
