"""ShardDataModule: batch contract, per-epoch determinism, rank/worker splitting, bad samples."""

import tarfile

import pytest
import torch

from icp.data import keys as K
from icp.data.datamodule import ShardDataModule
from icp.data.shards.read import ShardStream
from icp.data.shards.write import synth

IDS, VIEWS, RES = 6, 3, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    synth(root / "train", IDS, VIEWS, RES, seed=0, shard_size=1, progress=False)
    synth(root / "val", 3, VIEWS, RES, seed=1, shard_size=1, first_identity=100, progress=False)
    return root


def dm(folders, **kw):
    args = dict(shards=str(folders / "train"), val_shards=str(folders / "val"), batch_size=4, num_workers=0,
                pairs_per_identity=2, seed=7, shuffle_buffer=8)
    args.update(kw)
    module = ShardDataModule(**args)
    module.setup("fit")
    return module


def fingerprint(loader):
    return [(b[K.IDENTITY].tolist(), b[K.TARGET_KEEP].sum((1, 2, 3)).tolist(), b[K.TARGET_POSE][:, 0].tolist())
            for b in loader]


def test_batch_contract(folders):
    batch = next(iter(dm(folders).train_dataloader()))
    b = 4
    for key in (K.PROFILE, K.TARGET, K.TARGET_MASKED):
        assert batch[key].shape == (b, 3, RES, RES) and batch[key].min() >= -1 and batch[key].max() <= 1
    for key in (K.TARGET_KEEP, K.PROFILE_FG, K.TARGET_FG, K.FLOW_VALID):
        assert batch[key].shape == (b, 1, RES, RES)
    assert batch[K.FLOW_GT].shape == (b, 2, RES, RES) and batch[K.IDENTITY].dtype == torch.int64
    assert batch[K.PROFILE_POSE].shape == (b, 3) and batch[K.TARGET_LANDMARKS].shape[0] == b
    # 32x32 in 8px patches = 16 patches, round(12.8) = 13 dropped -> 3/16 of pixels kept
    assert torch.allclose(batch[K.TARGET_KEEP].mean((1, 2, 3)), torch.full((b,), 3 / 16))
    assert torch.equal(batch[K.TARGET_MASKED], batch[K.TARGET] * batch[K.TARGET_KEEP])
    # profile and target are always different views of the same identity (whole epoch)
    for other in dm(folders).train_dataloader():
        assert (other[K.PROFILE_POSE] != other[K.TARGET_POSE]).any(1).all()
    assert (batch[K.FLOW_VALID].sum((1, 2, 3)) > 0).all()


def test_flow_warps_profile_onto_target(folders):
    """The ground-truth flow is usable: warping profile coords by it reproduces target coords."""
    batch = next(iter(dm(folders, shuffle_buffer=0).train_dataloader()))
    flow, valid = batch[K.FLOW_GT], batch[K.FLOW_VALID]
    ys, xs = torch.meshgrid(torch.arange(RES.__float__()), torch.arange(RES.__float__()), indexing="ij")
    grid = torch.stack([xs + flow[:, 0], ys + flow[:, 1]], -1) / (RES - 1) * 2 - 1
    warped = torch.nn.functional.grid_sample(batch[K.PROFILE_COORDS], grid, mode="nearest", align_corners=True)
    err = (warped - batch[K.TARGET_COORDS]).norm(dim=1, keepdim=True)
    assert (err * valid).sum() / valid.sum() < 0.2  # canonical units; wrong flow gives ~1


def test_epoch_determinism(folders):
    a, b = dm(folders), dm(folders)
    a.set_epoch(0), b.set_epoch(0)
    first = fingerprint(a.train_dataloader())
    assert first == fingerprint(b.train_dataloader())
    assert sum(len(x[0]) for x in first) == IDS * 2
    a.set_epoch(1)
    second = fingerprint(a.train_dataloader())
    assert second != first and sorted(sum((x[0] for x in second), [])) == sorted(sum((x[0] for x in first), []))
    a.set_epoch(0)
    assert fingerprint(a.train_dataloader()) == first


def test_val_is_fixed(folders):
    a = dm(folders)
    v1 = fingerprint(a.val_dataloader())
    a.set_epoch(3)
    assert fingerprint(a.val_dataloader()) == v1

    def items(fp):
        return sorted(t for ids, keep, yaw in fp for t in zip(ids, keep, yaw))

    # two workers batch differently but produce the very same items (pairs and masks)
    assert items(fingerprint(dm(folders, num_workers=2).val_dataloader())) == items(v1)
    assert sorted(sum((x[0] for x in v1), [])) == sorted([100, 101, 102] * 2)


def _identities(stream, rank, world, worker, workers, monkeypatch):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("WORKER", worker), ("NUM_WORKERS", workers)):
        monkeypatch.setenv(name, str(value))
    return [item for item in stream]


