"""Issue 27: crafted configs, shards, images, checkpoints and metrics records.

Each test names the case of the issue it covers. Every test runs under a time limit
(``time_limit``): a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from icp.core import config as cfglib
from icp.core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


class Hang(BaseException):
    """Raised by ``time_limit``; a BaseException so that no ``except Exception`` in the code under
    test can turn a hang into an ordinary error."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (``Hang``) when the block runs longer than ``seconds`` (main thread, SIGALRM)."""
    assert threading.current_thread() is threading.main_thread()

    def fire(signum, frame):
        raise Hang(f"hung: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _limit(request):
    """Every test here: 400 s at most (a hang is a failure, not a stuck CI job); the cases that
    could hang have their own, much shorter limits inside."""
    with time_limit(400):
        yield


def icp(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (hangs become a TimeoutExpired failure)."""
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "icp.cli", *args], capture_output=True, text=True,
                          env=full, cwd=cwd or ROOT, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------ code execution via _target_


@pytest.mark.parametrize("target", ["torch.os.system", "icp.core.config.os.system", "lightning.os.system",
                                    "icp.core.config.importlib.import_module", "torch.optim.torch.load",
                                    "torch.optim.Optimizer.__init__.__globals__", "builtins.eval",
                                    "diffusers.utils.dynamic_modules_utils.get_class_from_dynamic_module",
                                    "torch.utils.data.DataLoader", "torch.hub.load_state_dict_from_url"])
def test_targets_reaching_code_are_refused(tmp_path, target):
    marker = tmp_path / "pwned"
    cfg = cfglib.load(write(tmp_path / "evil.yaml", f"x: {{_target_: {target}, command: 'touch {marker}'}}\n"))
    with pytest.raises(ConfigError, match="allowed"):
        cfglib.instantiate(cfg.x, cfg, "x")
    with pytest.raises(ConfigError, match="allowed"):
        cfglib.validate(cfg.x, cfg, "x")
    assert not marker.exists()


def test_targets_the_configs_use_still_build(tmp_path):
    import torch

    cfg = cfglib.load(write(tmp_path / "ok.yaml", """
net: {_target_: torch.nn.Linear, in_features: 2, out_features: 1}
opt: {_target_: torch.optim.AdamW, _partial_: true, lr: 0.1}
sched: {_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 3}
noise: {_target_: diffusers.DDPMScheduler, num_train_timesteps: 10}
cb: {_target_: lightning.pytorch.callbacks.LearningRateMonitor}
pre: {_target_: icp.cluster.preemption.PreemptionCheckpoint}
"""))
    net = cfglib.instantiate(cfg.net, cfg, "net")
    opt = cfglib.instantiate(cfg.opt, cfg, "opt")(net.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    cfglib.instantiate(cfg.sched, cfg, "sched")(opt)
    assert cfglib.instantiate(cfg.noise, cfg, "noise").config.num_train_timesteps == 10
    cfglib.instantiate(cfg.cb, cfg, "cb")
    cfglib.instantiate(cfg.pre, cfg, "pre")
    for name in ("trainer", "callbacks", "data", "model"):  # every shipped experiment still validates
        for exp in sorted((ROOT / "experiments").rglob("*.yaml")):
            full = cfglib.load(exp)
            if name in full and full[name] is not None:
                cfglib.validate(full[name], full, name)


def test_run_directory_config_cannot_run_code(tmp_path):
    """`icp generate`/`icp eval` read <run>/config.yaml: the same allow-list applies."""
    import torch

    from icp.tasks.loading import load_task

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    write(run / "config.yaml", f"experiment: x\nmodel: {{_target_: torch.os.system, command: 'touch {marker}'}}\n")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="allowed"):
        load_task(run)
    assert not marker.exists()


# ------------------------------------------------------------------------ secrets via interpolation

LEAKY = {
    "nested": "name: DB_PASSWD\nk: ${oc.env:${name}}\n",
    "select_default": "k: ${oc.select:nope,${oc.env:DB_PASSWD}}\n",
    "env_default": "k: ${oc.env:ICP_UNSET_XYZ,${oc.env:DB_PASSWD}}\n",
    "quoted": "k: ${oc.env:'DB_PASSWD'}\n",
    "credential": "k: ${oc.env:SERVICE_CREDENTIAL}\n",
    "plain_name": "k: ${oc.env:ICP_INNOCENT}\n",      # not secret-looking, but never approved
    "spaced": "k: ${ oc.env : DB_PASSWD }\n",
}


@pytest.mark.parametrize("case", sorted(LEAKY))
def test_interpolations_cannot_read_the_environment_by_default(tmp_path, monkeypatch, case):
    monkeypatch.setenv("DB_PASSWD", "hunter2-planted")
    monkeypatch.setenv("SERVICE_CREDENTIAL", "cred-planted-1234")
    monkeypatch.setenv("ICP_INNOCENT", "plain-planted-value")
    path = write(tmp_path / f"{case}.yaml", LEAKY[case])
    with pytest.raises(ConfigError):
        cfg = cfglib.load(path)
        text = cfglib.to_yaml(cfg)  # what a run directory would keep
        assert "planted" not in text, text


def test_environment_reads_need_the_config_to_name_them_and_the_runner_to_approve(tmp_path, monkeypatch):
    monkeypatch.setenv("ICP_DATA", "/data")
    monkeypatch.setenv("DB_PASSWD", "hunter2-planted")
    declared = write(tmp_path / "c.yaml", "security: {env: [ICP_DATA]}\nk: ${oc.env:ICP_DATA}\n")
    with pytest.raises(ConfigError, match="ICP_DATA"):  # named by the config, not approved
        cfglib.to_yaml(cfglib.load(declared))
    assert cfglib.load(declared, ["security.allowed_env=[ICP_DATA]"]).k == "/data"
    monkeypatch.setenv("ICP_ALLOWED_ENV", "ICP_DATA")
    assert cfglib.load(declared).k == "/data"
    undeclared = write(tmp_path / "u.yaml", "k: ${oc.env:ICP_DATA}\n")
    with pytest.raises(ConfigError, match="ICP_DATA"):  # approved, but the config did not name it
        cfglib.to_yaml(cfglib.load(undeclared))
    # A secret-looking name is never readable, declared and approved or not.
    monkeypatch.setenv("ICP_ALLOWED_ENV", "DB_PASSWD")
    secret = write(tmp_path / "s.yaml", "security: {env: [DB_PASSWD]}\nk: ${oc.env:DB_PASSWD}\n")
    with pytest.raises(ConfigError, match="DB_PASSWD"):
        cfglib.to_yaml(cfglib.load(secret))


def test_one_definition_of_secret_looking():
    from icp.core import secrets

    for name in ("DB_PASSWD", "SERVICE_CREDENTIAL", "WANDB_API_KEY", "HF_TOKEN", "MY_SECRET_X", "api_key"):
        assert secrets.is_secret_name(name)
    assert not hasattr(cfglib, "SECRET_NAME") or cfglib.SECRET_NAME is secrets.SECRET_NAME


# ------------------------------------------------------------------------------ sbatch injection


@pytest.mark.parametrize("override", ['experiment="x\\nrm -rf $HOME #"', 'run.name="a\\ntouch /tmp/pwned"',
                                      'run.root="r\\rtouch /tmp/pwned"', "experiment='a b; touch pwned'",
                                      'experiment="x\\u2028touch pwned"'])
def test_no_config_value_adds_a_line_to_the_sbatch_script(tmp_path, monkeypatch, override):
    from icp.cluster.slurm import JobSpec, submit

    monkeypatch.chdir(tmp_path)
    cfg = cfglib.load(ROOT / "tests/configs/toy.yaml", [override])
    try:
        _, script, _ = submit(cfg, JobSpec(cpu=True), dry_run=True)
    except ConfigError as err:
        assert "\n" not in str(err) and "\r" not in str(err)
        return
    normal = submit(cfglib.load(ROOT / "tests/configs/toy.yaml"), JobSpec(cpu=True), dry_run=True)[1]
    assert len(script.splitlines()) == len(normal.splitlines())
    assert "pwned" not in script and "rm -rf" not in script


def test_sbatch_options_from_the_command_line_cannot_add_lines(tmp_path, monkeypatch):
    from icp.cluster.slurm import JobSpec, submit

    monkeypatch.chdir(tmp_path)
    cfg = cfglib.load(ROOT / "tests/configs/toy.yaml")
    for spec in (JobSpec(cpu=True, partition="p\ntouch pwned"), JobSpec(cpu=True, extra_sbatch=["--x=1\nid"]),
                 JobSpec(cpu=True, mem="1G\nid"), JobSpec(cpu=True, account="a\rid")):
        with pytest.raises(ConfigError):
            submit(cfg, spec, dry_run=True)


@pytest.mark.parametrize("override", ["experiment=../../etc", "run.name=../../outside", "experiment=a/b",
                                      "run.name=..", 'experiment="x\\ny"', "run.name=.hidden"])
def test_run_directory_stays_under_its_root(tmp_path, override):
    from icp.core import rundir

    cfg = cfglib.load(ROOT / "tests/configs/toy.yaml", [override, f"run.root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="run directory"):
        rundir.run_dir_of(cfg)


# ----------------------------------------------------------------------------------- hanging shards


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    from icp.data.shards.write import synth

    out = tmp_path_factory.mktemp("hostile") / "synth"
    synth(out, 2, 2, 16, seed=1, shard_size=2, progress=False)
    return out


def _declare_size(tar_path: Path, member_suffix: str, size: int) -> None:
    """Rewrite the header of the first member ending in ``member_suffix`` to declare ``size`` bytes
    (GNU base-256 field, valid checksum): what a hostile shard holds."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        info = next(i for i in tar.getmembers() if i.name.endswith(member_suffix))
    data = bytearray(tar_path.read_bytes())
    off = info.offset
    data[off + 124:off + 136] = bytes([0x80]) + size.to_bytes(11, "big")
    data[off + 148:off + 156] = b" " * 8
    chk = sum(data[off:off + 512])
    data[off + 148:off + 156] = f"{chk:06o}\0 ".encode()
    tar_path.write_bytes(bytes(data))


def _refresh_manifest(folder: Path) -> None:
    """An attacker recomputes the manifest's sha256 (it is no defence against a crafted shard)."""
    import json

    from icp.data.shards.format import sha256_file, write_json_atomic

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = sha256_file(folder / entry["name"])
    write_json_atomic(folder / "manifest.json", manifest)


def test_member_declaring_one_tebibyte_fails_fast(synth_folder, tmp_path):
    import shutil

    from icp.data.shards import read

    folder = tmp_path / "tib"
    shutil.copytree(synth_folder, folder)
    _declare_size(folder / "shard-000000.tar", "meta.json", 1 << 40)
    _refresh_manifest(folder)
    with time_limit(10), pytest.raises(DataError, match="shard-000000.tar"):
        read.check(folder)
    with time_limit(10), pytest.raises(DataError, match="shard-000000.tar"):
        list(read.ShardStream(folder, lambda g, gen: [g["_key"]]))
    with time_limit(10), pytest.raises(DataError, match="no valid sample"):  # skipped, and nothing else left
        list(read.ShardStream(folder, lambda g, gen: [g["_key"]], on_bad_shard="skip", on_bad_sample="skip"))
    r = icp("shards", "check", str(folder), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("icp: error:") and len(r.stderr.strip().splitlines()) == 1


def _all_rejected(synth_folder: Path, tmp_path: Path) -> Path:
    """Every sample of every shard renamed to an unsafe member name: all rejected."""
    import io
    import shutil
    import tarfile

    folder = tmp_path / "rejected"
    shutil.copytree(synth_folder, folder)
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [(i, tar.extractfile(i).read()) for i in tar.getmembers()]
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, blob in members:
                info.name = info.name.replace(".meta.json", ".meta.json.bak")
                tar.addfile(info, io.BytesIO(blob))
    _refresh_manifest(folder)
    return folder


def test_every_sample_rejected_is_one_error_not_an_endless_loop(synth_folder, tmp_path):
    from icp.data.shards.read import ShardStream

    folder = _all_rejected(synth_folder, tmp_path)
    for resampled in (True, False):
        stream = ShardStream(folder, lambda g, gen: [g["_key"]], resampled=resampled, items_per_rank=10)
        with time_limit(20), pytest.raises(DataError, match="no valid sample"):
            list(stream)


DATA_YAML = ("data: {_target_: icp.data.datamodule.ShardDataModule, shards: %s, batch_size: 2, num_workers: 0, "
             "resolution: 16}\n")


def test_fit_on_a_folder_of_rejected_samples_stops_with_one_line(synth_folder, tmp_path):
    folder = _all_rejected(synth_folder, tmp_path)
    cfg = write(tmp_path / "exp.yaml", "defaults: [%s]\nexperiment: rejected\n" % (ROOT / "experiments/stitching/tiny")
                + "trainer: {max_steps: 3, accelerator: cpu, devices: 1}\nlogger: {wandb: null}\n")
    r = icp("fit", str(cfg), f"data.shards={folder}", f"data.val_shards={synth_folder}", "data.resolution=16",
            f"run.root={tmp_path / 'runs'}", "data.num_workers=0", "callbacks.samples=null", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("icp: error:")
    assert "no valid sample" in r.stderr and r.stderr.count("skipping bad sample") < 50


# ------------------------------------------------------------------------------------ YAML bombs

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_yaml_alias_bomb_is_refused_before_omegaconf(tmp_path):
    assert len(BOMB) < 800
    path = write(tmp_path / "bomb.yaml", BOMB)
    with time_limit(10), pytest.raises(ConfigError, match="nodes"):
        cfglib.load(path)
    r = icp("fit", str(path), "--dry-run", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("icp: error:") and "nodes" in r.stderr


def test_yaml_recursion_and_deep_nesting_are_one_line(tmp_path):
    for text in ("a: &a [*a]\n", "a: " + "[" * 5000 + "]" * 5000 + "\n", "a: &a {b: *a}\n"):
        with time_limit(10), pytest.raises(ConfigError):
            cfglib.load(write(tmp_path / "r.yaml", text))


def test_bomb_in_a_run_directory_config_is_refused(tmp_path):
    """`icp fit` on an existing run compares the saved config.yaml: it is read under the same limit."""
    from icp.core import rundir

    cfg = cfglib.load(ROOT / "tests/configs/toy.yaml", ["run.name=bombed", f"run.root={tmp_path}"])
    run = rundir.run_dir_of(cfg)
    write(run / "config.yaml", BOMB)
    with time_limit(10), pytest.raises(ConfigError, match="nodes"):
        rundir.prepare(cfg)


# ------------------------------------------------------------------------------- import folders


def test_fifo_and_other_non_files_in_an_import_folder_are_skipped_and_reported(tmp_path):
    from PIL import Image

    from icp.data.shards.imports import scan

    src = tmp_path / "photos"
    (src / "alice" / "nested").mkdir(parents=True)
    (src / "carol").mkdir()
    Image.new("RGB", (8, 8)).save(src / "alice" / "a.png")
    os.mkfifo(src / "alice" / "pipe.png")                       # would block Image.open forever
    Image.new("RGB", (8, 8)).save(src / "alice" / "nested" / "deep.png")
    Image.new("RGB", (8, 8)).save(src / "carol" / "c.webp")     # a format the importer does not take
    os.symlink("/dev/zero", src / "alice" / "zero.png")
    skipped: list = []
    with time_limit(10):
        found = scan(src, skipped)
    assert [(name, [p.name for p in images]) for name, images in found] == [("alice", ["a.png"])]
    reasons = {Path(p).name: why for p, why in skipped}
    assert {"pipe.png", "zero.png", "nested", "carol", "c.webp"} <= set(reasons), reasons
    assert "regular file" in reasons["pipe.png"]


def test_import_of_a_folder_holding_a_fifo_returns(tmp_path):
    src = tmp_path / "photos"
    (src / "alice").mkdir(parents=True)
    os.mkfifo(src / "alice" / "pipe.png")
    r = icp("shards", "import", str(src), str(tmp_path / "out"), timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("icp: error:")
    assert "pipe.png" in r.stderr


# ------------------------------------------------------------------------------ metrics records


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One real `icp eval` record (tiny: 2 held-out identities, 1 sampling step, CPU)."""
    import json

    import torch

    from icp.cli import main
    from tests.test_leaderboard import _run
    from tests.tiny_eval import heldout_and_embedder

    root = tmp_path_factory.mktemp("records")
    heldout_and_embedder(root, 2, seed=5, first_identity=900)
    run = _run(root, "entry", 0.1)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({**torch.load(ckpt, weights_only=True), "global_step": 1}, ckpt)  # a Lightning-like checkpoint
    assert main(["eval", str(run), f"dataset.shards={root / 'heldout'}", "pairs.num_samples=2", "pairs.mask_ratio=0.5",
                 "generation.num_steps=1", "generation.batch_size=2", "metrics.identity=[icp]", "metrics.fid=false",
                 f"metrics.embedder={root / 'embedder.pt'}", "--protocol", str(ROOT / "eval" / "protocol.yaml"),
                 "--device", "cpu"]) == 0
    return run, json.loads((run / "eval" / "metrics.json").read_text())


def _edited(tmp_path: Path, record: dict, name: str = "edited.json") -> str:
    import json

    path = tmp_path / name
    path.write_text(json.dumps(record))
    return str(path)


def test_record_pointing_at_dev_zero_is_refused_quickly(evaluated, tmp_path):
    from icp.eval.leaderboard import LeaderboardError, build

    _, record = evaluated
    for target in ("/dev/zero", "/dev/urandom"):
        with time_limit(10), pytest.raises(LeaderboardError, match="regular file"):
            build([_edited(tmp_path, dict(record, checkpoint=target))], tmp_path / "lb")
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(LeaderboardError, match="regular file"):
        build([_edited(tmp_path, dict(record, checkpoint=str(fifo)))], tmp_path / "lb")


def test_protocol_id_is_recomputed_from_the_record(evaluated, tmp_path):
    import copy

    from icp.eval.leaderboard import LeaderboardError, build

    _, record = evaluated
    build([_edited(tmp_path, record, "same.json")], tmp_path / "ok")
    forged = copy.deepcopy(record)
    forged["protocol"]["pairs"]["num_samples"] = 999          # measured under another protocol ...
    with pytest.raises(LeaderboardError, match="protocol_id"):  # ... but claims the original's id
        build([_edited(tmp_path, forged)], tmp_path / "lb")


def test_an_edited_metric_value_is_flagged(evaluated, tmp_path):
    import copy

    from icp.eval.leaderboard import LeaderboardError, build

    _, record = evaluated
    for metric in ("psnr", "id_cos_icp"):
        forged = copy.deepcopy(record)
        forged["metrics"][metric] = forged["metrics"][metric] + 0.5
        with pytest.raises(LeaderboardError, match=metric):
            build([_edited(tmp_path, forged)], tmp_path / "lb")


@pytest.mark.parametrize("mutation", ["string_metric", "no_samples", "list", "nan_metric", "bool_samples"])
def test_malformed_metrics_records_are_one_line(evaluated, tmp_path, mutation, capsys):
    import copy

    from icp.cli import main

    _, record = evaluated
    forged = copy.deepcopy(record)
    if mutation == "string_metric":
        forged["metrics"]["psnr"] = "high"
    elif mutation == "no_samples":
        forged.pop("samples")
    elif mutation == "list":
        forged = [record]
    elif mutation == "nan_metric":
        forged["metrics"]["psnr"] = float("nan")
    else:
        forged["samples"] = True
    assert main(["leaderboard", _edited(tmp_path, forged), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("icp: error:")


# --------------------------------------------------------------------------- images and arguments


def _png16(path: Path, value: int, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)
    return path


def test_sixteen_bit_pngs_are_scaled_not_saturated(tmp_path, synth_folder):
    import io
    import json
    import zlib

    import numpy as np
    from PIL import Image

    from icp.data.shards.format import decode_group
    from icp.data.shards.read import iter_shard, members_of
    from icp.inference import read_image

    rgb, _ = read_image(_png16(tmp_path / "mid.png", 32896))  # 32896 / 65535 = 128 / 255
    assert abs(np.asarray(rgb).astype(int).mean() - 128) <= 1
    members = members_of(next(iter_shard(synth_folder / "shard-000000.tar")))
    buf = io.BytesIO()
    size = Image.open(io.BytesIO(members["v00.rgb.png"])).size
    Image.fromarray(np.full(size[::-1], 32896, dtype=np.uint16)).save(buf, format="PNG")
    members["v00.rgb.png"] = buf.getvalue()
    body = {k: v for k, v in members.items() if k != "crc.json"}
    members["crc.json"] = json.dumps({k: zlib.crc32(v) for k, v in sorted(body.items())}).encode()
    group = decode_group(members, "x")
    assert abs(float(group["rgb"][0].mean()) - 128 / 255) < 0.01


@pytest.mark.parametrize("args", [["--guidance", "nan"], ["--guidance", "inf"], ["--guidance", "1e30"],
                                  ["--light", "dir=nan,0,1"], ["--light", "dir=1,0,1;ambient=inf"],
                                  ["--steps", "100000000"]])
def test_non_finite_or_absurd_generate_arguments_are_refused(tmp_path, args, capsys):
    from PIL import Image

    from icp.cli import main

    img = tmp_path / "p.png"
    Image.new("RGB", (32, 32), (120, 100, 90)).save(img)
    out = tmp_path / "out.png"
    rc = main(["generate", "--profile", str(img), "--target", str(img), "--checkpoint", str(tmp_path / "none"),
               "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and not out.exists()
    assert err.startswith("icp: error:") and args[0] in err, err  # refused for the argument, before loading


def test_light_spec_refuses_non_finite_numbers():
    from icp.inference import parse_light_spec

    for spec in ("dir=nan,0,1", "dir=inf,0,1", "color=1,nan,1", "ambient=nan", "ambient=1e30", "color=-1,1,1"):
        with pytest.raises(DataError):
            parse_light_spec(spec)
    assert parse_light_spec("dir=-1,0.3,1;color=1,0.9,0.8;ambient=0.3")["ambient"] == 0.3


# ------------------------------------------------------------------------- manifests and configs


@pytest.mark.parametrize("mutation", ["list", "entry_without_sha256", "entry_not_a_dict", "duplicate_shard",
                                      "string_counts"])
def test_malformed_manifests_are_one_line(synth_folder, tmp_path, mutation, capsys):
    import json
    import shutil

    from icp.cli import main
    from icp.data.shards.read import ShardStream

    folder = tmp_path / "m"
    shutil.copytree(synth_folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if mutation == "list":
        manifest = [manifest]
    elif mutation == "entry_without_sha256":
        manifest["shards"][0].pop("sha256")
    elif mutation == "entry_not_a_dict":
        manifest["shards"].append("shard-000009.tar")
    elif mutation == "duplicate_shard":
        manifest["shards"].append(dict(manifest["shards"][0]))
    else:
        manifest["counts"] = "many"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "check", str(folder)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("icp: error:")
    with pytest.raises(DataError):
        ShardStream(folder, lambda g, gen: [g])


@pytest.mark.parametrize("override", ["trainer.max_steps=-5", "data.batch_size=0", "seed=-1",
                                      "+model.optimizer.lr=.nan"])
def test_negative_counts_are_one_line(tmp_path, override):
    r = icp("fit", str(ROOT / "tests/configs/toy.yaml"), override, f"run.root={tmp_path}", timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    assert r.stderr.strip().splitlines()[-1].startswith("icp: error:") and "Traceback" not in r.stderr


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from PIL import Image

    img = tmp_path / "p.png"
    Image.new("RGB", (32, 32)).save(img)
    r = icp("generate", "--profile", str(img), "--target", str(img), "--checkpoint", str(tmp_path),
            "--out", str(tmp_path / "o.png"), "--device", "cuda", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--device cuda" in r.stderr


# ---------------------------------------------------------------- one-line errors for the rest


def test_one_pixel_profile_is_one_line(tmp_path):
    from PIL import Image

    from icp.inference import prepare_face

    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(DataError, match="too small"):
        prepare_face(tmp_path / "one.png", 32, align=True)


def test_disk_full_while_writing_shards_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from icp.cli import main
    from icp.data.shards import write

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(write, "write_tar_atomic", full)
    rc = main(["shards", "synth", str(tmp_path / "s"), "--identities", "1", "--views", "2", "--resolution", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and any(line.startswith("icp: error:") and "No space left" in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_truncated_shard_in_a_dataloader_worker_is_one_line(synth_folder, tmp_path):
    import shutil

    folder = tmp_path / "trunc"
    shutil.copytree(synth_folder, folder)
    shard = folder / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    _refresh_manifest(folder)
    cfg = write(tmp_path / "exp.yaml", "defaults: [%s]\nexperiment: trunc\n" % (ROOT / "experiments/stitching/tiny")
                + "trainer: {max_steps: 3, accelerator: cpu, devices: 1}\nlogger: {wandb: null}\n")
    r = icp("fit", str(cfg), f"data.shards={folder}", f"data.val_shards={synth_folder}", "data.resolution=16",
            f"run.root={tmp_path / 'runs'}", "data.num_workers=1", "callbacks.samples=null", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("icp: error:") and "shard-000000.tar" in last and "Traceback" not in r.stderr


def _fit(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return icp("fit", str(ROOT / "tests/configs/toy.yaml"), f"run.root={tmp_path}", "run.name=r", *overrides,
               timeout=300)


def test_resume_after_a_shape_changing_override_is_one_line(tmp_path):
    assert _fit(tmp_path, "trainer.max_steps=3").returncode == 0
    r = _fit(tmp_path, "trainer.max_steps=6", "model.hidden=16", "run.allow_config_change=true")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("icp: error:") and "does not fit" in last and "Traceback" not in r.stderr


class Pickled:
    """Not a tensor or container: a weights_only load refuses it."""


def test_pickle_bearing_last_ckpt_is_one_line(tmp_path):
    import torch

    assert _fit(tmp_path, "trainer.max_steps=3").returncode == 0
    last = next((tmp_path / "toy" / "r" / "checkpoints").glob("last*.ckpt"))
    state = torch.load(last, weights_only=False)
    state["global_step"] = 4  # the newest by step: chosen for the resume (below max_steps: not "already done")
    state["evil"] = Pickled()
    torch.save(state, last)
    r = _fit(tmp_path, "trainer.max_steps=6", "run.allow_config_change=true")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("icp: error:") and "Traceback" not in r.stderr


def test_reimport_after_adding_photos_imports_them(tmp_path):
    import json

    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from icp.data.shards.imports import import_folder

    src = tmp_path / "photos"
    (src / "alice").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(src / "alice" / "a.png")
    assert import_folder(src, tmp_path / "out", resolution=32)["images"] == 1
    Image.fromarray(skdata.astronaut()[:, ::-1].copy()).save(src / "alice" / "b.png")
    report = import_folder(src, tmp_path / "out", resolution=32)
    assert report["images"] == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["views"] == 2


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from icp.cli import main
    from icp.core import checkpointing

    def full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpointing.AtomicCheckpointIO, "save_checkpoint", full)
    rc = main(["fit", str(ROOT / "tests/configs/toy.yaml"), f"run.root={tmp_path}", "trainer.max_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and any(line.startswith("icp: error:") and "No space left" in line for line in err), err


def test_shards_check_follows_the_cli_convention(tmp_path):
    r = icp("shards", "check", str(tmp_path / "nowhere"), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("icp: error:") and len(r.stderr.strip().splitlines()) == 1
    r = icp("shards", "check", str(tmp_path / "nowhere"), env={"ICP_DEBUG": "1"}, timeout=60)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_generate_on_a_run_whose_config_names_a_shell_refuses(tmp_path, capsys):
    """The issue's case: `icp generate` on a run directory whose config.yaml builds torch.os.system."""
    import torch
    from PIL import Image

    from icp.cli import main

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    write(run / "config.yaml", "experiment: x\ndata: {resolution: 32}\nmodel:\n  _target_: icp.tasks.adaptation.AdaptationTask\n"
          f"  backbone: {{_target_: torch.os.system, command: 'touch {marker}'}}\n")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    Image.new("RGB", (32, 32), (120, 100, 90)).save(tmp_path / "p.png")
    rc = main(["generate", "--profile", str(tmp_path / "p.png"), "--target", str(tmp_path / "p.png"), "--checkpoint",
               str(run), "--out", str(tmp_path / "o.png"), "--no-align", "--device", "cpu"])
    assert rc == 2 and not marker.exists() and not (tmp_path / "o.png").exists()
    assert "torch.os.system" in capsys.readouterr().err
