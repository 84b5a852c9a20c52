"""DiffusionTask: the shared LightningModule base of the stitching and adaptation tasks.

It owns what every IC-Portrait stage has in common: the backbone (generation UNet, codec, text
encoder), text conditioning with a default prompt, the denoising loss and the sampling loop
(pure functions of ``icp.diffusion``, called with the task's model), classifier-free-guidance
dropout, which backbone parts train (frozen / LoRA / full), an EMA of the trained weights
(icp.tasks.weights: swapped in for validation and sampling, stored in checkpoints), optimizer +
scheduler from ``_partial_`` config nodes, gradient checkpointing, the performance switches of
``perf`` (icp.perf: bf16 frozen weights, compilation, fused AdamW, batched CFG and CUDA graphs
in sampling), and ``sample()`` -- the only door evaluation uses.

A subclass supplies the condition through two hooks:

- ``prepare_condition(batch) -> state``: everything that does not depend on the noisy latent
  (e.g. encoded profile and masked target), computed once per batch / per sampling run;
- ``condition(state, noisy_latents, timesteps, text_states) -> (down_residuals, mid_residual)``:
  the ControlNet-style residuals injected into the generation UNet at this denoising step.

CFG dropout (paper follows SD practice): for a dropped sample the text becomes the empty prompt
and its residuals are zeroed, i.e. the generation UNet runs unconditioned -- exactly the branch
``sample()`` uses as the unconditional prediction.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from typing import Any, Callable, Mapping

import lightning as L
import torch
from diffusers import ModelMixin

from icp import diffusion as D
from icp import perf as perflib
from icp.data import keys as K
from icp.core.errors import ConfigError
from icp.models.backbone import Backbone
from icp.tasks.weights import TrainedWeights

log = logging.getLogger(__name__)
Residuals = tuple[tuple[torch.Tensor, ...], torch.Tensor]
TRAIN_UNET_MODES = ("frozen", "lora", "full")


class DiffusionTask(TrainedWeights, L.LightningModule):
    """Base task. Config kwargs are flat; ``backbone`` is a built object, ``optimizer`` and
    ``lr_scheduler`` are ``functools.partial`` objects (``_partial_: true`` nodes)."""

    def __init__(
        self,
        backbone: Backbone,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        prompt: str = "a photo of a person",
        cond_drop_prob: float = 0.1,
        train_unet: str = "frozen",
        lora_rank: int = 8,
        ema_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        guidance_scale: float = 2.0,
        sampler: str = "ddim",
        save_frozen_weights: bool = False,
        perf: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if train_unet not in TRAIN_UNET_MODES:
            raise ConfigError(f"model.train_unet='{train_unet}' is not one of {', '.join(TRAIN_UNET_MODES)}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ConfigError(f"model.cond_drop_prob={cond_drop_prob} must lie in [0, 1)")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay} must lie in [0, 1) (0 disables the EMA)")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.prompt = prompt
        self.cond_drop_prob = cond_drop_prob
        self.ema_decay = ema_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.guidance_scale = guidance_scale
        self.sampler = sampler
        self.save_frozen_weights = save_frozen_weights
        # Performance switches (icp.perf.DEFAULTS merged with the config's model.perf); the
        # training-side ones are applied once in setup(), the sampling-side ones in sample().
        self.perf_config = perflib.settings(perf)
        self.perf_applied: dict[str, Any] | None = None
        self._sample_graph: tuple[tuple, Any] | None = None  # (key, GraphedStep) kept by evaluation tasks
        # The codec and text encoder never train here (paper: only the control nets and the
        # generation UNet's adapters learn).
        backbone.codec.requires_grad_(False)
        backbone.text_encoder.requires_grad_(False)
        backbone.unet.requires_grad_(train_unet == "full")
        if train_unet == "lora":
            self._add_lora(lora_rank)
        self._init_trained_weights()  # EMA state (icp.tasks.weights)
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------ subclass hooks

    def prepare_condition(self, batch: dict) -> Any:
        raise NotImplementedError

    def condition(self, state: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  text_states: torch.Tensor) -> Residuals:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- building blocks

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        # A copy, also when already fp32: under inductor's CUDA graphs the codec's output lives in
        # their memory pool, and sampling reads these latents across steps (see _mark_graph_step).
        return self.backbone.codec.encode(images, sample=sample).to(torch.float32, copy=True)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states (B, L, D). The text encoder is frozen, so each distinct prompt is encoded
        once and cached (runs mostly use one default prompt plus the empty one)."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            # float32 so that states cached under autocast also serve a full-precision sample()
            for prompt, states in zip(missing, self.backbone.encode_text(missing).float()):
                self._text_cache[prompt] = states
        device = self.backbone.text_encoder.device
        for p in set(prompts):
            if self._text_cache[p].device != device:  # the task moved (e.g. CPU -> GPU)
                self._text_cache[p] = self._text_cache[p].to(device)
        return torch.stack([self._text_cache[p] for p in prompts])

    def text_states(self, batch: dict, batch_size: int) -> torch.Tensor:
        prompts = batch.get(K.PROMPT) if isinstance(batch, dict) else None
        if prompts is None:
            prompts = [self.prompt] * batch_size
        return self.encode_prompts(list(prompts))

    def empty_text_states(self, batch_size: int) -> torch.Tensor:
        return self.encode_prompts([""] * batch_size)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor,
             residuals: Residuals | None = None) -> torch.Tensor:
        """Generation UNet prediction, with ControlNet-style residuals when given."""
        down, mid = residuals if residuals is not None else (None, None)
        return self.backbone.unet(latents, timesteps, encoder_hidden_states=text_states,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Denoising loss on the target latent (``loss``); subclasses may add terms to the dict."""
        latents = self.encode_images(batch[K.TARGET], sample=True)
        b = latents.shape[0]
        scheduler = self.backbone.noise_scheduler
        noisy, noise, timesteps = D.noise_latents(latents, scheduler, generator)
        text = self.text_states(batch, b)
        keep = torch.ones(b, device=latents.device)
        if self.training and self.cond_drop_prob > 0:
            keep = (torch.rand(b, generator=generator, device=latents.device) >= self.cond_drop_prob).float()
            text = torch.where(keep.view(-1, 1, 1) > 0, text, self.empty_text_states(b).to(text.dtype))
        down, mid = self.condition(self.prepare_condition(batch), noisy, timesteps, text)
        down = tuple(r * keep.view(-1, 1, 1, 1).to(r.dtype) for r in down)
        mid = mid * keep.view(-1, 1, 1, 1).to(mid.dtype)
        pred = self.unet(noisy, timesteps, text, (down, mid))
        return {"loss": D.denoising_loss(pred, D.prediction_target(scheduler, latents, noise, timesteps))}

    # --------------------------------------------------------------------------- Lightning hooks

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        bs = batch[K.TARGET].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch index: val/loss is comparable across epochs.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        losses = self.losses(batch, generator=generator)
        bs = batch[K.TARGET].shape[0]
        for name, value in losses.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ConfigError("nothing to train: every part is frozen (check model.train_unet and the task's nets)")
        factory = self.optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-2)
        if self.perf_config["fused_optimizer"]:
            factory = perflib.fused_optimizer(factory, params)  # same AdamW, one kernel (CUDA only)
        optimizer = factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        self.configure_perf()
        if self.gradient_checkpointing:
            # Also the frozen generation UNet: gradients flow through it to the injected residuals.
            # (Parts run under no_grad, the codec and text encoder, are unaffected by the flag.)
            for module in self.modules():
                if isinstance(module, ModelMixin) and module._supports_gradient_checkpointing:
                    module.enable_gradient_checkpointing()
        self._ensure_ema()

    def configure_perf(self, precision: str | None = None, device: torch.device | str | None = None
                       ) -> dict[str, Any]:
        """Apply the training-side ``perf`` switches once (bf16 frozen parts, layout, attention
        kernel, compilation). Defaults: the attached trainer's precision and device."""
        if self.perf_applied is None:
            trainer = self._trainer
            if precision is None and trainer is not None:
                precision = str(trainer.precision)
            if device is None and trainer is not None:
                device = trainer.strategy.root_device
            if trainer is not None:
                # Set by now (GlobalBatchSize sets it in its callback setup, which runs first).
                self._guard_accumulation(trainer.accumulate_grad_batches)
            self.perf_applied = perflib.configure_task(self, self.perf_config, precision=precision, device=device)
        return self.perf_applied

    def _guard_accumulation(self, accumulate_grad_batches: int) -> None:
        """No inductor CUDA graphs in a training step whose gradients accumulate over micro-batches
        (they would be overwritten between them: icp.perf.guard_accumulation)."""
        guarded = perflib.guard_accumulation(self.perf_config, accumulate_grad_batches)
        if guarded is not self.perf_config:
            log.warning("model.perf: compile=%s records CUDA graphs, which corrupt gradients accumulated over "
                        "%d micro-batches; training compiles with '%s' instead (same kernels, no graphs)",
                        self.perf_config["compile"], accumulate_grad_batches, guarded["compile"])
            self.perf_config = guarded

    def prepare_inference(self, device: torch.device | str | None = None, compile: bool = True) -> dict[str, Any]:
        """Apply the ``perf`` switches for a task that only samples from now on (evaluation:
        ``icp.tasks.loading.load_task``): all weights in bf16 on CUDA, attention kernel,
        compilation unless ``compile=False`` (icp.perf.configure_inference). Once, and not over
        a training setup."""
        if self.perf_applied is None:
            ema = self._ensure_ema()
            if ema is not None:
                # Sampling uses the EMA weights: fold them in once instead of swapping them in
                # (through host memory, diffusers' EMAModel.store) on every sample() call.
                ema.to(self.device)
                ema.copy_to(self.trainable_parameters())
                self._ema, self.ema_decay = None, 0.0
            self.perf_applied = perflib.configure_inference(self, self.perf_config, device=device or self.device,
                                                            compile=compile)
        return self.perf_applied

    def _mark_graph_step(self) -> None:
        """Begin a step of inductor's CUDA graphs (compile: reduce-overhead, the training default).

        They hand out the same output memory on every replay, so they must know when a step's
        outputs are dead: at each mark, as the torch.compile docs ask of training loops. Without
        marks, every call of a compiled net in no-grad code starts a new step, which frees the
        outputs of the net called just before it -- the control net's residuals that the UNet is
        about to read ("overwritten by a subsequent run", pytorch/pytorch#160281). So every
        logical step marks once: a training batch, a validation batch, a sampling step, a flow
        prediction; what outlives its step is copied out of the pool (encoded latents, flows,
        model outputs)."""
        if perflib.uses_cudagraphs(self.perf_config):
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._mark_graph_step()

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._mark_graph_step()

    # ------------------------------------------------------------------------------- sampling

    def _precision_context(self, graphs: bool = False):
        """Autocast for sampling. bf16 when the trainer trains in bf16, when frozen weights are
        stored in bf16 (any device: fp32 latents cannot meet bf16 weights), or outside a bf16
        trainer on CUDA with ``perf.sample_bf16``; otherwise the trainer's own precision."""
        trainer = self._trainer
        precision = str(trainer.precision) if trainer is not None else ""
        bf16_weights = bool(self.perf_applied and self.perf_applied.get("bf16_frozen"))
        if (precision.startswith("bf16") or bf16_weights
                or (self.perf_config["sample_bf16"] and self.device.type == "cuda")):
            # No weight-cast cache under CUDA graphs: cached casts would outlive the capture.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not graphs)
        if trainer is not None:
            return trainer.precision_plugin.forward_context()
        return contextlib.nullcontext()

    def guided_prediction(self, state: Any, text: torch.Tensor, uncond: torch.Tensor | None,
                          guidance: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(x, t) -> classifier-free-guided model output (fp32) for one denoising step.

        The unconditional branch is the generation UNet with the empty prompt and no residuals
        (as CFG dropout trains it). ``perf.batched_cfg`` runs both branches in one UNet call of
        twice the batch, the uncond half with zero residuals (adding zero changes nothing).
        """
        batched = self.perf_config["batched_cfg"]

        def conditional(x: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
            # a copy: schedulers may keep past outputs beyond the step
            return self.unet(x, tb, text, self.condition(state, x, tb, text)).to(torch.float32, copy=True)

        def branches(x: torch.Tensor, tb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            residuals = self.condition(state, x, tb, text)
            if batched:
                down, mid = residuals
                pair = (tuple(torch.cat([r, torch.zeros_like(r)]) for r in down),
                        torch.cat([mid, torch.zeros_like(mid)]))
                both = self.unet(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([text, uncond.to(text.dtype)]),
                                 pair).float()
                return both.chunk(2)
            return self.unet(x, tb, text, residuals).float(), self.unet(x, tb, uncond).float()

        return conditional if uncond is None else D.classifier_free_guidance(branches, guidance)

    def _graphed_prediction(self, state: Any, text: torch.Tensor, uncond: torch.Tensor | None,
                            guidance: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`guided_prediction` as a CUDA-graph step (``perf.GraphedStep``) whose inputs are
        everything a ``sample()`` call varies (latents, timesteps, condition state, text), so the
        graph closes over weights alone. A task prepared for evaluation (``prepare_inference``)
        keeps its captured step for the next calls of the same shapes, guidance and weight
        addresses: no eager warm-up steps and no capture per call (measured: 6% of a
        30-step call on an H200). A training task captures per call: a kept graph's memory pool would
        sit beside the training step's memory."""
        from torch.utils import _pytree

        leaves, spec = _pytree.tree_flatten((state, text, uncond))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        consts = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def step(x: torch.Tensor, tb: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            filled = list(consts)
            for i, tensor in zip(where, tensors):
                filled[i] = tensor
            return self.guided_prediction(*_pytree.tree_unflatten(filled, spec), guidance)(x, tb)

        tensors = [leaves[i] for i in where]
        keep = bool(self.perf_applied and self.perf_applied.get("inference"))
        key = (str(spec), repr(consts), tuple((t.shape, t.dtype, t.device) for t in tensors), float(guidance),
               self.perf_config["batched_cfg"], torch.is_autocast_enabled(self.device.type),
               tuple(t.data_ptr() for t in itertools.chain(self.parameters(), self.buffers()))) if keep else None
        if keep and self._sample_graph is not None and self._sample_graph[0] == key:
            graphed = self._sample_graph[1]
        else:
            self._sample_graph = None  # a graph of other shapes / weights: let its memory go first
            graphed = perflib.GraphedStep(step)
            if keep:
                self._sample_graph = (key, graphed)
        return lambda x, tb: graphed(x, tb, *tensors)

    @torch.no_grad()
    def sample(self, batch: dict, num_steps: int = 20, guidance_scale: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate targets for ``batch`` (needs PROFILE and TARGET_MASKED): (B, 3, H, W) in [-1, 1]."""
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        ref = batch[K.PROFILE]
        b, _, h, w = ref.shape
        f = self.backbone.downscale
        shape = (b, self.backbone.latent_channels, h // f, w // f)
        # Inductor's own CUDA graphs (compile: reduce-overhead) cannot be recorded inside ours.
        graphs = (self.perf_config["cuda_graph_sampling"] and self.device.type == "cuda"
                  and not perflib.uses_cudagraphs(self.perf_config))
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights(), self._precision_context(graphs):
                noise = D.initial_noise(shape, generator, self.device)
                self._mark_graph_step()
                state = self.prepare_condition(batch)
                text = self.text_states(batch, b)
                uncond = self.empty_text_states(b) if guidance != 1.0 else None
                if graphs:
                    # The step's model calls replayed as one CUDA graph (scheduler.step stays outside).
                    predict = self._graphed_prediction(state, text, uncond, guidance)
                else:
                    predict = self.guided_prediction(state, text, uncond, guidance)

                def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    self._mark_graph_step()  # one graph step per sampling step
                    return predict(x, t)

                # The scheduler steps on host timesteps, the model gets them on the device
                # (icp.diffusion.sample): no host sync per step between graph replays.
                latents = D.sample(denoise, noise, self.backbone.sampling_scheduler(self.sampler), num_steps,
                                   model_device=self.device)
                self._mark_graph_step()
                images = self.backbone.codec.decode(latents)
        finally:
            self.train(was_training)
        return images.float().clamp(-1, 1)
