"""Inference: profile photo(s) + target portrait -> the target re-rendered with the profile's identity.

Every input is put in the frame the run trained in, so inference sees what training saw: real
photos are detected (MTCNN, ``icp.data.faces``) and aligned onto where the renderer puts a face
(a run trained on renders) or onto the importer's template (a run trained on imported photos);
icp's own renders, recognised by their gradient background, already are in the render frame. The target is patch-masked as in training (paper §3.2: the
surviving ~20% of patches carry pose and lighting, not identity); the trained
:class:`~icp.tasks.adaptation.AdaptationTask` matches, warps and injects, and ``sample()`` denoises.

Relighting (paper's 3D-aware relighting, claim (d)): ``light`` replaces the target's lighting
before masking, so the output keeps the target's pose under the new light. It is either another
portrait (its low-frequency shading and colour are transferred in the aligned frame) or a light
spec ``"dir=x,y,z;color=r,g,b;ambient=a"`` (a directional light on an ellipsoidal head proxy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from icp.core import config as cfglib
from icp.core import runs
from icp.data import keys as K
from icp.data.faces import detect, detect_and_align, similarity_transform, warp_to_crop
from icp.data.masking import random_patch_mask
from icp.core.errors import DataError, WeightsError
from icp.data.shards.format import convert_8bit
from icp.tasks.adaptation import EXTRA_PROFILES, AdaptationTask

ImageLike = Union[str, Path, Image.Image, Tensor]
RUN_CONFIG = "config.yaml"


# ------------------------------------------------------------------------------ loading a run


def locate(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint, the model's run directory) for any run path a verb may get: a fit run, a .ckpt in
    one, the main job's root (its adaptation stage), a claims sub-run (``icp.core.runs.resolve``)."""
    info = runs.resolve(Path(path).expanduser())
    ckpt = info.need_checkpoint()
    return ckpt, info.model_run or ckpt.parent.parent


def load_adaptation(checkpoint: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False,
              compile: bool = False) -> tuple[AdaptationTask, DictConfig]:
    """The adaptation task of a run (any path :func:`locate` takes), with its weights and EMA; -> (task, run config).

    ``trust_checkpoint``: allow a checkpoint that needs full unpickling (it can run code from the file).
    ``compile``: torch.compile the nets (CUDA; ~2 minutes once, repaid only over many images, so
    off for the pipeline's few portraits; bf16 weights and CUDA-graphed steps apply either way).
    """
    from icp.tasks import loading

    ckpt, run_dir = locate(checkpoint)
    cfg = cfglib.load(run_dir / RUN_CONFIG)
    target = str(OmegaConf.select(cfg, "model._target_", default=""))
    if not target.endswith("AdaptationTask"):
        raise WeightsError(f"{run_dir}: is a '{target or 'unknown'}' run; `icp generate` and `icp export` need an "
                           "adaptation run (experiments/adaptation/*.yaml, or the main job's root)")
    task = loading.load_task(ckpt, device, trust_checkpoint=trust_checkpoint, compile=compile)
    return task, cfg


# What `icp shards` records as a shard folder's "kind" -> the words a user reads.
DOMAINS = {"synthetic": "synthetic renders", "import": "real photos"}


def training_domain(cfg: DictConfig, run_dir: str | Path) -> str:
    """What the run trained on, e.g. "synthetic renders at 32 px", from its shards' manifest.

    ``data.shards`` is relative to the folder the job ran in: looked up from the current folder,
    then from each folder above the run (a run copied elsewhere with its data still finds it)."""
    res = OmegaConf.select(cfg, "data.resolution", default=None)
    shards = OmegaConf.select(cfg, "data.shards", default=None)
    what = "unknown data"
    if isinstance(shards, str) and shards:
        what = f"data of {shards} (not found from here)"
        for base in [Path.cwd(), *Path(run_dir).resolve().parents]:
            manifest = base / shards / "manifest.json"
            if manifest.is_file():
                try:
                    kind = json.loads(manifest.read_text()).get("kind")
                except (OSError, ValueError, AttributeError):
                    kind = None
                what = DOMAINS.get(kind, f"'{kind}' shards") if kind else "unknown data"
                break
    return f"{what} at {res} px" if res else what


# --------------------------------------------------------------------------------- images


