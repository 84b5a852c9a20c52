"""Evaluator: the set of extractors and metrics one evaluation runs, shared by the in-loop
callback and ``icp eval``.

``build_extractors(...)`` loads every extractor whose weights are present and records, for each
one that is not, the one-line reason and the option that enables it. ``Evaluator.update(outputs,
batch)`` scores one batch of generated images against the batch (icp/data/keys.py) and returns
per-sample rows; ``compute()`` reduces across ranks (torchmetrics states) and returns the scalars.

Which reference each metric uses (paper §4 reports identity similarity, FID and CLIP scores):
- id_cos_<x>: output vs the PROFILE photo (the identity reference) with identity extractor x, on
  the head only when the batch has both head masks (``identity_inputs``: synthetic pairs);
  face_fail_<x>: fraction of outputs where x found no face (only for detecting extractors).
- fid / kid: outputs vs TARGET images (real / true renders of the held-out set).
- clip_i: output vs PROFILE in CLIP image space; clip_t: output vs the batch PROMPT text.
- synthetic ground truth (when the batch has TARGET and TARGET_FG): psnr, psnr_fg, ssim vs the
  true render of the identity in the target pose and light; light_colour_err and shading_err
  (icp.eval.metrics.lighting_error) over the target's head mask.
- view consistency (icp.eval.geometry; with ``build_extractors(probe=..., dlib_landmarks=True)``):
  landmark_err, yaw_err, pitch_err, silhouette_iou (icp geometry probe) and landmark_err_dlib,
  lm_fail_dlib (dlib 68 points) of the output vs the TARGET's true landmarks, pose and head mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from icp.data import keys as K
from icp.data.masking import head_only
from icp.eval import geometry as G
from icp.eval import metrics as M
from icp.eval.extractors import ExtractorUnavailable

log = logging.getLogger("icp")
IDENTITY_EXTRACTORS = ("icp", "dlib", "facenet")


@dataclass
class Extractors:
    identity: dict = field(default_factory=dict)   # short name -> face extractor
    inception: object | None = None
    clip: object | None = None
    probe: object | None = None        # icp geometry probe (view consistency, icp.eval.geometry)
    landmarks: object | None = None    # dlib 68-point landmarks (view consistency, the real check)
    unavailable: dict = field(default_factory=dict)  # metric name -> one-line reason + option

    def describe(self) -> dict:
        """name + weight sha256 of every extractor used (recorded in metrics.json)."""
        out = {}
        for short, ex in self.identity.items():
            out[f"identity_{short}"] = _entry(ex)
        if self.inception is not None:
            out["inception"] = _entry(self.inception)
        if self.clip is not None:
            out["clip"] = _entry(self.clip)
        if self.probe is not None:
            out["probe"] = _entry(self.probe)
        if self.landmarks is not None:
            out["landmarks_dlib"] = _entry(self.landmarks)
        return out


def _entry(ex) -> dict:
    entry = {"name": ex.name, "sha256": ex.weights_sha256, "file": getattr(ex, "weights_file", None)}
    if hasattr(ex, "label"):
        entry["label"] = ex.label
    return entry


def build_extractors(
    identity: list[str] | tuple[str, ...] | str = ("icp", "dlib"),
    embedder: str | None = None,
    dlib_models_dir: str | None = None,
    facenet_weights: str | None = None,
    fid: bool = True,
    inception_torchscript: str | None = None,
    clip_model: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    probe: str | None = None,
    dlib_landmarks: bool = False,
) -> Extractors:
    """Load what is available; never substitute random weights for what is not.

    ``probe``: a probe.pt (``icp fit experiments/probe.yaml``) -> landmark_err, yaw_err, pitch_err,
    silhouette_iou; ``dlib_landmarks``: dlib's 68-point predictor -> landmark_err_dlib, lm_fail_dlib.
    """
    device = str(device)
    found = Extractors()
    for short in [identity] if isinstance(identity, str) else list(identity):
        if short not in IDENTITY_EXTRACTORS:
            from icp.core.errors import ConfigError

            raise ConfigError(f"identity extractor {short!r} is unknown; choose from {', '.join(IDENTITY_EXTRACTORS)}")
        try:
            if short == "icp":
                from icp.eval.trained import IcpEmbedder

                found.identity[short] = IcpEmbedder(weights=embedder, device=device)
            elif short == "dlib":
                from icp.eval.dlib_face import DlibFaceDescriptor

                found.identity[short] = DlibFaceDescriptor(models_dir=dlib_models_dir)
            else:
                from icp.eval.facenet import FacenetDescriptor

                found.identity[short] = FacenetDescriptor(weights=facenet_weights, device=device)
        except ExtractorUnavailable as err:
            found.unavailable[f"id_cos_{short}"] = str(err)
    if fid:
        try:
            from icp.eval.inception import InceptionFeatures

            found.inception = InceptionFeatures(torchscript=inception_torchscript, cache_dir=cache_dir, device=device)
        except ExtractorUnavailable as err:
            found.unavailable["fid"] = found.unavailable["kid"] = str(err)
    if clip_model:
        try:
            from icp.eval.clip import ClipEncoder

            found.clip = ClipEncoder(model=clip_model, device=device)
        except ExtractorUnavailable as err:
            found.unavailable["clip_i"] = found.unavailable["clip_t"] = str(err)
    else:
        found.unavailable["clip_i"] = found.unavailable["clip_t"] = (
            "clip unavailable: no CLIP model folder given; set metrics.clip_model in eval/protocol.yaml or "
            "callbacks.eval.clip_model to enable it")
    if probe is not None:
        try:
            from icp.eval.trained import IcpGeometryProbe

            found.probe = IcpGeometryProbe(weights=probe, device=device)
        except ExtractorUnavailable as err:
            found.unavailable.update(dict.fromkeys(G.PROBE_METRICS, str(err)))
    if dlib_landmarks:
        try:
            from icp.eval.dlib_landmarks import DlibLandmarks68

            found.landmarks = DlibLandmarks68(models_dir=dlib_models_dir)
        except ExtractorUnavailable as err:
            found.unavailable.update(dict.fromkeys(G.DLIB_METRICS, str(err)))
    for name, why in found.unavailable.items():
        log.info("metric %s: %s", name, why)
    return found


GT_METRICS = ("psnr", "psnr_fg", "ssim", "light_colour_err", "shading_err")
# What each metric means (every report prints it) and which direction is better.
MEANINGS = {
    "id_cos_icp": "cosine similarity of output and profile in the icp synthetic-identity embedder, head only (higher = same person)",
    "id_cos_dlib": "cosine similarity of output and profile, dlib 128-D face descriptor (real recogniser)",
    "id_cos_facenet": "cosine similarity of output and profile, FaceNet (real recogniser)",
    "face_fail_dlib": "fraction of outputs in which dlib's detector found no face",
    "face_fail_facenet": "fraction of outputs in which MTCNN found no face",
    "psnr": "PSNR (dB) of output vs the true render of the profile identity in the target pose and light",
    "psnr_fg": "PSNR (dB) on the head only (target foreground mask)",
    "ssim": "SSIM of output vs the true render",
    "light_colour_err": "error of the mean head colour vs the true render (lighting colour)",
    "shading_err": "error of the head's shading statistics vs the true render (lighting direction)",
    "clip_i": "CLIP image similarity of output and profile",
    "clip_t": "CLIP similarity of output and prompt",
    "fid": "FID of outputs vs true renders (TF-FID Inception; few samples: compare runs, not papers)",
    "kid": "KID of outputs vs true renders (TF-FID Inception)",
    **G.MEANINGS,  # view consistency: landmark_err, yaw_err, pitch_err, silhouette_iou, *_dlib
}
LOWER_IS_BETTER = frozenset({"face_fail_dlib", "face_fail_facenet", "light_colour_err", "shading_err", "fid", "kid",
                   "flow_epe", "flow_epe_zero"}) | G.LOWER_IS_BETTER


class Evaluator(nn.Module):
    """Metrics for one evaluation pass (reset between passes). An nn.Module so ``.to(device)``
    moves the metric states, which DDP's gather needs on the communication device."""

    def __init__(self, extractors: Extractors, kid_subset_size: int = 100, kid_subsets: int = 50):
        super().__init__()
        self.extractors = extractors
        names = list(GT_METRICS)
        for short, ex in extractors.identity.items():
            names.append(f"id_cos_{short}")
            if short != "icp":  # the icp embedder has no detection step
                names.append(f"face_fail_{short}")
        if extractors.clip is not None:
            names += ["clip_i", "clip_t"]
        names += list(G.PROBE_METRICS) * (extractors.probe is not None)
        names += list(G.DLIB_METRICS) * (extractors.landmarks is not None)
        self.averages = M.Averages(names)
        self.fid = M.FrechetDistance(2048) if extractors.inception is not None else None
        self.kid = M.KernelDistance(subsets=kid_subsets, subset_size=kid_subset_size) if extractors.inception else None
        self.empty: list[str] = []  # metrics without a single valid sample in the last compute()

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: dict) -> list[dict]:
        """Score generated ``outputs`` (B,3,H,W in [-1,1]) for ``batch``; return per-sample rows."""
        values: dict[str, Tensor] = {}
        valid: dict[str, Tensor] = {}
        outputs = outputs.detach().float().clamp(-1, 1)
        profile = batch[K.PROFILE].to(outputs.device)
        out_id, ref_id = identity_inputs(outputs, profile, batch)
        for short, ex in self.extractors.identity.items():
            out_f, ref_f = ex(out_id), ex(ref_id)
            cos, ok = M.identity_cosine(out_f, ref_f)
            values[f"id_cos_{short}"], valid[f"id_cos_{short}"] = cos, ok
            if short != "icp":
                values[f"face_fail_{short}"] = (~out_f.detected).float()
        if self.extractors.clip is not None:
            clip = self.extractors.clip
            emb = clip(outputs)
            values["clip_i"] = M.embedding_cosine(emb, clip(profile))
            prompts = batch.get(K.PROMPT)
            if prompts is not None:
                values["clip_t"] = M.embedding_cosine(emb, clip.encode_text(list(prompts)).to(emb.device))
        target = batch.get(K.TARGET)
        if target is not None:
            target = target.to(outputs.device).float()
            values["psnr"], values["ssim"] = M.psnr(outputs, target), M.ssim(outputs, target)
            fg = batch.get(K.TARGET_FG)
            if fg is not None:
                fg = fg.to(outputs.device)
                values["psnr_fg"] = M.psnr(outputs, target, fg)
                values["light_colour_err"], values["shading_err"] = M.lighting_error(outputs, target, fg)
            if self.fid is not None:
                real, fake = self.extractors.inception(target), self.extractors.inception(outputs)
                self.fid.update(real, real=True), self.fid.update(fake, real=False)
                self.kid.update(real, real=True), self.kid.update(fake, real=False)
        if self.extractors.probe is not None or self.extractors.landmarks is not None:
            view_values, view_valid = G.view_scores(outputs, batch, self.extractors.probe, self.extractors.landmarks)
            values.update(view_values), valid.update(view_valid)
        self.averages.update(values, valid)
        return _rows(values, valid, batch)

    def compute(self) -> dict[str, float]:
        """Scalars over everything seen on all ranks (every rank must call this)."""
        # NaN = no valid sample on any rank (e.g. clip_t without prompts, id_cos_dlib when dlib found
        # no face in any output): left out of the scalars, not reported as 0; listed in `empty`.
        averages = self.averages.compute()
        out = {k: float(v) for k, v in averages.items() if not torch.isnan(v)}
        self.empty = sorted(k for k, v in averages.items() if torch.isnan(v))
        if self.fid is not None and len(self.fid.real) > 0:
            try:
                out["fid"] = float(self.fid.compute())
                out["kid"] = float(self.kid.compute()[0])
            except ValueError as err:  # fewer than 2 images: FID undefined, say so rather than fail
                log.info("fid/kid not computed: %s", err)
        return out

    def reset(self) -> None:
        self.averages.reset()
        if self.fid is not None:
            self.fid.reset(), self.kid.reset()


