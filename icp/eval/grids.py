"""The one grid writer: labelled columns of images, one row per sample.

Every picture icp writes (training samples, in-loop evaluation, the main job, the claims study)
goes through :func:`grid`: tiles are enlarged (nearest) to at least ``tile`` pixels so 32-px
renders can be seen, each column carries its label above it, and optional row labels sit on
the left. The result is a uint8 PIL image, so what is saved as PNG and what is logged to W&B are
the same pixels (``wandb.Image`` of a float tensor in [0, 1] logs black).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 2
LABEL_H = 14


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _tile(images: torch.Tensor, tile: int) -> torch.Tensor:
    scale = max(1, -(-tile // images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    return images


def grid(columns: Sequence[tuple[str, torch.Tensor]], row_labels: Sequence[str] | None = None,
         tile: int = 96, max_rows: int | None = None) -> Image.Image:
    """``columns``: (label, (B, 3, H, W) in [-1, 1]) pairs of equal B; returns a labelled RGB image."""
    if not columns:
        raise ValueError("grid needs at least one column")
    n = min(len(c) for _, c in columns)
    if max_rows is not None:
        n = min(n, max_rows)
    tiles = [to_uint8(_tile(c[:n], tile)) for _, c in columns]
    h, w = tiles[0].shape[1:3]
    font = ImageFont.load_default()
    left = 0
    if row_labels:
        left = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(s), font=font) for s in row_labels[:n])
        left = int(left) + 2 * PAD
    width = left + len(columns) * (w + PAD) + PAD
    height = LABEL_H + n * (h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (label, _) in enumerate(columns):
        x0 = left + PAD + j * (w + PAD)
        text = _fit(draw, str(label), w, font)
        draw.text((x0 + (w - draw.textlength(text, font=font)) / 2, 1), text, fill="black", font=font)
        for i in range(n):
            canvas.paste(Image.fromarray(tiles[j][i]), (x0, LABEL_H + PAD + i * (h + PAD)))
    for i, label in enumerate((row_labels or [])[:n]):
        draw.text((PAD, LABEL_H + PAD + i * (h + PAD) + h / 2 - 5), str(label), fill="black", font=font)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """Shorten a column label until it fits above its tile."""
    while len(text) > 3 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if not text.endswith("…") else text[:-2] + "…"
    return text


def save_grid(path: str | Path, columns: Sequence[tuple[str, torch.Tensor]],
              row_labels: Sequence[str] | None = None, tile: int = 96, max_rows: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(columns, row_labels, tile, max_rows).save(path)
    return path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, imported on first use (it costs ~1 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` and close it (a report draws many: open figures hold memory)."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
