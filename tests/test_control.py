"""ControlUNet: canvas stitching, raw multi-level features, zero-initialised injection."""

import pytest
import torch

from icp.models import backbone as B
from icp.models.control import ControlUNet, split_halves, stitch, unstitch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    backbone = B.tiny(resolution=32, width=16)
    return backbone, ControlUNet(backbone.unet)


def _inputs(backbone, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = backbone.latent_channels
    profile, target, masked = (torch.randn(b, c, 8, 8, generator=g) for _ in range(3))
    text = backbone.encode_text(["a photo of a person"] * b)
    return profile, target, masked, torch.tensor([5, 700])[:b], text


def test_stitch_round_trip_is_exact():
    a, b = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    canvas = stitch(a, b)
    assert canvas.shape == (2, 4, 6, 10)
    left, right = unstitch(canvas)
    assert torch.equal(left, a) and torch.equal(right, b)
    with pytest.raises(ValueError):
        stitch(a, b[..., :4])


def test_features_have_canvas_shapes_and_split(parts):
    backbone, control = parts
    profile, target, masked, t, text = _inputs(backbone)
    with torch.no_grad():
        feats = control(stitch(profile, target), t, text, stitch(profile, masked))
    assert len(feats) == control.num_levels == len(backbone.unet.down_blocks) * 2 + 1  # conv_in, 1 res/level, 1 down, mid
    for f, c in zip(feats, control.channels):
        assert f.shape[:2] == (2, c) and f.shape[-1] == 2 * f.shape[-2]  # (B, C_l, h_l, 2*w_l)
        assert f.abs().sum() > 0  # raw features carry signal at init (before the zero projections)
    prof, targ = split_halves(feats)
    for f, p, q in zip(feats, prof, targ):
        assert p.shape[-1] == q.shape[-1] == f.shape[-1] // 2
        assert torch.equal(torch.cat([p, q], -1), f)


def test_profile_half_influences_target_half(parts):
    # In-context: attention over the whole canvas lets the target half read the profile half.
    backbone, control = parts
    profile, target, masked, t, text = _inputs(backbone)
    with torch.no_grad():
        a = split_halves(control(stitch(profile, target), t, text, stitch(profile, masked)))[1]
        b = split_halves(control(stitch(profile * 0, target), t, text, stitch(profile * 0, masked)))[1]
    assert not torch.allclose(a[-1], b[-1])


def test_injection_is_exactly_a_noop_at_init(parts):
    backbone, control = parts
    profile, target, masked, t, text = _inputs(backbone)
    with torch.no_grad():
        feats = control(stitch(profile, target), t, text, stitch(profile, masked))
        down, mid = control.residuals(split_halves(feats)[1])
        plain = backbone.unet(target, t, encoder_hidden_states=text).sample
        injected = backbone.unet(target, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
    assert torch.equal(plain, injected)
    # ... and it is a real injection path: non-zero projections change the output.
    perturbed = ControlUNet(backbone.unet)
    with torch.no_grad():
        for p in perturbed.proj_down.parameters():
            p.normal_(0, 0.1)
        down, mid = perturbed.residuals(split_halves(feats)[1])
        changed = backbone.unet(target, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample
    assert not torch.allclose(plain, changed)


def test_copied_from_base_unet_even_with_lora(parts):
    from peft import LoraConfig

    backbone, control = parts
    base = backbone.unet.down_blocks.state_dict()
    assert all(torch.equal(v, control.net.down_blocks.state_dict()[k]) for k, v in base.items())
    lora_unet = B.tiny(resolution=32, width=16).unet
    lora_unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    copied = ControlUNet(lora_unet)
    assert all(torch.equal(v, copied.net.down_blocks.state_dict()[k]) for k, v in base.items())


def test_export_to_standard_controlnet_matches(parts):
    backbone, control = parts
    with torch.no_grad():
        for p in control.proj_down.parameters():
            p.normal_(0, 0.1)
        profile, target, masked, t, text = _inputs(backbone)
        sample, cond = stitch(profile, target), stitch(profile, masked)
        ours_down, ours_mid = control.residuals(control(sample, t, text, cond))
        out = control.to_controlnet()(sample, t, encoder_hidden_states=text, controlnet_cond=cond)
        for p in control.proj_down.parameters():
            p.zero_()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours_down, out.down_block_res_samples))
    assert torch.allclose(ours_mid, out.mid_block_res_sample, atol=1e-6)
