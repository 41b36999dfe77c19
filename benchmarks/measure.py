"""Shared measurement helpers for the benchmarks: peak RSS of a child, machine facts."""

from __future__ import annotations

import os
import platform
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


