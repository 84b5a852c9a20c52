"""The one paired evaluation (icp.eval.paired) and its parts: baselines, intervals, the grid writer."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icp.data import keys as K
from icp.eval import baselines as B
from icp.eval import stats
from icp.eval.evaluator import build_extractors
from icp.eval.grids import LABEL_H, PAD, grid
from icp.eval.paired import METHOD, evaluate_pairs


def _batch(ids, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    ids = torch.tensor(ids)
    # Each identity's profile is a constant colour, so a test can tell whose profile an output used.
    profile = (ids.float().view(-1, 1, 1, 1) / 10).expand(n, 3, res, res).clone() - 0.5
    target = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    keep = (torch.rand(n, 1, res, res, generator=g) < 0.2).float()
    return {K.IDENTITY: ids, K.PROFILE: profile, K.TARGET: target, K.TARGET_KEEP: keep,
            K.TARGET_MASKED: target * keep, K.TARGET_FG: torch.ones(n, 1, res, res)}


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=24))
def test_other_identity_profile_is_never_the_same_identity(ids):
    batch = _batch(ids)
    swapped = B.other_profiles(batch)
    if len(set(ids)) < 2:
        assert swapped is None
        return
    assert (swapped["baseline_profile_identity"] != batch[K.IDENTITY]).all()
    # ... and the profile pixels really are the other identity's
    assert (swapped[K.PROFILE][:, 0, 0, 0] != batch[K.PROFILE][:, 0, 0, 0]).all()


def test_arms_share_pairs_and_noise_and_are_scored_against_the_true_profile():
    seen = []

    def sample(batch, num_steps, guidance_scale, generator):
        noise = torch.randn(batch[K.PROFILE].shape, generator=generator)
        seen.append(noise[0, 0, 0, 0].item())
        return (0.5 * batch[K.PROFILE] + 0.1 * noise).clamp(-1, 1)

    batches = [_batch([1, 2, 3, 1], seed=0), _batch([4, 4, 5, 6], seed=1), _batch([7, 7], seed=2)]
    ex = build_extractors(identity=(), fid=False)
    res = evaluate_pairs(sample, batches, ex, "cpu", baselines={"other_identity": B.other_identity,
                                                                "copy_profile": B.copy_profile, "truth": B.truth},
                         num_steps=1, seed=3, grid_samples=2)
    # Method and baseline are generated with the same noise, batch by batch.
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]
    assert len(seen) == 5  # the last batch (one identity) has no other-identity baseline
    for arm in (METHOD, "other_identity", "copy_profile", "truth"):
        assert [r["identity"] for r in res.rows[arm]] == [1, 2, 3, 1, 4, 4, 5, 6, 7, 7]
    assert all(math.isnan(r["psnr"]) for r in res.rows["other_identity"][-2:])
    assert all(r["psnr"] == 100.0 or r["psnr"] > 90 for r in res.rows["truth"])
    assert res.comparisons["truth"]["psnr"]["mean"] < 0  # the method is below the ceiling
    assert res.comparisons["other_identity"]["psnr"]["n"] == 8
    assert res.comparisons["other_identity"]["psnr"]["verdict"] == "too few"  # 8 < MIN_VALID
    labels = [label for label, _ in res.grid_columns]
    assert labels[0] == "profile" and "true render" in labels and len(res.grid_columns[0][1]) == 2


def test_bootstrap_resamples_identities_not_pairs():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(4), 50)  # 4 identities x 50 pairs, identity effects dominate
    values = np.repeat(rng.normal(0, 1, 4), 50) + rng.normal(0, 0.05, 200)
    by_id = stats.bootstrap_mean(values, ids)
    naive_se = values.std(ddof=1) / np.sqrt(values.size)
    assert by_id["identities"] == 4 and by_id["n"] == 200
    assert (by_id["hi"] - by_id["lo"]) > 6 * naive_se  # far wider than pairs-as-independent


@pytest.mark.parametrize("n,verdict", [(10, "too few"), (40, "better")])
def test_comparison_needs_enough_valid_pairs(n, verdict):
    ids = np.arange(n) // 2
    out = stats.compare(np.full(n, 1.0) + np.arange(n) * 1e-3, np.zeros(n), ids)
    assert out["verdict"] == verdict and out["n"] == n


def test_inpainting_keeps_visible_pixels_and_fills_every_hole():
    batch = _batch([1, 2])
    filled = B.inpaint(batch, None)
    keep = batch[K.TARGET_KEEP].bool().expand_as(filled)
    assert torch.equal(filled[keep], batch[K.TARGET][keep])
    assert torch.isfinite(filled).all() and filled.abs().max() <= 1


def test_grid_labels_columns_and_keeps_the_pixels():
    a = torch.full((2, 3, 8, 8), -1.0)
    b = torch.ones(2, 3, 8, 8)
    image = np.asarray(grid([("black", a), ("white", b)], tile=16))
    assert image.dtype == np.uint8
    top = LABEL_H + PAD
    assert (image[top:top + 16, PAD:PAD + 16] == 0).all()  # column 1, row 1: the black tile, enlarged
    assert (image[top:top + 16, 2 * PAD + 16:2 * PAD + 32] == 255).all()
    assert (image[:LABEL_H] < 128).any()  # the labels are drawn above the tiles
