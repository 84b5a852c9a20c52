"""``icp eval``: measure one trained run under a protocol and write a reproducible metrics.json.

One schema (``SCHEMA``) for every metrics.json: ``icp eval`` and the main job's evaluate stage
(icp/jobs/evaluate.py) both build theirs with :func:`build_record`, so ``icp leaderboard`` and
the report read either. The record holds the values, the extractors (name, weight file, sha256), the data set's
manifest sha256, the protocol settings and their hash (``protocol_id``), the run's config hash
and the code version, so a leaderboard can refuse to mix protocols and can re-check that the
weights and data it was measured with are still the same files (icp/eval/leaderboard.py).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from icp import __version__
from icp.core import config as cfglib
from icp.core.errors import ConfigError, DataError
from icp.core.paths import EVAL
from icp.eval import baselines as B
from icp.eval.evaluator import build_extractors
from icp.eval.heldout import heldout_loader, interleaved
from icp.eval.paired import METHOD, evaluate_pairs

SCHEMA = "icp-metrics/2"  # v2: one schema for `icp eval` and the main job (rows, summary, per_pair added)
FORMAT = "icp-metrics"    # v1 records (`icp eval` before v2) said {"format": FORMAT, "version": 1}
DEFAULT_PROTOCOL = EVAL / "protocol.yaml"  # the checkout's, whatever the current folder


def code_version() -> str:
    """``git describe`` of the icp checkout when there is one, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def sha256_of(path: str | Path) -> str:
    from icp.eval.extractors import file_sha256

    return file_sha256(path)


def protocol_key(protocol: dict, manifest_sha: str, resolution: int, extractors: dict) -> dict:
    """The fields two leaderboard rows must share (weight *paths* excluded, their sha256 kept)."""
    return {
        "name": protocol.get("name"),
        "dataset_manifest_sha256": manifest_sha,
        "resolution": int(resolution),
        "pairs": dict(protocol.get("pairs", {})),
        "generation": {k: v for k, v in dict(protocol.get("generation", {})).items() if k != "batch_size"},
        "extractors": {k: {"name": v["name"], "sha256": v["sha256"]} for k, v in sorted(extractors.items())},
        "kid_subset_size": protocol.get("metrics", {}).get("kid_subset_size"),
    }


def protocol_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# What a record's numbers depend on, bound by its digest: an edit of one of them (a metric value, the
# sample count, the protocol) without recomputing the digest is flagged by the leaderboard. Paths
# are left out (records and files may move). The digest is not a signature: a forger who
# recomputes it is caught only by the per-sample cross-check or by re-running `icp eval`.
DIGEST_FIELDS = ("metrics", "samples", "per_sample", "baselines", "intervals", "comparisons", "no_valid_samples",
                 "protocol", "protocol_id", "checkpoint_sha256", "task")


