"""The installed package lives beside the rest of a training stack: its import names are its own.

transformers (5.25 on) imports Hugging Face's top-level `kernels` package when a model class loads;
a package of ours by that name, installed or found on sys.path from the project root, broke every
model import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_IMPORT_NAMES = {"clpsurgery", "clpsurgery_kernels"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built offline from a copy of this checkout (a build
    writes build/ and *.egg-info beside the sources)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("clpsurgery", "kernels"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("clpsurgery-*.whl")
    return built


def test_wheel_top_level_import_names_are_ours(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == OUR_IMPORT_NAMES
    assert "clpsurgery_kernels/combine.py" in names
    assert "clpsurgery_kernels/__init__.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "clpsurgery").rglob("*.py")}
    assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"


def test_wheel_entry_point_is_the_cli(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "clpsurgery = clpsurgery.cli:main" in text


def test_transformers_model_class_loads_after_the_kernel_module_from_the_project_root() -> None:
    """From the project root (`python -m pytest`, `python -m clpsurgery`) the cwd comes first on sys.path."""
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    code = (
        "import clpsurgery_kernels.combine as ours\n"
        "import transformers\n"
        "transformers.GPT2LMHeadModel\n"
        "import kernels\n"
        "assert 'clpsurgery' not in (kernels.__file__ or ''), kernels.__file__\n"
        "print(ours.__name__, kernels.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["clpsurgery_kernels.combine", "kernels"]
