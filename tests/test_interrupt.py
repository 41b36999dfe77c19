"""Interrupted conversions: SIGINT, SIGTERM and SIGKILL during the search, the combine and the copy.

Each run is a real `clpsurgery init`, `extend` or `apply` process on the fixture models. To hit a stage every time
(not "after about 2 seconds"), the run is started with the test hook CLPSURGERY_PAUSE_AT
(clpsurgery/stage_hooks.py): on reaching the named point it prints `clpsurgery: paused at ...`
and waits there, with that stage's work half done (the partial output folder exists, the output
files are laid out, the copies or rebuilt rows partly written); the test sends the signal as soon
as it reads that line.

After SIGINT or SIGTERM: exit code 130, one line on stderr, the partial folder removed, OUT absent;
for init at each stage, for extend and apply at each stage they pass (apply has no search), with
both signals. After SIGKILL (init): OUT absent, the partial folder left behind (nothing can remove it); the next run
recognises it (its process is gone), removes it and succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from clpsurgery.cli import main
from clpsurgery.formats.output_folder import PARTIAL_TAG
from clpsurgery.pipeline.verify import verify_output
from conftest import PAUSE_LINE, read_until_paused, tree_hashes

# The copy hook pauses at the third byte copy, so that some tensors are already copied.
POINTS = {"search": "search", "combine": "combine", "copy": "copy:3"}
RUNS = [
    ("search", signal.SIGINT),
    ("search", signal.SIGKILL),
    ("combine", signal.SIGINT),
    ("combine", signal.SIGTERM),
    ("combine", signal.SIGKILL),
    ("copy", signal.SIGINT),
    ("copy", signal.SIGKILL),
]
# extend and apply: both signals at each stage the command passes.
COMMAND_RUNS = [
    (command, point, sig)
    for command, points in (("extend", ("search", "combine", "copy")), ("apply", ("combine", "copy")))
    for point in points
    for sig in (signal.SIGINT, signal.SIGTERM)
]
INTERRUPTED_LINE = "error: interrupted; the output was not written (its partial folder was removed)"


@dataclass(frozen=True)
class Interrupted:
    folder: Path  # holds OUT and the partial folder
    out: Path
    pid: int
    returncode: int
    before: str  # stderr up to the pause line
    after: list[str]  # stderr lines after it
    partials: list[str]  # partial folders left beside OUT


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL_TAG in p.name)


def interrupt(args: list, folder: Path, point: str, sig: signal.Signals) -> Interrupted:
    """Run `clpsurgery ARGS... folder/out`, paused at `point`, and send it `sig` there."""
    out = folder / "out"
    env = dict(os.environ, CLPSURGERY_PAUSE_AT=POINTS[point], CLPSURGERY_PAUSE_SECONDS="120")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clpsurgery", *map(str, args), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(180, proc.kill)  # a run that never pauses must not hang the suite
    watchdog.start()
    try:
        before = read_until_paused(proc.stderr)
        assert before and before[-1].startswith(PAUSE_LINE + point), f"the run never paused at {POINTS[point]} (its stderr: {''.join(before)!r})"
        assert not out.exists()
        proc.send_signal(sig)
        after = proc.stderr.read().splitlines()
        returncode = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return Interrupted(folder, out, proc.pid, returncode, "".join(before), after, partials(folder))


@pytest.fixture(scope="module")
def interrupted(gpt2_source, german_helper, tmp_path_factory) -> dict[tuple[str, int], Interrupted]:
    """Every interrupted run, two at a time (each spends most of its time importing torch)."""
    base = tmp_path_factory.mktemp("interrupt")
    inputs_before = tree_hashes(gpt2_source), tree_hashes(german_helper)

    def run(item):
        point, sig = item
        folder = base / f"{point}-{sig.name}"
        folder.mkdir()
        return (point, int(sig)), interrupt(["init", "--quiet", "--top-k", "8", gpt2_source, german_helper], folder, point, sig)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, RUNS))
    assert (tree_hashes(gpt2_source), tree_hashes(german_helper)) == inputs_before
    return results


@pytest.mark.parametrize("point,sig", [(p, s) for p, s in RUNS if s != signal.SIGKILL], ids=lambda v: getattr(v, "name", v))
def test_interrupt_cleans_up(interrupted, point, sig):
    r = interrupted[(point, int(sig))]
    assert r.returncode == 130, (r.before, r.after)
    assert r.after == ["error: interrupted; the output was not written (its partial folder was removed)"], r.after
    assert not r.out.exists()
    assert r.partials == []


@pytest.fixture(scope="module")
def interrupted_commands(gpt2_source, german_helper, tmp_path_factory) -> dict[tuple[str, str, int], Interrupted]:
    """extend and apply interrupted at each of their stages; apply replays an init output of the
    GPT-2 source on the source itself."""
    base = tmp_path_factory.mktemp("interrupt-commands")
    transfer = base / "transfer"
    main(["init", "--quiet", "--top-k", "8", str(gpt2_source), str(german_helper), str(transfer)])
    inputs_before = tree_hashes(gpt2_source), tree_hashes(german_helper), tree_hashes(transfer)
    commands = {
        "extend": ["extend", "--quiet", "--top-k", "8", gpt2_source, german_helper],
        "apply": ["apply", "--quiet", transfer, gpt2_source],
    }

    def run(item):
        command, point, sig = item
        folder = base / f"{command}-{point}-{sig.name}"
        folder.mkdir()
        return (command, point, int(sig)), interrupt(commands[command], folder, point, sig)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, COMMAND_RUNS))
    assert (tree_hashes(gpt2_source), tree_hashes(german_helper), tree_hashes(transfer)) == inputs_before
    return results


@pytest.mark.parametrize("command,point,sig", COMMAND_RUNS, ids=lambda v: getattr(v, "name", v))
def test_interrupting_extend_and_apply_cleans_up(interrupted_commands, command, point, sig):
    r = interrupted_commands[(command, point, int(sig))]
    assert r.returncode == 130, (r.before, r.after)
    assert r.after == [INTERRUPTED_LINE], r.after
    assert not r.out.exists()
    assert r.partials == []


@pytest.mark.parametrize("point", ["search", "combine", "copy"])
def test_kill_leaves_a_partial_that_the_next_run_removes(interrupted, point, gpt2_source, german_helper):
    r = interrupted[(point, int(signal.SIGKILL))]
    assert r.returncode == -signal.SIGKILL
    assert not r.out.exists()
    assert r.partials == [f".out{PARTIAL_TAG}{r.pid}"], "the killed run's partial folder should be left behind"
    assert any((r.folder / r.partials[0]).iterdir()) or point == "search"
    try:
        main(["init", "--quiet", "--top-k", "8", str(gpt2_source), str(german_helper), str(r.out)])
    except SystemExit as e:
        pytest.fail(f"the run after a killed one exited with {e.code}")
    assert partials(r.folder) == []
    assert all(c.ok is not False for c in verify_output(r.out, gpt2_source)), [c.line() for c in verify_output(r.out, gpt2_source)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_once_out_is_in_place_is_no_failure(sig, gpt2_source, german_helper, tmp_path):
    """A signal landing once OUT is complete and renamed into place (the `placed` hook, before the
    success line) no longer fails the run: exit 0, the success line, and OUT verifies."""
    out = tmp_path / "out"
    env = dict(os.environ, CLPSURGERY_PAUSE_AT="placed", CLPSURGERY_PAUSE_SECONDS="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clpsurgery", "init", "--quiet", "--top-k", "8", str(gpt2_source), str(german_helper), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        before = read_until_paused(proc.stderr)
        assert before and before[-1].startswith(PAUSE_LINE + "placed"), "".join(before)
        assert out.is_dir() and partials(tmp_path) == []
        proc.send_signal(sig)
        stdout, after = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, after
    assert after == "" and stdout.startswith(f"wrote {out} ("), (stdout, after)
    assert all(c.ok is not False for c in verify_output(out, gpt2_source))
