"""What ``icp fit`` (and ``--dry-run``, sweeps, ``icp slurm submit``) checks before it creates anything.

A run directory or a W&B run made for a config that cannot train is litter, and a data error found
20 s into start-up (after the model was built) is a slow way to learn a path was wrong. So, first
and cheaply: every shard folder the data node names exists, has a valid manifest, lists shards that
are there and readable (one tar header read, not the shards' content: ``icp shards check`` does the
full check), and every ``_target_`` is allow-listed, importable and accepts its keys.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core.errors import DataError


def _shard_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """(config key, folder) of every shard folder the data node names: ``data.shards``,
    ``data.val_shards`` and any other ``data.*_shards`` string."""
    data = OmegaConf.select(cfg, "data", default=None)
    if not isinstance(data, DictConfig):
        return []
    found = []
    for key in data.keys():
        key = str(key)
        if key == "shards" or key.endswith("_shards"):
            value = OmegaConf.select(cfg, f"data.{key}", default=None)
            if isinstance(value, str) and value not in ("", "???"):
                found.append((f"data.{key}", value))
    return found


def check_shard_folder(key: str, folder: str) -> None:
    """The folder exists, its manifest is valid, every listed shard is a readable file and the
    first one starts with a tar header. One line naming the folder and the fix otherwise."""
    from icp.data.shards.format import read_manifest

    path = Path(folder)
    make = f"`icp shards synth {folder} --identities N` or `icp shards import PHOTOS {folder}`"
    if not path.is_dir():
        raise DataError(f"{key}: shard folder {folder} does not exist; make it with {make}, or set {key}=PATH")
    try:
        manifest = read_manifest(path)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None
    if not manifest["shards"]:
        raise DataError(f"{key}: {folder}/manifest.json lists no shards; re-create the folder with {make}")
    missing = [e["name"] for e in manifest["shards"] if not (path / e["name"]).is_file()]
    if missing:
        raise DataError(f"{key}: {len(missing)} shard(s) listed in {folder}/manifest.json are missing "
                        f"(first: {missing[0]}); copy them back or re-create the folder with {make}")
    first = path / manifest["shards"][0]["name"]
    try:
        with tarfile.open(first, mode="r:") as archive:
            archive.next()  # one header: readable, and a tar file
    except PermissionError:
        raise DataError(f"{key}: cannot read {first} (permission denied); fix its permissions") from None
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{key}: {first} is not a readable tar shard ({str(err)[:80]}); "
                        f"run `icp shards check {folder}`") from None


def preflight(cfg: DictConfig) -> None:
    """Data paths first (cheap), then every ``_target_`` (imports modules): before anything is made."""
    for key, folder in _shard_keys(cfg):
        check_shard_folder(key, folder)
    cfglib.validate(cfg, cfg)
    from icp.jobs import wandb_log

    wandb_log.check_online(wandb_log.fit_modes([cfg]))  # online without a key: refused before anything is made
