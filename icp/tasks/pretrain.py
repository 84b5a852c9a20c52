"""The base model the method builds on: a plain text-conditioned denoiser of the target renders.

IC-Portrait starts from a pre-trained diffusion model (SD1.5); its control nets are *copies* of
the base UNet's encoder (paper §3.2), so what the base has learned is what the Appearance and
Matching Nets start from. Nothing can be downloaded here, so this task trains that base within
the framework on the synthetic renders: no control net, no profile, only the denoising loss on
the target image with the default prompt (and CFG dropout to the empty prompt, as SD was
trained). When the fit ends, rank zero exports the backbone as a diffusers folder
``<run_dir>/<export_dir>/`` (``Backbone.save_pretrained``), which the stage configs load with
``icp.models.backbone.pretrained(path=...)`` -- the loader a real SD1.5 folder goes through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from icp.core.errors import ConfigError
from icp.models.backbone import Backbone
from icp.tasks.base import DiffusionTask, Residuals

EXPORT_INFO = "icp_pretrain.json"  # beside unet/ etc.: which run and step the folder holds


class PretrainTask(DiffusionTask):
    """Flat kwargs beyond :class:`DiffusionTask`'s: ``export_dir`` (folder under the run
    directory that receives the trained backbone). ``train_unet`` must be ``full``: pretraining
    trains the whole UNet (codec and text encoder stay frozen, as in SD's own training)."""

    def __init__(self, backbone: Backbone, export_dir: str = "backbone", train_unet: str = "full", **kwargs: Any):
        if train_unet != "full":
            raise ConfigError(f"model.train_unet='{train_unet}': pretraining trains the whole UNet; set it to full")
        if not export_dir or Path(export_dir).is_absolute() or ".." in Path(export_dir).parts:
            raise ConfigError(f"model.export_dir='{export_dir}' must be a folder name inside the run directory")
        super().__init__(backbone=backbone, train_unet=train_unet, **kwargs)
        self.export_dir = export_dir

    # No condition: the residual hooks return nothing and the UNet runs without injection.
    def prepare_condition(self, batch: dict) -> None:
        return None

    def condition(self, state: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  text_states: torch.Tensor) -> Residuals:
        # Placeholders that survive what the base class does to residuals (scaling by the CFG keep
        # mask, batching with the unconditional branch); ``unet`` below never injects them.
        return (), noisy_latents.new_zeros(noisy_latents.shape[0], 1, 1, 1)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor,
             residuals: Residuals | None = None) -> torch.Tensor:
        return super().unet(latents, timesteps, text_states, None)

    # -- export
    def on_train_end(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            self.export(Path(trainer.default_root_dir) / self.export_dir)

    def export(self, folder: str | Path) -> Path:
        """Write the backbone (EMA weights when an EMA is kept) as a diffusers folder."""
        folder = Path(folder)
        with self.ema_weights():
            self.backbone.save_pretrained(folder)
        info = {"step": int(self.global_step),
                "prediction_type": self.backbone.noise_scheduler.config.prediction_type}
        (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        return folder
