"""Property-based fuzzing of everything icp reads from someone else (issue 27): configs, shard
manifests, tar headers of shard members, images and metrics records.

The property is the same for each: the reader returns a well-formed result or raises one-line
``IcpError`` (the CLI's ``icp: error:``), within a time limit per case (``time_limit`` raises a
BaseException, so no ``except Exception`` in the code under test can hide a hang). Derandomized so
that CI runs the same cases every time.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from icp.core import config as cfglib
from icp.core.errors import IcpError
from tests.test_hostile_inputs import BOMB, time_limit

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PER_CASE_S = 10


def one_line(err: BaseException) -> None:
    assert isinstance(err, IcpError), f"{type(err).__name__}: {err}"
    assert "\n" not in str(err).strip(), str(err)


# ------------------------------------------------------------------------------------- configs

NAMES = st.sampled_from(["torch.os.system", "os.system", "icp.core.config.os.system", "builtins.eval",
                         "torch.optim.AdamW", "torch.nn.Linear", "lightning.Trainer", "torch.load",
                         "icp.models.backbone.tiny", "subprocess.Popen", "torch.optim.Optimizer.__init__",
                         "diffusers.DDPMScheduler", "pickle.loads", "", "a..b", "torch", "x" * 300])
INTERPOLATIONS = st.sampled_from(["${oc.env:HOME}", "${oc.env:${k}}", "${oc.select:x,${oc.env:DB_PASSWD}}",
                                  "${python.eval:1}", "${ oc.env : 'HF_TOKEN' }", "${oc.decode:'${oc.env:X}'}",
                                  "${k}", "${oc.create:{a: 1}}", "${oc.env:ICP_UNSET,d}", "${", "}", "$${x}"])
SCALARS = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12), st.booleans(), st.none(),
                    INTERPOLATIONS)
TREES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5),
                                                                     kids, max_size=4)), max_leaves=20)


def node_strategy():
    return st.fixed_dictionaries({"_target_": NAMES}, optional={"command": st.just("touch pwned"),
                                                                  "in_features": st.integers(-3, 3),
                                                                  "out_features": st.integers(-3, 3),
                                                                  "lr": st.floats(), "x": TREES})


@settings(max_examples=60, **FUZZ)
@given(tree=st.dictionaries(st.sampled_from(["k", "x", "model", "security", "experiment", "run"]),
                            st.one_of(TREES, node_strategy()), max_size=5))
def test_configs(tmp_path_factory, tree):
    import yaml

    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    marker = Path("pwned")
    with time_limit(PER_CASE_S):
        try:
            cfg = cfglib.load(path)
            cfglib.check_values(cfg)
            cfglib.to_yaml(cfg)
            for key in cfg:
                cfglib.validate(cfg[key], cfg, str(key))
        except IcpError as err:
            one_line(err)
    assert not marker.exists()


@settings(max_examples=40, **FUZZ)
@given(text=st.one_of(st.text(max_size=200), st.sampled_from([BOMB, "a: &a [*a]\n", "[" * 3000, "a: !!python/object:os.system {}\n",
                                                             "a: !!binary AAAA\n", "- 1\n- 2\n", "a: b: c\n"])))
def test_config_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("txt") / "c.yaml"
    path.write_text(text)
    with time_limit(PER_CASE_S):
        try:
            cfglib.load(path)
        except IcpError as err:
            one_line(err)


# ------------------------------------------------------------------------------------ manifests

JSON = st.recursive(st.one_of(st.integers(-2**70, 2**70), st.floats(), st.text(max_size=10), st.booleans(), st.none()),
                    lambda kids: st.one_of(st.lists(kids, max_size=4),
                                           st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=15)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from icp.data.shards.write import synth

    out = tmp_path_factory.mktemp("fz") / "synth"
    synth(out, 2, 2, 16, seed=1, shard_size=1, progress=False)
    return out, json.loads((out / "manifest.json").read_text())


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_manifests(shards, tmp_path_factory, data):
    from icp.data.shards.read import ShardStream, check

    src, manifest = shards
    folder = tmp_path_factory.mktemp("man")
    for shard in src.glob("*.tar"):
        (folder / shard.name).symlink_to(shard)
    edited = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3), "edits")):
        path = data.draw(st.sampled_from([(), ("shards",), ("shards", 0), ("shards", 0, "name"), ("shards", 0, "samples"),
                                          ("shards", 0, "sha256"), ("fields",), ("fields", "present"), ("counts",),
                                          ("schema_version",)]), "where")
        value = data.draw(JSON | st.sampled_from(["../x.tar", "/dev/zero", "shard-000000.tar", -1, 10**30]), "value")
        if not path:
            edited = value
            break
        node = edited
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    (folder / "manifest.json").write_text(json.dumps(edited))
    with time_limit(PER_CASE_S):
        for read in (lambda: check(folder), lambda: list(ShardStream(folder, lambda g, gen: [g["_key"]]))):
            try:
                read()
            except IcpError as err:
                one_line(err)


# ------------------------------------------------------------------------------ shard members

@settings(max_examples=40, **FUZZ)
@given(size=st.one_of(st.integers(0, 1 << 20), st.sampled_from([1 << 40, (1 << 63) - 1, 8 << 30])),
       kind=st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE,
                             tarfile.LNKTYPE]),
       name=st.sampled_from(["id00000000.meta.json", "../x", "/etc/passwd", "id00000000.v00.rgb.png", "a" * 200]))
def test_member_headers(shards, tmp_path_factory, size, kind, name):
    """A member whose header declares any size or type, then the rest of a good shard."""
    from icp.data.shards.format import sha256_file
    from icp.data.shards.read import ShardStream, check

    src, manifest = shards
    folder = tmp_path_factory.mktemp("hdr")
    good = (src / "shard-000000.tar").read_bytes()
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    header = info.tobuf(tarfile.GNU_FORMAT)
    (folder / "shard-000000.tar").write_bytes(header + b"\0" * 1024 + good)
    entry = {"name": "shard-000000.tar", "samples": 1, "sha256": sha256_file(folder / "shard-000000.tar")}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "shards": [entry]}))
    with time_limit(PER_CASE_S):
        for read in (lambda: check(folder), lambda: list(ShardStream(folder, lambda g, gen: [g["_key"]],
                                                                     on_bad_shard="skip"))):
            try:
                read()
            except IcpError as err:
                one_line(err)


# ------------------------------------------------------------------------------------- images

MODES = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"])


@settings(max_examples=50, **FUZZ)
@given(mode=MODES, w=st.integers(1, 40), h=st.integers(1, 40), fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]),
       seed=st.integers(0, 2**16), garbage=st.one_of(st.none(), st.binary(max_size=64)), cut=st.integers(0, 400))
def test_images(tmp_path_factory, mode, w, h, fmt, seed, garbage, cut):
    from icp.inference import prepare_face, read_image

    path = tmp_path_factory.mktemp("img") / "x.img"
    rng = np.random.default_rng(seed)
    try:
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        elif mode == "F":
            img = Image.fromarray(rng.random((h, w), dtype=np.float32))
        else:
            img = Image.new(mode, (w, h), tuple(int(v) for v in rng.integers(0, 255, 4))[:len(mode)]
                            if mode not in ("I", "1", "P", "L") else int(rng.integers(0, 255)))
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        blob = buf.getvalue()
    except (OSError, ValueError, KeyError):  # this mode cannot be written in this format
        blob = b""
    if garbage is not None:
        blob = blob[:cut] + garbage
    path.write_bytes(blob)
    with time_limit(PER_CASE_S):
        try:
            rgb, _ = read_image(path)
            arr = np.asarray(rgb)
            assert rgb.mode == "RGB" and arr.dtype == np.uint8
            face = prepare_face(path, 16, align=False)
            assert face.shape == (3, 16, 16) and bool(face.isfinite().all()) and float(face.abs().max()) <= 1
        except IcpError as err:
            one_line(err)


# ------------------------------------------------------------------------------ metrics records


@pytest.fixture(scope="module")
def record_file(tmp_path_factory):
    """A well-formed record made with icp's own helpers, and the files it names."""
    from icp.eval.record import FORMAT, protocol_id, protocol_key, record_digest, sha256_of

    root = tmp_path_factory.mktemp("rec")
    (root / "manifest.json").write_text("{}")
    (root / "last.ckpt").write_bytes(b"weights")
    (root / "emb.pt").write_bytes(b"embedder")
    extractors = {"identity_icp": {"name": "icp", "file": str(root / "emb.pt"), "sha256": sha256_of(root / "emb.pt")}}
    key = protocol_key({"name": "p", "pairs": {"num_samples": 2}, "generation": {"num_steps": 1}, "metrics": {}},
                       sha256_of(root / "manifest.json"), 32, extractors)
    per_sample = {"psnr": [20.0, 22.0], "id_cos_icp": [0.5, None]}
    record = {"format": FORMAT, "version": 1, "run": str(root / "run"), "checkpoint": str(root / "last.ckpt"),
              "checkpoint_sha256": sha256_of(root / "last.ckpt"), "task": "T", "metrics": {"psnr": 21.0, "id_cos_icp": 0.5},
              "samples": 2, "per_sample": per_sample, "extractors": extractors,
              "dataset": {"manifest": str(root / "manifest.json"), "manifest_sha256": key["dataset_manifest_sha256"]},
              "protocol": key, "protocol_id": protocol_id(key), "baselines": {}, "intervals": {}, "comparisons": {},
              "no_valid_samples": []}
    record["digest"] = record_digest(record)
    return root, record


