"""Metrics: pure per-sample functions plus mergeable accumulators.

Per-sample functions take tensors and return one value per sample (B,), so the same numbers feed
both the averages and the per-identity tables. Accumulators are ``torchmetrics.Metric``
subclasses whose states are sums (or concatenations for KID) with a declared reduction, so
``compute()`` gives the same value on one process as on N ranks that each saw a slice (the
gloo test in tests/test_metrics.py checks this).

Images follow the batch contract: (B, 3, H, W) float in [-1, 1]; masks (B, 1, H, W) in {0, 1}.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd

from icp.eval.extractors import FaceFeatures

# ------------------------------------------------------------------------ per-sample functions


def identity_cosine(output: FaceFeatures, reference: FaceFeatures) -> tuple[Tensor, Tensor]:
    """Cosine similarity of the output's and reference's face embeddings, per sample.

    Returns (cosine (B,), valid (B,) bool): valid where a face was found in both images; the
    cosine of an invalid pair is 0 and must not enter an average (the detection failure rate
    is reported separately, so a generator cannot gain by producing no face at all).
    """
    valid = output.detected & reference.detected
    cos = (output.embeddings * reference.embeddings).sum(dim=1)
    return torch.where(valid, cos, torch.zeros_like(cos)), valid


def embedding_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine per row of two (B, D) embeddings (CLIP-I: image/image; CLIP-T: image/text)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


def psnr(output: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """PSNR in dB per sample, on [0, 1] intensities, optionally over a mask only."""
    err = ((output.float() - target.float()) / 2).square()  # [-1,1] -> [0,1] scale
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.float().expand_as(err)
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(output: Tensor, target: Tensor) -> Tensor:
    """SSIM per sample (Gaussian window 11, sigma 1.5; [0, 1] intensities)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = (output.float() + 1) / 2, (target.float() + 1) / 2
    kernel = min(11, (min(x.shape[-2:]) // 2) * 2 - 1)  # tiny test images: keep the window inside
    return structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel, reduction="none")


LUMA = (0.299, 0.587, 0.114)


def shading_stats(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Low-order lighting statistics of an image over a mask: (mean RGB (B,3), shading slope (B,2)).

    The slope is the least-squares fit of luminance = a + b*x + c*y over the masked pixels, with
    x, y in [-1, 1] across the image: a first-order stand-in for the light direction that needs no
    normals (outputs have none). The mean RGB carries light colour and intensity. See
    docs/decisions/eval.md for why this and not a spherical-harmonics fit.
    """
    x = (image.float() + 1) / 2
    b, _, h, w = x.shape
    m = mask.float().reshape(b, -1)
    luma = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1).reshape(b, -1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    design = torch.stack([torch.ones_like(xs), xs, ys], -1).reshape(1, -1, 3) * m.unsqueeze(-1)
    gram = design.transpose(1, 2) @ design + 1e-6 * torch.eye(3, device=x.device)
    coef = torch.linalg.solve(gram, design.transpose(1, 2) @ (luma * m).unsqueeze(-1)).squeeze(-1)
    mean_rgb = (x.reshape(b, 3, -1) * m.unsqueeze(1)).sum(-1) / m.sum(-1, keepdim=True).clamp_min(1)
    return mean_rgb, coef[:, 1:]


def lighting_error(output: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (light colour error, shading slope error) of the output vs the true render.

    Colour error: L2 distance of masked mean RGB in [0, 1]. Slope error: L2 distance of the
    fitted luminance gradients (luminance units per half image). Both 0 for identical lighting.
    """
    rgb_o, slope_o = shading_stats(output, mask)
    rgb_t, slope_t = shading_stats(target, mask)
    return (rgb_o - rgb_t).norm(dim=1), (slope_o - slope_t).norm(dim=1)


# ------------------------------------------------------------------------------ accumulators


class Averages(Metric):
    """Mean of per-sample values per name, ignoring invalid samples; sums reduce across ranks.

    ``update({"id_cos": values}, valid={"id_cos": mask})``; ``compute()`` -> {name: mean}, NaN
    for a name with no valid sample. Names are fixed at construction so states can sync.
    """

    full_state_update = False

    def __init__(self, names: list[str] | tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.names = tuple(names)
        for name in self.names:
            self.add_state(f"sum_{name}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"count_{name}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor], valid: dict[str, Tensor] | None = None) -> None:
        valid = valid or {}
        for name, value in values.items():
            if name not in self.names:
                raise KeyError(f"Averages got '{name}', not among its names {self.names}")
            value = value.detach().double().reshape(-1)
            ok = torch.isfinite(value)
            if name in valid:
                ok = ok & valid[name].reshape(-1).bool().to(ok.device)
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + value[ok].sum())
            setattr(self, f"count_{name}", getattr(self, f"count_{name}") + ok.sum())

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in self.names:
            count = getattr(self, f"count_{name}")
            out[name] = (getattr(self, f"sum_{name}") / count).float() if count > 0 else torch.tensor(float("nan"))
        return out

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, f"count_{name}")) for name in self.names}


