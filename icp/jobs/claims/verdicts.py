"""Each claim as the paper makes it, and the pre-registered rule that turns our numbers into a verdict.

The rules and thresholds live in ``eval/claims/rules.yaml`` (committed before the results they
judge); this module only applies them. Every function takes the results of ALL seeds (a list of
``results.collect`` outputs, one per seed) and pools per-pair rows across seeds; intervals are
identity bootstraps (icp.eval.stats), and fewer than ``min_valid`` valid pairs is NOT DECIDED.
"""

from __future__ import annotations

import hashlib
import math
import subprocess

import yaml

from icp.core.paths import EVAL
from icp.eval import stats

RULES_FILE = EVAL / "claims" / "rules.yaml"

CLAIMS = {
    "fast_learner": ("Diffusion models are fast learners of in-context dense correspondence: the Matching Net, "
                     "a copy of the pre-trained UNet's encoder, learns accurate matching within 100-200 training "
                     "steps from the denoising loss alone."),
    "masking": ("Masking the target heavily (~80 %) in Lighting-Aware Stitching lets its lighting through while "
                "keeping its identity out: at low ratios the model copies the target instead of taking identity "
                "from the profile; at very high ratios too little of the lighting survives."),
    "warping": ("Warping the profile's identity features into the target's pose with the matching flow "
                "(View-Consistent Adaptation) gives outputs in the target's pose and preserves identity better "
                "than unwarped concatenation, the more so the further the poses differ."),
    "relighting": ("3D-aware relighting: with identity and pose fixed, a new target light re-lights the output "
                   "while the identity is kept."),
}


