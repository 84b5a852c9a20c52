"""``icp leaderboard``: rank metrics.json records of one protocol as Markdown + HTML + a plot.

Refusals (one-line ``IcpError``s, never a silently mixed table):
- records of different ``protocol_id`` (data set, resolution, extractors, pairs, sampling);
  the message names the protocol fields that differ;
- a record whose evaluated checkpoint, extractor weight file or data-set manifest no longer has the
  recorded sha256 (or is gone, or the record lacks the hash): its numbers cannot be reproduced with
  what is on disk.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from icp.core.errors import DataError, IcpError
from icp.eval.grids import pyplot, save_figure
from icp.eval.evaluator import LOWER_IS_BETTER
from icp.eval.record import DIGEST_FIELDS, FORMAT, SCHEMA, protocol_id, record_digest, sha256_of


def higher_is_better(metric: str) -> bool:
    """A metric's direction: the one list every report uses (icp.eval.evaluator.LOWER_IS_BETTER)."""
    return metric not in LOWER_IS_BETTER


class LeaderboardError(IcpError):
    """Records that cannot share one leaderboard."""


def record_path(path: str | Path) -> Path:
    """The metrics.json of ``path``: itself, or that of a run of any kind icp.core.runs.resolve takes
    (a fit run, the main job's root, a claims sub-run, a checkpoint): ``icp eval``'s first."""
    from icp.core.runs import resolve

    path = Path(path)
    if path.is_dir() and not (path / "eval" / "metrics.json").is_file():  # a folder holding just eval/ still counts
        found = resolve(path).metrics
        if found is None:
            raise DataError(f"{path}: the run has no metrics.json yet; run `icp eval {path}` first")
        return found
    if path.is_dir():
        return path / "eval" / "metrics.json"
    if path.suffix == ".ckpt":
        return record_path(resolve(path).root)
    return path


def load_record(path: str | Path) -> dict:
    """A metrics.json, given itself or a run directory of any kind (see :func:`record_path`)."""
    path = record_path(path)
    if not path.is_file():
        raise DataError(f"{path}: no metrics.json; run `icp eval RUN_DIR` first")
    if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        raise DataError(f"{path}: not a regular file of at most {MAX_RECORD_BYTES} bytes; pass a metrics.json from `icp eval`")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON ({getattr(err, 'msg', type(err).__name__)})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: a metrics record is a JSON object, not a {type(record).__name__}; make it with `icp eval`")
    # v1 (`icp eval` before one schema, issue 28) holds every field read here: still accepted
    if isinstance(record.get("metrics"), list) and "schema" not in record:  # the main job's, before one schema
        raise DataError(f"{path}: the main job's record of an older icp (not schema {SCHEMA}); write it anew with "
                        "`icp run CONFIG --only evaluate report`, or measure the run with `icp eval RUN`")
    if record.get("schema") != SCHEMA and not (record.get("format") == FORMAT and record.get("version") == 1):
        raise DataError(f"{path}: not an icp metrics record (schema {record.get('schema', record.get('format'))!r}, "
                        f"expected {SCHEMA!r}); make it with `icp eval` or `icp run`")
    # A record from someone else may be hand-edited: its shape is checked here, one line if wrong.
    shape = {"protocol_id": str, "protocol": dict, "metrics": dict, "extractors": dict, "dataset": dict,
             "run": str, "task": str}
    wrong = [k for k, kind in shape.items() if not isinstance(record.get(k), kind)]
    samples = record.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        wrong.append("samples")
    bad_values = [k for k, v in (record.get("metrics") or {}).items()
                  if not _number(v)] if isinstance(record.get("metrics"), dict) else []
    if wrong or bad_values:
        what = ", ".join(wrong + [f"metrics.{k}" for k in bad_values[:5]])
        raise DataError(f"{path}: malformed metrics record (bad or missing {what}); re-run `icp eval`")
    record["_path"] = str(path)
    return record


