"""The whole method as a diffusers pipeline: ``icp export RUN OUT`` writes it, ``from_pretrained`` reads it.

An exported folder is a diffusers pipeline folder (``model_index.json`` + one subfolder per
component, each written by the component's own ``save_pretrained``, safetensors only):

- ``unet/`` the generation UNet (LoRA adapters of a ``train_unet: lora`` run merged in);
- ``appearance/`` and ``matching/`` the Appearance Net and the Matching Net as plain diffusers
  ``ControlNetModel`` folders (their zero projections are the ControlNet's own ``controlnet_*``
  blocks), loadable without icp;
- ``fusion/`` the warp-and-inject part (:class:`FusionModel`: the fusion's projections, with the
  warp switch in its config); the matcher itself has no weights, its settings are in the
  pipeline config;
- ``codec/`` the VAE (``AutoencoderKL``) or the tiny default's pixel codec (:class:`PixelCodecModel`),
  ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (the training noise schedule; ``sampler``
  names the family sampled with, as in training);
- ``model_index.json`` also holds what generation needs beyond weights: resolution, mask ratio
  and patch size of the target masking, the adaptation settings (prompt, guidance, sampler,
  matching, performance switches) and the training domain.

:class:`ICPortraitPipeline` rebuilds the :class:`~icp.tasks.adaptation.AdaptationTask` from those
components -- sharing their tensors, not copying them -- and generates through
:class:`icp.inference.PortraitPipeline`, the code ``icp generate`` runs: the same seed gives the
same image from the run and from its export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import ConfigMixin, ControlNetModel, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import nn

from icp.core.errors import ConfigError, WeightsError
from icp.inference import ImageLike, PortraitPipeline, load_adaptation, read_image, training_domain
from icp.models.backbone import Backbone
from icp.models.codec import PixelCodec, VaeCodec
from icp.models.fusion import ReferenceFusion

# diffusers finds a custom component's load method by the base classes it looks up *in the
# component's module* (model_index.json names "icp.pipeline"): ModelMixin must be a name here.
COMPONENTS = ("unet", "appearance", "matching", "fusion", "codec", "text_encoder", "tokenizer", "scheduler")
# The AdaptationTask settings generation depends on (an allow-list: training-only settings such
# as optimizers, the stitching run's path or the auxiliary loss stay behind).
TASK_SETTINGS = ("prompt", "guidance_scale", "sampler", "matching_mode", "temperature", "chunk_rows",
                 "match_levels", "warp_identity", "cond_embedding_channels", "perf")
# A two-line module that lets plain diffusers load the folder:
# DiffusionPipeline.from_pretrained(OUT, custom_pipeline="icp_pipeline", trust_remote_code=True).
SHIM_NAME = "icp_pipeline.py"
SHIM = ('"""Loads the installed icp package\'s pipeline class (pip install icp); the weights are in this folder."""\n'
        "from icp.pipeline import ICPortraitPipeline  # noqa: F401\n")


