"""A tiny trained-looking adaptation run laid out as `icp run` leaves it, and renders to feed it.

The main job's root holds ``stages.json`` and ``stages/adaptation/cfg-<hash>/`` (config.yaml +
checkpoints/last.ckpt); its config's ``data.shards`` names a synthetic shard folder (only its
manifest), so the verbs can tell the training domain. Weights are random, with the fusion's zero
projections opened and an EMA stored, so a dropped or stale part changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESOLUTION = 32
RUN_CONFIG = f"""\
experiment: adaptation-test
data:
  shards: data_shards/tiny/train
  resolution: {RESOLUTION}
  mask_ratio: 0.8
  patch_size: 8
model:
  _target_: icp.tasks.adaptation.AdaptationTask
  guidance_scale: 1.5
  ema_decay: 0.5
  backbone:
    _target_: icp.models.backbone.tiny
    resolution: {RESOLUTION}
    width: 16
"""


def make_main_job(root: Path) -> tuple[Path, "torch.nn.Module"]:
    """-> (the main job's root, the task whose weights the checkpoint holds, EMA folded in)."""
    from icp.core import config as cfglib

    main = root / "runs" / "tiny" / "main"
    run = main / "stages" / "adaptation" / "cfg-0123456789"
    run.mkdir(parents=True)
    (main / "stages.json").write_text("{}")
    (run / "config.yaml").write_text(RUN_CONFIG)
    shards = root / "data_shards" / "tiny" / "train"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"kind": "synthetic", "shards": []}))
    cfg = cfglib.load(run / "config.yaml")
    torch.manual_seed(0)
    task = cfglib.instantiate(cfg.model, cfg, "model")
    with torch.no_grad():  # open the injection so that every part reaches the output
        for proj in task.fusion.proj:
            proj.weight.normal_(std=0.5)
        for net in (task.appearance, task.matching):
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    ema = task._ensure_ema()
    with torch.no_grad():  # an EMA unlike the live weights: the export must carry the EMA's
        for p in task.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint = {"state_dict": task.state_dict(), "global_step": 1}
    task.on_save_checkpoint(checkpoint)  # drops the frozen backbone weights, as real checkpoints do
    (run / "checkpoints").mkdir()
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    ema.copy_to(task.trainable_parameters())
    return main, task.eval()


def render_png(path: Path, identity: int, view: int, resolution: int = RESOLUTION) -> Path:
    """One of icp's renders, saved as a PNG (what a user of `icp generate` would pass)."""
    from icp.render import renderer as R

    pose, light, background = R.sample_view(identity, view, 0)
    out = R.render(R.sample_identity(identity, 0)[None], pose[None], light[None], background[None], resolution)
    Image.fromarray((out["rgb"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def make_job(root: Path) -> dict:
    """The main job under ``root`` plus two renders of other identities to generate from."""
    main, task = make_main_job(root)
    faces = root / "faces"
    faces.mkdir()
    return {"root": root, "main": main, "task": task, "faces": faces,
            "profile": render_png(faces / "profile.png", 3, 1), "target": render_png(faces / "target.png", 5, 2)}