def record_digest(record: dict) -> str:
    body = {k: record.get(k) for k in DIGEST_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def per_sample_scores(rows: list[dict], metrics: dict) -> dict[str, list]:
    """metric -> its per-pair values (None where not valid) for every metric with per-pair rows; the
    leaderboard re-averages them and flags a metric value that does not match."""
    out = {}
    for name in metrics:
        values = [row.get(name) for row in rows]
        if rows and all(isinstance(v, (int, float)) for v in values):
            out[name] = [None if math.isnan(v) else float(v) for v in values]
    return out


def load_protocol(path: str | Path | None, overrides: list[str] = ()) -> dict:
    path = Path(path) if path else DEFAULT_PROTOCOL
    if not path.is_file():
        raise ConfigError(f"protocol file {path} not found; pass --protocol eval/protocol.yaml (from the icp checkout)")
    cfg: DictConfig = cfglib.load(path, overrides)
    data = OmegaConf.to_container(cfg, resolve=True)
    for section in ("dataset", "pairs", "generation", "metrics"):
        if not isinstance(data.get(section), dict):
            raise ConfigError(f"{path}: section '{section}' is missing (see eval/protocol.yaml)")
    return data


def read_protocol_defaults(protocol: dict, info) -> tuple[dict, list[str]]:
    """``protocol`` with its null held-out set, embedder and resolution taken from the run
    (``info``: icp.core.runs.RunInfo); returns it and a line per value taken, for the user."""
    ds, met = protocol["dataset"], protocol["metrics"]
    taken = []
    for section, key, value, what in ((ds, "shards", info.heldout, "held-out shards"),
                                      (met, "embedder", info.embedder, "identity embedder"),
                                      (ds, "resolution", info.resolution, "resolution")):
        if section.get(key) is None and value is not None:
            section[key] = str(value) if isinstance(value, Path) else value
            taken.append(f"{what} {value} (from the run; override with "
                         f"{'dataset' if section is ds else 'metrics'}.{key}=...)")
    if ds.get("shards") is None:
        raise DataError(f"{info.root} names no held-out set (no data.val_shards in its config); pass "
                        "dataset.shards=FOLDER, e.g. the benchmark set made by the command in eval/protocol.yaml")
    return protocol, taken


def build_record(result, extractors, *, source: str, run: str | Path, checkpoint: str | Path, checkpoint_sha256: str,
                 task: str, protocol: dict, shards: str | Path, resolution: int, config_hash: str,
                 flows: dict | None = None, extra: dict | None = None) -> dict:
    """The metrics.json record of one paired evaluation (``result``: icp.eval.paired.PairedResult),
    whoever ran it (``source``: "icp eval" or "icp run"). ``protocol`` holds name, pairs, generation
    and metrics.kid_subset_size; ``flows`` are scalars without per-pair rows (the matching flow's
    error); ``extra`` adds sections a report reads (relighting, notes, reliability)."""
    from icp.eval.summary import identity_verdict, metric_rows

    scalars = {**result.scalars[METHOD], **(flows or {})}
    described = extractors.describe()
    manifest = Path(shards) / "manifest.json"
    key = protocol_key(protocol, sha256_of(manifest), int(resolution), described)
    record = {
        "schema": SCHEMA, "source": source,
        "run": str(run), "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256, "task": task,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": scalars, "samples": result.samples, "unavailable": dict(extractors.unavailable),
        "no_valid_samples": result.empty[METHOD], "arms": list(result.scalars),
        "baselines": {arm: v for arm, v in result.scalars.items() if arm != METHOD},
        "intervals": result.intervals[METHOD], "comparisons": result.comparisons,
        "summary": identity_verdict(result), "rows": metric_rows(result, described, extractors.unavailable, flows),
        "extractors": described,
        "dataset": {"shards": str(shards), "manifest": str(manifest), "manifest_sha256": key["dataset_manifest_sha256"]},
        "protocol": key, "protocol_id": protocol_id(key),
        "config_hash": config_hash, "code_version": code_version(),
        "per_sample": per_sample_scores(result.rows.get(METHOD, []), scalars),
        "per_pair": result.rows,
        **(extra or {}),
    }
    record["digest"] = record_digest(record)
    return record


def write_record(record: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def run_eval(target: str | Path, protocol: dict, device: str = "cpu", out: str | Path | None = None,
             trust_checkpoint: bool = False, say=print) -> Path:
    """Evaluate the run ``target`` (any path icp.core.runs.resolve takes); write and return
    metrics.json's path (default ``<run>/eval/metrics.json``). The protocol's null held-out set,
    embedder and resolution come from the run.

    ``trust_checkpoint``: allow a checkpoint that needs full unpickling (it can run code).
    """
    from tqdm import tqdm

    from icp.core.rundir import config_hash
    from icp.core.runs import resolve
    from icp.tasks.loading import load_task

    info = resolve(target)
    ckpt = info.need_checkpoint()
    protocol, taken = read_protocol_defaults(protocol, info)
    ds, pairs, gen, met = protocol["dataset"], protocol["pairs"], protocol["generation"], protocol["metrics"]
    shards = Path(ds["shards"])
    if not (shards / "manifest.json").is_file():
        raise DataError(f"held-out set {shards} has no manifest.json; make it with the command in eval/protocol.yaml "
                        "or set dataset.shards=FOLDER")
    resolution = ds.get("resolution") or OmegaConf.select(cfglib.load(info.config), "data.resolution", default=None)
    if resolution is None:
        raise ConfigError(f"{info.config} has no data.resolution; pass dataset.resolution=N")
    say(f"icp eval: {info.kind} run {info.root}, checkpoint {ckpt}")
    for line in taken:
        say(f"icp eval: {line}")
    # Hash the checkpoint before loading it: the record names exactly the bytes that were measured.
    ckpt_sha = sha256_of(ckpt)
    task = load_task(ckpt, device=device, trust_checkpoint=trust_checkpoint)
    if not callable(getattr(task, "sample", None)):  # the embedder or probe stage: nothing to generate
        raise ConfigError(f"{info.model_run} is a {type(task).__name__} run, which generates no portraits; pass a "
                          "stitching or adaptation run, or the main job's root")
    extractors = build_extractors(
        identity=met.get("identity", ["icp", "dlib"]), embedder=met.get("embedder"),
        dlib_models_dir=met.get("dlib_models_dir"), facenet_weights=met.get("facenet_weights"),
        fid=bool(met.get("fid", True)), inception_torchscript=met.get("inception_torchscript"),
        clip_model=met.get("clip_model"), device=device)
    batch_size = int(gen.get("batch_size", 8))
    loader = heldout_loader(str(shards), resolution=int(resolution), mask_ratio=pairs["mask_ratio"],
                            patch_size=pairs["patch_size"], pairs_per_identity=pairs["pairs_per_identity"],
                            seed=pairs["seed"], batch_size=batch_size)
    num_samples = int(pairs["num_samples"])
    # Generation of every arm takes minutes on a CPU: a bar with an ETA, batch by batch.
    with tqdm(total=-(-num_samples // batch_size), desc="icp eval", unit="batch", dynamic_ncols=True) as bar:
        generated = 0

        def sample(batch, *args, **kwargs):  # the bar moves per batch; this shows life within one (each arm)
            nonlocal generated
            images = task.sample(batch, *args, **kwargs)
            generated += len(images)
            bar.set_postfix_str(f"{generated} images generated", refresh=True)
            return images

        result = evaluate_pairs(sample, interleaved(loader, num_samples, batch_size), extractors, device,
                                baselines=B.resolve(list(protocol.get("baselines", ["other_identity"]))),
                                num_steps=int(gen["num_steps"]), guidance_scale=gen.get("guidance_scale"),
                                seed=int(gen.get("seed", 0)), kid_subset_size=int(met.get("kid_subset_size", 50)),
                                progress=bar)
    record = build_record(result, extractors, source="icp eval", run=info.root, checkpoint=ckpt,
                          checkpoint_sha256=ckpt_sha, task=type(task).__name__, protocol=protocol, shards=shards,
                          resolution=int(resolution), config_hash=config_hash(cfglib.load(info.config)))
    return write_record(record, Path(out) if out else info.root / "eval" / "metrics.json")