class FusionModel(ReferenceFusion, ModelMixin, ConfigMixin):
    """:class:`~icp.models.fusion.ReferenceFusion` as a diffusers model: same weights and forward,
    plus ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, feature_channels: Sequence[int] = (), residual_channels: Sequence[int] | None = None,
                 warp_identity: bool = True, scale: float = 1.0):
        super().__init__(list(feature_channels), None if residual_channels is None else list(residual_channels),
                         warp_identity=warp_identity, scale=scale)

    @classmethod
    def of(cls, fusion: ReferenceFusion, feature_channels: Sequence[int]) -> "FusionModel":
        model = cls(feature_channels=[int(c) for c in feature_channels],
                    residual_channels=[int(p.out_channels) for p in fusion.proj],
                    warp_identity=bool(fusion.warp_identity), scale=float(fusion.scale))
        model.load_state_dict(fusion.state_dict())
        return model


class PixelCodecModel(PixelCodec, ModelMixin, ConfigMixin):
    """The weightless pixel-unshuffle codec of the tiny backbone as a diffusers model (config only)."""

    config_name = "config.json"

    # diffusers' persistence, not PixelCodec's own one-file format (Backbone.save_pretrained's).
    save_pretrained = ModelMixin.save_pretrained
    from_pretrained = ModelMixin.__dict__["from_pretrained"]

    @register_to_config
    def __init__(self, factor: int = 4, scaling_factor: float = 1.0):
        super().__init__(factor=factor, scaling_factor=scaling_factor)
        # diffusers writes no weights file for a model without tensors, then fails to load it:
        # one unused integer (dtype casts leave it alone) makes the folder a normal model folder.
        self.register_buffer("codec_version", torch.tensor(1, dtype=torch.int64))


def _share_control(view: nn.Module, net: ControlNetModel) -> None:
    """Make a ControlUNet use ``net``'s parameters (the same tensors, so moving the pipeline moves
    both). ``ControlUNet.to_controlnet`` maps the other way: its projections are the ControlNet's
    ``controlnet_*`` blocks."""
    renamed = {}
    for key, value in net.state_dict(keep_vars=True).items():
        if key.startswith("controlnet_down_blocks."):
            key = "proj_down." + key.split(".", 1)[1]
        elif key.startswith("controlnet_mid_block."):
            key = "proj_mid." + key.split(".", 1)[1]
        else:
            key = "net." + key
        renamed[key] = value
    try:
        view.load_state_dict(renamed, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise WeightsError(f"an exported control net does not fit the exported UNet ({first}); re-export the run "
                           "with `icp export`") from None


def _plain_unet(unet: nn.Module) -> nn.Module:
    """The UNet without peft LoRA layers (merged into the base weights), for a plain diffusers folder."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora(lora_scale=1.0)
        unet.unload_lora()
    return unet


