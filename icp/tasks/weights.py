"""The trained weights of a task: LoRA adapters, an EMA of the weights, what a checkpoint holds.

:class:`TrainedWeights` is a mixin of :class:`icp.tasks.base.DiffusionTask`: it adds LoRA
adapters to the generation UNet (``train_unet: lora``), keeps an EMA of the trainable
parameters (diffusers' ``EMAModel``: stepped after every optimizer step, swapped in for
validation and sampling, stored in checkpoints) and leaves the backbone's frozen weights out of
checkpoints (they come back from the backbone path). It expects of its host ``backbone``,
``ema_decay`` and ``save_frozen_weights``.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.training_utils import EMAModel

from icp.core.errors import WeightsError


class TrainedWeights:
    """LoRA, EMA and checkpoint hooks of a LightningModule (listed before it among the bases)."""

    def _init_trained_weights(self) -> None:
        self._ema: EMAModel | None = None
        self._ema_pending: dict | None = None
        self._ema_swapped = False

    def _add_lora(self, rank: int) -> None:
        from peft import LoraConfig

        # Attention projections, as in diffusers' LoRA training scripts; B=0 at init -> no-op.
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        self.backbone.unet.add_adapter(config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- EMA of the trained weights
    def _ensure_ema(self) -> EMAModel | None:
        if self.ema_decay > 0 and self._ema is None:
            self._ema = EMAModel(self.trainable_parameters(), decay=self.ema_decay)
            if self._ema_pending is not None:
                self._ema.load_state_dict(self._ema_pending)
                self._ema_pending = None
        return self._ema

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema = self._ensure_ema()
        if ema is not None:
            ema.to(self.device)
            ema.step(self.trainable_parameters())

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the trained parameters (no-op without EMA)."""
        ema = self._ensure_ema()
        if ema is None or self._ema_swapped:
            yield
            return
        params = self.trainable_parameters()
        ema.to(self.device)
        ema.store(params)
        ema.copy_to(params)
        self._ema_swapped = True
        try:
            yield
        finally:
            ema.restore(params)
            self._ema_swapped = False

    def on_validation_epoch_start(self) -> None:
        self._val_ema = self.ema_weights()
        self._val_ema.__enter__()

    def on_validation_epoch_end(self) -> None:
        ctx = getattr(self, "_val_ema", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)
            self._val_ema = None

    # -- checkpoints: trained weights + EMA, not the (large, reloadable) frozen backbone
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._ema is not None:
            checkpoint["ema"] = self._ema.state_dict()
        if not self.save_frozen_weights:
            # Only the backbone's frozen weights: they come back from its path. A frozen task net
            # (e.g. an Appearance Net loaded from another run) must stay in the checkpoint.
            frozen = {n for n, p in self.named_parameters() if not p.requires_grad and n.startswith("backbone.")}
            state = checkpoint["state_dict"]
            for name in frozen & set(state):
                del state[name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.setdefault("state_dict", {})
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trained - set(state))
        # Frozen weights were left out on save: they come back from the backbone path, so the
        # strict state-dict load still checks everything else.
        for name, param in self.named_parameters():
            if not param.requires_grad and name.startswith("backbone.") and name not in state:
                state[name] = param.detach()
        if missing:
            raise WeightsError(f"checkpoint lacks {len(missing)} trained weights (e.g. '{missing[0]}'): it was "
                               "written by a different model config; resume with the config it was trained with")
        if "ema" in checkpoint:
            self._ema_pending = checkpoint["ema"]
            self._ema = None
            self._ensure_ema()