MAX_RECORD_BYTES = 64 << 20


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_integrity(record: dict) -> None:
    """Refuse a record whose numbers do not fit the rest of it: ``protocol_id`` recomputed from its
    own protocol block (and that block tied to the record's extractors and data set), the digest
    over its values, and every metric re-averaged from its stored per-sample scores."""
    where = record["_path"]
    proto = record["protocol"]
    if protocol_id(proto) != record["protocol_id"]:
        raise LeaderboardError(f"{where}: protocol_id {record['protocol_id']} does not match its protocol block "
                               f"({protocol_id(proto)}); the record was edited, re-run `icp eval`")
    try:
        same_data = proto["dataset_manifest_sha256"] == record["dataset"]["manifest_sha256"]
        same_extractors = {k: v["sha256"] for k, v in proto["extractors"].items()} == {
            k: v["sha256"] for k, v in record["extractors"].items()}
    except (KeyError, TypeError, AttributeError):
        same_data = same_extractors = False
    if not (same_data and same_extractors):
        raise LeaderboardError(f"{where}: the protocol block names other extractors or data than the record; "
                               "the record was edited, re-run `icp eval`")
    per_sample = record.get("per_sample")
    if not isinstance(record.get("digest"), str) or not isinstance(per_sample, dict):
        raise LeaderboardError(f"{where}: has no digest or per-sample scores (made by an older icp, or edited); "
                               "re-run `icp eval` for this entry")
    for name, value in record["metrics"].items():
        scores = per_sample.get(name)
        if scores is None:
            continue
        if not isinstance(scores, list) or len(scores) != record["samples"] or not all(
                v is None or _number(v) for v in scores):
            raise LeaderboardError(f"{where}: per-sample scores of {name} are malformed; re-run `icp eval`")
        valid = [v for v in scores if v is not None]
        mean = math.fsum(valid) / len(valid) if valid else math.nan
        if not math.isclose(mean, value, rel_tol=1e-4, abs_tol=1e-5):
            raise LeaderboardError(f"{where}: {name} = {value:.6g} but its {len(valid)} per-sample scores average "
                                   f"{mean:.6g}; the value was edited, re-run `icp eval`")
    if record_digest(record) != record["digest"]:
        fields = ", ".join(DIGEST_FIELDS)
        raise LeaderboardError(f"{where}: its values do not match its digest (one of {fields} was edited); "
                               "re-run `icp eval`")


def verify(record: dict) -> None:
    """Refuse a record whose weights or data changed since it was measured."""
    where = record["_path"]
    try:
        checks = [(f"extractor {k} weights", v.get("file"), v["sha256"]) for k, v in record["extractors"].items()]
        checks.append(("data-set manifest", record["dataset"]["manifest"], record["dataset"]["manifest_sha256"]))
        checks.append(("evaluated checkpoint", record["checkpoint"], record["checkpoint_sha256"]))
    except (KeyError, TypeError, AttributeError) as err:
        raise LeaderboardError(f"{where}: lacks the sha256 of its weights or data ({err}); re-run `icp eval` "
                               "for this entry") from None
    for what, file, expected in checks:
        file = _located(file, record)
        if not isinstance(expected, str) or len(expected) != 64:
            raise LeaderboardError(f"{where}: {what} has no valid sha256; re-run `icp eval` for this entry")
        if not isinstance(file, str) or not file or not Path(file).exists():
            raise LeaderboardError(f"{where}: {what} file {str(file)[:200]} is gone; re-run `icp eval` where it exists")
        if not (Path(file).is_file() or Path(file).is_dir()) or _pseudo(Path(file)):
            # /dev/zero, a FIFO, /proc files: hashing would never end or fail half-way
            raise LeaderboardError(f"{where}: {what} {file} is not a regular file; re-run `icp eval` on a real one")
        try:
            actual = sha256_of(file)
        except (OSError, IcpError) as err:
            raise LeaderboardError(f"{where}: {what} {file} cannot be read ({type(err).__name__}); "
                                   "re-run `icp eval` for this entry") from None
        if actual != expected:
            raise LeaderboardError(f"{where}: {what} {file} changed since evaluation (sha256 differs); "
                                   "re-run `icp eval` for this entry")


def _located(file, record: dict):
    """A relative path in a record is relative to the folder the evaluation ran in. When it is not
    found from here, look from that folder as the record's place tells it: a record in
    ``<run>/eval/`` or ``<run>/evaluate/`` whose ``run`` is relative (``runs/quickstart/main``)."""
    if not isinstance(file, str) or not file or Path(file).is_absolute() or Path(file).exists():
        return file
    run = Path(record["run"])
    here = Path(record["_path"]).resolve().parent.parent.parts
    if run.is_absolute() or not run.parts or len(here) <= len(run.parts) or here[-len(run.parts):] != run.parts:
        return file
    moved = Path(*here[:-len(run.parts)]) / file
    return str(moved) if moved.exists() else file


