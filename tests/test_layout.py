"""The layout's promises (README "Architecture", docs/decisions/layout.md): dependencies run one way,
no file grows into a grab-bag, no script edits sys.path."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Data-flow order: a module may import only from its own folder and the folders before it.
ORDER = ["core", "render", "data", "models", "diffusion", "perf", "tasks", "eval", "cluster", "jobs",
         "inference", "pipeline", "bench", "cli"]
MAX_LINES = 450  # "~400": one concept a file


def _layer(path: Path) -> str:
    return path.relative_to(ROOT / "icp").parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icp."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("icp.")]
    return found


FILES = sorted(p for p in (ROOT / "icp").rglob("*.py") if _layer(p) in ORDER)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_lower_layer_imports_a_higher_one(path):
    mine = ORDER.index(_layer(path))
    upward = [m for m in _imports(path) if m.split(".")[1] in ORDER and ORDER.index(m.split(".")[1]) > mine]
    assert not upward, f"{path.relative_to(ROOT)} ({ORDER[mine]}) imports {upward}, a later layer"


def test_every_package_folder_is_in_the_order():
    folders = {p.name for p in (ROOT / "icp").iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.stem for p in (ROOT / "icp").glob("*.py") if p.stem != "__init__"}
    assert folders | modules <= set(ORDER), sorted((folders | modules) - set(ORDER))


def test_no_file_is_a_grab_bag():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "icp").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for folder in ("icp", "eval", "tests") for p in (ROOT / folder).rglob("*.py")
                 if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert offenders == [str(Path(__file__).relative_to(ROOT))] or not offenders, offenders
