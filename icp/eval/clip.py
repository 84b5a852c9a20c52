"""CLIP image and text embeddings from a local transformers model folder (for CLIP-I / CLIP-T).

No package ships CLIP weights, so the folder (``CLIPModel.save_pretrained`` layout: config,
weights, tokenizer files, optionally ``preprocessor_config.json``) must be on disk. Images are
preprocessed in torch (resize to the model's ``image_size``, normalise with the processor's
mean/std) so no PIL round trip is needed.

transformers 5: ``get_image_features`` / ``get_text_features`` return a model output, not a
tensor; the projected embedding is its ``pooler_output`` (ENVIRONMENT.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from icp.core.errors import WeightsError
from icp.eval.extractors import check_images, file_sha256, require_file, to_unit

OPTION = "metrics.clip_model in eval/protocol.yaml or callbacks.eval.clip_model (a local folder saved with transformers' CLIPModel.save_pretrained)"
# OpenAI CLIP preprocessing constants, used when the folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _embedding(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipEncoder:
    """images -> (B, D) and texts -> (B, D) L2-normalised CLIP embeddings.

    Args:
        model: local CLIP folder (required; see ``OPTION``).
        device: where the model runs.
    """

    name = "clip"

    def __init__(self, model: str | None = None, device: str = "cpu"):
        folder = require_file(model, self.name, OPTION, folder=True)
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise WeightsError(f"{folder}: not a CLIP model folder ({str(err).splitlines()[0]}); "
                               "save one with CLIPModel.save_pretrained and tokenizer.save_pretrained") from None
        self.model.requires_grad_(False)
        mean, std = CLIP_MEAN, CLIP_STD
        proc = folder / "preprocessor_config.json"
        if proc.is_file():
            cfg = json.loads(proc.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.device = torch.device(device)
        self.name = f"clip:{Path(folder).name}"
        self.weights_sha256 = file_sha256(folder)
        self.weights_file = str(folder)

    def preprocess(self, images: Tensor) -> Tensor:
        x = to_unit(images).to(self.device)
        # Resize the short side to `size` and centre-crop, as CLIPImageProcessor does.
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = torch.nn.functional.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                                            mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        check_images(images, self.name)
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return torch.nn.functional.normalize(_embedding(out).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(_embedding(out).float(), dim=-1)
