"""Flow measurements of the adaptation task: metrics, pictures, and the held-out flow curve.

The Matching Net's flow (``AdaptationTask.predict_flow``: per level, target -> profile, in that
level's pixels) against the renderer's true flow FLOW_GT: EPE / PCK per matched level
(:func:`flow_metrics`, logged by validation), the colour-wheel picture of the finest level
(:func:`flow_picture`, :func:`write_flow_images`), and :class:`FlowCurve`, the callback that
measures the same on fixed held-out pairs over training steps (paper claim (a): matching is
learned fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import lightning as L
import torch
from torch import Tensor

from icp.data import keys as K
from icp.models import matching as M

if TYPE_CHECKING:
    from icp.tasks.adaptation import AdaptationTask

# ------------------------------------------------------------------------- flow measurements


def _finest(flows: list[Tensor], levels: Sequence[int]) -> int:
    """The matched level with the highest resolution (the headline flow)."""
    return max(levels, key=lambda l: (flows[l].shape[-2], -l))


def flow_metrics(flows: list[Tensor], levels: Sequence[int], batch: dict, pck_alpha: float) -> dict[str, Tensor]:
    """EPE / PCK of each matched level's flow, upsampled to image pixels, against FLOW_GT.

    ``flow_epe`` / ``flow_pck`` are the finest matched level; ``flow_epe_zero`` is the identity
    (no-motion) flow's EPE, the baseline a useful matcher must beat.
    """
    gt = batch[K.FLOW_GT].float()
    valid = batch.get(K.FLOW_VALID)
    valid = None if valid is None else valid.float()
    size = tuple(gt.shape[-2:])
    thr = pck_alpha * max(size)
    out: dict[str, Tensor] = {}
    for l in levels:
        up = M.upsample_flow(flows[l].float(), size)
        out[f"flow_epe/l{l}"] = M.endpoint_error(up, gt, valid)
        out[f"flow_pck/l{l}"] = M.pck(up, gt, valid, thr)
    head = _finest(flows, levels)
    out["flow_epe"], out["flow_pck"] = out[f"flow_epe/l{head}"], out[f"flow_pck/l{head}"]
    out["flow_epe_zero"] = M.endpoint_error(torch.zeros_like(gt), gt, valid)
    return out


def flow_picture(flows: list[Tensor], levels: Sequence[int], batch: dict, count: int) -> Tensor:
    """(3, 5H, nW) in [0, 1]: rows profile, target, true flow, predicted flow, profile warped by it."""
    n = min(count, batch[K.TARGET].shape[0])
    gt = batch[K.FLOW_GT][:n].float()
    valid = batch.get(K.FLOW_VALID)
    valid = None if valid is None else valid[:n].float()
    size = tuple(gt.shape[-2:])
    pred = M.upsample_flow(flows[_finest(flows, levels)][:n].float(), size)
    scale = float((gt if valid is None else gt * valid).norm(dim=1).max().clamp_min(1.0))
    profile = (batch[K.PROFILE][:n].float() + 1) / 2
    target = (batch[K.TARGET][:n].float() + 1) / 2
    rows = [profile, target, M.flow_to_color(gt, scale, valid), M.flow_to_color(pred, scale),
            M.warp(profile, pred)]
    return torch.cat([torch.cat(list(r.cpu().clamp(0, 1)), dim=2) for r in rows], dim=1)


def write_flow_images(trainer, flows: list[Tensor], levels: Sequence[int], batch: dict, count: int) -> Path:
    """Write the flow picture to <run>/samples/flow_stepNNNNNNN.png and log it to W&B if present."""
    from PIL import Image

    picture = flow_picture(flows, levels, batch, count)
    arr = (picture.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(trainer.default_root_dir) / "samples" / f"flow_step{trainer.global_step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is a dependency
        return path
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="val/flow", images=[arr], step=trainer.global_step,
                             caption=["profile / target / true flow / predicted flow / warped profile"])
    return path


# ------------------------------------------------------------------- flow over training steps


class FlowCurve(L.Callback):
    """Held-out flow EPE / PCK of the Matching Net at given optimizer steps, 0 = before training.

    The paper's claim (a) is about *how fast* matching is learned, so the flow is measured on a
    fixed set of held-out pairs (``shards``, built like validation pairs) at each of ``steps``,
    with the target noised to the task's ``flow_eval_timestep`` by a fixed generator: every
    point of the curve sees the same pairs and the same noise. Results go to
    ``<run_dir>/<out>`` (a JSON list, rewritten after each point, so a resumed run keeps them)
    and to the trainer's loggers as ``heldout/flow_*``.
    """

    def __init__(self, shards: str, steps: Sequence[int] = (0, 50, 100, 200), pairs: int = 64,
                 pairs_per_identity: int = 4, batch_size: int = 16, resolution: int | None = None,
                 mask_ratio: float = 0.8, patch_size: int = 4, seed: int = 0, out: str = "flow_curve.json"):
        self.shards, self.steps = shards, sorted({int(s) for s in steps})
        self.pairs, self.pairs_per_identity, self.batch_size = pairs, pairs_per_identity, batch_size
        self.resolution, self.mask_ratio, self.patch_size, self.seed = resolution, mask_ratio, patch_size, seed
        self.out = out
        self._batches: list[dict] | None = None
        self.points: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        import json

        path = Path(trainer.default_root_dir) / self.out
        if path.is_file():  # a resumed run: keep the points already measured
            self.points = json.loads(path.read_text())

    def _load(self) -> list[dict]:
        if self._batches is None:
            from torch.utils.data import DataLoader

            from icp.data.datamodule import PairMaker
            from icp.data.shards.read import ShardStream

            maker = PairMaker(self.resolution, self.mask_ratio, self.patch_size, self.pairs_per_identity,
                              seed=self.seed, fixed=True)
            stream = ShardStream(self.shards, maker, seed=self.seed, shardshuffle=False, shuffle_buffer=0,
                                 resampled=False)
            self._batches, seen = [], 0
            for batch in DataLoader(stream, batch_size=self.batch_size, num_workers=0):
                keep = min(len(batch[K.TARGET]), self.pairs - seen)
                self._batches.append({k: v[:keep] for k, v in batch.items()})
                seen += keep
                if seen >= self.pairs:
                    break
        return self._batches

    @torch.no_grad()
    def measure(self, task: AdaptationTask) -> dict[str, float]:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        sums: dict[str, float] = {}
        count = 0
        with task.ema_weights():
            for i, batch in enumerate(self._load()):
                batch = move_data_to_device(batch, task.device)
                generator = torch.Generator(task.device).manual_seed(self.seed + 1000 + i)
                found = flow_metrics(task.predict_flow(batch, generator=generator), task.match_levels, batch,
                                     task.pck_alpha)
                n = len(batch[K.TARGET])
                for key in ("flow_epe", "flow_pck", "flow_epe_zero"):
                    sums[key] = sums.get(key, 0.0) + float(found[key]) * n
                count += n
        return {k: v / max(count, 1) for k, v in sums.items()} | {"pairs": count}

    def _maybe_measure(self, trainer, task) -> None:
        step = int(trainer.global_step)
        if step not in self.steps or any(p["step"] == step for p in self.points) or not trainer.is_global_zero:
            return
        point = {"step": step, **self.measure(task)}
        self.points.append(point)
        self.points.sort(key=lambda p: p["step"])
        import json

        path = Path(trainer.default_root_dir) / self.out
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.points, indent=2))
        tmp.replace(path)
        for logger in trainer.loggers:
            logger.log_metrics({f"heldout/{k}": v for k, v in point.items() if k.startswith("flow_")}, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_measure(trainer, pl_module)
