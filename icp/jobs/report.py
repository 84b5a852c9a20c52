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

PICTURES = (
    ("grid.png", "Held-out identities: profile | masked target | generated | ground truth"),
    ("baseline_grid.png", "Baseline (profile of another identity): profile used | generated | ground truth"),
    ("flows.png", "Matching flow target→profile, rows: profile, target, true flow, predicted flow (colour wheel), profile warped by it"),
    ("relight.png", "Relighting, one row per new light: profile | masked target under that light | generated | true render"),
    ("loss_curves.png", "Training losses per stage"),
)


def read_losses(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``*loss*`` column of a stage's CSV logs (all invocations), as (step, value) lists."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(stage_dir.glob("logs/csv/version_*/metrics.csv")):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if "loss" in key and value not in ("", None):
                        series.setdefault(key, []).append((int(float(row.get("step") or 0)), float(value)))
    return series


def plot_losses(stages: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[list[str]]:
    return [[_fmt(row.get(key)) for key, _ in columns] for row in rows]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


METRIC_COLUMNS = [("name", "metric"), ("value", "icp"), ("baseline", "baseline"), ("better", "better"),
                  ("extractor", "extractor"), ("meaning", "what it means")]


def write_report(run_dir: Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else {}
    eval_dir = run_dir / "evaluate"
    evaluation = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else {}
    eval_dir.mkdir(exist_ok=True)
    plot_losses(stages, eval_dir / "loss_curves.png")

    summary = evaluation.get("summary", "No evaluation has run yet.")
    metrics = evaluation.get("metrics", [])
    pictures = [(f"evaluate/{name}", caption) for name, caption in PICTURES if (eval_dir / name).is_file()]
    timings = [(name, entry.get("seconds")) for name, entry in stages.items()]

    md = [f"# icp report: {run_dir}", "", "## Summary", "", summary, ""]
    md += ["## Metrics (held-out identities)", "", "| " + " | ".join(t for _, t in METRIC_COLUMNS) + " |",
           "|" + "---|" * len(METRIC_COLUMNS)]
    md += ["| " + " | ".join(cells) + " |" for cells in _table(metrics, METRIC_COLUMNS)]
    for path, caption in pictures:
        md += ["", f"## {caption}", "", f"![{caption}]({path})"]
    md += ["", "## Stages", "", "| stage | seconds |", "|---|---|"] + [f"| {n} | {s} |" for n, s in timings]
    notes = evaluation.get("notes", [])
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")

    esc = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                   for cells in _table(metrics, METRIC_COLUMNS))
    head = "".join(f"<th>{esc(t)}</th>" for _, t in METRIC_COLUMNS)
    figs = "".join(f"<h2>{esc(c)}</h2><img src='{esc(p)}' style='max-width:100%;image-rendering:pixelated'>"
                   for p, c in pictures)
    stage_rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(_fmt(s))}</td></tr>" for n, s in timings)
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    page = (
        "<!doctype html><meta charset='utf-8'><title>icp report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>"
        f"<h1>icp report</h1><p><code>{esc(str(run_dir))}</code></p><h2>Summary</h2><p>{esc(summary)}</p>"
        f"<h2>Metrics (held-out identities)</h2><table><tr>{head}</tr>{rows}</table>{figs}"
        f"<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th></tr>{stage_rows}</table>"
        + (f"<h2>Notes</h2><ul>{note_items}</ul>" if notes else "")
    )
    (run_dir / "report.html").write_text(page)
    return {"html": run_dir / "report.html", "md": run_dir / "report.md"}
