"""The main job's report: ``report.md`` and ``report.html`` in the run directory.

It only reads what the stages wrote (``stages.json``, each training stage's CSV logs,
``evaluate/metrics.json`` and its pictures), so it can be rebuilt at any time with
``icp run CONFIG --only report``.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from icp.eval.grids import pyplot, save_figure

PICTURES = (
    ("grid.png", "Held-out identities (one per row): profile | masked target | generated | each baseline | true render"),
    ("flows.png", "Matching flow target→profile, rows: profile, target, true flow, predicted flow (colour wheel), profile warped by it"),
    ("relight.png", "Relighting: one identity and pose, one column per light; rows: true render, generated"),
    ("pairs.png", "Per pair: icp against a baseline (same pair, same noise; the grey line is equality)"),
    ("eval_curves.png", "Held-out identity and view consistency vs training step (in-loop evaluation)"),
    ("loss_curves.png", "Training losses per stage"),
)


def read_losses(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``*loss*`` column of a stage's CSV logs (all invocations), as (step, value) lists."""
    return read_columns(stage_dir, lambda key: "loss" in key)


CURVE_METRICS = ("eval/id_cos_icp", "eval/id_cos_icp@other_identity", "eval/yaw_err", "eval/landmark_err")


def read_columns(stage_dir: Path, wanted) -> dict[str, list[tuple[int, float]]]:
    """Columns of a stage's CSV logs (all invocations) for which ``wanted(name)``, as (step, value) lists."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(stage_dir.glob("logs/csv/version_*/metrics.csv")):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key and wanted(key) and value not in ("", None):
                        series.setdefault(key, []).append((int(float(row.get("step") or 0)), float(value)))
    return series


def plot_eval_curves(stages: dict, out: Path) -> Path | None:
    """Identity and view consistency on held-out pairs vs training step (the in-loop EvalCallback)."""
    plt = pyplot()

    curves = {name: read_columns(Path(entry["result"]["run_dir"]), lambda k: k in CURVE_METRICS)
              for name, entry in stages.items() if "run_dir" in entry.get("result", {})}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for stage, series in curves.items():
        for key, points in sorted(series.items()):
            ax = axes[0] if "id_cos" in key else axes[1] if "yaw" in key else axes[2]
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", lw=1, ls="--" if "@" in key else "-",
                    label=f"{stage}: {key.split('/', 1)[1]}")
    for ax, title in zip(axes, ("identity (head, icp embedder)", "yaw error (deg, probe)", "landmark error (probe)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_pairs(evaluation: dict, out: Path) -> Path | None:
    """Per-pair scatter: the method against its baseline, pair by pair (same pair, same noise)."""
    plt = pyplot()

    pairs = evaluation.get("per_pair", {})
    panels = [(k, b) for k, b in (("id_cos_icp", "other_identity"), ("id_cos_icp", "inpaint"), ("yaw_err", "copy_profile"),
                                  ("yaw_err", "inpaint")) if b in pairs and any(k in r for r in pairs.get("method", []))]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, (key, base) in zip(axes[0], panels):
        xy = [(b[key], m[key]) for m, b in zip(pairs["method"], pairs[base]) if m.get(key) == m.get(key)
              and b.get(key) == b.get(key)]
        if not xy:
            continue
        x, y = zip(*xy)
        ax.scatter(x, y, s=8)
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel(f"{base}", fontsize=8)
        ax.set_ylabel("icp", fontsize=8)
        ax.set_title(f"{key} per pair (n={len(xy)})", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_losses(stages: dict, out: Path) -> Path | None:
    plt = pyplot()

    curves = {name: read_losses(Path(entry["result"]["run_dir"]))
              for name, entry in stages.items() if "run_dir" in entry.get("result", {})}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (stage, series) in zip(axes[0], curves.items()):
        for key, points in sorted(series.items()):
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, label=key, lw=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def _table(rows: list[dict], arms: list[str]) -> tuple[list[str], list[list[str]]]:
    """Metric rows -> (header, cells): icp with its interval, each baseline, the paired verdicts."""
    from icp.eval.baselines import LABELS
    from icp.eval.stats import fmt_interval

    header = ["metric", "icp [95% CI]", *[LABELS.get(a, a) for a in arms], "icp vs other identity", "extractor",
              "what it means"]
    cells = []
    for row in rows:
        if row.get("unavailable"):
            cells.append([row["name"], "unavailable", *[""] * len(arms), "", "", row["unavailable"]])
            continue
        value = row.get("interval") or _fmt(row.get("value"))
        versus = row.get("versus", {}).get("other_identity")
        vs = f"{fmt_interval(versus)}: {versus['verdict']}" if versus else ""
        cells.append([row["name"], value, *[_fmt(row.get("baselines", {}).get(a)) for a in arms], vs,
                      _fmt(row.get("extractor")), _fmt(row.get("meaning"))])
    return header, cells


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(run_dir: Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else {}
    eval_dir = run_dir / "evaluate"
    evaluation = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else {}
    eval_dir.mkdir(exist_ok=True)
    plot_losses(stages, eval_dir / "loss_curves.png")
    plot_eval_curves(stages, eval_dir / "eval_curves.png")
    plot_pairs(evaluation, eval_dir / "pairs.png")

    summary = evaluation.get("summary", "No evaluation has run yet.")
    metrics = evaluation.get("rows", evaluation.get("metrics", []))  # rows: icp-metrics/2; a list: older roots
    pictures = [(f"evaluate/{name}", caption) for name, caption in PICTURES if (eval_dir / name).is_file()]
    timings = [(name, entry.get("seconds")) for name, entry in stages.items()]

    md = [f"# icp report: {run_dir}", "", "## Summary", "", summary, ""]
    arms = [a for a in evaluation.get("arms", []) if a != "method"]
    if any("flow_epe" == r.get("name") for r in metrics):
        arms.append("zero_flow")
    header, table = _table(metrics, arms)
    md += ["## Metrics (held-out identities)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in table]
    probe_md = run_dir / "correspondence" / "correspondence.md"
    if probe_md.is_file():  # the base's correspondence before any adaptation (icp.eval.correspondence)
        md += ["", "## Does the base's feature space correspond? (probe before adaptation)", "",
               probe_md.read_text().split("\n", 1)[-1]]
    reliability = evaluation.get("reliability", {}).get("markdown")
    if reliability:
        md += ["", "## How far the identity metric can be trusted", "", reliability]
    for path, caption in pictures:
        md += ["", f"## {caption}", "", f"![{caption}]({path})"]
    md += ["", "## Stages", "", "| stage | seconds |", "|---|---|"] + [f"| {n} | {s} |" for n, s in timings]
    notes = evaluation.get("notes", [])
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")

    esc = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in table)
    head = "".join(f"<th>{esc(t)}</th>" for t in header)
    figs = "".join(f"<h2>{esc(c)}</h2><img src='{esc(p)}' style='max-width:100%;image-rendering:pixelated'>"
                   for p, c in pictures)
    stage_rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(_fmt(s))}</td></tr>" for n, s in timings)
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    page = (
        "<!doctype html><meta charset='utf-8'><title>icp report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>"
        f"<h1>icp report</h1><p><code>{esc(str(run_dir))}</code></p><h2>Summary</h2><p>{esc(summary)}</p>"
        f"<h2>Metrics (held-out identities)</h2><table><tr>{head}</tr>{rows}</table>"
        + (f"<h2>How far the identity metric can be trusted</h2><pre>{esc(reliability)}</pre>" if reliability else "")
        + (f"<h2>Does the base's feature space correspond?</h2><pre>{esc(probe_md.read_text())}</pre>"
           if probe_md.is_file() else "")
        + f"{figs}"
        f"<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th></tr>{stage_rows}</table>"
        + (f"<h2>Notes</h2><ul>{note_items}</ul>" if notes else "")
    )
    (run_dir / "report.html").write_text(page)
    return {"html": run_dir / "report.html", "md": run_dir / "report.md"}
