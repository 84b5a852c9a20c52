"""Options and key=value overrides in any order, for every verb that takes overrides (issue 28)."""

import pytest

from icp import cli

TOY = "tests/configs/toy.yaml"


def _out(capsys, argv):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("orders, without", [
    ((["fit", TOY, "trainer.max_steps=5", "seed=3", "--dry-run"],
      ["fit", TOY, "--dry-run", "trainer.max_steps=5", "seed=3"],
      ["fit", TOY, "trainer.max_steps=5", "--dry-run", "seed=3"]),
     ["fit", TOY, "trainer.max_steps=5", "--dry-run"]),
    ((["run", "tests/configs/quickstart_ci.yaml", "data.identities=7", "--until", "data", "--dry-run", "seed=2"],
      ["run", "tests/configs/quickstart_ci.yaml", "--dry-run", "data.identities=7", "--until", "data", "seed=2"],
      # after an option of several values: an override, not a stage name
      ["run", "tests/configs/quickstart_ci.yaml", "--until", "data", "--dry-run", "--only", "evaluate", "report",
       "data.identities=7", "seed=2"]),
     ["run", "tests/configs/quickstart_ci.yaml", "data.identities=7", "--dry-run"]),
    ((["slurm", "submit", TOY, "seed=4", "--nodes", "2", "--dry-run"],
      ["slurm", "submit", TOY, "--nodes", "2", "--dry-run", "seed=4"]),
     ["slurm", "submit", TOY, "--nodes", "2", "--dry-run"]),
], ids=["fit", "run", "slurm"])
def test_overrides_after_options_mean_the_same(repo_root, monkeypatch, capsys, orders, without):
    monkeypatch.chdir(repo_root)
    outs = [_out(capsys, argv) for argv in orders]
    assert all(out == outs[0] for out in outs[1:])
    assert _out(capsys, without) != outs[0]  # the override after the option took effect


def test_eval_takes_overrides_after_options(monkeypatch):
    from icp.cli import args as cli_args

    parsed = cli_args.parse(cli.build_parser(), ["eval", "RUN", "a=1", "--device", "cpu", "b=2", "--out", "m.json", "+c=3"])
    assert parsed.overrides == ["a=1", "b=2", "+c=3"] and parsed.device == "cpu" and parsed.out == "m.json"
    # an option's own value is never an override, even with '=' in it; the order on the line is kept
    parsed = cli_args.parse(cli.build_parser(), ["slurm", "submit", "a=b.yaml", "x=1", "--job-name", "k=v", "x=2",
                                                 "--sbatch=--constraint=h100", "--cpu"])
    assert parsed.config == "a=b.yaml" and parsed.job_name == "k=v" and parsed.overrides == ["x=1", "x=2"]
    assert parsed.extra_sbatch == ["--constraint=h100"] and parsed.cpu


def test_stray_words_are_still_refused(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", TOY, "--dry-run", "max_steps5"])
    assert exit_.value.code == 2 and "unrecognized arguments: max_steps5" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a verb without overrides takes none
        cli.main(["leaderboard", "x.json", "--out", "lb", "a=1", "--sort", "psnr", "--bogus"])
    assert "--bogus" in capsys.readouterr().err
