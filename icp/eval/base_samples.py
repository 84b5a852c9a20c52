"""Is the pretrained base worth building on? Its unconditional samples, and how face-like they are.

``python -m icp.eval.base_samples sample RUN_DIR --count N --out samples.npz`` draws N samples from a
pretraining run (icp/tasks/pretrain.py) through its own ``sample()`` and saves them as uint8, small
enough to bring back from a GPU machine. ``python -m icp.eval.base_samples score samples.npz
--heldout SHARDS`` then reports, with the real offline weights: the fraction of samples in which
MTCNN finds a face, and FID/KID against held-out true renders (TF-FID Inception, few samples:
compare runs, not papers) -- beside the same figures for held-out renders themselves (the ceiling)
and for pure noise (the floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from icp.core.argtypes import int_in
from icp.data import keys as K


@torch.no_grad()
def draw(run_dir: str, count: int, steps: int = 50, batch_size: int = 64, seed: int = 0,
         device: str = "cuda") -> np.ndarray:
    """(count, H, W, 3) uint8 samples of the pretraining run's EMA weights."""
    from icp.eval.grids import to_uint8
    from icp.tasks.loading import load_task

    task = load_task(run_dir, device=device)
    res = _resolution(run_dir)
    out = []
    for start in range(0, count, batch_size):
        b = min(batch_size, count - start)
        blank = torch.zeros(b, 3, res, res, device=device)
        g = torch.Generator(device=device).manual_seed(seed + start)
        images = task.sample({K.PROFILE: blank, K.TARGET_MASKED: blank}, num_steps=steps, generator=g)
        out.append(to_uint8(images))
    return np.concatenate(out)


def _resolution(run_dir: str) -> int:
    from icp.core import config as cfglib

    return int(cfglib.load(Path(run_dir) / "config.yaml").data.resolution)


def face_rate(images: np.ndarray) -> dict:
    """Fraction of images in which MTCNN (facenet-pytorch's bundled weights) finds a face, upscaled to 160 px."""
    from icp.data.faces import detect

    found = 0
    for img in images:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        big = torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear", align_corners=False)
        found += detect(big[0].clamp(0, 255).byte().permute(1, 2, 0).numpy()) is not None
    return {"n": int(len(images)), "face_rate": found / max(1, len(images))}


def fid(fake: np.ndarray, real: np.ndarray) -> dict:
    from icp.eval import metrics as M
    from icp.eval.inception import InceptionFeatures

    inc = InceptionFeatures()
    to = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    f_real, f_fake = inc(to(real)), inc(to(fake))
    d = M.FrechetDistance(2048)
    d.update(f_real, real=True), d.update(f_fake, real=False)
    k = M.KernelDistance(subsets=20, subset_size=min(50, len(fake), len(real)))
    k.update(f_real, real=True), k.update(f_fake, real=False)
    return {"fid": float(d.compute()), "kid": float(k.compute()[0]), "n_fake": len(fake), "n_real": len(real)}


def heldout_renders(shards: str, count: int) -> np.ndarray:
    from icp.eval.grids import to_uint8
    from icp.eval.heldout import heldout_loader, take

    loader = heldout_loader(shards, batch_size=32)
    return np.concatenate([to_uint8(b[K.TARGET]) for b in take(loader, count)])


MAX_SAMPLES = 50_000


def read_samples(path: str, parser: argparse.ArgumentParser) -> np.ndarray:
    """``images`` of a samples file written by ``sample``: (N, H, W, 3) uint8; anything else is one line."""
    where = Path(path)
    if not where.is_file():  # also refuses a FIFO or a device, which np.load would block on
        parser.error(f"{path}: no such samples file (write one with `python -m icp.eval.base_samples sample`)")
    try:
        with np.load(where, allow_pickle=False) as data:
            images = data["images"]
    except Exception as err:  # not a zip, truncated, no 'images', an object array...
        parser.error(f"{path}: not a samples file ({type(err).__name__}: {str(err)[:80]}); write it with `sample`")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not 1 <= len(images) <= MAX_SAMPLES:
        parser.error(f"{path}: images must be (N <= {MAX_SAMPLES}, H, W, 3) uint8, not {images.dtype} {images.shape}")
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icp.eval.base_samples", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("sample")
    s.add_argument("run_dir")
    s.add_argument("--count", type=int_in(1, 50_000), default=256)
    s.add_argument("--steps", type=int_in(1, 1000), default=50)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c = sub.add_parser("score")
    c.add_argument("samples")
    c.add_argument("--heldout", required=True, help="held-out shard folder (the true renders)")
    c.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    if args.verb == "sample":
        if not Path(args.run_dir).is_dir():
            p.error(f"{args.run_dir}: no such run directory (a base pretrain run: runs/base_pretrain/<name>)")
        images = draw(args.run_dir, args.count, args.steps, device=args.device)
        np.savez_compressed(args.out, images=images)
        print(f"base_samples: {len(images)} samples -> {args.out}")
        return 0
    fake = read_samples(args.samples, p)
    if not Path(args.heldout).is_dir():
        p.error(f"--heldout {args.heldout}: no such shard folder (render it with `icp shards synth`)")
    real = heldout_renders(args.heldout, len(fake))
    noise = np.random.default_rng(0).integers(0, 256, size=fake.shape, dtype=np.uint8)
    found = {"base": {**face_rate(fake), **fid(fake, real)},
             "heldout_renders": face_rate(real),
             "noise": {**face_rate(noise), **fid(noise, real)}}
    print(json.dumps(found, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
