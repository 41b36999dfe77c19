"""The tree is the architecture: the import contracts in pyproject.toml hold (import-linter), and
a header-only command never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "KEPT" in proc.stdout and "BROKEN" not in proc.stdout


def test_every_module_lives_in_a_room():
    """Beside the five rooms, the package's top level holds only the command line and the
    modules every layer may use."""
    top = {p.name for p in (ROOT / "clpsurgery").glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "cli.py", "errors.py", "stage_hooks.py"}
    rooms = {p.name for p in (ROOT / "clpsurgery").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == {"formats", "vocab", "mixing", "pipeline", "learning"}
