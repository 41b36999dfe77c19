"""Build an output folder beside its final place and rename it in only when it is complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SurgeryError

MANIFEST_NAME = "clpsurgery.json"
PARTIAL_TAG = ".clpsurgery-partial-"
OLD_TAG = ".clpsurgery-old-"


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"


def check_out_path(out: Path, force: bool) -> None:
    """Refuse an OUT that exists, unless --force and it is a previous clpsurgery output."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise SurgeryError(out, "already exists; pass --force to replace a previous clpsurgery output")
    if out.is_symlink() or not out.is_dir() or not (out / MANIFEST_NAME).is_file():
        raise SurgeryError(out, f"exists and is not a clpsurgery output (no {MANIFEST_NAME}); refusing to replace it")


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temporary folders left beside OUT by runs that were killed (their process is gone)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for tag in (PARTIAL_TAG, OLD_TAG):
        for candidate in out.parent.glob(f".{out.name}{tag}*"):
            pid_text = candidate.name.rsplit(tag, 1)[-1]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _process_alive(int(pid_text)):
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it becomes OUT, on any failure it is removed."""
    out = Path(out)
    check_out_path(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurgeryError(parent, f"cannot create the output's parent folder: {e.strerror or e}") from e
    remove_stale_partials(out)
    staging = partial_folder(out)
    try:
        staging.mkdir()
    except OSError as e:
        raise SurgeryError(parent, f"cannot create a folder beside the output: {e.strerror or e}") from e
    try:
        yield staging
        _fsync_dir(staging)
        if out.exists():
            check_out_path(out, force)
            old = parent / f".{out.name}{OLD_TAG}{os.getpid()}"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