def test_the_made_record_is_accepted(record_file, tmp_path):
    from icp.eval.leaderboard import build

    root, record = record_file
    (tmp_path / "r.json").write_text(json.dumps(record))
    build([str(tmp_path / "r.json")], tmp_path / "lb")


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_metrics_records(record_file, tmp_path_factory, data):
    from icp.eval.leaderboard import build

    root, record = record_file
    edited = json.loads(json.dumps(record))
    where = data.draw(st.sampled_from([("metrics", "psnr"), ("metrics",), ("samples",), ("per_sample", "psnr"),
                                       ("protocol_id",), ("protocol", "resolution"), ("checkpoint",), ("digest",),
                                       ("extractors", "identity_icp", "file"), ("dataset",), ()]), "where")
    value = data.draw(JSON | st.sampled_from(["/dev/zero", "/dev/urandom", "/proc/self/mem", 21.5, float("nan"),
                                              [None, None], 10**400 if False else 1e308]), "value")
    if where:
        node = edited
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
    else:
        edited = value
    folder = tmp_path_factory.mktemp("lbf")
    (folder / "r.json").write_text(json.dumps(edited))
    with time_limit(PER_CASE_S):
        try:
            build([str(folder / "r.json")], folder / "lb")
        except IcpError as err:
            one_line(err)
            return
    # Accepted only if the numbers are the ones measured (an edit that changes nothing is fine).
    assert edited["metrics"] == record["metrics"] and edited["samples"] == record["samples"]
    assert not any(isinstance(v, float) and math.isnan(v) for v in edited["metrics"].values())
