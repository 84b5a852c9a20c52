"""ResidentImages: every view decoded once and held in memory; batches a pure function of the
batch number, so a resumed fit sees the batches an uninterrupted one would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from icp.core.errors import DataError
from icp.data import keys as K
from icp.data.resident import ResidentImages, load_views
from icp.data.shards.format import decode_group
from icp.data.shards.read import iter_shard, members_of
from icp.data.shards.write import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    synth(root / "train", identities=5, views=3, resolution=32, shard_size=2, progress=False)
    synth(root / "heldout", identities=2, views=3, resolution=32, shard_size=2, first_identity=5, progress=False)
    return root


def test_views_are_the_decoded_pngs_in_shard_order(shards):
    images, ids = load_views(shards / "train", workers=2)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (15, 3, 32, 32)
    assert ids.tolist() == [i for i in range(5) for _ in range(3)]
    first = next(iter_shard(sorted((shards / "train").glob("*.tar"))[0]))
    rgb = decode_group(members_of(first))["rgb"]
    assert torch.equal(images[:3], (rgb * 255).round().to(torch.uint8))


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        load_views(tmp_path / "nothing")
    assert "\n" not in str(err.value)


def _module(shards, step: int, world: int = 1, rank: int = 0) -> ResidentImages:
    dm = ResidentImages(str(shards / "train"), str(shards / "heldout"), batch_size=2, seed=3, workers=1)
    dm.trainer = SimpleNamespace(global_step=step, accumulate_grad_batches=1, global_rank=rank, world_size=world)
    dm.setup("fit")
    return dm


def test_batches_continue_from_the_restored_step_and_ranks_differ(shards):
    full = [b[K.TARGET] for b in _module(shards, 0).train_dataloader()]
    assert len(full) == 7 and all(b.shape[0] == 2 for b in full)  # 15 views // 2 per batch
    resumed = [b[K.TARGET] for b in _module(shards, 3).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))
    # the batch after an epoch's end is the next epoch's permutation, not a repeat
    assert not torch.equal(resumed[4], full[0]) or not torch.equal(resumed[5], full[1])
    r0 = next(iter(_module(shards, 0, world=2, rank=0).train_dataloader()))[K.TARGET]
    r1 = next(iter(_module(shards, 0, world=2, rank=1).train_dataloader()))[K.TARGET]
    assert not torch.equal(r0, r1)
    val = list(_module(shards, 0).val_dataloader())
    assert sum(len(b[K.TARGET]) for b in val) == 6


def test_images_become_floats_on_the_device(shards):
    dm = _module(shards, 0)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[K.TARGET].dtype == torch.float32
    assert batch[K.TARGET].min() >= -1 and batch[K.TARGET].max() <= 1


def test_the_base_pretrain_fits_from_resident_images(shards, tmp_path):
    """The real fit (icp fit, PretrainTask) with the resident loader: it trains and exports."""
    cmd = [sys.executable, "-m", "icp.cli", "fit", "experiments/base_pretrain.yaml", f"run.root={tmp_path}",
           "data._target_=icp.data.resident.ResidentImages", f"data.shards={shards / 'train'}",
           f"data.val_shards={shards / 'heldout'}", "+data.workers=1", "data.batch_size=4", "model.backbone.width=16",
           "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.samples=null", "logger.wandb=null",
           "+model.perf={compile: none}", "trainer.enable_progress_bar=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob("base_pretrain/*/backbone/unet/config.json"))


def test_a_folder_too_large_to_hold_is_refused_before_decoding(shards, monkeypatch):
    """The memory bound reads the manifest's view count and resolution (15 views of 32 px here)."""
    from icp.core.errors import ConfigError
    from icp.data import resident

    monkeypatch.setattr(resident, "MAX_BYTES", 15 * 3 * 32 * 32 - 1)
    monkeypatch.setattr(resident, "_load_shard", lambda *a: pytest.fail("decoded before the bound was checked"))
    with pytest.raises(ConfigError, match="ShardDataModule"):
        load_views(shards / "train", workers=1)
    monkeypatch.setattr(resident, "MAX_BYTES", 15 * 3 * 32 * 32)
    monkeypatch.undo()
    assert len(load_views(shards / "train", workers=1)[0]) == 15


def test_the_serving_rate_bench_reads_the_real_module(shards):
    from icp.bench.data import resident_rate

    out = resident_rate(shards / "train", batch_size=4, batches=10)  # 15 views: crosses epochs
    assert out["views"] == 15 and out["batch"] == 4 and out["samples_per_s"] > 0


@pytest.mark.parametrize("kind", ["missing", "fifo", "empty", "bad_manifest"])
def test_the_serving_rate_bench_refuses_bad_folders_in_one_line(tmp_path, kind):
    target = tmp_path / "shards"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind != "missing":
        target.mkdir()
        if kind == "bad_manifest":
            (target / "manifest.json").write_text("{not json")
    run = subprocess.run([sys.executable, str(ROOT / "eval/bench_data.py"), "--resident", str(target)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-500:]
    assert lines[-1].startswith("bench_data.py: error: --resident") and str(target) in lines[-1]
    if kind == "missing":  # the folder itself is named, not its parent
        from icp.data.shards.format import read_manifest

        with pytest.raises(DataError, match=f"no manifest.json in {target} "):
            read_manifest(target)
