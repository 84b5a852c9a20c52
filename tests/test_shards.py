"""Shard writing, reading, resuming, corruption detection and photo import."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icp.render.renderer import render_group
from icp.data.shards.format import decode_group, read_manifest, to_uint8
from icp.cli.shards import main as cli
from icp.data.shards.read import ShardStream, check, iter_shard, members_of
from icp.data.shards.write import synth
from icp.core.errors import DataError

IDS, VIEWS, RES = 6, 3, 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "synth"
    synth(out, IDS, VIEWS, RES, seed=3, shard_size=2, progress=False)
    return out


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def member_offset(tar_path: Path, suffix: str) -> tuple[int, int]:
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            if info.name.endswith(suffix):
                return info.offset_data, info.size
    raise AssertionError(suffix)


def test_manifest(folder):
    m = read_manifest(folder)
    assert m["counts"] == {"shards": 3, "samples": IDS, "views": IDS * VIEWS}
    assert m["generator"]["seed"] == 3 and len(m["shards"]) == 3
    assert {"fg", "coords", "depth", "pose", "light", "landmarks"} <= set(m["fields"]["present"])
    assert not (folder / "manifest.partial.json").exists() and not list(folder.glob("*.tmp"))
    assert check(folder)["samples"] == IDS


def test_round_trip_equals_render(folder):
    sample = next(iter_shard(folder / "shard-000001.tar"))
    assert sample["__key__"] == "id00000002" and "." not in sample["__key__"]
    got = decode_group(members_of(sample))
    ref = render_group(2, VIEWS, RES, 3)
    assert got["identity_index"] == 2
    for v in range(VIEWS):  # PNG is lossless: bytes after decode equal the quantised render
        assert np.array_equal(np.asarray(to_uint8(got["rgb"][v])), to_uint8(ref["rgb"][v]))
        assert np.array_equal(np.asarray(to_uint8(got["fg"][v])), to_uint8(ref["fg"][v]))
    for name in ("coords", "depth"):
        assert torch.equal(got[name], ref[name].half().float())
    for name in ("pose", "light", "landmarks"):
        assert torch.equal(got[name], ref[name].float())
    assert torch.equal(got["identity_params"], ref["identity"].float())


def test_resume_skips_good_shards_and_refuses_other_config(folder, tmp_path):
    out = corrupt_copy(folder, tmp_path / "resume")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    sha = {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]}
    (out / "shard-000001.tar").unlink()
    synth(out, IDS, VIEWS, RES, seed=3, shard_size=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # skipped
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]} == sha  # deterministic bytes
    # a run killed mid-way leaves only manifest.partial.json (and maybe a .tmp): resume from it
    (out / "manifest.json").rename(out / "manifest.partial.json")
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    synth(out, IDS, VIEWS, RES, seed=3, shard_size=2, progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before["shard-000000.tar"]
    assert {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]} == sha
    assert not (out / "manifest.partial.json").exists()
    with pytest.raises(DataError, match="different generator config.*seed"):
        synth(out, IDS, VIEWS, RES, seed=4, shard_size=2, progress=False)


def test_workers_give_the_same_bytes(tmp_path):
    a = synth(tmp_path / "a", 2, 2, 16, seed=1, shard_size=1, workers=1, progress=False)
    b = synth(tmp_path / "b", 2, 2, 16, seed=1, shard_size=1, workers=2, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def _stream(folder, **kw):
    return ShardStream(folder, lambda group, g: [group["identity_index"]], **kw)


def test_truncated_shard_caught_by_check_and_reader(folder, tmp_path, capsys):
    out = corrupt_copy(folder, tmp_path / "trunc")
    path = out / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-000001.tar"):
        check(out)
    assert cli(["shards", "check", str(out)]) == 2
    assert "shard-000001.tar" in capsys.readouterr().err
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(_stream(out, on_bad_shard="fail"))
    stream = _stream(out, on_bad_shard="skip")
    got = list(stream)
    assert stream.bad_shards == 1 and {0, 1, 4, 5} <= set(got) and len(got) < IDS


def test_bit_flip_caught_by_check_and_reader(folder, tmp_path, capsys):
    out = corrupt_copy(folder, tmp_path / "flip")
    path = out / "shard-000002.tar"
    offset, size = member_offset(path, "id00000005.coords.npy")
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    assert cli(["shards", "check", str(out)]) == 2
    assert "shard-000002.tar" in capsys.readouterr().err
    with pytest.raises(DataError, match="shard-000002.tar: sha256 mismatch"):
        check(out)
    with pytest.raises(DataError, match="id00000005.*coords"):
        list(_stream(out, on_bad_sample="fail"))
    stream = _stream(out, on_bad_sample="skip")
    assert sorted(stream) == [0, 1, 2, 3, 4] and stream.bad_samples == 1


def test_cli_synth_and_check(tmp_path, capsys):
    assert cli(["shards", "synth", str(tmp_path / "c"), "--identities", "2", "--views", "2",
                "--resolution", "16", "--shard-size", "1"]) == 0
    assert cli(["shards", "check", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 2
    assert cli(["shards", "check", str(tmp_path / "nowhere")]) == 2


def test_import_astronaut_and_report_coffee(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    src = tmp_path / "photos"
    (src / "alice").mkdir(parents=True)
    (src / "bob").mkdir()
    Image.fromarray(skdata.astronaut()).save(src / "alice" / "a.png")
    Image.fromarray(skdata.astronaut()[:, ::-1].copy()).save(src / "alice" / "b.jpg")
    Image.fromarray(skdata.coffee()).save(src / "bob" / "coffee.png")
    (src / "alice" / "junk.png").write_bytes(b"not an image")
    assert cli(["shards", "import", str(src), str(tmp_path / "out"), "--resolution", "48"]) == 0
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["identities"] == 1 and report["images"] == 2
    assert [Path(p).name for p in report["no_face"]] == ["coffee.png"]
    assert [Path(p).name for p in report["unreadable"]] == ["junk.png"]
    counts = check(tmp_path / "out")
    assert counts["samples"] == 1 and counts["views"] == 2
    manifest = read_manifest(tmp_path / "out")
    assert "coords" not in manifest["fields"]["present"] and "landmarks" in manifest["fields"]["present"]
    group = decode_group(members_of(next(iter_shard(tmp_path / "out" / "shard-000000.tar"))))
    assert group["rgb"].shape == (2, 3, 48, 48) and group["landmarks"].shape == (2, 5, 2)
    # eyes land where the alignment template puts them, in both the photo and its mirror
    assert (group["landmarks"][:, 0, 0] < group["landmarks"][:, 1, 0]).all()
