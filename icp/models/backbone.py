"""The latent-diffusion backbone: UNet, codec (VAE or pixel), CLIP text encoder, tokenizer, scheduler.

Every part comes from diffusers / transformers and is loaded from a *local* folder with their
own ``from_pretrained`` (nothing is downloaded). The folder layout is the Stable Diffusion 1.5
one: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; a folder exported from the embedded
tiny default has ``codec/`` (a pixel-unshuffle codec, see codec.py) instead of ``vae/``.

Builders meant for configs (flat kwargs, each returns a :class:`Backbone`):

- :func:`tiny` -- random tiny model for CPU tests and the quickstart;
- :func:`pretrained` -- a local diffusers folder (real SD1.5 weights or an exported tiny one);
- :func:`sd15_architecture` -- the full SD1.5 architecture with random weights (GPU benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.tokenization_clip import CLIPTokenizer

from icp.core.errors import ConfigError, WeightsError
from icp.models.codec import PIXEL_CODEC_FILE, PixelCodec, VaeCodec

# SD1.5's training noise schedule; steps_offset/clip_sample as diffusers expects (no warnings).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1, prediction_type="epsilon")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# Words the tiny tokenizer knows as whole tokens; anything else falls back to byte tokens.
_TINY_WORDS = ("a", "photo", "portrait", "of", "person", "face", "man", "woman", "the", "lit", "light", "from",
               "left", "right", "high", "quality")


class Backbone(nn.Module):
    """Holds the diffusion parts. Modules (unet, codec, text_encoder) are registered submodules;
    the tokenizer and schedulers are plain attributes (no tensors, nothing to train)."""

    def __init__(self, unet: UNet2DConditionModel, codec: nn.Module, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, noise_scheduler: DDPMScheduler):
        super().__init__()
        self.unet = unet
        self.codec = codec
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler

    def compiled_nets(self) -> list[tuple[nn.Module, str]]:
        """The diffusers UNet, compiled by block (icp.perf.compile); the codec declares itself."""
        return [(self.unet, "blocks")]

    # -- shapes
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def downscale(self) -> int:
        return int(self.codec.downscale)

    @property
    def min_latent_multiple(self) -> int:
        """Latent height/width must be divisible by this (one halving per down block)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    # -- text
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states (B, L, D) for a list of prompts, as SD1.5 conditions its UNet."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        ids = ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def sampling_scheduler(self, kind: str = "ddim"):
        """A fresh sampler built from the training schedule (same betas, offsets, prediction type)."""
        if kind == "ddim":
            # SD1.5 samples with set_alpha_to_one=False (its scheduler_config.json says so).
            config = dict(self.noise_scheduler.config)
            config.setdefault("set_alpha_to_one", False)
            return DDIMScheduler.from_config(config)
        if kind == "ddpm":
            return DDPMScheduler.from_config(self.noise_scheduler.config)
        if kind == "euler":
            from diffusers import EulerDiscreteScheduler

            return EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        raise ConfigError(f"unknown sampler '{kind}' (use ddim, ddpm or euler)")

    # -- export
    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers-format folder (safetensors) that diffusers/transformers load without icp."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.noise_scheduler.save_pretrained(folder / "scheduler")
        if isinstance(self.codec, VaeCodec):
            self.codec.vae.save_pretrained(folder / "vae", safe_serialization=True)
            # With a VAE the folder is a complete SD1.5 layout: StableDiffusionPipeline loads it.
            index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                     "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": ["transformers", "CLIPTokenizer"],
                     "scheduler": ["diffusers", type(self.noise_scheduler).__name__],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}
            (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        else:
            self.codec.save_pretrained(folder / "codec")


# ----------------------------------------------------------------------------------- builders


def tiny_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A real CLIP byte-level BPE tokenizer with a tiny vocabulary (bytes + a few whole words).

    It round-trips through save_pretrained/from_pretrained offline, so the tiny default exercises
    exactly the tokenizer code path of a real SD1.5 folder.
    """
    vocab: dict[str, int] = {}
    byte_chars = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for ch in byte_chars:
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [pair[0] + pair[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny(resolution: int = 32, width: int = 32, codec_factor: int = 4, layers_per_block: int = 1,
         levels: int = 2, text_width: int = 32, text_layers: int = 2, max_text_length: int = 16,
         codec: str = "pixel", seed: int = 0, prediction_type: str = "epsilon") -> Backbone:
    """Random tiny backbone: trains on CPU in minutes.

    ``prediction_type`` (epsilon | sample | v_prediction) is what the UNet learns to predict. A
    model trained from scratch for a few hundred CPU steps predicts noise too poorly to sample
    from with "epsilon"; with "sample" (x0) its early samples are blurred conditional means,
    which already carry colour, shape and identity cues (docs/decisions/stitching.md).

    ``width`` is the first UNet block's channels (doubling per level); ``levels`` down blocks,
    the first ``levels-1`` with cross-attention to the text (as in SD1.5's layout). ``codec``:
    "pixel" (lossless pixel-unshuffle, the default) or "vae" (a tiny random AutoencoderKL with
    the same downscale, to exercise the VAE code path).
    """
    latent = resolution // codec_factor
    if resolution % codec_factor or latent % (2 ** (levels - 1)):
        raise ConfigError(f"tiny backbone: resolution {resolution} must be divisible by codec_factor*2**(levels-1) "
                           f"= {codec_factor * 2 ** (levels - 1)} (change resolution or codec_factor)")
    torch.manual_seed(seed)
    if codec == "pixel":
        the_codec: nn.Module = PixelCodec(factor=codec_factor)
    elif codec == "vae":
        blocks = codec_factor.bit_length()  # factor 2**k -> k+1 encoder blocks
        if codec_factor != 2 ** (blocks - 1):
            raise ConfigError(f"tiny backbone: codec_factor {codec_factor} must be a power of 2 for codec=vae")
        the_codec = VaeCodec(AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,) * blocks,
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            layers_per_block=1, norm_num_groups=8, sample_size=resolution))
    else:
        raise ConfigError(f"tiny backbone: codec '{codec}' unknown (use pixel or vae)")
    channels = tuple(width * 2**i for i in range(levels))
    down = tuple(["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1))
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=the_codec.latent_channels, out_channels=the_codec.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=channels, layers_per_block=layers_per_block,
        cross_attention_dim=text_width, attention_head_dim=max(1, width // 8), norm_num_groups=min(8, width),
    )
    tokenizer = tiny_tokenizer(max_text_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=text_width * 4,
        num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 16),
        max_position_embeddings=max_text_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ConfigError(f"tiny backbone: prediction_type '{prediction_type}' unknown (epsilon, sample or v_prediction)")
    scheduler = DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})
    return Backbone(unet, the_codec, text_encoder, tokenizer, scheduler)


def sd15_architecture(random: bool = True, max_text_length: int = 77, seed: int = 0) -> Backbone:
    """The full SD1.5 architecture (UNet 860M, VAE, CLIP ViT-L text encoder) with random weights.

    For GPU throughput/memory benchmarks where no weights may be downloaded. The tokenizer is
    the tiny one (the real CLIP vocabulary needs the weights folder); the text encoder keeps the
    real width and depth.
    """
    if not random:
        raise WeightsError("sd15_architecture builds random weights only; for real weights use "
                           "icp.models.backbone.pretrained with path=<your SD1.5 folder>")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers defaults == SD1.5 UNet
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = tiny_tokenizer(max_text_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=max_text_length, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return Backbone(unet, VaeCodec(vae), text_encoder, tokenizer, DDPMScheduler(**SD15_SCHEDULER))


def sd15(path: str | None = None, random: bool = False, dtype: str = "float32",
         resolution: int | None = None, prediction_type: str | None = None) -> Backbone:
    """Config entry point of experiments/stitching/sd15.yaml: real weights from ``path``, or the
    random SD1.5 architecture when ``random`` is true (then ``path`` must be null).
    ``prediction_type`` None keeps the scheduler's own (epsilon for SD1.5; v_prediction folders
    say so in their scheduler config); set it only for weights trained otherwise."""
    if random and path not in (None, ""):
        raise ConfigError(f"backbone: both path={path} and random=true given; set model.backbone.path=null "
                           "for random weights or model.backbone.random=false to load the folder")
    backbone = sd15_architecture(random=True) if random else pretrained(path, dtype=dtype)
    if random and dtype != "float32":
        backbone.to(_DTYPES[dtype])
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ConfigError(f"backbone: prediction_type '{prediction_type}' unknown (epsilon, sample or v_prediction)")
        backbone.noise_scheduler = DDPMScheduler.from_config(backbone.noise_scheduler.config,
                                                             prediction_type=prediction_type)
    if resolution is not None and resolution % (backbone.downscale * backbone.min_latent_multiple):
        raise ConfigError(f"data.resolution={resolution} must be divisible by "
                           f"{backbone.downscale * backbone.min_latent_multiple} for this backbone")
    return backbone


def _load(folder: Path, part: str, loader, **kwargs):
    sub = folder / part
    if not sub.is_dir():
        raise WeightsError(f"{folder}: missing subfolder '{part}/' (expected a diffusers SD1.5-style folder with "
                           "unet/, vae/ or codec/, text_encoder/, tokenizer/, scheduler/)")
    try:
        return loader(str(sub), local_files_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 -- any loader failure is a bad folder; say so in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{sub}: cannot load {part} ({type(err).__name__}: {first[:200]}); "
                           "re-download or re-export this folder") from None


def pretrained(path: str, dtype: str = "float32") -> Backbone:
    """Load a local diffusers folder (SD1.5 layout, or one written by Backbone.save_pretrained).

    ``dtype`` applies to every part; keep float32 for training (Lightning's bf16-mixed autocasts).
    """
    if path is None or str(path) in ("", "???"):
        raise WeightsError("backbone path is not set: pass model.backbone.path=<local diffusers model folder>")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"{folder}: backbone folder does not exist (set model.backbone.path to a local "
                           "diffusers folder; nothing is downloaded)")
    if dtype not in _DTYPES:
        raise ConfigError(f"backbone dtype '{dtype}' unknown (use one of {', '.join(sorted(_DTYPES))})")
    torch_dtype = _DTYPES[dtype]
    unet = _load(folder, "unet", UNet2DConditionModel.from_pretrained, torch_dtype=torch_dtype)
    if (folder / "vae").is_dir():
        codec: nn.Module = VaeCodec(_load(folder, "vae", AutoencoderKL.from_pretrained, torch_dtype=torch_dtype))
    elif (folder / "codec" / PIXEL_CODEC_FILE).is_file():
        codec = PixelCodec.from_pretrained(folder / "codec")
    else:
        raise WeightsError(f"{folder}: missing subfolder 'vae/' (or 'codec/{PIXEL_CODEC_FILE}' for a pixel codec)")
    text_encoder = _load(folder, "text_encoder", CLIPTextModel.from_pretrained, dtype=torch_dtype)
    tokenizer = _load(folder, "tokenizer", CLIPTokenizer.from_pretrained)
    scheduler = _load(folder, "scheduler", DDPMScheduler.from_pretrained)
    if unet.config.in_channels != codec.latent_channels:
        raise WeightsError(f"{folder}: unet/ expects {unet.config.in_channels} latent channels but the codec gives "
                           f"{codec.latent_channels}; the folder mixes parts of different models")
    return Backbone(unet, codec, text_encoder, tokenizer, scheduler)
