"""Image <-> latent codecs with one interface: the SD VAE, or a lossless pixel-unshuffle.

Latent diffusion (and IC-Portrait's stitching, paper §3.2) works on latents, not pixels. Where
a pretrained VAE exists we wrap it; where none can be had (the embedded tiny default, tests) a
pixel-unshuffle codec stands in: it is lossless, has no weights, and gives latents of the same
kind of shape (B, C, H/f, W/f), so the stitching and adaptation code paths are identical.

Both codecs take images in [-1, 1] of shape (B, 3, H, W) and return *scaled* latents (ready for
the diffusion model, i.e. roughly unit variance for the VAE), and decode scaled latents back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from icp.core.errors import ConfigError, WeightsError

PIXEL_CODEC_FILE = "codec_config.json"


class PixelCodec(nn.Module):
    """Lossless codec: pixel-unshuffle by ``factor`` (3 -> 3*factor**2 channels).

    No parameters: it is an nn.Module only so that it sits in a Backbone exactly where a VAE
    would (device moves, ``.to(dtype)``, state dicts all behave the same).
    """

    def __init__(self, factor: int = 4, scaling_factor: float = 1.0):
        super().__init__()
        if factor < 1:
            raise ConfigError(f"pixel codec factor must be >= 1, got {factor} (set backbone.codec_factor)")
        self.factor = int(factor)
        self.scaling_factor = float(scaling_factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def downscale(self) -> int:
        return self.factor

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        del sample, generator  # deterministic and lossless: nothing to sample
        return F.pixel_unshuffle(images, self.factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scaling_factor, self.factor)

    # -- diffusers-like persistence: a one-file config any reader can re-create without icp
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "PixelUnshuffleCodec", "factor": self.factor, "scaling_factor": self.scaling_factor,
                  "note": "latents = pixel_unshuffle(images in [-1,1], factor) * scaling_factor"}
        (folder / PIXEL_CODEC_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "PixelCodec":
        path = Path(folder) / PIXEL_CODEC_FILE
        try:
            config = json.loads(path.read_text())
            return cls(factor=int(config["factor"]), scaling_factor=float(config.get("scaling_factor", 1.0)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{path}: not a readable pixel codec config ({type(err).__name__}); "
                               "re-export the backbone with Backbone.save_pretrained") from None


class VaeCodec(nn.Module):
    """Wraps a diffusers ``AutoencoderKL``: scaled latents in, images in [-1, 1] out."""

    compile_as = "blocks"  # icp.perf.compile: by block, or whole (its compiled_parts) without compile_regional

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", 0.18215))
        # SD3/FLUX-style VAEs also shift; SD1.5 has no shift (None -> 0).
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        images = images.to(self.vae.dtype)
        dist = self.vae.encode(images).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return (latents - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample

    def compiled_parts(self) -> list[nn.Module]:
        """What a whole compile wraps: the VAE runs through encode/decode, never ``forward``."""
        return [self.vae.encoder, self.vae.decoder]