def load_rules() -> dict:
    """The rules, their sha256 and the commit that last changed them (None outside a checkout)."""
    text = RULES_FILE.read_text()
    rules = yaml.safe_load(text)
    rules["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%H %cI", "--", str(RULES_FILE)], cwd=RULES_FILE.parent,
                             capture_output=True, text=True, timeout=10)
        rules["commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rules["commit"] = None
    return rules


def _pool(per_seed: list[list[dict]], key=lambda r: r.get("pair")) -> dict:
    """(seed, pair key) -> row, over every seed's rows."""
    return {(s, key(r)): r for s, rows in enumerate(per_seed) for r in rows}


def _paired(a: dict, b: dict, metric, higher_is_better: bool, seed: int = 0) -> dict:
    """Identity-bootstrap comparison of metric(a) vs metric(b) over the keys both have."""
    keys = [k for k in a if k in b]
    return stats.compare([metric(a[k]) for k in keys], [metric(b[k]) for k in keys],
                         [a[k]["identity"] for k in keys], higher_is_better=higher_is_better, seed=seed)


def _decided(c: dict, rules: dict) -> bool:
    return c["n"] >= rules["min_valid"] and not math.isnan(c["lo"])


def fast_learner(curves_by_seed: list[dict], rules: dict) -> tuple[str, str]:
    r = rules["fast_learner"]
    parts, useful_all, faster_all = [], True, True
    for s, curves in enumerate(curves_by_seed):
        base, rand = curves.get("base"), curves.get("random")
        if not base or not rand:
            return "NOT MEASURED", f"seed #{s}: an adaptation fit did not finish"
        zero = sum(p["flow_epe_zero"] for p in base) / len(base)
        early = [p for p in base if 0 < p["step"] <= r["max_step"]] or base
        best = min(early, key=lambda p: p["flow_epe"])
        useful = best["flow_epe"] <= r["epe_ratio"] * zero
        rand_by = {p["step"]: p for p in rand}
        shared = [p for p in base if 0 < p["step"] <= r["max_step"] and p["step"] in rand_by]
        faster = bool(shared) and all(p["flow_epe"] < rand_by[p["step"]]["flow_epe"] for p in shared)
        useful_all &= useful
        faster_all &= faster
        parts.append(f"seed #{s}: best base-init EPE within {r['max_step']} steps {best['flow_epe']:.2f} px "
                     f"(step {best['step']}) vs {r['epe_ratio']:g} x zero flow = {r['epe_ratio'] * zero:.2f} px "
                     f"({'met' if useful else 'NOT met'}); base below random at every step in (0, {r['max_step']}]: "
                     f"{'yes' if faster else 'no'}")
        sup = curves.get("supervised")
        if sup:
            top = min(sup, key=lambda p: p["flow_epe"])
            parts[-1] += f"; true-flow supervised reference reaches {top['flow_epe']:.2f} px"
    verdict = "HOLDS" if useful_all and faster_all else "PARTLY HOLDS" if useful_all else "DOES NOT HOLD"
    return verdict, "; ".join(parts)


def _combined(row: dict) -> float:
    return row.get("id_paired", math.nan) - (row["light_colour_err"] + row["shading_err"])


def masking(evals_by_seed: list[dict], rules: dict, tag) -> tuple[str, str, dict]:
    r = rules["masking"]
    get = lambda ratio: [(e.get(f"eval_masking_{tag(ratio)}") or {}).get("rows", []) for e in evals_by_seed]
    main = _pool(get(r["main"]))
    if not main:
        return "NOT MEASURED", "the main-ratio stitching evaluation is missing", {}
    comparisons, parts, verdicts = {}, [], []
    for other in r["against"]:
        rows = _pool(get(other))
        if not rows:
            return "NOT MEASURED", f"the ratio-{other:g} evaluation is missing", comparisons
        c = _paired(main, rows, _combined, higher_is_better=True)
        comparisons[str(other)] = c
        verdicts.append(c["verdict"] if _decided(c, rules) else "too few")
        parts.append(f"C({r['main']:g}) - C({other:g}) = {stats.fmt_interval(c)}: {verdicts[-1]}")
    why = "combined criterion C = id_gain - (colour + shading error); " + "; ".join(parts)
    if "too few" in verdicts:
        return "NOT DECIDED (too few valid pairs)", why, comparisons
    return ("HOLDS" if all(v == "better" for v in verdicts) else "DOES NOT HOLD"), why, comparisons


def warping(evals_by_seed: list[dict], rules: dict) -> tuple[str, str, dict]:
    r = rules["warping"]
    warp = [(e.get("eval_warping_warp") or {}) for e in evals_by_seed]
    nowarp = [(e.get("eval_warping_nowarp") or {}) for e in evals_by_seed]
    if not all(w.get("rows") for w in warp) or not all(n.get("rows") for n in nowarp):
        return "NOT MEASURED", "a warping evaluation is missing", {}
    edges = warp[0]["edges"]
    metric = r["metric"]
    per_bucket, parts = {}, []
    for k in range(len(edges) - 1):
        a = _pool([[x for x in w["rows"] if x["bucket"] == k] for w in warp])
        b = _pool([[x for x in n["rows"] if x["bucket"] == k] for n in nowarp])
        view = _paired(a, b, lambda x: x.get(metric, math.nan), higher_is_better=False)
        ident = _paired(a, b, lambda x: x["id_cos"], higher_is_better=True)
        per_bucket[k] = {"label": _bucket_label(edges, k), metric: view, "id_cos": ident}
        parts.append(f"{_bucket_label(edges, k)}: {metric} warp - no warp {stats.fmt_interval(view)}, "
                     f"id_cos {stats.fmt_interval(ident)}")
    last = per_bucket[len(edges) - 2]
    view, ident = last[metric], last["id_cos"]
    why = "; ".join(parts)
    if view["n"] == 0:
        return "NOT MEASURED", f"no valid {metric} (is the geometry probe missing?); {why}", per_bucket
    if not _decided(view, rules) or not _decided(ident, rules):
        return "NOT DECIDED (too few valid pairs)", why, per_bucket
    holds = view["hi"] < 0 and ident["lo"] > -r["identity_margin"]
    return ("HOLDS" if holds else "DOES NOT HOLD"), why, per_bucket


def relighting(evals_by_seed: list[dict], rules: dict) -> tuple[str, str, dict]:
    r = rules["relighting"]
    key = lambda x: (x["identity"], x["light"])
    models = [(e.get("eval_relighting") or {}).get("models", {}) for e in evals_by_seed]
    if not all("adaptation" in m and "inpainting" in m for m in models):
        return "NOT MEASURED", "the relighting evaluation (with its inpainting baseline) is missing", {}
    method = _pool([m["adaptation"]["rows"] for m in models], key)
    inpaint = _pool([m["inpainting"]["rows"] for m in models], key)
    metric = r["metric"]
    c = _paired(method, inpaint, lambda x: x[metric], higher_is_better=True)
    own = stats.bootstrap_mean([x[metric] for x in method.values()], [x["identity"] for x in method.values()])
    why = (f"{metric}: adaptation {stats.fmt_interval(own, 4)}; adaptation - model-free inpainting "
           f"{stats.fmt_interval(c, 4)}")
    if not _decided(c, rules):
        return "NOT DECIDED (too few valid outputs)", why, {"versus_inpainting": c, "adaptation": own}
    holds = c["lo"] > 0 and own["mean"] > 0
    return ("HOLDS" if holds else "DOES NOT HOLD"), why, {"versus_inpainting": c, "adaptation": own}


def _bucket_label(edges: list[float], k: int) -> str:
    return f">{edges[k]:g}°" if edges[k + 1] >= 180 else f"{edges[k]:g}-{edges[k + 1]:g}°"
