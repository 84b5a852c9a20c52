"""Dense matching maths: cost volume, flow, warp, flow images and flow metrics.

Pure tensor functions (paper §3.3, "View-Consistent Adaptation"): the Matching Net's features of
the target half ``D_t`` and the profile half ``D_s`` give a 4D cost volume of normalised
correlations; its argmax (or soft-argmax) per target location is a dense matching flow
target -> profile; the profile's identity features are warped by that flow into the target pose.

Flow convention (``icp.data.keys``): (B, 2, H, W) in pixels, channel 0 = x, channel 1 = y;
``flow[b, :, y, x]`` points from target pixel (x, y) to its profile pixel. Pixel (x, y) is the
centre of the cell at column x, row y, so coordinates run 0..W-1 and 0..H-1.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------- cost volume


def _normalise(feat: Tensor, eps: float = 1e-6) -> Tensor:
    return feat / feat.norm(dim=1, keepdim=True).clamp_min(eps)


def correlation(feat_t: Tensor, feat_s: Tensor, chunk_rows: int | None = None, normalize: bool = True) -> Tensor:
    """4D cost volume between target and profile features.

    feat_t: (B, C, Ht, Wt), feat_s: (B, C, Hs, Ws). Returns (B, Ht*Wt, Hs, Ws) where entry
    [b, y_t*Wt + x_t, y_s, x_s] is the cosine similarity (``normalize``) or the raw dot product of
    the two feature vectors. ``chunk_rows`` computes the volume a few target rows at a time so the
    intermediate products stay small; the result is identical to the unchunked one.
    """
    if feat_t.dim() != 4 or feat_s.dim() != 4 or feat_t.shape[:2] != feat_s.shape[:2]:
        raise ValueError(f"correlation needs (B, C, H, W) features with equal B, C; got "
                         f"{tuple(feat_t.shape)} and {tuple(feat_s.shape)}")
    if normalize:
        feat_t, feat_s = _normalise(feat_t), _normalise(feat_s)
    b, c, ht, wt = feat_t.shape
    hs, ws = feat_s.shape[-2:]
    src = feat_s.flatten(2)  # (B, C, Hs*Ws)
    rows = ht if not chunk_rows else max(1, int(chunk_rows))
    out = []
    for y0 in range(0, ht, rows):
        tgt = feat_t[:, :, y0:y0 + rows].flatten(2).transpose(1, 2)  # (B, r*Wt, C)
        out.append(torch.bmm(tgt, src))
    return torch.cat(out, dim=1).view(b, ht * wt, hs, ws)


def _grid(h: int, w: int, like: Tensor) -> Tensor:
    """(2, h, w) pixel coordinates, channel 0 = x, channel 1 = y."""
    ys = torch.arange(h, device=like.device, dtype=like.dtype)
    xs = torch.arange(w, device=like.device, dtype=like.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))


def argmax_flow(cost: Tensor, target_size: tuple[int, int]) -> Tensor:
    """Hard matching: flow to the best-scoring profile location of each target location.

    cost: (B, Ht*Wt, Hs, Ws) from :func:`correlation`; returns (B, 2, Ht, Wt) in feature pixels.
    Not differentiable (the paper's default matching, §3.3).
    """
    b, n, hs, ws = cost.shape
    ht, wt = target_size
    if n != ht * wt:
        raise ValueError(f"cost volume has {n} target locations, target_size {target_size} has {ht * wt}")
    idx = cost.flatten(2).argmax(dim=2)  # (B, Ht*Wt)
    src = torch.stack(((idx % ws), torch.div(idx, ws, rounding_mode="floor")), dim=1).to(cost.dtype)
    return src.view(b, 2, ht, wt) - _grid(ht, wt, cost)


def soft_argmax_flow(cost: Tensor, target_size: tuple[int, int], temperature: float = 0.05) -> Tensor:
    """Differentiable matching: expected profile location under softmax(cost / temperature).

    As ``temperature`` -> 0 this tends to :func:`argmax_flow` (for a unique maximum); with cosine
    costs in [-1, 1] a temperature of ~0.01-0.05 is sharp while still passing gradients.
    """
    if temperature <= 0:
        raise ValueError(f"soft-argmax temperature must be > 0, got {temperature}")
    b, n, hs, ws = cost.shape
    ht, wt = target_size
    if n != ht * wt:
        raise ValueError(f"cost volume has {n} target locations, target_size {target_size} has {ht * wt}")
    prob = torch.softmax(cost.flatten(2) / temperature, dim=2)  # (B, N, Hs*Ws)
    coords = _grid(hs, ws, cost).flatten(1)  # (2, Hs*Ws)
    src = torch.einsum("bnk,ck->bcn", prob, coords)
    return src.view(b, 2, ht, wt) - _grid(ht, wt, cost)


def match(feat_t: Tensor, feat_s: Tensor, mode: str = "argmax", temperature: float = 0.05,
          chunk_rows: int | None = None) -> Tensor:
    """Flow target -> profile from two feature maps, without holding the whole 4D volume.

    Works ``chunk_rows`` target rows at a time (all rows when None), so peak memory is
    O(chunk_rows * Wt * Hs * Ws) instead of O(Ht * Wt * Hs * Ws). ``mode`` is "argmax" or "soft".
    """
    if mode not in ("argmax", "soft"):
        raise ValueError(f"matching mode must be 'argmax' or 'soft', got {mode!r}")
    b, _, ht, wt = feat_t.shape
    feat_t, feat_s = _normalise(feat_t), _normalise(feat_s)
    rows = ht if not chunk_rows else max(1, int(chunk_rows))
    flows = []
    for y0 in range(0, ht, rows):
        part = feat_t[:, :, y0:y0 + rows]
        cost = correlation(part, feat_s, normalize=False)
        size = (part.shape[2], wt)
        flow = argmax_flow(cost, size) if mode == "argmax" else soft_argmax_flow(cost, size, temperature)
        flow[:, 1] -= y0  # rows of this chunk start at y0 in the full target grid
        flows.append(flow)
    return torch.cat(flows, dim=2)


class FlowMatcher(nn.Module):
    """Per-level flows target -> profile for several feature levels (no parameters).

    The loop of ``AdaptationTask.match_flows`` as a module, so that ``icp.perf`` can compile it
    as one region: 13 SD1.5 levels of normalise / cost volume / argmax / softmax are hundreds of
    small eager ops otherwise, and the adaptation step waits on the host for them. ``hard``:
    argmax flows, carrying the soft-argmax gradient (straight-through) where gradients flow.
    Returns ({level: flow}, {level: soft flow}) for ``levels``.
    """

    compile_as = "whole"  # icp.perf.compile: one region, not hundreds of small eager ops

    def forward(self, target_feats: list[Tensor], profile_feats: list[Tensor], levels: list[int], hard: bool,
                temperature: float, chunk_rows: int | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        flows: dict[int, Tensor] = {}
        soft_flows: dict[int, Tensor] = {}
        for l in levels:
            t, s = target_feats[l].float(), profile_feats[l].float()
            grad = torch.is_grad_enabled() and (t.requires_grad or s.requires_grad)
            soft = match(t, s, "soft", temperature, chunk_rows) if (grad or not hard) else None
            if hard:
                flow = match(t, s, "argmax", chunk_rows=chunk_rows)
                flows[l] = flow if soft is None else soft + (flow - soft).detach()
            else:
                flows[l] = soft
            if soft is not None:
                soft_flows[l] = soft
        return flows, soft_flows


# --------------------------------------------------------------------------------- resampling


def upsample_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a flow field to ``size`` = (H, W), scaling its magnitudes by the resize factors.

    Bilinear with align_corners=False: a feature cell covers a block of image pixels, so the
    displacement of a block scales exactly with the block size.
    """
    h, w = flow.shape[-2:]
    H, W = size
    out = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
    scale = torch.tensor([W / w, H / h], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
    return out * scale


def downsample_flow(flow: Tensor, size: tuple[int, int], valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Average a pixel flow (and its validity) down to a feature grid, scaling magnitudes.

    Used to compare predicted feature-level flows with an image-resolution ground truth; with
    ``valid`` the average is taken over valid pixels only and a cell is valid if any pixel is.
    """
    h, w = flow.shape[-2:]
    H, W = size
    scale = torch.tensor([W / w, H / h], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
    if valid is None:
        return F.adaptive_avg_pool2d(flow, (H, W)) * scale, None
    num = F.adaptive_avg_pool2d(flow * valid, (H, W))
    den = F.adaptive_avg_pool2d(valid, (H, W))
    return num / den.clamp_min(1e-6) * scale, (den > 0).to(flow.dtype)


def warp(features: Tensor, flow: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Sample ``features`` (the profile) at ``(x, y) + flow``: the profile in the target's pose.

    features: (B, C, Hs, Ws); flow: (B, 2, Ht, Wt) in pixels of the features' grid. Returns
    (B, C, Ht, Wt). Bilinear, differentiable in both arguments; outside the profile is 0.
    """
    b, _, hs, ws = features.shape
    ht, wt = flow.shape[-2:]
    pos = _grid(ht, wt, flow).unsqueeze(0) + flow  # (B, 2, Ht, Wt) absolute profile pixels
    # align_corners=True maps pixel index 0 -> -1 and W-1 -> +1, matching our pixel-centre grid.
    gx = 2.0 * pos[:, 0] / max(ws - 1, 1) - 1.0
    gy = 2.0 * pos[:, 1] / max(hs - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1).to(features.dtype)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


# ---------------------------------------------------------------------------------- metrics


def endpoint_error(flow: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean end-point error (pixels) over valid pixels; NaN when no pixel is valid."""
    err = (flow - gt).norm(dim=1, keepdim=True)
    if valid is None:
        return err.mean()
    valid = valid.to(err.dtype)
    return (err * valid).sum() / valid.sum() if valid.sum() > 0 else err.new_tensor(float("nan"))


def pck(flow: Tensor, gt: Tensor, valid: Tensor | None = None, threshold: float = 1.0) -> Tensor:
    """Percentage of correct keypoints: fraction of valid pixels with end-point error < threshold."""
    ok = ((flow - gt).norm(dim=1, keepdim=True) < threshold).to(flow.dtype)
    if valid is None:
        return ok.mean()
    valid = valid.to(ok.dtype)
    return (ok * valid).sum() / valid.sum() if valid.sum() > 0 else ok.new_tensor(float("nan"))


# ------------------------------------------------------------------------------ flow images


def _color_wheel() -> Tensor:
    """The Middlebury colour wheel (Baker et al. 2011): 55 hues, (55, 3) in [0, 1]."""
    segments = [(15, (1, 0, 0), (1, 1, 0)), (6, (1, 1, 0), (0, 1, 0)), (4, (0, 1, 0), (0, 1, 1)),
                (11, (0, 1, 1), (0, 0, 1)), (13, (0, 0, 1), (1, 0, 1)), (6, (1, 0, 1), (1, 0, 0))]
    rows = []
    for n, a, b in segments:
        t = torch.arange(n, dtype=torch.float32).unsqueeze(1) / n
        rows.append(torch.tensor(a).unsqueeze(0) * (1 - t) + torch.tensor(b).unsqueeze(0) * t)
    return torch.cat(rows)


def flow_to_color(flow: Tensor, max_flow: float | None = None, valid: Tensor | None = None) -> Tensor:
    """Colour-wheel image of a flow: hue = direction, saturation = magnitude / ``max_flow``.

    Returns (B, 3, H, W) float in [0, 1]; zero flow is white, invalid pixels are black.
    ``max_flow`` defaults to the largest magnitude in the batch, so pass a fixed value to compare
    images across steps.
    """
    flow = flow.detach().float()
    u, v = flow[:, 0], flow[:, 1]
    mag = torch.sqrt(u * u + v * v)
    norm = max_flow if max_flow is not None else float(mag.max().clamp_min(1e-6))
    mag = (mag / norm).clamp(max=1.0)
    wheel = _color_wheel().to(flow.device)
    k = wheel.shape[0]
    ang = torch.atan2(-v, -u) / torch.pi  # [-1, 1]
    fk = (ang + 1) / 2 * (k - 1)
    k0 = fk.floor().long().clamp(0, k - 1)
    k1 = (k0 + 1) % k
    f = (fk - k0.float()).unsqueeze(1)
    col = wheel[k0].permute(0, 3, 1, 2) * (1 - f) + wheel[k1].permute(0, 3, 1, 2) * f
    col = 1 - mag.unsqueeze(1) * (1 - col)
    if valid is not None:
        col = col * valid.to(col.dtype)
    return col.clamp(0, 1)

