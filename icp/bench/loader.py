"""(e) The shard loader's throughput with this machine's CPU cores.

Shards are rendered here (synthetic identities, the project's own renderer) at the training
resolution, then read back by ShardDataModule exactly as training does (pairs, 80% patch
masking, ground-truth flow) with a given number of DataLoader workers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from icp.data.datamodule import ShardDataModule
from icp.data.shards.write import synth


def make_shards(folder: Path, identities: int, views: int, resolution: int, workers: int) -> float:
    start = time.perf_counter()
    synth(folder, identities=identities, views=views, resolution=resolution, seed=0, workers=workers,
          shard_size=1, progress=False)
    return time.perf_counter() - start


def loader_rate(folder: Path, batch: int, workers: int, resolution: int, batches: int,
                warmup_batches: int = 2) -> dict[str, Any]:
    """Samples/s of the training loader after its workers have started (``warmup_batches``)."""
    dm = ShardDataModule(shards=str(folder), batch_size=batch, num_workers=workers, resolution=resolution,
                         samples_per_epoch=batch * (batches + warmup_batches + workers + 1) * 4,
                         shuffle_buffer=16, pin_memory=False)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(warmup_batches):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["target"].shape[0]
    elapsed = time.perf_counter() - start
    del it
    return {"workers": workers, "batch": batch, "samples_per_s": n / elapsed, "batches": batches}


def run(identities: int, views: int, resolution: int, batch: int, worker_counts: list[int], batches: int,
        render_workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="icp_bench_shards_") as tmp:
        folder = Path(tmp) / "shards"
        render_s = make_shards(folder, identities, views, resolution, render_workers)
        size = sum(p.stat().st_size for p in folder.glob("*.tar"))
        rates = [loader_rate(folder, batch, w, resolution, batches) for w in worker_counts]
    return {"render_s": render_s, "views_rendered": identities * views, "shard_bytes_per_view": size / (identities * views),
            "rates": rates}
