"""Read a W&B offline run's transaction log (``run-<id>.wandb``), the file ``wandb sync`` uploads.

wandb 0.31 ships no Python reader (wandb-core writes and syncs it), so the tests read the format
themselves: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB log records in
32 KiB blocks (crc32c, length, type FULL/FIRST/MIDDLE/LAST), each payload one ``Record`` protobuf
of ``wandb.proto.wandb_internal_pb2``. A file that fails to parse is one ``wandb sync`` cannot
upload either.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        assert len(payload) == length, f"{path}: truncated record at byte {pos}"
        pos += HEADER + length
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"{path}: bad record type {kind} at byte {pos}"
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def complete_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The records of an offline run folder once its exit record is written (wandb-core writes the
    file from its own process, a moment after ``finish()`` returns)."""
    deadline = time.time() + timeout
    while True:
        files = list(Path(run_dir).glob("run-*.wandb"))
        found = [r for f in files for r in records(f)] if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.time() > deadline:
            return found


def _put(out: dict, item) -> None:
    """One item (``key``, or ``nested_key``: a media value comes as its fields) into ``out``."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        out = out.setdefault(part, {})
    out[path[-1]] = json.loads(item.value_json)


def history(recs: list) -> list[dict]:
    """Every logged history row as {key: decoded value} (a logged image or table: its file reference)."""
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({})
            for item in r.history.item:
                _put(rows[-1], item)
    return rows


def summary(recs: list) -> dict:
    """The run summary (its last update of each key)."""
    out: dict = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                _put(out, item)
    return out


def run_record(recs: list):
    return next(r.run for r in recs if r.WhichOneof("record_type") == "run")
