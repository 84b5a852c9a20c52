import pytest
import torch

from icp.data.masking import apply_mask, num_dropped, random_patch_mask
from icp.core.errors import ConfigError


@pytest.mark.parametrize("ratio,patch,hw", [(0.8, 8, (64, 64)), (0.5, 4, (32, 48)), (0.75, 8, (36, 36)),
                                            (0.0, 8, (32, 32)), (1.0, 8, (32, 32))])
def test_exact_number_of_patches_dropped_per_image(ratio, patch, hw):
    keep = random_patch_mask((5, *hw), ratio=ratio, patch_size=patch, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (5, 1, *hw)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    dropped, total = num_dropped(*hw, ratio, patch)
    # count dropped patches on the (ceil) patch grid: a patch is dropped iff its top-left pixel is
    grid = keep[:, 0, ::patch, ::patch]
    assert grid.numel() == 5 * total
    assert ((grid == 0).flatten(1).sum(1) == dropped).all()
    # every patch is constant (whole patches are dropped, never parts)
    up = grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, : hw[0], : hw[1]]
    assert torch.equal(up, keep[:, 0])


def test_pixel_ratio_when_divisible():
    keep = random_patch_mask((3, 3, 64, 64), ratio=0.8, patch_size=8)
    # 64 patches, round(51.2) = 51 dropped
    assert torch.allclose(1 - keep.mean(dim=(1, 2, 3)), torch.full((3,), 51 / 64))


def test_seeded_and_varied():
    a = random_patch_mask((4, 32, 32), generator=torch.Generator().manual_seed(1))
    b = random_patch_mask((4, 32, 32), generator=torch.Generator().manual_seed(1))
    c = random_patch_mask((4, 32, 32), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images of a batch get different masks


def test_apply_mask_and_shape_from_tensor():
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = random_patch_mask(img, ratio=0.5, patch_size=4)
    out = apply_mask(img, keep)
    assert torch.equal(out[keep.expand_as(out) == 0], torch.zeros(int((keep == 0).sum()) * 3))
    assert torch.equal(out[keep.expand_as(out) == 1], img[keep.expand_as(img) == 1])


def test_bad_knobs_are_config_errors():
    with pytest.raises(ConfigError, match="mask_ratio"):
        random_patch_mask((1, 8, 8), ratio=1.5)
    with pytest.raises(ConfigError, match="patch_size"):
        random_patch_mask((1, 8, 8), patch_size=0)
