"""``icp eval``: measure one trained run under a protocol and write a reproducible metrics.json.

The record holds the values, the extractors (name, weight file, sha256), the data set's
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
from icp.eval import baselines as B
from icp.eval.evaluator import build_extractors
from icp.eval.heldout import heldout_loader, interleaved
from icp.eval.paired import METHOD, evaluate_pairs

FORMAT = "icp-metrics"
DEFAULT_PROTOCOL = Path("eval") / "protocol.yaml"


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


def run_eval(target: str | Path, protocol: dict, device: str = "cpu", out: str | Path | None = None,
             trust_checkpoint: bool = False) -> Path:
    """Evaluate the run directory or checkpoint ``target``; write and return metrics.json's path.

    ``trust_checkpoint``: allow a checkpoint that needs full unpickling (it can run code).
    """
    from icp.tasks.loading import load_task, locate_run

    run_dir, ckpt = locate_run(target)
    run_cfg = cfglib.load(run_dir / "config.yaml")
    ds, pairs, gen, met = protocol["dataset"], protocol["pairs"], protocol["generation"], protocol["metrics"]
    shards = Path(ds["shards"])
    if not (shards / "manifest.json").is_file():
        raise DataError(f"held-out set {shards} has no manifest.json; make it with the command in eval/protocol.yaml "
                        "or set dataset.shards=FOLDER")
    resolution = ds.get("resolution") or OmegaConf.select(run_cfg, "data.resolution", default=None)
    if resolution is None:
        raise ConfigError(f"{run_dir}/config.yaml has no data.resolution; pass dataset.resolution=N")
    # Hash the checkpoint before loading it: the record names exactly the bytes that were measured.
    ckpt_sha = sha256_of(ckpt)
    task = load_task(run_dir if Path(target).is_dir() else ckpt, device=device, trust_checkpoint=trust_checkpoint)
    extractors = build_extractors(
        identity=met.get("identity", ["icp", "dlib"]), embedder=met.get("embedder"),
        dlib_models_dir=met.get("dlib_models_dir"), facenet_weights=met.get("facenet_weights"),
        fid=bool(met.get("fid", True)), inception_torchscript=met.get("inception_torchscript"),
        clip_model=met.get("clip_model"), device=device)
    loader = heldout_loader(str(shards), resolution=int(resolution), mask_ratio=pairs["mask_ratio"],
                            patch_size=pairs["patch_size"], pairs_per_identity=pairs["pairs_per_identity"],
                            seed=pairs["seed"], batch_size=int(gen.get("batch_size", 8)))
    batch_size = int(gen.get("batch_size", 8))
    result = evaluate_pairs(task.sample, interleaved(loader, int(pairs["num_samples"]), batch_size), extractors, device,
                            baselines=B.resolve(list(protocol.get("baselines", ["other_identity"]))),
                            num_steps=int(gen["num_steps"]), guidance_scale=gen.get("guidance_scale"),
                            seed=int(gen.get("seed", 0)), kid_subset_size=int(met.get("kid_subset_size", 50)))
    scalars = result.scalars[METHOD]
    described = extractors.describe()
    manifest = shards / "manifest.json"
    key = protocol_key(protocol, sha256_of(manifest), int(resolution), described)
    from icp.core.rundir import config_hash

    record = {
        "format": FORMAT, "version": 1,
        "run": str(run_dir), "checkpoint": str(ckpt), "checkpoint_sha256": ckpt_sha, "task": type(task).__name__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": scalars, "samples": result.samples, "unavailable": extractors.unavailable,
        "no_valid_samples": result.empty[METHOD],
        "baselines": {arm: v for arm, v in result.scalars.items() if arm != METHOD},
        "intervals": result.intervals[METHOD], "comparisons": result.comparisons,
        "extractors": described,
        "dataset": {"shards": str(shards), "manifest": str(manifest), "manifest_sha256": key["dataset_manifest_sha256"]},
        "protocol": key, "protocol_id": protocol_id(key),
        "config_hash": config_hash(run_cfg), "code_version": code_version(),
        "per_sample": per_sample_scores(result.rows.get(METHOD, []), scalars),
    }
    record["digest"] = record_digest(record)
    path = Path(out) if out else run_dir / "eval" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path