def frechet_distance(real: Tensor, fake: Tensor) -> Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (B, D) (FID on Inception features).

    d^2 = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr sqrt(S_r S_f). When a set has fewer samples
    than dimensions (every in-loop evaluation: tens of images, 2048 features) the covariances are
    low-rank, S = A^T A with A the centred features / sqrt(n - 1), and the non-zero eigenvalues
    of S_r S_f are those of (A_r A_f^T)(A_r A_f^T)^T, so tr sqrt(S_r S_f) is the nuclear norm of
    the small n_r x n_f matrix A_r A_f^T: exact, and seconds faster than a 2048^2 eigensolve.
    """
    r, f = real.double(), fake.double()
    mu_r, mu_f = r.mean(0), f.mean(0)
    a_r = (r - mu_r) / (len(r) - 1) ** 0.5
    a_f = (f - mu_f) / (len(f) - 1) ** 0.5
    traces = a_r.square().sum() + a_f.square().sum()
    if min(len(r), len(f)) < r.shape[1]:
        cross = torch.linalg.svdvals(a_r @ a_f.T).sum()
    else:
        cross = torch.linalg.eigvals((a_r.T @ a_r) @ (a_f.T @ a_f)).sqrt().real.sum()
    return ((mu_r - mu_f).square().sum() + traces - 2 * cross).float().clamp_min(0)


class FrechetDistance(Metric):
    """FID from features, so one extractor pass feeds FID and KID (see :func:`frechet_distance`).

    Features are kept (``cat`` states, gathered across ranks; 8 KB per image for Inception) so
    the low-rank exact path above is available; the formula is torchmetrics' ``_compute_fid``,
    checked against it in tests/test_metrics.py.
    """

    full_state_update = False

    def __init__(self, dim: int = 2048, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        if features.shape[-1] != self.dim:
            raise ValueError(f"FrechetDistance(dim={self.dim}) got features of size {features.shape[-1]}")
        (self.real if real else self.fake).append(features.detach().float())

    def compute(self) -> Tensor:
        real = torch.cat(self.real) if isinstance(self.real, list) and self.real else self.real
        fake = torch.cat(self.fake) if isinstance(self.fake, list) and self.fake else self.fake
        if isinstance(real, list) or isinstance(fake, list) or len(real) < 2 or len(fake) < 2:
            raise ValueError("FID needs at least 2 real and 2 generated images")
        return frechet_distance(real, fake)


class KernelDistance(Metric):
    """KID from features: polynomial-kernel MMD^2 averaged over random subsets.

    Subsets are drawn with a seeded generator over features sorted into a canonical order, so
    the value does not depend on how samples were split across ranks. When a set is smaller
    than ``subset_size`` the whole set is used once (the unbiased MMD estimate still holds).
    """

    full_state_update = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.detach().float())

    @staticmethod
    def _canonical(feats) -> Tensor:
        f = (torch.cat(feats) if feats else torch.zeros(0, 1)) if isinstance(feats, list) else feats
        f = f.double()
        order = torch.argsort(f[:, 0] + 1e-3 * f.sum(1))
        return f[order]

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = self._canonical(self.real), self._canonical(self.fake)
        if len(real) < 2 or len(fake) < 2:
            raise ValueError("KID needs at least 2 real and 2 generated images")
        size = min(self.subset_size, len(real), len(fake))
        if size == len(real) == len(fake):
            score = poly_mmd(real, fake)
            return score.float(), torch.zeros(())
        gen = torch.Generator().manual_seed(self.seed)
        scores = torch.stack([
            poly_mmd(real[torch.randperm(len(real), generator=gen)[:size]],
                     fake[torch.randperm(len(fake), generator=gen)[:size]])
            for _ in range(self.subsets)
        ])
        return scores.mean().float(), scores.std(unbiased=False).float()