# Photos are read whole: a header may declare any size (a decompression bomb); PIL's own guard
# starts at ~89M pixels and only warns below 179M.
MAX_PHOTO_PIXELS = 40_000_000
# A face cannot be found (and MTCNN's image pyramid is empty) below this size.
MIN_ALIGN_SIDE = 24


def read_image(image: ImageLike, name: str | None = None) -> tuple[Image.Image, str]:
    if isinstance(image, (str, Path)):
        try:
            if not Path(image).is_file():  # a FIFO or device would block or never end
                raise DataError(f"{image}: not a regular image file; pass a PNG or JPEG file")
            with Image.open(image) as img:
                if img.width * img.height > MAX_PHOTO_PIXELS:  # from the header, before decoding
                    raise DataError(f"{image}: {img.width}x{img.height} pixels, over the {MAX_PHOTO_PIXELS} limit; "
                                    "pass a smaller photo")
                rgb = convert_8bit(img, "RGB")
            return rgb, name or str(image)
        except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {image} ({type(err).__name__}); pass a PNG or JPEG file") from None
    if isinstance(image, Tensor):
        arr = ((image.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr), name or "<tensor>"
    return convert_8bit(image, "RGB"), name or "<image>"


# A render's background is a linear colour gradient (icp.render.renderer._background): the share
# of the upper border that a plane fits within RENDER_TOLERANCE. Measured: renders 0.85-1.0 at
# 32-256 px (also upscaled and JPEG-saved), photos 0.0-0.37 (skimage's samples; a sky is smooth).
RENDER_BORDER_SHARE = 0.75
RENDER_TOLERANCE = 4 / 255
RENDER_SUBJECT_SHARE = 0.1  # measured: the bust covers 36-48% of a render


def looks_rendered(image: Image.Image) -> bool:
    """Whether ``image`` looks like one of icp's renders (smooth gradient background), not a photo."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    h, w, _ = a.shape
    if min(h, w) < 4:
        return False
    k = max(1, min(h, w) // 32)
    ring = np.zeros((h, w), bool)  # top rows and the upper 60% of the sides: the bust fills the bottom
    ring[:k], ring[: int(h * 0.6), :k], ring[: int(h * 0.6), -k:] = True, True, True
    ys, xs = np.nonzero(ring)
    x, y = np.c_[xs / w, ys / h, np.ones(len(xs))], a[ring]
    keep = np.ones(len(x), bool)
    for _ in range(4):  # refit on the pixels the plane explains: hair may touch the border
        coef, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        keep = np.abs(x @ coef - y).max(1) < RENDER_TOLERANCE
        if keep.sum() < 8:
            return False
    # ... and something that is not background: a head (a flat or gradient-only image is no render)
    yy, xx = np.mgrid[0:h, 0:w]
    whole = np.c_[xx.ravel() / w, yy.ravel() / h, np.ones(h * w)] @ coef
    subject = (np.abs(whole - a.reshape(-1, 3)).max(1) >= RENDER_TOLERANCE).mean()
    return bool(keep.mean() >= RENDER_BORDER_SHARE and subject >= RENDER_SUBJECT_SHARE)


# The five points MTCNN finds (eyes, nose tip, mouth corners) in the renderer's camera frame, in
# unit crop coordinates: the mean of 16 frontal renders (tests/test_generate_run.py re-measures it).
# icp.data.faces.TEMPLATE, which `icp shards import` aligns real photos to, puts the eyes 10% of the
# image lower and 15% closer together; a photo given to a model trained on renders is aligned here.
RENDER_TEMPLATE = np.array([[0.398, 0.418], [0.602, 0.418], [0.500, 0.565], [0.423, 0.651], [0.577, 0.651]])


def align_photo(pil: Image.Image, resolution: int, name: str, template: np.ndarray | None = None) -> Tensor:
    """Detect the face and map its five points onto ``template`` (unit coordinates; None: the
    importer's, icp.data.faces.TEMPLATE) by a similarity transform; (3, R, R) in [-1, 1]."""
    if min(pil.size) < MIN_ALIGN_SIDE:
        raise DataError(f"{name}: {pil.size[0]}x{pil.size[1]} pixels is too small to find a face in (at least "
                        f"{MIN_ALIGN_SIDE} px a side; or pass --no-align for an aligned crop)")
    if template is None:
        return detect_and_align(pil, resolution, source=name).image
    found = detect(pil, name)
    if found is None:
        raise DataError(f"no face found in {name} (use a photo with one clearly visible, roughly frontal face)")
    image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return warp_to_crop(image, similarity_transform(found[1], template * resolution), resolution).clamp(-1, 1)


def prepare_face(image: ImageLike, resolution: int, align: bool = True, name: str | None = None,
                 template: np.ndarray | None = None) -> Tensor:
    """(3, R, R) in [-1, 1]: the face in the training frame.

    ``align``: a photo is detected and aligned onto ``template`` (:func:`align_photo`); a render of
    icp's renderer already is in the frame the model trained in (its camera frame), so it is only
    centre-cropped and resized -- as ``align=False`` treats every input (already aligned crops)."""
    pil, name = read_image(image, name)
    if align and not looks_rendered(pil):
        return align_photo(pil, resolution, name, template)
    w, h = pil.size
    s = min(w, h)
    pil = pil.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    pil = pil.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 127.5 - 1


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) [-1, 1] image as PNG."""
    pil, _ = read_image(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


# ------------------------------------------------------------------------------- relighting


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def transfer_lighting(target: Tensor, light: Tensor, sigma_frac: float = 0.12) -> Tensor:
    """Give ``target`` the low-frequency shading and colour of ``light`` (both aligned, [-1, 1])."""
    sigma = sigma_frac * target.shape[-1]
    t01, l01 = (target + 1) / 2, (light + 1) / 2
    ratio = (_blur(l01, sigma) + 0.02) / (_blur(t01, sigma) + 0.02)
    return (t01 * ratio).clamp(0, 1) * 2 - 1


def parse_light_spec(spec: str) -> dict:
    """``"dir=x,y,z;color=r,g,b;ambient=a"`` (any subset) -> dict; x right, y up, z to the viewer."""
    out = {"dir": (0.0, 0.0, 1.0), "color": (1.0, 1.0, 1.0), "ambient": 0.35}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, value = part.partition("=")
        key = key.strip()
        try:
            nums = tuple(float(v) for v in value.split(","))
        except ValueError:
            nums = ()
        if key not in out or not nums or len(nums) != (1 if key == "ambient" else 3):
            raise DataError(f"light spec '{spec}': cannot read '{part}' (write e.g. "
                            "--light 'dir=-1,0.3,1;color=1,0.9,0.8;ambient=0.3' or give a portrait file)")
        # NaN/inf (or absurd sizes) would render an all-black image without an error.
        if not all(math.isfinite(v) and (key == "dir" or 0 <= v <= 10) and abs(v) <= 1e6 for v in nums):
            raise DataError(f"light spec '{spec}': '{part}' must hold finite numbers"
                            + ("" if key == "dir" else " between 0 and 10"))
        out[key] = nums[0] if key == "ambient" else nums
    if math.hypot(*out["dir"]) == 0:
        raise DataError(f"light spec '{spec}': the direction must not be 0,0,0")
    return out


def synthetic_lighting(target: Tensor, spec: str) -> Tensor:
    """Re-light an aligned target with a directional light on an ellipsoidal head proxy."""
    p = parse_light_spec(spec)
    _, h, w = target.shape
    ys, xs = torch.meshgrid(torch.linspace(1, -1, h), torch.linspace(-1, 1, w), indexing="ij")
    # Head proxy in the aligned frame: an ellipse ~ the face template's extent (icp.data.faces).
    u, v = xs / 0.62, (ys - 0.02) / 0.80
    nz = (1 - u**2 - v**2).clamp_min(0).sqrt()
    inside = (u**2 + v**2) < 1
    normal = torch.stack((torch.where(inside, u, 0 * u), torch.where(inside, v, 0 * v),
                          torch.where(inside, nz, 1 + 0 * nz)))
    d = torch.tensor(p["dir"], dtype=torch.float32)
    lambert = (normal * (d / d.norm()).view(3, 1, 1)).sum(0).clamp_min(0)
    shade = p["ambient"] + (1 - p["ambient"]) * lambert
    color = torch.tensor(p["color"], dtype=torch.float32).view(3, 1, 1)
    # Divide out the old flat shading guess (mean brightness) so the spec sets the light level.
    out = (target + 1) / 2 * shade * color / shade[inside].mean().clamp_min(1e-3)
    return out.clamp(0, 1) * 2 - 1


# -------------------------------------------------------------------------------- pipeline


class PortraitPipeline:
    """``pipe(profiles, target, ...) -> (3, R, R)`` in [-1, 1]; see the module docstring."""

    def __init__(self, task: AdaptationTask, resolution: int | None = None, mask_ratio: float = 0.8,
                 patch_size: int = 8, align: bool = True):
        self.task = task.eval()
        unet = task.backbone.unet
        self.resolution = resolution or int(unet.config.sample_size) * task.backbone.downscale
        self.mask_ratio, self.patch_size, self.align = mask_ratio, patch_size, align
        self.checkpoint: Path | None = None  # what from_checkpoint resolved, and what the run trained on
        self.last_batch: dict | None = None
        self.domain: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | None = None, align: bool = True,
                        trust_checkpoint: bool = False, compile: bool = False) -> "PortraitPipeline":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt, run_dir = locate(checkpoint)
        task, cfg = load_adaptation(ckpt, device, trust_checkpoint=trust_checkpoint, compile=compile)
        pipe = cls(task, resolution=OmegaConf.select(cfg, "data.resolution", default=None),
                   mask_ratio=float(OmegaConf.select(cfg, "data.mask_ratio", default=0.8)),
                   patch_size=int(OmegaConf.select(cfg, "data.patch_size", default=8)), align=align)
        pipe.checkpoint, pipe.domain = ckpt, training_domain(cfg, run_dir)
        return pipe

    def prepare(self, profiles: Sequence[ImageLike], target: ImageLike, light: ImageLike | None = None,
                prompt: str | None = None, seed: int = 0) -> dict:
        """The batch the task samples from (useful to inspect what the model sees)."""
        if not profiles:
            raise DataError("give at least one profile photo (--profile P.png)")
        res = self.resolution
        # The frame the run trained in: renders' camera frame, or the importer's for real photos.
        frame = RENDER_TEMPLATE if (self.domain or "").startswith(DOMAINS["synthetic"]) else None
        faces = [prepare_face(p, res, self.align, template=frame) for p in profiles]
        tgt = prepare_face(target, res, self.align, template=frame)
        if light is not None:
            if isinstance(light, str) and "=" in light and not Path(light).exists():
                tgt = synthetic_lighting(tgt, light)
            else:
                tgt = transfer_lighting(tgt, prepare_face(light, res, self.align, template=frame))
        keep = random_patch_mask((1, res, res), self.mask_ratio, self.patch_size,
                                 generator=torch.Generator().manual_seed(seed))
        device = self.task.device
        batch = {K.PROFILE: faces[0][None].to(device), K.TARGET: tgt[None].to(device),
                 K.TARGET_KEEP: keep.to(device), K.TARGET_MASKED: (tgt[None] * keep).to(device)}
        if len(faces) > 1:
            batch[EXTRA_PROFILES] = [f[None].to(device) for f in faces[1:]]
        if prompt:
            batch[K.PROMPT] = [prompt]
        return batch

    @torch.no_grad()
    def __call__(self, profiles: Sequence[ImageLike], target: ImageLike, prompt: str | None = None,
                 steps: int = 20, seed: int = 0, light: ImageLike | None = None,
                 guidance_scale: float | None = None) -> Tensor:
        if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
            raise DataError(f"guidance_scale {guidance_scale}: must be a finite number")
        batch = self.prepare(profiles, target, light, prompt, seed)
        generator = torch.Generator(device=self.task.device).manual_seed(seed)
        out = self.task.sample(batch, num_steps=steps, guidance_scale=guidance_scale, generator=generator)
        self.last_batch = batch  # what the model saw, for strip()
        return out[0].cpu()

    def strip(self, image: Tensor) -> Image.Image:
        """profile | target | output of the last call, labelled, as uint8 pixels (icp.eval.grids):
        the aligned crops the model saw, beside what it made of them."""
        from icp.eval.grids import grid

        batch = self.last_batch
        return grid([("profile", batch[K.PROFILE][:1].cpu()), ("target", batch[K.TARGET][:1].cpu()),
                     ("output", image[None].cpu())])
