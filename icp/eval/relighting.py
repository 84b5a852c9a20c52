"""Relighting (paper claim d), one implementation for the main job and the claims study.

Held-out identity and target pose fixed, only the target light changes: each identity's profile
(view 0) and its target pose (view 1) rendered under L sampled lights, one patch mask per identity
so only the light differs between the L targets. An output *follows* the light when its lighting
error to its own target is below its error to the same pose under the other lights
(``follow_* = other_* - own_*``). The same figures are computed for model-free inpainting of the
masked target (icp.eval.baselines.inpaint_visible): the visible 20 % carry the light too, so a
method must beat that to claim it relights.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from icp.data import keys as K
from icp.data.masking import apply_mask, random_patch_mask
from icp.data.shards.read import stable_seed
from icp.eval import metrics as M
from icp.eval.baselines import inpaint_visible
from icp.render import renderer as R
from icp.render.lighting import sample_light

KEYS = ("own_colour", "other_colour", "follow_colour", "truth_gap_colour", "own_shading", "other_shading",
        "follow_shading", "truth_gap_shading", "follow_colour_hidden", "follow_shading_hidden",
        "truth_gap_shading_hidden")


def relight_set(first: int, identities: int, lights: int, resolution: int, data_seed: int, seed: int,
                mask_ratio: float, patch_size: int) -> dict:
    """Profiles (N,3,H,W), targets (N,L,3,H,W), head masks (N,1,H,W), patch masks (N,1,H,W)."""
    profiles, targets, masks, fgs = [], [], [], []
    for k in range(first, first + identities):
        ident = R.sample_identity(k, data_seed)[None]
        pose_p, light_p, bg_p = R.sample_view(k, 0, data_seed)
        pose_t, _, bg_t = R.sample_view(k, 1, data_seed)
        profiles.append(R.render(ident, pose_p[None], light_p[None], bg_p[None], resolution)["rgb"][0] * 2 - 1)
        g = torch.Generator().manual_seed(stable_seed(seed, k, 17))
        light = torch.stack([sample_light(g) for _ in range(lights)])
        rend = R.render(ident.expand(lights, -1), pose_t[None].expand(lights, -1), light,
                        bg_t[None].expand(lights, -1), resolution)
        targets.append(rend["rgb"] * 2 - 1)
        fgs.append(rend["fg"][0])
        masks.append(random_patch_mask((1, resolution, resolution), mask_ratio, patch_size, generator=g)[0])
    return {"identity": torch.arange(first, first + identities), "profile": torch.stack(profiles),
            "target": torch.stack(targets), "fg": torch.stack(fgs), "keep": torch.stack(masks)}


def batch_for_light(s: dict, light: int) -> dict:
    target = s["target"][:, light].contiguous()  # a strided slice sends CPU convs down a ~10x slower path
    return {K.PROFILE: s["profile"], K.TARGET: target, K.TARGET_KEEP: s["keep"], K.IDENTITY: s["identity"],
            K.TARGET_MASKED: apply_mask(target, s["keep"]), K.TARGET_FG: s["fg"]}


@torch.no_grad()
def generate(sample, s: dict, num_steps: int, device: str, seed: int) -> torch.Tensor:
    """(N, L, 3, H, W): the method under every light, with the same noise for every light."""
    outs = []
    for light in range(s["target"].shape[1]):
        batch = move_data_to_device(batch_for_light(s, light), device)
        g = torch.Generator(device=device).manual_seed(seed)
        outs.append(sample(batch, num_steps=num_steps, guidance_scale=None, generator=g).cpu())
    return torch.stack(outs, dim=1)


def inpainted(s: dict) -> torch.Tensor:
    """(N, L, 3, H, W): model-free inpainting of each masked target."""
    return torch.stack([inpaint_visible(batch_for_light(s, l)[K.TARGET_MASKED], s["keep"])
                        for l in range(s["target"].shape[1])], dim=1)


def _follow(out: torch.Tensor, target: torch.Tensor, l: int, m: torch.Tensor) -> dict:
    """Lighting error of output ``out`` (3,H,W) to its own light ``l`` and to the others, over mask ``m``."""
    n_light = target.shape[0]
    own_c, own_s = M.lighting_error(out[None], target[l][None], m)
    others = [o for o in range(n_light) if o != l]
    oth = [M.lighting_error(out[None], target[o][None], m) for o in others]
    gap = [M.lighting_error(target[l][None], target[o][None], m) for o in others]
    row = {"own_colour": float(own_c), "own_shading": float(own_s),
           "other_colour": sum(float(a) for a, _ in oth) / len(oth),
           "other_shading": sum(float(b) for _, b in oth) / len(oth),
           "truth_gap_colour": sum(float(a) for a, _ in gap) / len(gap),
           "truth_gap_shading": sum(float(b) for _, b in gap) / len(gap)}
    row["follow_colour"] = row["other_colour"] - row["own_colour"]
    row["follow_shading"] = row["other_shading"] - row["own_shading"]
    return row


def scores(out: torch.Tensor, s: dict) -> list[dict]:
    """Per (identity, light): lighting error to its own target, to the other lights, the truth's gap --
    over the whole head, and over the head pixels the patch mask HID (``*_hidden``): there the output
    cannot copy the light from the visible pixels, so relighting must come from the model."""
    target, fg, keep = s["target"], s["fg"], s["keep"]
    n_id, n_light = target.shape[:2]
    rows = []
    for i in range(n_id):
        head, hidden = fg[i][None], (fg[i] * (1 - keep[i].float()))[None]
        for l in range(n_light):
            row = {"identity": int(s["identity"][i]), "light": l, **_follow(out[i, l], target[i], l, head)}
            h = _follow(out[i, l], target[i], l, hidden)
            row.update(follow_colour_hidden=h["follow_colour"], follow_shading_hidden=h["follow_shading"],
                       truth_gap_shading_hidden=h["truth_gap_shading"])
            rows.append(row)
    return rows


def grid_columns(out: torch.Tensor, s: dict, n_show: int = 3) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Columns: profile, then one per light; per identity two rows: true render, generated."""
    n_show = min(n_show, out.shape[0])
    lines, labels = [], []
    for i in range(n_show):
        lines += [s["target"][i], out[i]]
        labels += [f"id {int(s['identity'][i])} truth", f"id {int(s['identity'][i])} output"]
    cols = [("profile", torch.stack([s["profile"][i // 2] for i in range(len(lines))]))]
    cols += [(f"light {l}", torch.stack([line[l] for line in lines])) for l in range(out.shape[1])]
    return cols, labels