class ICPortraitPipeline(DiffusionPipeline):
    """IC-Portrait: profile photo(s) + target portrait -> the target with the profile's identity.

    ``ICPortraitPipeline.from_pretrained(folder)`` (or ``DiffusionPipeline.from_pretrained(folder,
    custom_pipeline="icp_pipeline", trust_remote_code=True)``) on a folder written by ``icp export``;
    ``pipe(profiles, target, seed=0).images[0]`` is a PIL image. See the module docstring.
    """

    _optional_components: list[str] = []

    def __init__(self, unet, appearance: ControlNetModel, matching: ControlNetModel, fusion: FusionModel, codec,
                 text_encoder, tokenizer, scheduler, resolution: int | None = None, mask_ratio: float = 0.8,
                 patch_size: int = 8, adaptation: dict | None = None, training_domain: str | None = None,
                 source: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, appearance=appearance, matching=matching, fusion=fusion, codec=codec,
                              text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(resolution=resolution, mask_ratio=mask_ratio, patch_size=patch_size,
                                adaptation=dict(adaptation or {}), training_domain=training_domain, source=source)
        self._portrait: PortraitPipeline | None = None

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, trust_checkpoint: bool = False) -> "ICPortraitPipeline":
        """The pipeline of an adaptation run (its directory or a .ckpt in it), on the CPU, fp32."""
        task, cfg = load_adaptation(checkpoint, "cpu", trust_checkpoint=trust_checkpoint, compile=False)
        if task.flow_source != "matched":
            raise ConfigError(f"{checkpoint}: model.flow_source={task.flow_source} warps with the renderer's true "
                              "flow, which no photo has; export a run with flow_source=matched")
        from omegaconf import OmegaConf

        backbone = task.backbone
        if isinstance(backbone.codec, VaeCodec):
            codec = backbone.codec.vae
        else:
            codec = PixelCodecModel(factor=backbone.codec.factor, scaling_factor=backbone.codec.scaling_factor)
        settings = {"prompt": task.prompt, "guidance_scale": float(task.guidance_scale), "sampler": task.sampler,
                    "matching_mode": task.matching_mode, "temperature": float(task.temperature),
                    "chunk_rows": task.chunk_rows, "match_levels": list(task.match_levels),
                    "warp_identity": bool(task.fusion.warp_identity),
                    "cond_embedding_channels": int(task.appearance.net.config.conditioning_embedding_out_channels[0]),
                    "perf": dict(task.perf_config)}
        resolution = OmegaConf.select(cfg, "data.resolution", default=None)
        return cls(unet=_plain_unet(backbone.unet), appearance=task.appearance.to_controlnet(),
                   matching=task.matching.to_controlnet(),
                   fusion=FusionModel.of(task.fusion, task.appearance.channels), codec=codec,
                   text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                   scheduler=backbone.noise_scheduler,
                   resolution=int(resolution) if resolution is not None else None,
                   mask_ratio=float(OmegaConf.select(cfg, "data.mask_ratio", default=0.8)),
                   patch_size=int(OmegaConf.select(cfg, "data.patch_size", default=8)),
                   adaptation=settings, training_domain=training_domain(cfg, Path(checkpoint)),
                   source=str(checkpoint))

    def _task(self):
        """The AdaptationTask on these components (built once, on first use)."""
        if self._portrait is not None:
            return self._portrait.task
        from icp.tasks.adaptation import AdaptationTask

        missing = [name for name in COMPONENTS if getattr(self, name, None) is None]
        if missing:
            raise WeightsError(f"the pipeline lacks its {', '.join(missing)} component(s); re-export the run with "
                               "`icp export RUN OUT`")
        settings = {k: v for k, v in dict(self.config.adaptation or {}).items() if k in TASK_SETTINGS}
        # The pixel codec has no weights: a plain one, without the export format's marker buffer.
        codec = (PixelCodec(self.codec.factor, self.codec.scaling_factor) if isinstance(self.codec, PixelCodec)
                 else VaeCodec(self.codec))
        backbone = Backbone(self.unet, codec, self.text_encoder, self.tokenizer, self.scheduler)
        # Build on the components' device (the UNet is already there; no LoRA: it was merged on export).
        task = AdaptationTask(backbone, matching_init="random", **settings)
        _share_control(task.appearance, self.appearance)
        _share_control(task.matching, self.matching)
        if [int(c) for c in self.fusion.config.feature_channels] != [int(c) for c in task.appearance.channels]:
            raise WeightsError("the exported fusion does not fit the exported control nets; re-export the run")
        task.fusion = self.fusion
        self._portrait = PortraitPipeline(task.eval(), resolution=self.config.resolution,
                                          mask_ratio=float(self.config.mask_ratio),
                                          patch_size=int(self.config.patch_size))
        self._portrait.domain = self.config.training_domain  # photos are aligned to the frame it trained in
        return task

    # ---------------------------------------------------------------------------- generating

    @torch.no_grad()
    def __call__(self, profiles: ImageLike | Sequence[ImageLike], target: ImageLike, prompt: str | None = None,
                 num_inference_steps: int = 20, seed: int = 0, light: ImageLike | None = None,
                 guidance_scale: float | None = None, align: bool = True, output_type: str = "pil",
                 return_dict: bool = True) -> Any:
        """Generate as ``icp generate`` does (same arguments, same image for the same seed).

        ``seed`` draws both the noise and the target's patch mask; ``align`` detects and aligns the
        faces (False: the inputs are already aligned crops); ``output_type``: "pil" or "pt" (a
        (1, 3, R, R) tensor in [-1, 1])."""
        if output_type not in ("pil", "pt"):
            raise ConfigError(f"output_type='{output_type}': use 'pil' or 'pt'")
        task = self._task()
        device = self.unet.device
        if task.device != device:
            task.to(device)  # the pipeline moved its components: the task follows (no copies)
        # As icp generate loads a run: the run's perf switches once, on the device it samples on.
        task.prepare_inference(device, compile=False)
        if isinstance(profiles, (str, Path)) or not isinstance(profiles, Sequence):
            profiles = [profiles]
        self._portrait.align = align
        image = self._portrait(list(profiles), target, prompt=prompt, steps=num_inference_steps, seed=seed,
                               light=light, guidance_scale=guidance_scale)
        images = image[None] if output_type == "pt" else [read_image(image)[0]]
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def write_shim(folder: Path) -> None:
    (Path(folder) / SHIM_NAME).write_text(SHIM)