def _pseudo(path: Path) -> bool:
    """A file of a kernel pseudo file system (/proc, /sys, /dev): not data a record may name."""
    resolved = path.resolve()
    return any(resolved == Path(p) or Path(p) in resolved.parents for p in ("/proc", "/sys", "/dev"))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def check_same_protocol(records: list[dict]) -> None:
    first = records[0]
    for other in records[1:]:
        if other["protocol_id"] != first["protocol_id"]:
            fields = ", ".join(_differences(first["protocol"], other["protocol"])) or "protocol_id"
            raise LeaderboardError(f"{other['_path']} was measured under another protocol than {first['_path']} "
                                   f"(differs in: {fields}); evaluate both with the same eval/protocol.yaml")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def entries(paths: list[str]) -> list[tuple[Path, str | None]]:
    """(metrics.json or run, label) for every entry; a sweep (its folder or sweep.json, icp.core.sweep)
    becomes its points, labelled by their axis values, so one sweep is one table and one plot."""
    from icp.core.runs import sweep_points

    out: list[tuple[Path, str | None]] = []
    for path in paths:
        points = sweep_points(path)
        if points is None:
            out.append((Path(path), None))
            continue
        missing = []
        for point in points:
            try:
                found = record_path(point.run_dir)
            except IcpError:  # not trained or not evaluated yet
                found = None
            if found is None or not found.is_file():
                missing.append(point.label)
            else:
                out.append((found, point.label))
        if missing:
            shown = "; ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise LeaderboardError(f"{len(missing)} of {len(points)} points of sweep {path} have no metrics.json "
                                   f"({shown}); evaluate them with `icp eval {path}` (after training them)")
    return out


def build(paths: list[str], out_dir: str | Path, sort_by: str | None = None, check_files: bool = True) -> dict[str, Path]:
    """Write leaderboard.md / .html / .png under ``out_dir``; return their paths."""
    if not paths:
        raise LeaderboardError("no entries given: pass run directories or metrics.json files")
    records = []
    for path, label in entries(paths):
        records.append(load_record(path))
        records[-1]["_label"] = label or Path(records[-1]["run"]).name
    for record in records:
        check_integrity(record)
    check_same_protocol(records)
    if check_files:
        for record in records:
            verify(record)
    names = sorted({m for r in records for m in r["metrics"]})
    sort_by = sort_by or next((m for m in ("id_cos_icp", "id_cos_dlib", "fid") if m in names), names[0] if names else None)
    if sort_by is not None and sort_by not in names:
        raise LeaderboardError(f"--sort {sort_by}: no entry has that metric; metrics: {', '.join(names)}")
    higher = higher_is_better(sort_by)

    def key(r):
        v = r["metrics"].get(sort_by)
        return (v is None, -(v or 0) if higher else (v or 0))

    records.sort(key=key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [[str(i + 1), r["_label"], r["task"], str(r["samples"]), *[_fmt(r["metrics"].get(m)) for m in names]]
            for i, r in enumerate(records)]
    header = ["rank", "run", "task", "samples", *[f"{m} {'↑' if higher_is_better(m) else '↓'}" for m in names]]
    proto = records[0]["protocol"]
    extractors = "; ".join(f"{k}: {v.get('label') or v['name']} ({v['sha256'][:12]})"
                           for k, v in records[0]["extractors"].items())
    meta = [f"protocol `{proto.get('name')}` id `{records[0]['protocol_id']}`, resolution {proto['resolution']}, "
            f"data manifest sha256 `{proto['dataset_manifest_sha256'][:12]}`", f"extractors: {extractors}",
            f"sorted by {sort_by} ({'higher' if higher else 'lower'} is better)"]
    md = ["# icp leaderboard", "", *[f"- {m}" for m in meta], "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *["| " + " | ".join(r) + " |" for r in rows], "", "![metrics](leaderboard.png)", ""]
    (out / "leaderboard.md").write_text("\n".join(md))
    plot = _plot(records, names, out / "leaderboard.png")
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    page = (f"<!doctype html><meta charset='utf-8'><title>icp leaderboard</title><h1>icp leaderboard</h1>"
            f"<ul>{''.join(f'<li>{html.escape(m)}</li>' for m in meta)}</ul>"
            f"<table border='1' cellpadding='4'><tr>{cells}</tr>{body}</table>"
            f"<p><img src='{plot.name}' alt='metrics per run'></p>")
    (out / "leaderboard.html").write_text(page)
    return {"markdown": out / "leaderboard.md", "html": out / "leaderboard.html", "plot": plot}


def _plot(records: list[dict], names: list[str], path: Path) -> Path:
    plt = pyplot()

    shown = [m for m in names if any(isinstance(r["metrics"].get(m), (int, float)) for r in records)][:8]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3 * max(1, len(shown)), 3), squeeze=False)
    labels = [r["_label"] for r in records]
    for ax, metric in zip(axes[0], shown):
        values = [r["metrics"].get(metric, float("nan")) for r in records]
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{metric} {'↑' if higher_is_better(metric) else '↓'}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path
