"""Shared measurement helpers for the benchmarks: peak RSS of a child, machine facts, and the
results files (benchmarks/results/<benchmark>/current.json and archive/, with provenance)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def hwm_kib(pid: int) -> int | None:
    """A live process's peak RSS (VmHWM) in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None  # gone, or a zombie without an address space


def run_polled(argv: list[str], env: dict | None = None, poll_seconds: float = 0.02) -> dict:
    """Run a command, polling its VmHWM; return wall seconds, peak RSS, exit code and stderr tail.

    VmHWM of the child itself, not ru_maxrss (which on Linux starts from the parent's peak).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    while proc.poll() is None:
        value = hwm_kib(proc.pid)
        if value is not None:
            peak = max(peak, value)
        time.sleep(poll_seconds)
    stdout, stderr = proc.communicate()
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_kib": peak,
        "returncode": proc.returncode,
        "stdout_tail": stdout.decode(errors="replace")[-2000:],
        "stderr_tail": stderr.decode(errors="replace")[-2000:],
    }


def machine_info(workdir: Path) -> dict:
    """Facts about this machine for a results file."""
    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError as e:
            return f"unavailable: {e}"

    meminfo = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            k, _, v = line.partition(":")
            meminfo[k] = v.strip()
    import numpy
    import safetensors
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": sh(["nproc"]),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total": meminfo.get("MemTotal"),
        "mem_available_at_start": meminfo.get("MemAvailable"),
        "uname": sh(["uname", "-a"]),
        "python": sys.version,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "cp": sh(["cp", "--version"]).splitlines()[0] if shutil.which("cp") else None,
        "df_T_workdir": sh(["df", "-T", str(workdir)]),
        "has_copy_file_range": hasattr(os, "copy_file_range"),
        "platform": platform.platform(),
    }




# --------------------------------------------------------------------------------------------
# Results with provenance: benchmarks/results/<benchmark>/current.json and archive/
# --------------------------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
COMMIT_ENV = "CLPSURGERY_BENCH_COMMIT"  # the commit, where the tree was copied without .git (a GPU machine)


def git_commit(repo: Path = REPO) -> str:
    """`git describe --always --dirty --tags` of the repository, except that changes under
    benchmarks/results/ (the results themselves) do not make it "-dirty"; $CLPSURGERY_BENCH_COMMIT
    where git cannot tell (a copy of the tree without .git); "unknown" otherwise."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False, timeout=60)

    try:
        described = git("describe", "--always", "--tags")
        if described.returncode == 0 and described.stdout.strip():
            paths = [".", ":(exclude)benchmarks/results"]
            changed = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
            dirty = changed.returncode != 0 or bool(changed.stdout.strip())
            return described.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def provenance(workdir: Path | None = None, machine: dict | None = None) -> dict:
    """Where a result comes from: the commit, the machine, the date (UTC) and the command.

    Call it once when a run starts and pass the result to every `write_result` of that run
    (a later write of the same run then replaces current.json instead of archiving it).
    `machine` reuses facts the script gathered already; otherwise `machine_info(workdir)`."""
    if machine is None:
        try:
            machine = machine_info(workdir or REPO)
        except Exception as e:  # noqa: BLE001 -- a machine without /proc, a missing package: say so, still record
            machine = {"platform": platform.platform(), "python": sys.version, "machine_info_error": f"{type(e).__name__}: {e}"}
    return {
        "commit": git_commit(),
        "machine": machine,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
    }


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")


def archive_name(prov: dict) -> str:
    """The archive file name of a result: <date>[-HHMMSS]-<commit>[-<label>].json.

    Results recorded before provenance carry their name in provenance["archive_name"]."""
    if prov.get("archive_name"):
        return prov["archive_name"]
    date = str(prov.get("date") or "undated")
    try:
        when = _dt.datetime.fromisoformat(date)
        date = when.strftime("%Y-%m-%d-%H%M%S") if "T" in str(prov.get("date")) else when.strftime("%Y-%m-%d")
    except ValueError:
        date = _safe(date) or "undated"
    parts = [date]
    commit = str(prov.get("commit") or "unknown")
    if not commit.startswith("unknown"):
        parts.append(_safe(commit))
    if prov.get("label"):
        parts.append(_safe(str(prov["label"])))
    return "-".join(parts) + ".json"


def _write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _normalised(value):
    return json.loads(json.dumps(value))


def _archive(current: Path, incoming_provenance: dict | None) -> Path | None:
    """Keep the present current.json in archive/ (a hard link, or a copy), unless it comes from
    the same run as the incoming result. Returns the archived path, or None."""
    if not current.exists():
        return None
    try:
        old = json.loads(current.read_text(encoding="utf-8"))
        old_prov = old.get("provenance") if isinstance(old, dict) else None
    except (OSError, ValueError):
        old_prov = None
    if incoming_provenance is not None and old_prov == _normalised(incoming_provenance):
        return None  # the same run, saved again (gpu_combine saves after every section)
    if not isinstance(old_prov, dict):
        old_prov = {"date": _dt.datetime.fromtimestamp(current.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                    "label": "no-provenance"}
    folder = current.parent / "archive"
    folder.mkdir(parents=True, exist_ok=True)
    name = archive_name(old_prov)
    target = folder / name
    n = 2
    while target.exists():
        target = folder / f"{name[:-len('.json')]}-{n}.json"
        n += 1
    try:
        os.link(current, target)
    except OSError:
        shutil.copy2(current, target)
    return target


def write_result(benchmark: str, result: dict, label: str | None = None, prov: dict | None = None,
                 json_out: Path | str | None = None, indent: int = 2) -> Path:
    """Write a benchmark's result with its provenance; return the path written.

    Default: benchmarks/results/<benchmark>/current.json, atomically, after the previous
    current.json (from another run) is kept as archive/<archive_name>. With json_out, that file
    only (a trial run, or a machine whose results are installed here later with
    `python benchmarks/measure.py install BENCHMARK FILE`). `label` names the result in the archive."""
    prov = dict(prov if prov is not None else provenance())
    if label:
        prov["label"] = label
    doc = {"provenance": prov, **{k: v for k, v in result.items() if k != "provenance"}}
    text = json.dumps(doc, indent=indent, ensure_ascii=False) + "\n"
    if json_out is not None:
        out = Path(json_out)
        _write_atomic(out, text)
        return out
    current = RESULTS / benchmark / "current.json"
    _archive(current, prov)
    _write_atomic(current, text)
    return current


def install_result(benchmark: str, path: Path) -> Path:
    """Make a result file written elsewhere (--json-out on another machine) the benchmark's
    current.json, archiving the present one. The file must carry its provenance."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("provenance"), dict):
        raise SystemExit(f"{path}: no provenance entry; not a result written by write_result")
    current = RESULTS / benchmark / "current.json"
    _archive(current, doc["provenance"])
    _write_atomic(current, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return current


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Benchmark results: provenance, and installing a result written elsewhere.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("provenance", help="print this checkout's provenance as JSON")
    inst = sub.add_parser("install", help="make FILE benchmarks/results/BENCHMARK/current.json, archiving the present one")
    inst.add_argument("benchmark")
    inst.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "provenance":
        print(json.dumps(provenance(), indent=2))
    else:
        print(f"wrote {install_result(args.benchmark, args.file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
