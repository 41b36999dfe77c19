"""Build an output folder beside its final place and rename it in only when it is complete.

The folder is built as `.OUT.clpsurgery-partial-PID` beside OUT and renamed to OUT as the very
last step, so OUT never exists half-written. A run that fails or is interrupted removes its
partial folder; one that is killed (SIGKILL, power loss) leaves it, and the next run for the same
OUT removes it once that PID is gone. `--force` replaces only a previous clpsurgery output: a
folder whose files are exactly those its `clpsurgery.json` lists.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.stage_hooks import reached

MANIFEST_NAME = "clpsurgery.json"
PARTIAL_TAG = ".clpsurgery-partial-"
OLD_TAG = ".clpsurgery-old-"

_finished: list[Path] = []  # the outputs this process has completed (see finished_outputs)


def finished_outputs() -> tuple[Path, ...]:
    """The outputs this process has completed: written in full, then renamed into place (marked
    just before the rename). The command line's signal handling asks, so that a Ctrl-C landing
    once OUT is complete no longer turns the run into a failure."""
    return tuple(_finished)


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"


def check_out_path(out: Path, force: bool) -> None:
    """Refuse an OUT that exists, unless --force and it is a previous clpsurgery output.

    --force is suggested only where it would work: for anything else the refusal says why."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir() or not (out / MANIFEST_NAME).is_file():
        what = "a link" if out.is_symlink() else "a file" if not out.is_dir() else f"no {MANIFEST_NAME}"
        raise SurgeryError(out, f"already exists and is not a clpsurgery output ({what}); choose another folder")
    stray = _files_not_in_manifest(out)
    if stray:
        raise SurgeryError(
            out,
            f"holds {stray!r}, which its {MANIFEST_NAME} does not list; --force replaces only what clpsurgery "
            "wrote, so move that away first",
        )
    if not force:
        raise SurgeryError(out, "already exists, a previous clpsurgery output; pass --force to replace it")


def _files_not_in_manifest(out: Path) -> str | None:
    """The first entry of a previous output folder that clpsurgery did not write there, if any."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_bytes())
        listed = {entry["file"] for entry in manifest["outputs"]} | {MANIFEST_NAME}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SurgeryError(out / MANIFEST_NAME, f"cannot be read as a clpsurgery manifest ({type(e).__name__}); refusing to replace {out.name}") from e
    try:
        unlisted = unlisted_entries(out, listed)
    except OSError as e:
        raise SurgeryError(out, f"cannot list: {e.strerror or e}") from e
    return unlisted[0] if unlisted else None


def is_inside_path(name: str) -> bool:
    """Whether a manifest entry names a file inside the output folder: a relative POSIX path with
    no empty, `.` or `..` part (`model.safetensors`, or a carried module's `1_Pooling/config.json`)."""
    return isinstance(name, str) and bool(name) and "\\" not in name and not name.startswith("/") and all(p not in ("", ".", "..") for p in name.split("/"))


def unlisted_entries(out: Path, listed: set[str]) -> list[str]:
    """The entries under OUT that `listed` (relative POSIX paths) does not name, sorted: a file
    not listed, a symlink, anything that is not a plain file or folder, a folder that holds no
    listed file. Only folders that hold a listed file are walked."""
    folders = {"/".join(n.split("/")[:k]) for n in listed if is_inside_path(n) for k in range(1, n.count("/") + 1)}
    found = []

    def walk(relative: str) -> None:
        for name in sorted(os.listdir(out / relative if relative else out)):
            path = f"{relative}/{name}" if relative else name
            full = out / path
            if full.is_symlink():
                found.append(path)
            elif full.is_dir() and path in folders:
                walk(path)
            elif path not in listed or not full.is_file():
                found.append(path)

    walk("")
    return found


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temporary folders left beside OUT by runs that were killed (their process is gone).

    A previous output set aside by a `--force` run killed between its two renames is put back
    as OUT rather than removed: OUT is left as it was before that run.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for tag in (OLD_TAG, PARTIAL_TAG):
        for candidate in sorted(out.parent.glob(f".{out.name}{tag}*")):
            pid_text = candidate.name.rsplit(tag, 1)[-1]
            if not pid_text.isdigit() or candidate.is_symlink() or not candidate.is_dir():
                continue  # not a name this module makes: leave it alone
            if int(pid_text) != os.getpid() and _process_alive(int(pid_text)):
                continue
            if tag == OLD_TAG and not out.exists() and not out.is_symlink():
                os.rename(candidate, out)
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
    check_out_path(out, force)  # again: a stale partial may have put a previous output back
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
        _finished.append(out)
        try:
            if out.exists():
                old = parent / f".{out.name}{OLD_TAG}{os.getpid()}"
                os.rename(out, old)
                os.rename(staging, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, out)
        except BaseException:
            _finished.remove(out)
            raise
        reached("placed")  # test hook (stage_hooks.py): a no-op unless CLPSURGERY_PAUSE_AT names it
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        error = _write_error(e, out, staging)
        if error is e:
            raise
        raise error from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def write_output_file(path: Path, data: bytes) -> None:
    """Write one whole file of the output (a side file, the record, the index, the manifest) with
    an OSError that names it, so that staged_output reports a full disk against OUT's file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e


def _write_error(e: OSError, out: Path, staging: Path) -> Exception:
    """An OSError met while building OUT, as one line naming the output file and the problem.

    Errors naming an input file pass through unchanged (they are about the input).
    """
    name = Path(os.fsdecode(e.filename)) if e.filename is not None else None
    if name is not None and staging not in (name, *name.parents):
        return e
    place = out / name.relative_to(staging) if name is not None else out
    what = e.strerror or str(e)
    if e.errno in DISK_FULL:
        problem = f"the disk is full ({what}) while writing the output; the partial output was removed"
    else:
        problem = f"cannot write the output ({what}); the partial output was removed"
    if out.exists():
        problem += f" and {out.name} was left as it was"
    return SurgeryError(place, problem)


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