def test_two_ranks_two_workers_disjoint_and_complete(folders, monkeypatch):
    stream = ShardStream(folders / "train", lambda g, gen: [g["identity_index"]], seed=0, shardshuffle=True)
    seen = [_identities(stream, r, 2, w, 2, monkeypatch) for r in range(2) for w in range(2)]
    flat = sum(seen, [])
    assert sorted(flat) == list(range(IDS)) and all(seen[:3])  # disjoint, complete, all but one busy
    # rank captured from the Trainer in the main process wins over what a worker process sees
    captured = []
    for r in range(2):
        stream.rank_world = (r, 2)
        captured += [_identities(stream, 0, 1, w, 2, monkeypatch) for w in range(2)]
    assert captured == seen


def test_ddp_ranks_get_equal_counts(folders, monkeypatch):
    """Under DDP, training resamples with a fixed per-rank share; validation splits samples evenly."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    module = dm(folders, samples_per_epoch=10)
    assert module.train_set.resampled and module.train_set.items_per_rank == 5
    counts, val = [], []
    for rank in range(2):
        for worker in range(2):
            counts.append(len(_identities(module.train_set, rank, 2, worker, 2, monkeypatch)))
        val.append(sum(len(_identities(module.val_set, rank, 2, w, 2, monkeypatch)) for w in range(2)))
    assert counts == [3, 2, 3, 2] and val == [2, 2]  # 3 val identities x 2 pairs -> 1 identity per rank


def test_bad_sample_counted_across_workers(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "train", tmp_path / "bad")
    path = tmp_path / "bad" / "shard-000003.tar"
    with tarfile.open(path) as tar:
        info = next(i for i in tar.getmembers() if i.name.endswith("v01.rgb.png"))
    raw = bytearray(path.read_bytes())
    raw[info.offset_data + info.size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    module = dm(folders, shards=str(tmp_path / "bad"), num_workers=2, shuffle_buffer=0)
    ids = sum((b[K.IDENTITY].tolist() for b in module.train_dataloader()), [])
    assert module.bad_samples == 1 and sorted(set(ids)) == [0, 1, 2, 4, 5]
    strict = dm(folders, shards=str(tmp_path / "bad"), on_bad_sample="fail")
    with pytest.raises(Exception, match="shard-000003.tar"):
        list(strict.train_dataloader())


def test_images_only_mode(folders):
    batch = next(iter(dm(folders, images_only=True).train_dataloader()))
    assert set(batch) >= {K.PROFILE, K.IDENTITY} and K.TARGET not in batch
    assert batch[K.PROFILE].shape == (4, 3, RES, RES)


def test_resize_to_resolution(folders):
    batch = next(iter(dm(folders, resolution=16).train_dataloader()))
    assert batch[K.PROFILE].shape[-1] == 16 and batch[K.FLOW_GT].shape[-1] == 16


def test_persistent_workers_follow_the_epoch(folders):
    """Workers that outlive an epoch still read the epoch the trainer set (shared counter)."""
    ref = dm(folders)
    module = dm(folders, num_workers=1, persistent_workers=True)
    loader = module.train_dataloader()
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        module.set_epoch(epoch)
        assert fingerprint(loader) == fingerprint(ref.train_dataloader())


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm5")
    synth(root / "train", 5, VIEWS, RES, seed=2, shard_size=1, progress=False)  # 3 + 2 shards over 2 workers
    return root


@pytest.mark.parametrize("kw", [{}, {"samples_per_epoch": 14}], ids=["shards", "resampled"])
def test_resumes_at_the_exact_next_batch_with_two_workers(uneven, kw):
    """The state after k trained batches (any k, epoch end too) restores the remaining batches
    exactly, in order, also when the workers' streams end at different times."""
    def module():
        return ShardDataModule(shards=str(uneven / "train"), batch_size=3, num_workers=2, pairs_per_identity=2,
                               seed=3, shuffle_buffer=4, **kw)

    def batches(m, epoch):
        m.setup("fit")
        m.set_epoch(epoch)
        out = []
        for batch in m.train_dataloader():
            batch = m.on_before_batch_transfer(batch, 0)
            assert "_stream_worker" not in batch
            out.append((batch[K.IDENTITY].tolist(), batch[K.TARGET_KEEP].sum((1, 2, 3)).tolist()))
            yield out[-1], m.state_dict()

    full = [b for b, _ in batches(module(), 1)]
    assert len(full) >= 4 and len({str(b) for b in full}) == len(full)
    for k, (_, state) in enumerate(batches(module(), 1), start=1):
        resumed = module()
        resumed.load_state_dict(state)
        again = list(batches(resumed, 1))
        assert [b for b, _ in again] == full[k:], k
        if again:  # a second preemption one batch later, within the resumed pass
            twice = module()
            twice.load_state_dict(again[0][1])
            assert [b for b, _ in batches(twice, 1)] == full[k + 1:], k
    fresh = module()
    fresh.load_state_dict(state)
    assert [b for b, _ in batches(fresh, 2)] == [b for b, _ in batches(module(), 2)]  # a new epoch: from its start
