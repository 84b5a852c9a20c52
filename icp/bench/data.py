"""Data-path throughput: renders per core, raw tar read rate, decode rate, loader rate by workers.

Usage: python eval/bench_data.py [--identities 24] [--views 4] [--out eval/results/bench_data.md]

Numbers depend on the machine and on what else runs on it; the markdown records both.
:func:`loader_rates` is row (e) of eval/bench_train.py: the loader at the training resolution
with this machine's cores, against what the training steps consume.
"""

from __future__ import annotations

import argparse
import os
import warnings
import platform
import tempfile
import time
from pathlib import Path

import torch

from icp.data.datamodule import ShardDataModule
from icp.render.renderer import render_group
from icp.data.shards.format import decode_group
from icp.data.shards.read import iter_shard, members_of
from icp.data.shards.write import synth


def render_rate(resolution: int, views: int, groups: int) -> float:
    """Views rendered per second on one thread (one core)."""
    torch.set_num_threads(1)
    render_group(10_000, 1, resolution, 0)  # warm-up (allocator, lazy imports)
    start = time.perf_counter()
    for i in range(groups):
        render_group(i, views, resolution, 0)
    return groups * views / (time.perf_counter() - start)


def raw_and_decode_rate(folder: Path) -> tuple[float, float, float]:
    """(samples/s reading tar bytes only, MB/s of that, samples/s including full decode)."""
    tars = sorted(folder.glob("*.tar"))
    start = time.perf_counter()
    samples = sum(1 for t in tars for _ in iter_shard(t))
    raw = time.perf_counter() - start
    megabytes = sum(t.stat().st_size for t in tars) / 1e6
    start = time.perf_counter()
    for t in tars:
        for sample in iter_shard(t):
            decode_group(members_of(sample))
    decoded = time.perf_counter() - start
    return samples / raw, megabytes / raw, samples / decoded


def loader_rate(folder: Path, workers: int, batch_size: int, pairs: int, epochs: int = 3) -> float:
    """Training items (profile/target pairs with mask and flow) per second through the DataLoader,
    steady state: persistent workers, the first (start-up) epoch not timed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = ShardDataModule(str(folder), batch_size=batch_size, num_workers=workers, pairs_per_identity=pairs,
                                 shuffle_buffer=64, seed=0, persistent_workers=True)
        module.setup("fit")
        loader = module.train_dataloader()
        items, start = 0, 0.0
        for epoch in range(epochs + 1):
            if epoch == 1:
                items, start = 0, time.perf_counter()
            module.set_epoch(epoch)
            for batch in loader:
                items += batch["identity"].shape[0]
        return items / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def resident_rate(folder: Path, batch_size: int = 128, batches: int = 200, resolution: int | None = None,
                  device: str = "cpu") -> dict:
    """Samples/s that :class:`icp.data.resident.ResidentImages` serves (its training loader, moved to
    ``device`` and scaled to [-1, 1] as in training), to set beside what a training step consumes."""
    from icp.data.resident import ResidentImages

    module = ResidentImages(str(folder), batch_size=batch_size, resolution=resolution, workers=os.cpu_count() or 1)
    module.setup("fit")
    data = module.train_dataloader().dataset  # item g = training batch g, across epochs (what the loader asks)

    def one(g: int) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in data[g].items()}
        module.on_after_batch_transfer(batch, 0)

    one(0)  # the first batch builds the epoch's permutation
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for g in range(1, batches + 1):
        one(g)
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - start
    return {"views": len(module.train_images), "load_s": module.load_seconds, "batch": batch_size,
            "device": device, "samples_per_s": batches * batch_size / took}


def loader_rates(identities: int, views: int, resolution: int, batch_size: int, worker_counts: list[int],
                 render_workers: int, pairs: int = 4) -> dict:
    """Row (e) of eval/bench_train.py: shards rendered at ``resolution`` (one per identity, so that
    every loader worker has shards to read), then :func:`loader_rate` for each worker count."""
    with tempfile.TemporaryDirectory(prefix="icp_bench_shards_") as tmp:
        folder = Path(tmp) / "shards"
        start = time.perf_counter()
        synth(folder, identities=identities, views=views, resolution=resolution, seed=0, workers=render_workers,
              shard_size=1, progress=False)
        render_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.glob("*.tar"))
        rates = [{"workers": w, "batch": batch_size, "samples_per_s": loader_rate(folder, w, batch_size, pairs)}
                 for w in worker_counts]
    return {"render_s": render_s, "views_rendered": identities * views,
            "shard_bytes_per_view": size / (identities * views), "rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="shard resolution for the loader bench")
    parser.add_argument("--render-groups", type=int, default=2)
    parser.add_argument("--out", default="eval/results/bench_data.md")
    parser.add_argument("--resident", metavar="SHARDS", help="only the in-memory loader's serving rate on SHARDS "
                        "(batch 128, to the GPU when there is one), printed as JSON")
    args = parser.parse_args()
    if args.resident:
        import json

        from icp.core.errors import IcpError

        if not Path(args.resident).is_dir():  # also a FIFO or a device, which a read would block on
            parser.error(f"--resident {args.resident}: no such shard folder (render one with `icp shards synth`)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            print(json.dumps(resident_rate(Path(args.resident), device=device)))
        except IcpError as err:
            parser.error(f"--resident {args.resident}: {err}")
        return
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")

    rows = []
    for res in (64, 128, 256):
        rate = render_rate(res, args.views, args.render_groups)
        rows.append((f"render {res}px, 1 core", f"{rate:.2f} views/s", f"{1 / rate:.3f} s/view"))
        print(rows[-1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench"
        start = time.perf_counter()
        synth(folder, args.identities, args.views, args.resolution, seed=0, shard_size=4, progress=False)
        took = time.perf_counter() - start
        rows.append((f"synth shards {args.resolution}px ({args.identities}x{args.views} views, 1 process)",
                     f"{args.identities * args.views / took:.2f} views/s", f"{took:.1f} s total"))
        print(rows[-1])
        raw, mbps, dec = raw_and_decode_rate(folder)
        rows.append(("raw tar read (bytes only)", f"{raw:.0f} identities/s", f"{mbps:.0f} MB/s"))
        rows.append(("tar read + decode (PNG, npy, crc)", f"{dec:.0f} identities/s", f"{dec * args.views:.0f} views/s"))
        print(rows[-2:])
        for workers in (1, 2, 4):
            rate = loader_rate(folder, workers, batch_size=8, pairs=4)
            rows.append((f"loader, {workers} worker(s), pairs+mask+flow", f"{rate:.0f} pairs/s", ""))
            print(rows[-1])

    lines = [
        "# Data-path throughput (eval/bench_data.py)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Other jobs may share the CPU: read ratios, not absolutes.",
        f"Loader: {args.identities} identities x {args.views} views at {args.resolution}px, 4 pairs per "
        "identity, batch 8, persistent workers, 3 epochs after an untimed start-up epoch.",
        "",
        "| what | rate | note |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