def identity_inputs(outputs: Tensor, profile: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
    """What identity is scored on. Synthetic pairs (both head masks in the batch): the output inside
    the target's TRUE head mask and the profile inside its own, background set to mid-grey, so a copied
    background cannot carry identity. Otherwise (real photos) the whole images: dlib and FaceNet score
    the face they detect and crop."""
    target_fg, profile_fg = batch.get(K.TARGET_FG), batch.get(K.PROFILE_FG)
    if target_fg is None or profile_fg is None:
        return outputs, profile
    return head_only(outputs, target_fg), head_only(profile, profile_fg)


def _rows(values: dict[str, Tensor], valid: dict[str, Tensor], batch: dict) -> list[dict]:
    n = len(batch[K.PROFILE])
    ids = batch.get(K.IDENTITY)
    rows = []
    for i in range(n):
        row = {"identity": int(ids[i]) if ids is not None else -1}
        for name, v in values.items():
            ok = valid.get(name)
            row[name] = float(v[i]) if ok is None or bool(ok[i]) else float("nan")
        rows.append(row)
    return rows


def per_identity(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Mean of each metric per identity (NaN-aware): (columns, table rows) for CSV / W&B tables."""
    import math

    names = sorted({k for r in rows for k in r if k != "identity"})
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["identity"], []).append(r)
    table = []
    for identity in sorted(groups):
        line: list = [identity, len(groups[identity])]
        for name in names:
            vals = [r[name] for r in groups[identity] if name in r and not math.isnan(r[name])]
            line.append(sum(vals) / len(vals) if vals else float("nan"))
        table.append(line)
    return ["identity", "samples", *names], table
