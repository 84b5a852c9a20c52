"""``icp export RUN OUT``: an adaptation run -> a diffusers pipeline folder (model_index.json + parts).

    icp export runs/quickstart/main out/portrait
    python -c "from icp import ICPortraitPipeline; ICPortraitPipeline.from_pretrained('out/portrait')"

RUN is anything ``icp generate --checkpoint`` takes (a fit run, a .ckpt in it, the main job's
root, a claims sub-run). The folder is written beside OUT under a temporary name and renamed
into place when complete, so OUT is either absent, or a whole export.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write an adaptation run as a diffusers pipeline folder (model_index.json)",
        description="Write the run's whole method (UNet, Appearance Net, Matching Net, fusion, codec, text "
                    "encoder, scheduler and generation settings) as a diffusers folder that "
                    "icp.ICPortraitPipeline.from_pretrained(OUT) loads offline.")
    p.add_argument("run", metavar="RUN", help="an adaptation run directory, a .ckpt in one, or the main job's root")
    p.add_argument("out", metavar="OUT", help="the folder to create (must not exist, or be empty)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling: this RUNS PICKLED CODE FROM THE FILE; "
                        "use only for files from someone you trust")
    p.set_defaults(func=handler)


def export(run: str | Path, out: str | Path, trust_checkpoint: bool = False) -> Path:
    """Write ``run``'s pipeline to ``out`` atomically (temporary folder beside it, then a rename)."""
    from icp.core.errors import ConfigError
    from icp.pipeline import ICPortraitPipeline, write_shim

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; pass the path of a new folder to export into")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; pass a new folder (or delete it) to export into")
    pipe = ICPortraitPipeline.from_checkpoint(run, trust_checkpoint=trust_checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_shim(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); a rename does not replace a folder
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def handler(args: argparse.Namespace) -> int:
    out = export(args.run, args.out, trust_checkpoint=args.trust_checkpoint)
    print(f"icp: wrote {out} (load it with icp.ICPortraitPipeline.from_pretrained('{out}'))")
    return 0
