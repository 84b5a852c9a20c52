"""The `icp` command: verbs, dry runs and one-line errors."""

import subprocess
import sys

import pytest

from icp import cli


def run_icp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "icp.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_verbs():
    out = run_icp("--help")
    assert out.returncode == 0
    assert "fit" in out.stdout


def test_dry_run_prints_the_resolved_config(repo_root, capsys):
    assert cli.main(["fit", str(repo_root / "tests/configs/toy.yaml"), "trainer.max_steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "_target_: tests.toy.ToyTask" in out and "# run directory: runs/toy/cfg-" in out


@pytest.mark.parametrize("args, needle", [
    (["fit", "tests/configs/toy.yaml", "nonexistent.key=1"], "nonexistent.key"),
    (["fit", "tests/configs/toy.yaml", "trainer.max_steps=many"], "trainer.max_steps"),
    (["fit", "tests/configs/no_such.yaml"], "no_such.yaml"),
])
def test_user_errors_are_one_line_and_exit_nonzero(repo_root, args, needle):
    out = run_icp(*args, cwd=repo_root)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("icp: error:") and needle in err
    assert len(err.splitlines()) == 1, err
