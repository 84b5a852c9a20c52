"""Does the base model's UNet already correspond across views? A DIFT-style probe, no training.

IC-Portrait's Matching Net *adapts* a matcher the pretrained base already is (paper §3.3; DIFT,
Tang et al. 2023: the decoder features of a diffusion UNet give zero-shot dense correspondence by
cosine argmax). Before judging "diffusion models are fast learners of in-context dense
correspondence" on a base we trained ourselves, measure whether its features match at all.

For held-out profile/target pairs with the renderer's true flow: both images are encoded, the
target (and the profile, ``profile="noised"``; or not, ``"clean"``, as in the method's canvas)
is noised to timestep t with fixed noise, the UNet runs once, and every block's output (decoder
``up<i>``: DIFT's features; encoder ``down<i>`` and ``mid``: what a ControlNet-style Matching Net
copied from the base starts from) gives a cosine-argmax flow target -> profile at that level's grid
(:func:`icp.models.matching.match`), upsampled to pixels and scored inside the target head on the
co-visible pixels (FLOW_VALID) by :func:`icp.tasks.flows.flow_metrics` (EPE px, PCK@alpha).

Beside it, at every level's grid: the **zero flow** (what a matcher must beat), **raw pixels**
(cosine argmax of each cell's RGB block and its 3x3 cell neighbourhood: what matching without any
learned feature gets), and the **rounded true flow** (the cell-averaged true flow rounded to whole
cells: the best an argmax at that grid can do). Verdict: the claims are testable when some
level's EPE <= 0.7 x the zero flow's (issue 30; the fast-learner rule of eval/claims/rules.yaml).

Entry points: :func:`probe` (the whole table from a UNet, codec, scheduler and batches),
:func:`run` (render held-out pairs, load a backbone folder, write ``correspondence.md/json``),
``python -m icp.eval.correspondence --backbone PATH --pairs N --resolution R --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icp.core.argtypes import int_in
from icp.data import keys as K
from icp.models import matching as M
from icp.tasks.flows import flow_metrics

TIMESTEPS = (50, 200, 400)
TESTABLE_RATIO = 0.7  # a level must reach EPE <= 0.7 x zero flow (issue 30)
PROFILE_MODES = ("noised", "clean")
BLOCKS = ("down", "mid", "up")

# ------------------------------------------------------------------------------ features


def unet_features(unet: nn.Module, latents: Tensor, timesteps: Tensor, text_states: Tensor | None = None,
                  blocks: Sequence[str] = ("up",)) -> dict[str, Tensor]:
    """Block outputs of one UNet call, named ``down<i>`` (encoder, fine to coarse: the features a
    ControlNet-style copy such as the Matching Net gives), ``mid`` and ``up<i>`` (decoder, coarse to
    fine: DIFT's features), for the kinds named in ``blocks``.

    Works for diffusers ``UNet2DConditionModel`` (``text_states`` required) and ``UNet2DModel``
    (no text). The hooks read the block outputs only; the UNet's own output is discarded.
    """
    modules: list[tuple[str, nn.Module]] = []
    if "down" in blocks:
        modules += [(f"down{k}", b) for k, b in enumerate(unet.down_blocks)]
    if "mid" in blocks and getattr(unet, "mid_block", None) is not None:
        modules.append(("mid", unet.mid_block))
    if "up" in blocks:
        modules += [(f"up{k}", b) for k, b in enumerate(unet.up_blocks)]
    found: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, out):
            found[name] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules]
    try:
        if text_states is None:
            unet(latents, timesteps)
        else:
            unet(latents, timesteps, encoder_hidden_states=text_states)
    finally:
        for h in hooks:
            h.remove()
    return {name: found[name].float() for name, _ in modules}


# ----------------------------------------------------------------------- flows at a grid


def feature_flows(target_feats: Sequence[Tensor], profile_feats: Sequence[Tensor], chunk_rows: int | None = 8
                  ) -> list[Tensor]:
    """Cosine-argmax flow target -> profile per level, in that level's cells (matching.match)."""
    return [M.match(t, s, "argmax", chunk_rows=chunk_rows) for t, s in zip(target_feats, profile_feats)]


def pixel_features(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw-pixel features at a (h, w) grid: each cell's RGB block (pixel-unshuffle) with its 3x3 cell
    neighbourhood, so that a cell of one pixel still compares a patch, not a colour."""
    H, W = images.shape[-2:]
    h, w = size
    if H % h or W % w or H // h != W // w:
        images = F.interpolate(images, size=(h, w), mode="area")
        cells = images
    else:
        cells = F.pixel_unshuffle(images, H // h)
    b, c = cells.shape[:2]
    return F.unfold(cells, 3, padding=1).view(b, c * 9, h, w)


def rounded_true_flow(flow_gt: Tensor, valid: Tensor | None, size: tuple[int, int]) -> Tensor:
    """The true flow averaged over each cell's co-visible pixels and rounded to whole cells: the
    flow an argmax at this grid would give if it always picked the right cell (the grid's floor)."""
    cells, cell_valid = M.downsample_flow(flow_gt.float(), size, None if valid is None else valid.float())
    flow = cells.round()
    return flow if cell_valid is None else flow * cell_valid


# ------------------------------------------------------------------------------- scoring


class _Tally:
    """Per-row sums over pairs: EPE and PCK pooled over co-visible pixels, per-pair EPE kept."""

    def __init__(self) -> None:
        self.rows: dict[tuple, dict] = {}

    def add(self, key: tuple, info: dict, flows: Sequence[Tensor], batch: dict, ids: Sequence[int],
            pck_alpha: float) -> None:
        row = self.rows.setdefault(key, {**info, "epe_sum": 0.0, "pck_sum": 0.0, "n_valid": 0, "pairs": [],
                                         "identities": []})
        valid = batch.get(K.FLOW_VALID)
        for i in range(batch[K.FLOW_GT].shape[0]):
            item = {K.FLOW_GT: batch[K.FLOW_GT][i:i + 1]}
            if valid is not None:
                item[K.FLOW_VALID] = valid[i:i + 1]
            n = int(valid[i].sum()) if valid is not None else int(batch[K.FLOW_GT][i, 0].numel())
            found = flow_metrics([f[i:i + 1] for f in flows], range(len(flows)), item, pck_alpha)
            epe, pc = float(found["flow_epe"]), float(found["flow_pck"])
            if n > 0:
                row["epe_sum"] += epe * n
                row["pck_sum"] += pc * n
                row["n_valid"] += n
            row["pairs"].append(epe if n > 0 else math.nan)
            row["identities"].append(int(ids[i]))

    def finish(self) -> list[dict]:
        out = []
        for row in self.rows.values():
            n = row.pop("n_valid")
            epe, pc = row.pop("epe_sum"), row.pop("pck_sum")
            out.append({**row, "epe": epe / n if n else math.nan, "pck": pc / n if n else math.nan, "n_valid": n})
        return out


@torch.no_grad()
def probe(unet: nn.Module, codec: nn.Module, scheduler, batches: Iterable[dict], text_states: Tensor | None = None,
          timesteps: Sequence[int] = TIMESTEPS, profile_modes: Sequence[str] = ("noised",), ensemble: int = 1,
          seed: int = 0, pck_alpha: float = 0.05, chunk_rows: int | None = 8, blocks: Sequence[str] = ("up",)) -> dict:
    """The probe's whole table on ``batches`` (the batch contract: PROFILE, TARGET, FLOW_GT,
    FLOW_VALID, IDENTITY). ``text_states``: (1, L, D) prompt states for a conditional UNet, None
    for ``UNet2DModel``. ``ensemble``: features averaged over that many fixed noise draws (DIFT
    uses 8). Noise is seeded by (seed, batch index) and the same for every t and profile mode.
    ``blocks``: which block outputs are probed (``down``, ``mid``, ``up``: see :func:`unet_features`).

    Returns {"rows": [{level, grid, t, profile, epe, pck, n_valid, pairs, identities}],
    "baselines": [{name, level, grid, ...same scores}], "zero_epe", "verdict": {...}, "settings"}.
    """
    for mode in profile_modes:
        if mode not in PROFILE_MODES:
            raise ValueError(f"profile mode {mode!r} unknown (use {' or '.join(PROFILE_MODES)})")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    tally, grids, pairs = _Tally(), {}, 0
    for index, batch in enumerate(batches):
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        ids = batch[K.IDENTITY].tolist() if K.IDENTITY in batch else list(range(pairs, pairs + len(batch[K.TARGET])))
        b = batch[K.TARGET].shape[0]
        pairs += b
        lat_t = codec.encode(batch[K.TARGET].float()).to(dtype)
        lat_s = codec.encode(batch[K.PROFILE].float()).to(dtype)
        g = torch.Generator(device="cpu").manual_seed(seed * 100_003 + index)
        noise_t = torch.randn((ensemble, *lat_t.shape), generator=g).to(device, dtype)
        noise_s = torch.randn((ensemble, *lat_s.shape), generator=g).to(device, dtype)
        text = None if text_states is None else text_states.to(device, dtype).expand(2 * b * ensemble, -1, -1)
        for t in timesteps:
            steps = torch.full((b,), int(t), device=device, dtype=torch.long)
            noisy_t = torch.cat([scheduler.add_noise(lat_t, n, steps) for n in noise_t])
            for mode in profile_modes:
                noisy_s = (torch.cat([scheduler.add_noise(lat_s, n, steps) for n in noise_s]) if mode == "noised"
                           else lat_s.repeat(ensemble, 1, 1, 1))
                named = unet_features(unet, torch.cat([noisy_t, noisy_s]), steps.repeat(2 * ensemble), text, blocks)
                # (2*E*B, C, h, w) -> mean over the E noise draws, split into target / profile
                feats = [f.view(2, ensemble, b, *f.shape[1:]).mean(1) for f in named.values()]
                flows = feature_flows([f[0] for f in feats], [f[1] for f in feats], chunk_rows)
                for level, flow, f in zip(named, flows, feats):
                    grid = tuple(f.shape[-2:])
                    grids[level] = grid
                    tally.add(("probe", level, int(t), mode), {"kind": "probe", "level": level,
                              "grid": f"{grid[0]}x{grid[1]}", "channels": int(f.shape[2]), "t": int(t),
                              "profile": mode}, [flow], batch, ids, pck_alpha)
        # Baselines at every level's grid (independent of t): raw pixels, rounded true flow; zero once.
        gt, valid = batch[K.FLOW_GT].float(), batch.get(K.FLOW_VALID)
        tally.add(("zero",), {"kind": "zero", "name": "zero flow", "level": None, "grid": "-"},
                  [torch.zeros_like(gt)], batch, ids, pck_alpha)
        for grid in sorted(set(grids.values())):  # once per distinct grid (levels may share one)
            name = f"{grid[0]}x{grid[1]}"
            px = M.match(pixel_features(batch[K.TARGET].float(), grid), pixel_features(batch[K.PROFILE].float(), grid),
                         "argmax", chunk_rows=chunk_rows)
            tally.add(("pixels", grid), {"kind": "pixels", "name": "raw pixels", "level": None, "grid": name,
                                         "cells": grid[0] * grid[1]}, [px], batch, ids, pck_alpha)
            tally.add(("rounded", grid), {"kind": "rounded", "name": "rounded true flow", "level": None, "grid": name,
                                          "cells": grid[0] * grid[1]}, [rounded_true_flow(gt, valid, grid)],
                      batch, ids, pck_alpha)
    rows = tally.finish()
    table = [r for r in rows if r["kind"] == "probe"]
    baselines = [r for r in rows if r["kind"] != "probe"]
    zero = next((r for r in baselines if r["kind"] == "zero"), None)
    result = {"rows": table, "baselines": baselines, "zero_epe": zero["epe"] if zero else math.nan, "pairs": pairs,
              "settings": {"timesteps": [int(t) for t in timesteps], "profile_modes": list(profile_modes),
                           "blocks": list(blocks),
                           "ensemble": int(ensemble), "seed": int(seed), "pck_alpha": float(pck_alpha)}}
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict, ratio: float = TESTABLE_RATIO) -> dict:
    """Is some level's EPE <= ``ratio`` x the zero flow's? With the paired identity-bootstrap
    interval of (EPE - ratio x zero EPE) per pair for the best row (chosen on the same pairs: the
    interval is optimistic by that selection)."""
    from icp.eval.stats import compare

    zero = next(r for r in result["baselines"] if r["kind"] == "zero")
    finite = [r for r in result["rows"] if math.isfinite(r["epe"])]
    if not finite or not math.isfinite(zero["epe"]) or zero["epe"] <= 0:
        return {"testable": False, "ratio_needed": ratio, "text": "NOT MEASURED: no co-visible pixels"}
    best = min(finite, key=lambda r: r["epe"])
    share = best["epe"] / zero["epe"]
    paired = compare(best["pairs"], [ratio * z for z in zero["pairs"]], best["identities"], higher_is_better=False)
    testable = share <= ratio
    name = f"level {_level_name(best['level'])} ({best['grid']}), t={best['t']}, profile {best['profile']}"
    text = (f"{'TESTABLE' if testable else 'NOT TESTABLE'}: best {name}: EPE {best['epe']:.2f} px = "
            f"{share:.2f} x zero flow ({zero['epe']:.2f} px); needed <= {ratio:g} x. Per pair, EPE - {ratio:g} x zero: "
            f"{paired['mean']:.2f} [{paired['lo']:.2f}, {paired['hi']:.2f}] px ({paired['verdict']}, "
            f"n={paired['n']}, {paired['identities']} ids)")
    return {"testable": bool(testable), "ratio_needed": ratio,
            "best": {k: best[k] for k in ("level", "grid", "t", "profile", "epe", "pck")}, "share_of_zero": share,
            "paired": {k: paired[k] for k in ("mean", "lo", "hi", "n", "identities", "verdict")},
            "text": text}


# ------------------------------------------------------------------------------- writing


def _level_name(level) -> str:
    return f"up{level}" if isinstance(level, int) else str(level)  # results before encoder levels: ints = up<i>


def _block_order(level) -> tuple:
    name = _level_name(level)
    kind = name.rstrip("0123456789")
    return ({"down": 0, "mid": 1, "up": 2}.get(kind, 3), int(name[len(kind):] or 0))


def markdown(result: dict, title: str = "Correspondence probe of the base (DIFT-style, no training)") -> str:
    """The probe table, the baselines and the verdict as Markdown."""
    s = result["settings"]
    zero = result["zero_epe"]

    def share(epe: float) -> str:
        return f"{epe / zero:.2f}" if math.isfinite(epe) and zero and math.isfinite(zero) else "n/a"

    alpha = f"PCK@{s['pck_alpha']:g}"
    lines = [f"# {title}", "",
             f"{result['pairs']} held-out pairs; timesteps {s['timesteps']}; noise ensemble {s['ensemble']}; "
             f"seed {s['seed']}. Cosine argmax of each UNet block's output features (down<i>: encoder, the "
             "features a ControlNet-style Matching Net starts from; up<i>: decoder, DIFT's), target -> profile, upsampled to "
             "pixels and scored on the target's co-visible head pixels against the renderer's flow.", ""]
    lines += ["| level | grid | t | profile | EPE px | " + alpha + " | x zero | valid px |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (_block_order(r["level"]), r["t"], r["profile"])):
        lines.append(f"| {_level_name(r['level'])} | {r['grid']} | {r['t']} | {r['profile']} | {r['epe']:.2f} | {r['pck']:.3f} | "
                     f"{share(r['epe'])} | {r['n_valid']} |")
    lines += ["", "Baselines (no model):", "", "| baseline | grid | EPE px | " + alpha + " | x zero | valid px |",
              "|---|---|---|---|---|---|"]
    order = {"zero": 0, "pixels": 1, "rounded": 2}
    for r in sorted(result["baselines"], key=lambda r: (order[r["kind"]], r.get("cells", 0))):
        lines.append(f"| {r['name']} | {r['grid']} | {r['epe']:.2f} | {r['pck']:.3f} | {share(r['epe'])} | "
                     f"{r['n_valid']} |")
    lines += ["", f"**Verdict** (a level with EPE <= {result['verdict']['ratio_needed']:g} x zero flow): "
              f"{result['verdict']['text']}", ""]
    return "\n".join(lines)


def write(result: dict, out: str | Path, **extra) -> dict[str, Path]:
    """``<out>/correspondence.md`` and ``.json`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "correspondence.md", "json": out / "correspondence.json"}
    texts = {"md": markdown(result), "json": json.dumps({**result, **extra}, indent=1, default=str)}
    for kind, path in paths.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(texts[kind])
        tmp.replace(path)
    return paths


# ------------------------------------------------------------------------- the whole run


def heldout_batches(first_identity: int, identities: int, views: int, resolution: int, pairs: int,
                    batch_size: int, seed: int) -> list[dict]:
    """``pairs`` ordered view pairs of held-out identities [first, first + identities), rendered
    directly (the claims study's recipe, icp.eval.pairs), round-robin over identities."""
    from icp.eval import pairs as P

    groups = P.render_heldout(first_identity, identities, views, resolution, seed)
    per_identity = max(1, math.ceil(pairs / identities))
    chosen = P.random_pairs(sorted(groups), views, per_identity, seed)[:pairs]
    return list(P.batches(groups, chosen, batch_size, mask_ratio=0.0, patch_size=4, seed=seed))


def run(backbone: str, out: str | Path, pairs: int = 64, resolution: int = 64, first_identity: int = 1024,
        identities: int = 32, views: int = 8, seed: int = 0, timesteps: Sequence[int] = TIMESTEPS,
        profile_modes: Sequence[str] = PROFILE_MODES, ensemble: int = 1, batch_size: int = 16, device: str = "cpu",
        prompt: str = "a photo of a person", dtype: str = "float32", pck_alpha: float = 0.05,
        tiny_kwargs: dict | None = None, blocks: Sequence[str] = BLOCKS) -> dict:
    """Load ``backbone`` (a diffusers folder, icp.models.backbone.pretrained; or ``tiny`` = a random
    icp.models.backbone.tiny(resolution, **tiny_kwargs)), render held-out pairs, probe, write
    ``<out>/correspondence.md/json``. Returns the result (with "files")."""
    import time

    from icp.models import backbone as B

    start = time.perf_counter()
    if backbone == "tiny":
        model = B.tiny(resolution=resolution, **(tiny_kwargs or {}))
    else:
        model = B.pretrained(backbone, dtype=dtype)
    model = model.to(device).eval()
    if dtype != "float32":
        model.codec.float()  # encode in float32; the UNet runs in ``dtype``
    text = model.encode_text([prompt]) if hasattr(model.unet.config, "cross_attention_dim") and \
        model.unet.config.cross_attention_dim else None
    batches = heldout_batches(first_identity, identities, views, resolution, pairs, batch_size, seed)
    result = probe(model.unet, model.codec, model.noise_scheduler, batches, text, timesteps, profile_modes, ensemble,
                   seed, pck_alpha, blocks=blocks)
    params = sum(p.numel() for p in model.unet.parameters())
    info = {"backbone": str(backbone), "unet_parameters": params, "resolution": resolution, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "heldout_identities": [first_identity, first_identity + identities], "views": views,
            "seconds": round(time.perf_counter() - start, 1)}
    result["settings"].update(info)
    result["files"] = {k: str(v) for k, v in write(result, out).items()}
    return result


def from_pipeline(cfg, backbone: str | Path, out: str | Path, device: str) -> dict:
    """The ``correspondence`` stage of an ``icp run`` pipeline (experiments/portrait64.yaml): the
    held-out identities, views, resolution and seed of its ``data`` node, the probe settings of its
    ``correspondence`` node. Returns what the stage records (verdict, files)."""
    from omegaconf import OmegaConf

    d = cfg.data
    settings = OmegaConf.to_container(cfg.correspondence, resolve=True) if "correspondence" in cfg else {}
    result = run(str(backbone), out, first_identity=int(d.identities), identities=int(d.heldout_identities),
                 views=int(d.views), resolution=int(d.resolution), seed=int(cfg.seed), device=device, **settings)
    return {"verdict": result["verdict"], "zero_epe": result["zero_epe"], "files": result["files"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icp.eval.correspondence", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="diffusers folder (<run>/backbone) or 'tiny' (random weights)")
    p.add_argument("--tiny", default="{}", help="JSON kwargs of icp.models.backbone.tiny when --backbone tiny")
    p.add_argument("--out", required=True, help="folder for correspondence.md/json")
    p.add_argument("--pairs", type=int_in(1, 4096), default=64)
    p.add_argument("--resolution", type=int_in(8, 512), default=64)
    p.add_argument("--first-identity", type=int_in(0, 10**9), default=1024,
                   help="first held-out identity index (= the number of training identities)")
    p.add_argument("--identities", type=int_in(1, 4096), default=32)
    p.add_argument("--views", type=int_in(2, 64), default=8)
    p.add_argument("--timesteps", type=int_in(0, 999), nargs="+", default=list(TIMESTEPS))
    p.add_argument("--profile", nargs="+", default=list(PROFILE_MODES), choices=PROFILE_MODES)
    p.add_argument("--ensemble", type=int_in(1, 32), default=1)
    p.add_argument("--batch-size", type=int_in(1, 1024), default=16)
    p.add_argument("--seed", type=int_in(0, 2**31 - 1), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS,
                   help="block outputs probed: down (encoder: the Matching Net's features), mid, up (decoder: DIFT's)")
    a = p.parse_args(argv)
    if a.backbone != "tiny" and not (Path(a.backbone) / "unet").is_dir():
        p.error(f"--backbone {a.backbone}: not a base folder (unet/ inside; a pretrain run writes <run>/backbone) "
                "and not 'tiny'")
    try:
        tiny = json.loads(a.tiny)
    except ValueError:
        tiny = None
    if not isinstance(tiny, dict):
        p.error(f"--tiny {a.tiny[:60]!r}: give a JSON object of icp.models.backbone.tiny's keyword arguments")
    result = run(a.backbone, a.out, a.pairs, a.resolution, a.first_identity, a.identities, a.views, a.seed,
                 a.timesteps, a.profile, a.ensemble, a.batch_size, a.device, dtype=a.dtype,
                 tiny_kwargs=tiny, blocks=a.blocks)
    print(markdown(result))
    print(f"wrote {result['files']['md']} ({result['settings']['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
