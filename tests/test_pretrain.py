"""The pretrained base (icp/tasks/pretrain.py, experiments/base_pretrain.yaml) and what is built on it.

A few-step fit must export a diffusers folder that ``icp.models.backbone.pretrained`` -- the loader
of a real SD1.5 folder -- loads with exactly the trained UNet weights, and the control nets of the
later stages must start as copies of it (the Matching Net only with ``matching_init: base``).
"""

from pathlib import Path

import pytest
import torch

from icp.core import config as cfglib
from icp.data import keys as K
from icp.core.errors import ConfigError
from icp.models.backbone import pretrained, tiny
from icp.tasks.adaptation import AdaptationTask
from icp.tasks.pretrain import EXPORT_INFO, PretrainTask
from icp.tasks.stitching import StitchingTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, one_thread):
    from icp.data.shards.write import synth
    from icp.jobs.fit import fit

    tmp = tmp_path_factory.mktemp("pretrain")
    synth(tmp / "train", identities=4, views=2, resolution=32, progress=False)
    synth(tmp / "heldout", identities=2, views=2, resolution=32, first_identity=4, progress=False)
    cfg = cfglib.load(ROOT / "experiments/base_pretrain.yaml", [
        f"run.root={tmp / 'runs'}", f"data.shards={tmp / 'train'}", f"data.val_shards={tmp / 'heldout'}",
        "data.num_workers=0", "data.batch_size=4", "model.backbone.width=16", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "callbacks.samples=null", "logger.wandb=null"])
    return fit(cfg)


def _unet_state_from_checkpoint(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("backbone.unet."):]: v for k, v in state.items() if k.startswith("backbone.unet.")}


def test_fit_exports_a_folder_the_sd15_loader_reads_with_the_trained_weights(pretrain_run):
    folder = pretrain_run / "backbone"
    assert {"unet", "codec", "text_encoder", "tokenizer", "scheduler", EXPORT_INFO} <= {p.name for p in folder.iterdir()}
    loaded = pretrained(str(folder))
    trained = _unet_state_from_checkpoint(pretrain_run)
    assert trained and set(trained) == set(loaded.unet.state_dict())
    initial = tiny(resolution=32, width=16).unet.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it did train
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert loaded.noise_scheduler.config.prediction_type == "sample"  # the stage configs' setting travels along


def test_stage_nets_start_as_copies_of_the_pretrained_base(pretrain_run):
    folder = str(pretrain_run / "backbone")
    base = pretrained(folder).unet.state_dict()
    stitching = StitchingTask(pretrained(folder), train_unet="full")
    app = stitching.appearance.net.state_dict()
    shared = [k for k in app if k.startswith(("conv_in.", "down_blocks.", "mid_block.")) and k in base]
    assert shared and all(torch.equal(app[k], base[k]) for k in shared)

    copied = AdaptationTask(pretrained(folder), matching_init="base").matching.net.state_dict()
    assert all(torch.equal(copied[k], base[k]) for k in shared)
    fresh = AdaptationTask(pretrained(folder), matching_init="random").matching.net.state_dict()
    assert not any(torch.equal(fresh[k], base[k]) for k in shared if k.endswith("conv1.weight"))
    # The stage config's loader is the SD1.5 one: the config node builds the same backbone.
    cfg = cfglib.load(ROOT / "experiments/stitching/tiny.yaml", [
        "model.backbone=null", "model.backbone={_target_: icp.models.backbone.pretrained, path: " + folder + "}"])
    built = cfglib.instantiate(cfg.model.backbone, cfg, "model.backbone")
    assert all(torch.equal(v, base[k]) for k, v in built.unet.state_dict().items())


def test_matching_init_rejects_other_values_in_one_line():
    with pytest.raises(ConfigError, match=r"model\.matching_init='copy' is not one of base, random") as err:
        AdaptationTask(tiny(resolution=32, width=16), matching_init="copy")
    assert "\n" not in str(err.value)


def test_pretrain_task_trains_the_whole_unet_and_samples_without_injection():
    with pytest.raises(ConfigError, match="train_unet"):
        PretrainTask(tiny(resolution=32, width=16), train_unet="frozen")
    task = PretrainTask(tiny(resolution=32, width=16, prediction_type="sample"), guidance_scale=2.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {K.PROFILE: x, K.TARGET: x, K.TARGET_MASKED: x * 0}
    loss = task.losses(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in task.backbone.unet.parameters() if p.requires_grad)
    out = task.sample(batch, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
