"""Tests of the View-Consistent Adaptation task (icp.tasks.adaptation) on a tiny random backbone.

The synthetic pairs here are random textures and their copies shifted by whole latent cells (4
pixels), with the exact flow known: cheap enough for a CPU test, unlike the 3D renders.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from icp.data import keys as K
from icp.core.errors import ConfigError, WeightsError
from icp.models.backbone import tiny
from icp.tasks.adaptation import AdaptationTask
from icp.tasks.flows import flow_metrics
from icp.tasks.stitching import StitchingTask

RES = 32


def shifted_pairs(n: int, seed: int, res: int = RES) -> dict:
    """Texture profile, target = profile moved by (dx, dy) in {-4, 0, 4}^2 pixels, and the true flow."""
    g = torch.Generator().manual_seed(seed)
    tex = F.interpolate(torch.rand(n, 3, res // 4, res // 4, generator=g), size=(res, res), mode="bilinear",
                        align_corners=False) * 2 - 1
    tex = (tex + 0.3 * torch.randn(n, 3, res, res, generator=g)).clamp(-1, 1)
    shift = 4 * torch.randint(-1, 2, (n, 2), generator=g)
    target = torch.stack([torch.roll(tex[i], (-int(shift[i, 1]), -int(shift[i, 0])), dims=(1, 2)) for i in range(n)])
    flow = shift.float().view(n, 2, 1, 1).expand(n, 2, res, res).clone()
    ys, xs = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    valid = torch.stack([((xs + s[0] >= 0) & (xs + s[0] < res) & (ys + s[1] >= 0) & (ys + s[1] < res)).float()
                         for s in shift]).unsqueeze(1)  # rolled-in pixels have no true match
    keep = (torch.rand(n, 1, res // 4, res // 4, generator=g) > 0.8).float()
    keep = keep.repeat_interleave(4, 2).repeat_interleave(4, 3)
    return {K.PROFILE: tex, K.TARGET: target, K.TARGET_MASKED: target * keep, K.TARGET_KEEP: keep,
            K.FLOW_GT: flow, K.FLOW_VALID: valid}


def make_task(**kwargs) -> AdaptationTask:
    torch.manual_seed(0)
    kwargs.setdefault("cond_drop_prob", 0.0)
    return AdaptationTask(tiny(resolution=RES, width=16), **kwargs)


def test_injection_is_a_noop_at_init():
    task = make_task().eval()
    batch = shifted_pairs(2, 0)
    state = task.prepare_condition(batch)
    noisy = torch.randn(2, task.backbone.latent_channels, RES // 4, RES // 4)
    t = torch.tensor([10, 500])
    text = task.text_states(batch, 2)
    with torch.no_grad():
        down, mid = task.condition(state, noisy, t, text)
        assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))
        assert torch.equal(task.unet(noisy, t, text, (down, mid)), task.unet(noisy, t, text))


def test_matching_trains_through_denoising_loss_gradient():
    """With aux loss off, the Matching Net still gets gradient (straight-through argmax) once the
    fusion projections are non-zero -- the paper's only training signal for it."""
    task = make_task(matching_mode="argmax")
    for proj in task.fusion.proj:
        torch.nn.init.normal_(proj.weight, std=0.1)
    loss = task.losses(shifted_pairs(2, 1))
    assert set(loss) == {"loss"}
    loss["loss"].backward()
    grads = [p.grad for p in task.matching.net.down_blocks.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_aux_flow_loss_switch_adds_a_term():
    task = make_task(aux_flow_weight=0.5, match_levels=[0])
    losses = task.losses(shifted_pairs(2, 3))
    assert set(losses) == {"loss", "flow_aux"} and losses["flow_aux"] > 0
    losses["loss"].backward()
    assert task.matching.net.conv_in.weight.grad.abs().sum() > 0  # flows even with zero fusion


def test_matching_probe_lowers_flow_error():
    """Pure-matching probe (ground-truth flow loss, soft-argmax, Matching Net only, no denoising
    loss): 40 CPU steps must cut the validation EPE clearly. The denoising loss alone cannot move
    the EPE in a CPU test budget; this checks that features -> cost volume -> flow is learnable."""
    task = make_task(matching_mode="soft", match_levels=[0, 1], flow_eval_timestep=500)
    opt = torch.optim.AdamW([p for p in task.matching.parameters() if p.requires_grad], lr=3e-3)
    val = shifted_pairs(8, 123)

    def epe() -> float:
        flows = task.predict_flow(val, generator=torch.Generator().manual_seed(0))
        return flow_metrics(flows, task.match_levels, val, 0.05)["flow_epe"].item()

    before = epe()
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        loss = task.matching_probe_loss(shifted_pairs(4, step), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = epe()
    assert after < 0.75 * before, (before, after)


class _Pairs(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train = [{k: v[i] for k, v in shifted_pairs(4, 0).items()} for i in range(4)]
        self.val = [{k: v[i] for k, v in shifted_pairs(2, 9).items()} for i in range(2)]

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=2)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=2)


def test_fit_logs_flow_metrics_and_writes_flow_images(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    task = make_task(aux_flow_weight=0.5, match_levels=[0, 2])
    loggers = [CSVLogger(str(tmp_path / "logs")),
               WandbLogger(save_dir=str(tmp_path), mode="offline", project="icp-test")]
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, logger=loggers,
                        default_root_dir=str(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(task, datamodule=_Pairs())
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/flow_epe", "val/flow_pck", "val/flow_epe_zero", "val/flow_epe/l2", "train/flow_aux"):
        assert key in metrics, sorted(metrics)
    assert metrics["val/flow_epe_zero"].item() > 0
    pictures = list((tmp_path / "samples").glob("flow_step*.png"))
    assert len(pictures) == 1
    from PIL import Image

    assert Image.open(pictures[0]).size == (2 * RES, 5 * RES)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/**/flow_*.png"))


def test_appearance_from_stitching_checkpoint_and_export(tmp_path):
    torch.manual_seed(1)
    stitch = StitchingTask(tiny(resolution=RES, width=16))
    with torch.no_grad():
        for p in stitch.appearance.parameters():
            p.add_(torch.randn_like(p))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": stitch.state_dict(), "global_step": 1}, ckpt)  # as Lightning writes it
    export = tmp_path / "export"
    stitch.appearance.to_controlnet().save_pretrained(export)
    ref = stitch.appearance.state_dict()
    for source in (tmp_path / "run", ckpt, export):
        task = make_task(appearance_from=str(source))
        got = task.appearance.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), source
        assert not any(p.requires_grad for p in task.appearance.parameters())  # train_appearance=False
    with pytest.raises(WeightsError, match="no stitching checkpoint"):
        make_task(appearance_from=str(tmp_path / "nowhere"))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="matching_mode"):
        make_task(matching_mode="nearest")
    with pytest.raises(ConfigError, match="match_levels"):
        make_task(match_levels=[99])


def test_true_flow_source_warps_with_the_ground_truth_and_leaves_the_matching_net_out():
    """flow_source=ground_truth (the warping claim's oracle): the warp uses the batch's flow averaged to each
    level, the Matching Net gets no gradient, and a batch without the flow is a one-line error."""
    from icp.core.errors import DataError

    batch = shifted_pairs(2, 5)
    task = make_task(flow_source="ground_truth")
    for proj in task.fusion.proj:
        torch.nn.init.normal_(proj.weight, std=0.1)
    state = task.prepare_condition(batch)
    feats = [torch.zeros(2, 1, RES // 4 // 2 ** k, RES // 4 // 2 ** k) for k in range(2)]
    flows = task.true_flows(state, feats)
    shift = batch[K.FLOW_GT][:, :, 0, 0]  # the whole-image shift, pixels
    for f, k in zip(flows, range(2)):  # valid cells: the shift in the level's pixels
        ok = F.adaptive_avg_pool2d(batch[K.FLOW_VALID], f.shape[-2:]) == 1
        expect = (shift / (4 * 2 ** k)).view(2, 2, 1, 1).expand_as(f)
        assert torch.allclose(f[ok.expand_as(f)], expect[ok.expand_as(f)])
    task.losses(batch)["loss"].backward()
    assert all(p.grad is None for p in task.matching.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.fusion.parameters())
    # The oracle changes the conditioning (vs the Matching Net's flow), on the same weights.
    matched = make_task()
    matched.load_state_dict(task.state_dict())
    noisy = torch.randn(2, task.backbone.latent_channels, RES // 4, RES // 4)
    t, text = torch.tensor([10, 500]), task.text_states(batch, 2)
    with torch.no_grad():
        a = task.condition(task.prepare_condition(batch), noisy, t, text)[1]
        b = matched.condition(matched.prepare_condition(batch), noisy, t, text)[1]
    assert not torch.allclose(a, b)
    assert task.sample(batch, num_steps=2).shape == batch[K.TARGET].shape
    with pytest.raises(DataError, match="flow_source=ground_truth needs the true flow"):
        task.prepare_condition({k: v for k, v in batch.items() if k != K.FLOW_GT})
    for bad in ({"flow_source": "oracle"}, {"flow_source": "ground_truth", "warp_identity": False},
                {"flow_source": "ground_truth", "aux_flow_weight": 1.0}):
        with pytest.raises(ConfigError, match="flow_source"):
            make_task(**bad)
