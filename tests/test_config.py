"""Config composition, overrides, instantiation and its one-line errors."""

import functools
from pathlib import Path

import pytest
import torch

from icp.core import config as cfglib
from icp.core.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_extends_compose_in_order(tmp_path):
    write(tmp_path / "base.yaml", "a: 1\nb: {c: 2, d: 3}\n")
    write(tmp_path / "mid.yaml", "defaults: [base]\nb: {c: 20}\n")
    child = write(tmp_path / "sub" / "child.yaml", "extends: ../mid\nb: {d: 30}\ne: 5\n")
    cfg = cfglib.load(child)
    assert (cfg.a, cfg.b.c, cfg.b.d, cfg.e) == (1, 20, 30, 5)
    assert "defaults" not in cfg and "extends" not in cfg
    assert cfglib.origin_of(cfg, "b.c").endswith("mid.yaml")
    assert cfglib.origin_of(cfg, "b.d").endswith("child.yaml")


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b\n")
    write(tmp_path / "b.yaml", "extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        cfglib.load(tmp_path / "a.yaml")


def test_overrides_set_existing_keys_and_refuse_unknown_ones(tmp_path):
    f = write(tmp_path / "x.yaml", "trainer: {max_steps: 5, lr: 0.1, name: a}\n")
    cfg = cfglib.load(f, ["trainer.max_steps=10", "trainer.lr=1", "+extra.k=[1, 2]"])
    assert cfg.trainer.max_steps == 10 and cfg.trainer.lr == 1 and list(cfg.extra.k) == [1, 2]
    assert cfglib.origin_of(cfg, "trainer.max_steps") == "command line"
    with pytest.raises(ConfigError, match="nonexistent.key") as err:
        cfglib.load(f, ["nonexistent.key=1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="expected a int"):
        cfglib.load(f, ["trainer.max_steps=ten"])
    with pytest.raises(ConfigError, match="key=value"):
        cfglib.load(f, ["trainer.max_steps"])


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        cfglib.load(bad)
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        cfglib.load(tmp_path / "missing.yaml")


def test_instantiate_builds_nested_targets_and_partials(tmp_path):
    f = write(tmp_path / "x.yaml", """
net: {_target_: torch.nn.Linear, in_features: 3, out_features: 2}
opt: {_target_: torch.optim.SGD, _partial_: true, lr: 0.5}
plain: {a: 1}
""")
    cfg = cfglib.load(f)
    net = cfglib.instantiate(cfg.net, cfg, "net")
    assert isinstance(net, torch.nn.Linear) and net.out_features == 2
    opt = cfglib.instantiate(cfg.opt, cfg, "opt")
    assert isinstance(opt, functools.partial)
    assert opt(net.parameters()).defaults["lr"] == 0.5
    assert cfglib.instantiate(cfg.plain) == {"a": 1}


def test_unknown_kwarg_names_key_file_and_accepted_keys(tmp_path):
    f = write(tmp_path / "exp.yaml", "net: {_target_: torch.nn.Linear, in_features: 3, out_feature: 2}\n")
    cfg = cfglib.load(f)
    with pytest.raises(ConfigError) as err:
        cfglib.instantiate(cfg.net, cfg, "net")
    msg = str(err.value)
    assert "net.out_feature" in msg and "exp.yaml" in msg and "out_features" in msg and "\n" not in msg


def test_targets_outside_the_allow_list_are_refused(tmp_path):
    f = write(tmp_path / "evil.yaml", "x: {_target_: os.system, command: 'echo pwned'}\n")
    cfg = cfglib.load(f)
    with pytest.raises(ConfigError, match="outside the allowed targets"):
        cfglib.instantiate(cfg.x, cfg, "x")
    f2 = write(tmp_path / "ok.yaml", "security: {allowed_targets: [collections]}\nx: {_target_: collections.OrderedDict}\n")
    with pytest.raises(ConfigError, match="cannot extend the list itself"):  # the file cannot trust a module
        cfglib.instantiate(cfglib.load(f2).x, cfglib.load(f2), "x")
    cfg2 = cfglib.load(f2, ["security.allowed_targets=[collections]"])  # the person running it can
    assert cfglib.instantiate(cfg2.x, cfg2, "x") == {}


def test_code_running_targets_and_switches_are_refused(tmp_path, monkeypatch):
    for text, needle in [
        ("x: {_target_: torch.hub.load, repo_or_dir: a/b, model: m}\n", "never allowed"),
        ("x: {_target_: torch.nn.Linear, in_features: 1, out_features: 1, weights_only: false}\n", "run code"),
        ("x: {_target_: diffusers.DiffusionPipeline.from_pretrained, custom_pipeline: evil}\n", "run code"),
    ]:
        cfg = cfglib.load(write(tmp_path / "c.yaml", text))
        with pytest.raises(ConfigError, match=needle):
            cfglib.validate(cfg.x, cfg, "x")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567")
    with pytest.raises(ConfigError, match="MY_SERVICE_TOKEN"):
        cfglib.load(write(tmp_path / "s.yaml", "notes: run with tok-1234567\n"))


def test_unsafe_resolvers_and_secret_env_reads_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "s3cr3t")
    with pytest.raises(ConfigError, match="secret"):
        cfglib.load(write(tmp_path / "a.yaml", "k: ${oc.env:MY_API_KEY}\n"))
    with pytest.raises(ConfigError, match="resolver 'python.eval'"):
        cfglib.load(write(tmp_path / "b.yaml", "k: ${python.eval:1+1}\n"))
    monkeypatch.setenv("ICP_DATA", "/data")
    # Environment reads are denied unless the config names the variable and the runner approves it.
    c = write(tmp_path / "c.yaml", "security: {env: [ICP_DATA]}\nk: ${oc.env:ICP_DATA}\n")
    assert cfglib.load(c, ["security.allowed_env=[ICP_DATA]"]).k == "/data"


def test_mandatory_values_are_filled_by_plain_overrides(tmp_path):
    f = write(tmp_path / "x.yaml", "model:\n  path: ???\n  n: 1\n")
    assert cfglib.load(f, ["model.path=/weights"]).model.path == "/weights"
    with pytest.raises(ConfigError, match="model.pth"):
        cfglib.load(f, ["model.pth=/weights"])
