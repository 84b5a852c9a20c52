"""The readable part of a metrics record: one row per metric (value, interval, extractor, meaning,
baselines, paired comparisons) and the identity verdict in words. Shared by ``icp eval`` and the
main job's evaluate stage through :func:`icp.eval.record.build_record`."""

from __future__ import annotations

from icp.eval.evaluator import LOWER_IS_BETTER, MEANINGS
from icp.eval.paired import METHOD
from icp.eval.stats import fmt_interval

FLOW_MEANINGS = {
    "flow_epe": "matching-flow end-point error in pixels vs the renderer's ground truth (lower is better)",
    "flow_pck": "fraction of co-visible target pixels whose matched profile pixel is within 5% of the image size",
    "flow_epe_zero": "end-point error of the zero (no-motion) flow: the baseline a useful matcher must beat",
}


def metric_rows(result, described: dict, unavailable: dict, flows: dict | None = None) -> list[dict]:
    """The table every report prints: each metric of the method beside each baseline arm."""
    flows = flows or {}
    arms = list(result.scalars)
    rows = []
    for name in sorted(set().union(*(result.scalars[a] for a in arms)) | set(flows)):
        row = {"name": name, "value": result.scalars[METHOD].get(name, flows.get(name)),
               # per-pair metrics carry an identity-bootstrap interval; set-level ones (FID, KID) and flows do not
               "interval": fmt_interval(result.intervals[METHOD][name]) if name in result.intervals[METHOD] else None,
               "extractor": extractor_of(name, described), "meaning": MEANINGS.get(name, FLOW_MEANINGS.get(name, "")),
               "lower_is_better": name in LOWER_IS_BETTER, "baselines": {}, "versus": {}}
        for arm in arms[1:]:
            row["baselines"][arm] = result.scalars[arm].get(name)
            if name in result.comparisons.get(arm, {}):
                row["versus"][arm] = result.comparisons[arm][name]
        if name == "flow_epe" and "flow_epe_zero" in flows:
            row["baselines"]["zero_flow"] = flows["flow_epe_zero"]
        rows.append(row)
    for name, why in unavailable.items():
        rows.append({"name": name, "value": None, "unavailable": why, "meaning": why})
    return rows


def extractor_of(metric: str, described: dict) -> str:
    """Which model produced a metric's features (every report names it)."""
    def named(entry: dict) -> str:
        sha = entry.get("sha256")
        return (entry.get("label") or entry.get("name", "?")) + (f" (weights sha256 {sha[:12]})" if sha else "")

    for prefix in ("id_cos_", "face_fail_"):
        if metric.startswith(prefix):
            return named(described.get("identity_" + metric[len(prefix):], {}))
    if metric in ("fid", "kid"):
        return named(described.get("inception", {}))
    if metric.startswith("clip_"):
        return named(described.get("clip", {}))
    if metric in ("landmark_err", "yaw_err", "pitch_err", "silhouette_iou") and "probe" in described:
        return named(described["probe"])
    if metric in ("landmark_err_dlib", "lm_fail_dlib") and "landmarks_dlib" in described:
        return named(described["landmarks_dlib"])
    return "renderer ground truth"


def identity_verdict(result) -> str:
    method = result.scalars[METHOD]
    key = "id_cos_icp" if "id_cos_icp" in method else next((k for k in method if k.startswith("id_cos_")), None)
    if key is None:
        return "No identity extractor was available, so identity preservation was not measured."
    text = f"Identity: generated portraits of held-out identities have {key} = {fmt_interval(result.intervals[METHOD][key])}."
    versus = result.comparisons.get("other_identity", {}).get(key)
    if versus:
        base = result.intervals["other_identity"][key]
        said = {"better": "beats", "worse": "is WORSE than", "no difference": "does NOT beat",
                "too few": "cannot be compared with (too few valid pairs)"}[versus["verdict"]]
        text += (f" icp {said} the other-identity baseline ({base['mean']:.3f}): paired difference "
                 f"{fmt_interval(versus)}, icp closer in {versus['win_rate']:.0%} of pairs.")
    if "truth" in result.intervals:
        text += f" The true render scores {result.intervals['truth'][key]['mean']:.3f} (the ceiling)."
    return text
