"""``paper_claims.md`` / ``.json`` and the plots, from whatever results exist so far.

Called after every finished job, so a run cut short still leaves every table it got to (a missing
claim says NOT MEASURED). Plots need matplotlib; without it they are skipped with a note (the
GPU image does not promise it), and the sample grids, written with torchvision, are always there.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from icp.eval.grids import pyplot, save_figure
from icp.jobs.claims import verdicts as V
from icp.jobs.claims.results import CURVES, collect, masking_rows, merge, warp_table
from icp.jobs.claims.plan import Job, ratio_tag
from icp.jobs.runner import Timeline

LIMITATIONS = [
    "Tiny models: a UNet of a few million parameters (paper: SD1.5, 860 M) pretrained here for minutes on "
    "synthetic renders, not on billions of photos; the control nets are copies of *that* base.",
    "32 px renders with a lossless pixel codec (4x4 latent cells), not 512 px through a VAE: the finest matching "
    "level is 8x8, so a flow is quantised to 4-px cells and the zero flow is a strong baseline.",
    "Synthetic procedural heads with exact ground truth (flow, relit target); the identity metric is icp's own "
    "embedder trained on the training identities, not a face recogniser on real photos.",
    "Few steps: stitching, adaptation and pretraining run for hundreds to a few thousand steps (paper: 10k-20k "
    "for the Appearance Net); a claim that fails here may hold at scale, and one that holds here is weak "
    "evidence for scale.",
    "Intervals resample held-out identities (pairs of one identity, in every seed, go together); with few "
    "held-out identities they are wide, and a comparison with fewer than 20 valid pairs is not decided.",
]


LABELS = {"base": "base init", "random": "random init", "supervised": "true-flow supervised (reference)"}


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ms(s: dict | None, digits: int = 3) -> str:
    """mean [95 % identity-bootstrap interval]."""
    if not s or not s.get("n"):
        return "n/a"
    lo, hi = s.get("lo", math.nan), s.get("hi", math.nan)
    ci = f" [{_f(lo, digits)}, {_f(hi, digits)}]" if lo == lo and hi == hi else ""
    return f"{_f(s['mean'], digits)}{ci}"


def _err(stats_list: list[dict]) -> list[list[float]]:
    """Asymmetric error bars (mean - lo, hi - mean) for matplotlib."""
    return [[s["mean"] - s["lo"] if s["lo"] == s["lo"] else 0 for s in stats_list],
            [s["hi"] - s["mean"] if s["hi"] == s["hi"] else 0 for s in stats_list]]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _plots(out_dir: Path, found: dict, cfg: DictConfig) -> tuple[dict, str | None]:
    try:
        plt = pyplot()
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed here (tables and sample grids are complete)"
    plots = {}
    curves = found["curves"]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for init, curve in curves.items():
            steps = [p["step"] for p in curve]
            style = {"ls": ":"} if init == "supervised" else {}
            axes[0].plot(steps, [p["flow_epe"] for p in curve], marker="o", label=LABELS[init], **style)
            axes[1].plot(steps, [p["flow_pck"] for p in curve], marker="o", label=LABELS[init], **style)
        zero = next(iter(curves.values()))
        axes[0].axhline(sum(p["flow_epe_zero"] for p in zero) / len(zero), color="grey", ls="--", label="zero flow")
        axes[0].set(xlabel="adaptation steps", ylabel="flow EPE (px, lower better)", title="held-out flow EPE")
        axes[1].set(xlabel="adaptation steps", ylabel="PCK@5%", title="held-out flow PCK")
        axes[0].legend(fontsize=7), axes[1].legend(fontsize=7)
        fig.tight_layout()
        plots["fast_learner"] = "fast_learner.png"
        save_figure(fig, out_dir / plots["fast_learner"])
    masks = masking_rows(cfg, found)
    if masks:
        ratios = [r for r, _ in masks]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, key, label in ((axes[0], "id_paired", "id_cos gain over swapped profile"),
                               (axes[1], "light_colour_err", "lighting colour error")):
            ax.errorbar(ratios, [s[key]["mean"] for _, s in masks], yerr=_err([s[key] for _, s in masks]),
                        marker="o", capsize=3)
            ax.set(xlabel="mask ratio (train = eval)", ylabel=label)
        axes[0].axhline(0, color="grey", lw=0.8)
        fig.tight_layout()
        plots["masking"] = "masking.png"
        save_figure(fig, out_dir / plots["masking"])
    warp = warp_table(found)
    if warp:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels = [b["label"] for b in warp["buckets"]]
        ax.errorbar(range(len(labels)), [b["delta"]["mean"] for b in warp["buckets"]],
                    yerr=_err([b["delta"] for b in warp["buckets"]]), marker="o", capsize=3, label="matched-flow warp")
        if "true_delta" in warp:
            ax.errorbar([i + 0.05 for i in range(len(labels))], [b["true_delta"]["mean"] for b in warp["buckets"]],
                        yerr=_err([b["true_delta"] for b in warp["buckets"]]), marker="s", capsize=3, ls=":",
                        label="true-flow warp (oracle)")
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel="|yaw(profile) - yaw(target)|", ylabel="id_cos(warp) - id_cos(no warp)")
        fig.tight_layout()
        plots["warping"] = "warping.png"
        save_figure(fig, out_dir / plots["warping"])
    return plots, None


def write(cfg: DictConfig, jobs: dict[str, Job], timeline: Timeline, status: dict, device: str, final: bool,
          config_name: str = "eval/paper_claims.yaml", founds: list[dict] | None = None,
          seeds: list[int] | None = None) -> Path:
    """The report of one seed (``founds`` None) or of several seeds pooled (``founds``: one collect()
    per seed, ``seeds`` their seeds; the tables and verdicts pool them)."""
    out = Path(cfg.report)
    img_dir = out.parent / out.name  # PNGs in a folder named like the report, next to it
    img_dir.mkdir(parents=True, exist_ok=True)
    founds = founds or [collect(cfg, jobs)]
    seeds = seeds or [int(cfg.seed)]
    found = merge(founds)
    rules = V.load_rules()
    plots, plot_note = _plots(img_dir, found, cfg)
    for res in found["evals"].values():  # copy the evaluation grids beside the report
        for grid in _grids(res):
            if Path(grid).is_file():
                shutil.copyfile(grid, img_dir / Path(grid).name)
    rel = img_dir.name
    c = cfg.claims
    verdicts: dict[str, tuple[str, str]] = {}
    md = [f"# IC-Portrait's claims at small scale{'' if final else ' (PARTIAL: run still going or cut short)'}", ""]
    seed_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"
    md += [f"Generated by `python eval/paper_claims.py` on **{device}**; {seed_text} (each seed: every fit, sampling "
           f"noise and pair selection; tables and verdicts pool the seeds' per-pair rows, intervals are 95 % "
           f"bootstraps over held-out identities) (data seed {cfg.data.seed}). Held-out identities {cfg.data.identities}.."
           f"{cfg.data.identities + cfg.data.heldout_identities - 1} were never trained on (the fits see "
           f"{cfg.data.identities} identities x {cfg.data.views} views at {cfg.data.resolution} px). Identity metric: "
           f"`icp-synthetic-embedder, trained by icp` (held-out verification AUC "
           f"{_f(found['embedder_auc'])}). Sampling: DDIM {cfg.evaluate.steps} steps, each model's own guidance scale.",
           ""]
    # 1 -----------------------------------------------------------------------------------------
    verdicts["fast_learner"] = V.fast_learner([f["curves"] for f in founds], rules)
    md += ["## 1. Fast learner: Matching Net flow vs training steps", "", f"> {V.CLAIMS['fast_learner']}", "",
           "Measured: end-point error (px) and PCK (within 5 % of the image size) of the finest matched level's "
           f"hard flow vs the renderer's true flow on {c.fast_learner.pairs} held-out pairs, target noised to "
           "t = 200 with fixed noise; the same pretrained backbone, Appearance Net (stitching run at mask ratio "
           f"{c.masking.main_ratio:g}), seed and data for both inits; only the Matching Net's initial weights differ.", ""]
    curves = found["curves"]
    if curves:
        steps = sorted({p["step"] for cv in curves.values() for p in cv})
        get = {init: {p["step"]: p for p in cv} for init, cv in curves.items()}
        inits = [i for i in CURVES if i in ("base", "random") or i in curves]
        rows = []
        for s in steps:
            row = [str(s)]
            for init in inits:
                p = get.get(init, {}).get(s)
                row += [_f(p["flow_epe"], 2), _f(p["flow_pck"], 3)] if p else ["", ""]
            zero = next((g[s]["flow_epe_zero"] for g in get.values() if s in g), None)
            rows.append(row + [_f(zero, 2)])
        header = [h for i in inits for h in (f"EPE {LABELS[i]}", f"PCK {LABELS[i]}")]
        md += _table(["step", *header, "EPE zero flow"], rows) + [""]
        if "supervised" in curves:
            md += [f"The *true-flow supervised* column is not the paper's method: the same base-init Matching Net "
                   f"trained with the renderer's flow as an extra loss (weight {float(c.fast_learner.get('supervised_weight', 0)):g}), "
                   "a reference for what this matcher, at this resolution, and this measurement can reach.", ""]
        if "fast_learner" in plots:
            md += [f"![flow EPE and PCK vs steps]({rel}/{plots['fast_learner']})", ""]
    md += [f"**{verdicts['fast_learner'][0]}** at this scale: {verdicts['fast_learner'][1]}.",
           f"Rule (eval/claims/rules.yaml): {rules['fast_learner']['rule']}", ""]
    # 2 -----------------------------------------------------------------------------------------
    masks = masking_rows(cfg, found)
    verdicts["masking"] = V.masking([f["evals"] for f in founds], rules, ratio_tag)[:2]
    md += ["## 2. Masking ratio of Lighting-Aware Stitching", "", f"> {V.CLAIMS['masking']}", "",
           f"Measured: one stitching fit per ratio (same pretrained base, seed, steps), evaluated at its own ratio on "
           f"{c.masking.pairs} held-out pairs. *gain over swapped* = id_cos(output, profile) minus the same for the "
           "same model, masked target and noise given another identity's profile (paired, ± s.e.): how much the "
           "output depends on the profile. Lighting errors are vs the true render over the head mask "
           "(`icp.eval.metrics.lighting_error`: mean-RGB distance and luminance-slope distance).", ""]
    if masks:
        md += _table(["mask ratio", "id_cos to profile", "gain over swapped", "ceiling (true render)",
                      "light colour err", "shading err", "PSNR", "SSIM", "pairs"],
                     [[f"{r:g}", _ms(s["id_cos"]), _ms(s["id_paired"]), _ms(s["ceiling"]),
                       _ms(s["light_colour_err"], 4), _ms(s["shading_err"], 4), _ms(s["psnr"], 2), _ms(s["ssim"]),
                       str(s["id_cos"]["n"])] for r, s in masks]) + [""]
        if "masking" in plots:
            md += [f"![masking ratio]({rel}/{plots['masking']})", ""]
        for r, _ in masks:
            res = found["evals"][f"eval_masking_{ratio_tag(r)}"]
            if res.get("grid"):
                md += [f"Ratio {r:g} ({res['grid_columns']}):", "", f"![ratio {r:g}]({rel}/{Path(res['grid']).name})", ""]
    md += [f"**{verdicts['masking'][0]}** at this scale: {verdicts['masking'][1]}.",
           f"Rule (eval/claims/rules.yaml): {rules['masking']['rule']}", ""]
    # 3 -----------------------------------------------------------------------------------------
    warp = warp_table(found)
    verdicts["warping"] = V.warping([f["evals"] for f in founds], rules)[:2]
    md += ["## 3. Warping by the matching flow vs unwarped concatenation", "", f"> {V.CLAIMS['warping']}", "",
           "Measured: two adaptation fits from the same stitching run, pretrained base and seed, with the flow warp "
           "(`warp_identity: true`) and without (`false`); held-out pairs rendered with "
           f"{c.warping.views} views per identity, bucketed by |yaw(profile) - yaw(target)|, up to "
           f"{c.warping.pairs_per_bucket} per bucket; both models see the same pairs, masks and noise, so "
           "*warp - no warp* is paired.", ""]
    if warp:
        oracle = "true_delta" in warp
        md += _table(["yaw difference", "pairs", "id_cos warp", "id_cos no warp", "warp - no warp",
                      *(["id_cos true-flow warp", "true-flow warp - no warp"] if oracle else []),
                      "gain over swapped: warp", "no warp", "PSNR warp / no warp", "SSIM warp / no warp"],
                     [[b["label"], str(b["n"]), _ms(b["warp"]["id_cos"]), _ms(b["nowarp"]["id_cos"]), _ms(b["delta"]),
                       *([_ms((b.get("true") or {}).get("id_cos")), _ms(b.get("true_delta"))] if oracle else []),
                       _ms(b["warp"]["id_paired"]), _ms(b["nowarp"]["id_paired"]),
                       f"{_f(b['warp']['psnr']['mean'], 2)} / {_f(b['nowarp']['psnr']['mean'], 2)}",
                       f"{_f(b['warp']['ssim']['mean'])} / {_f(b['nowarp']['ssim']['mean'])}"]
                      for b in warp["buckets"]]) + [""]
        if oracle:
            md += ["*True-flow warp* is not the method: a third adaptation fit that warps with the renderer's flow "
                   "(`flow_source: ground_truth`) instead of the Matching Net's, on the same pairs, masks and noise -- what "
                   "the warp is worth when the matching is right (its swapped-profile baseline keeps the pair's own "
                   f"flow). Over all pairs, true-flow warp - no warp: {_ms(warp['true_delta'])}.", ""]
        if "warping" in plots:
            md += [f"![warp minus no warp by yaw difference]({rel}/{plots['warping']})", ""]
        titles = {"warp": "With warp", "nowarp": "Without warp", "truewarp": "With the true-flow warp"}
        for name, title in titles.items():
            res = found["evals"].get(f"eval_warping_{name}")
            if res and res.get("grid"):
                md += [f"{title} ({res['grid_columns']}):", "", f"![{name}]({rel}/{Path(res['grid']).name})", ""]
    md += [f"**{verdicts['warping'][0]}** at this scale: {verdicts['warping'][1]}.",
           f"Rule (eval/claims/rules.yaml): {rules['warping']['rule']}", ""]
    # 4 -----------------------------------------------------------------------------------------
    relight = found["evals"].get("eval_relighting")
    verdicts["relighting"] = V.relighting([f["evals"] for f in founds], rules)[:2]
    md += ["## 4. Relighting", "", f"> {V.CLAIMS['relighting']}", "",
           f"Measured: {c.relighting.identities} held-out identities, each with one profile and one target pose "
           f"under {c.relighting.lights} lights (same mask and noise for every light, so only the light changes). "
           "For each output: lighting error vs its own target light and vs the other lights' true renders (mean); "
           "*follows* = other - own (> 0: the output follows its own light); *truth gap* = how far the true renders "
           "under different lights are apart (the most *follows* can be).", ""]
    if relight:
        rows = []
        for label, res in relight["models"].items():
            s = res["summary"]
            rows.append([label, _ms(s["own_colour"], 4), _ms(s["other_colour"], 4), _ms(s["follow_colour"], 4),
                         _ms(s["truth_gap_colour"], 4), _ms(s["follow_shading"], 4), _ms(s["truth_gap_shading"], 4),
                         _ms(s["follow_shading_hidden"], 4), _ms(s["truth_gap_shading_hidden"], 4),
                         _ms(s["id_cos"]), str(s["id_cos"]["n"])])
        md += _table(["model", "colour err own light", "colour err other lights", "follows (colour)", "truth gap",
                      "follows (shading)", "truth gap (shading)", "follows (shading, hidden region)",
                      "truth gap (hidden)", "id_cos to profile", "outputs"], rows) + [""]
        md += ["*inpainting* is the model-free baseline: the visible pixels of the masked target, holes filled from "
               "their neighbours (no profile, no model). The hidden region is the head pixels the patch mask hid.", ""]
        for label, res in relight["models"].items():
            md += [f"{label} ({relight['grid_columns']}):", "", f"![relight {label}]({rel}/{Path(res['grid']).name})", ""]
    md += [f"**{verdicts['relighting'][0]}** at this scale (full method, adaptation model): {verdicts['relighting'][1]}.",
           f"Rule (eval/claims/rules.yaml): {rules['relighting']['rule']}", ""]
    # summary, limitations, timings ------------------------------------------------------------------
    summary = ["## Summary", ""] + _table(["claim", "verdict at this scale"],
                                          [[k.replace("_", " "), v[0]] for k, v in verdicts.items()]) + [""]
    summary += [f"Judged by eval/claims/rules.yaml version {rules['version']}, sha256 `{rules['sha256'][:16]}`"
                + (f", last changed in commit `{rules['commit'].split()[0][:10]}` ({rules['commit'].split()[1]})"
                   if rules.get("commit") else "") + ".", ""]
    md[4:4] = summary
    md += ["## Limitations", "", *[f"- {x}" for x in LIMITATIONS], ""]
    if plot_note:
        md += [f"Note: {plot_note}.", ""]
    md += run_section(cfg, timeline, status, config_name)
    out.with_suffix(".md").write_text("\n".join(md))
    result = {"final": final, "device": device, "seed": int(cfg.seed), "seeds": seeds,
              "rules": {k: rules[k] for k in ("version", "sha256", "commit")}, "verdicts": {k: {"verdict": v[0], "why": v[1]}
              for k, v in verdicts.items()}, "fast_learner": found["curves"],
              "masking": {str(r): s for r, s in masks}, "warping": warp,
              "relighting": {k: v["summary"] for k, v in (relight or {}).get("models", {}).items()},
              "embedder_auc": found["embedder_auc"], "timeline": timeline.invocations(), "status": status,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    return out.with_suffix(".md")


def run_section(cfg: DictConfig, timeline: Timeline, status: dict, config_name: str) -> list[str]:
    """Where the time went: each job's span in the invocation that ran it, and every invocation."""
    invocations = timeline.invocations()
    history = timeline.history()
    md = ["## Run", "", "Jobs (status now; the invocation that ran the job, its start in seconds since that "
          "invocation began, and its duration):", ""]
    names = [n for n in history if n in status or n == "data"] + [n for n in status if n not in history]
    md += _table(["job", "status", "run in", "start s", "seconds"],
                 [[n, status.get(n) or history.get(n, {}).get("status", "running"),
                   f"#{history[n]['invocation']}" if n in history else "-",
                   _f(history.get(n, {}).get("start"), 0), _f(history.get(n, {}).get("seconds"), 0)]
                  for n in names]) + [""]
    md += ["Invocations: " + "; ".join(
        f"#{i} {inv['wall']:.0f} s{'' if inv['finished'] else ' (ended early: cut short, or still running)'}"
        for i, inv in enumerate(invocations, 1)) + "."]
    md += [f"Sizes: fits {', '.join(f'{k}: {_steps(cfg, k)} steps' for k in cfg.fits)}; config `{config_name}` "
           "(see docs/decisions/paper_claims.md for every choice).", ""]
    return md


def _steps(cfg: DictConfig, node: str) -> str:
    for o in cfg.fits[node].get("overrides", []):
        if str(o).startswith("trainer.max_steps="):
            return str(o).split("=", 1)[1]
    return "default"


def _grids(res: dict | None) -> list[str]:
    if not res:
        return []
    grids = [res.get("grid")] + [m.get("grid") for m in res.get("models", {}).values()]
    return [g for g in grids if g]
