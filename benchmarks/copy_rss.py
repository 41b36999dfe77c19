"""Peak RSS and wall time of copying a multi-GiB safetensors file through the clpsurgery writer.

The claim under test: copying a file of 4 GiB or more through `clpsurgery.formats.writer.write_file`
keeps peak RSS near the copy buffer size, not the file size.

The parent process generates a source file of at least --size-gib (header from
`encode_header`, tensor bytes streamed in 64 MiB random chunks, never held in RAM), then runs
every measured operation in a fresh child process, repeats interleaved round-robin:

  cp_sync          `cp SRC DST && sync DST`: the physical floor (the writer fsyncs, so cp does too)
  writer_direct    write_file with every tensor a CopiedTensor, the default path (O_DIRECT for
                   whole 4 KiB blocks, os.copy_file_range for the edges)
  writer_kernel    the same with os.O_DIRECT deleted, so os.copy_file_range copies everything
  writer_buffered  the same with os.copy_file_range deleted too, so the bounded 64 MiB buffer is used
  writer_rows      every tensor a ComputedTensor whose producer yields Checkpoint.read_rows
                   blocks of ~32 MiB (the streaming path for changed tensors)
  writer_rows_dontneed
                   writer_rows plus madvise(MADV_DONTNEED) of each block's mapped pages once read
                   (not library behaviour: shows where writer_rows' RSS comes from)
  load_save        safetensors.torch.load_file + save_file (+ fsync), which holds the whole
                   file; run only when it fits comfortably in available RAM

Peak RSS is the child's VmHWM (/proc/PID/status): the Python children read their own at the
end; for cp the parent polls it every 5 ms while cp runs. Not ru_maxrss: on Linux a child's
ru_maxrss starts from its parent's high-water mark (the whole parent peak when spawned through
vfork, as subprocess does, its current RSS through fork) and survives exec, so a child of this
parent, which held 64 MiB chunks, numpy and torch, would report hundreds of MiB for `cp`. The
ru_maxrss figures are still recorded, labelled as such. Python children also report their RSS
right after importing torch, clpsurgery and numpy (the import baseline), and a 10 ms sampler
of /proc/self/status splits the peak into anonymous memory (RssAnon) and mapped file pages
(RssFile). The page cache is not RSS: the
source stays warm in the page cache for every run (all operations read it from memory), and
each output is deleted after its run. Every writer output is checked byte-identical to the
source (sha256, streamed).

    python benchmarks/copy_rss.py --size-gib 4 --repeats 3

The results, with their provenance (commit, machine, date, command), go to
benchmarks/results/copy_rss/current.json; the previous current.json moves to archive/.
--json-out PATH writes them to PATH instead (a trial run that should not replace them).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import hwm_kib, machine_info, provenance, write_result  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK = 64 * MIB
ROW_BLOCK_BYTES = 32 * MIB
COLS = 16384  # BF16 columns: 32 KiB rows
TENSOR_BYTES = 512 * MIB

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TMP_PARENT = HERE / "tmp-copy-rss"

OPERATIONS = ["cp_sync", "writer_direct", "writer_kernel", "writer_buffered", "writer_rows", "writer_rows_dontneed", "load_save"]
IDENTICAL_REQUIRED = {"cp_sync", "writer_direct", "writer_kernel", "writer_buffered", "writer_rows", "writer_rows_dontneed"}


# --------------------------------------------------------------------------------------------
# child side: one operation in a fresh process, report JSON on the last stdout line
# --------------------------------------------------------------------------------------------


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


class _Sampler(threading.Thread):
    """Peak RssAnon / RssFile / VmRSS seen every `interval` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.halt = threading.Event()

    def sample(self) -> None:
        for k, v in _status_kib().items():
            if v > self.peak.get(k, 0):
                self.peak[k] = v

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self.halt.set()
        self.join()
        self.sample()
        return self.peak


def child_main(op: str, src: Path, dst: Path) -> None:
    if op in ("writer_kernel", "writer_buffered") and hasattr(os, "O_DIRECT"):
        del os.O_DIRECT  # the writer looks it up when it copies: without it, no direct I/O
    if op == "writer_buffered" and hasattr(os, "copy_file_range"):
        del os.copy_file_range  # before clpsurgery is imported: the writer takes the buffer path
    import numpy  # noqa: F401
    import torch

    import clpsurgery  # noqa: F401
    from clpsurgery.formats.checkpoint import Checkpoint
    from clpsurgery.formats.writer import COPY_BUFFER_BYTES, ComputedTensor, CopiedTensor, WriteStats, write_file

    if op == "load_save":
        import safetensors.torch  # noqa: F401

    baseline = _status_kib()
    baseline["ru_maxrss_inherited"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = _Sampler()
    sampler.start()
    extra: dict = {}
    t0 = time.perf_counter()
    if op in ("writer_direct", "writer_kernel", "writer_buffered"):
        with Checkpoint.open(src) as ckpt:
            header = ckpt.headers[0]
            planned = [CopiedTensor(_spec(ref.info), ref.path, ref.absolute_range()[0]) for ref in ckpt.tensors.values()]
            stats = write_file(dst, planned, metadata=header.metadata, stats=WriteStats())
        extra["stats"] = {"direct_copies": stats.direct_copies, "kernel_copies": stats.kernel_copies, "buffered_copies": stats.buffered_copies, "copied_bytes": stats.copied_bytes}
        extra["copy_buffer_bytes"] = COPY_BUFFER_BYTES
    elif op in ("writer_rows", "writer_rows_dontneed"):
        import mmap

        dontneed = op == "writer_rows_dontneed"
        with Checkpoint.open(src) as ckpt:
            header = ckpt.headers[0]

            def producer(name: str):
                info = ckpt.info(name)
                block_rows = max(1, ROW_BLOCK_BYTES // max(1, info.row_bytes))

                def produce():
                    begin = ckpt.tensors[name].absolute_range()[0]
                    for start in range(0, info.rows, block_rows):
                        stop = min(info.rows, start + block_rows)
                        block = ckpt.read_rows(name, start, stop)
                        if dontneed:
                            lo = begin + start * info.row_bytes
                            hi = begin + stop * info.row_bytes
                            page_lo = lo - lo % mmap.PAGESIZE
                            ckpt._map(ckpt.tensors[name].path).madvise(mmap.MADV_DONTNEED, page_lo, hi - page_lo)
                        yield block.data  # the stored bytes

                return produce

            planned = [ComputedTensor(_spec(ref.info), producer(name)) for name, ref in ckpt.tensors.items()]
            stats = write_file(dst, planned, metadata=header.metadata, stats=WriteStats())
        extra["stats"] = {"computed_bytes": stats.computed_bytes}
        extra["row_block_bytes"] = ROW_BLOCK_BYTES
    elif op == "load_save":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(src), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(src))
        extra["rss_after_load_kib"] = _status_kib()
        save_file(tensors, str(dst), metadata=metadata)
        del tensors
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        raise SystemExit(f"unknown child operation {op!r}")
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    end = _status_kib()
    report = {
        "op": op,
        "op_seconds": seconds,
        "baseline_kib": baseline,
        "peak_rss_kib": end["VmHWM"],
        "ru_maxrss_inherited_kib": usage.ru_maxrss,
        "sampled_peak_kib": peaks,
        "end_kib": end,
        "minor_faults": usage.ru_minflt,
        "major_faults": usage.ru_majflt,
        "torch": torch.__version__,
        **extra,
    }
    print(json.dumps(report), flush=True)


def _spec(info):
    from clpsurgery.formats.safetensors_header import TensorSpec

    return TensorSpec(info.name, info.dtype, info.shape)


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------


def generate_source(path: Path, size_bytes: int, seed: int = 0) -> tuple[str, int, list[dict]]:
    """Write a safetensors file of >= size_bytes in 64 MiB chunks; return (sha256, size, tensors)."""
    import numpy as np

    from clpsurgery.formats.safetensors_header import TensorSpec, encode_header, layout_order

    row_bytes = COLS * 2
    n = max(1, math.ceil(size_bytes / TENSOR_BYTES))
    rows = math.ceil(size_bytes / n / row_bytes)
    specs = [TensorSpec(f"model.layers.{i}.mlp.weight", "BF16", (rows, COLS)) for i in range(n)]
    specs.append(TensorSpec("model.norm.weight", "F32", (COLS,)))
    header, offsets = encode_header(specs, {"format": "pt"})
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(header)
        digest.update(header)
        for spec in layout_order(specs):
            left = spec.nbytes
            while left:
                n_bytes = min(CHUNK, left)
                chunk = rng.bytes(n_bytes)
                f.write(chunk)
                digest.update(chunk)
                left -= n_bytes
        f.flush()
        os.fsync(f.fileno())
    size = path.stat().st_size
    described = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bytes": s.nbytes} for s in specs]
    return digest.hexdigest(), size, described


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _drop_file_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (per file, not the whole machine's cache)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_cp_sync(src: Path, dst: Path) -> dict:
    """`cp SRC DST` then `sync DST`, timed together; cp's VmHWM polled every 5 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["cp", "--", str(src), str(dst)])
    hwm = 0
    samples = 0
    while proc.poll() is None:
        v = hwm_kib(proc.pid)
        if v is not None:
            hwm = max(hwm, v)
            samples += 1
        time.sleep(0.005)
    cp_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cp exited {proc.returncode}")
    subprocess.run(["sync", "--", str(dst)], check=True)
    seconds = time.perf_counter() - t0
    return {"op": "cp_sync", "op_seconds": seconds, "process_seconds": seconds, "cp_seconds": cp_seconds,
            "peak_rss_kib": hwm, "hwm_samples": samples}


def run_once(op: str, src: Path, dst: Path) -> dict:
    if op == "cp_sync":
        return run_cp_sync(src, dst)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", op, "--src", str(src), "--dst", str(dst)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, cwd=REPO, check=False)
    process_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{op}: child exited {proc.returncode}; stdout: {proc.stdout[-2000:]!r}")
    result: dict = {"op": op, "process_seconds": process_seconds}
    result.update(json.loads(proc.stdout.decode().strip().splitlines()[-1]))
    return result


def mem_available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    floor = statistics.median(r["op_seconds"] for r in runs["cp_sync"]) if runs.get("cp_sync") else None
    for op in OPERATIONS:
        rs = runs.get(op)
        if not rs:
            continue
        wall = statistics.median(r["op_seconds"] for r in rs)
        peak_kib = statistics.median(r["peak_rss_kib"] for r in rs)
        peak_max_kib = max(r["peak_rss_kib"] for r in rs)
        base = [r["baseline_kib"]["VmRSS"] for r in rs if "baseline_kib" in r]
        base_kib = statistics.median(base) if base else None
        anon = [r["sampled_peak_kib"].get("RssAnon") for r in rs if "sampled_peak_kib" in r]
        file_ = [r["sampled_peak_kib"].get("RssFile") for r in rs if "sampled_peak_kib" in r]
        rows.append(
            {
                "op": op,
                "median_wall_s": wall,
                "ratio_to_cp": wall / floor if floor else None,
                "peak_rss_mib": peak_kib / 1024,
                "peak_rss_max_mib": peak_max_kib / 1024,
                "import_baseline_mib": base_kib / 1024 if base_kib is not None else None,
                "peak_minus_baseline_mib": (peak_kib - base_kib) / 1024 if base_kib is not None else None,
                "peak_rss_anon_mib": max(anon) / 1024 if anon else None,
                "peak_rss_file_mib": max(file_) / 1024 if file_ else None,
                "identical_all": all(r.get("identical") for r in rs),
            }
        )
    return rows


def print_table(rows: list[dict], size: int) -> None:
    print(f"\nsource: {size / GIB:.3f} GiB ({size} bytes); figures: medians over repeats (peak RSS = VmHWM)")
    head = f"{'operation':<22}{'wall s':>9}{'x cp':>7}{'peak MiB':>10}{'-import':>9}{'anon pk':>9}{'file pk':>9}  identical"
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        width = spec.split(".")[0]
        return format(v, spec) if v is not None else format("-", width)

    for r in rows:
        print(
            f"{r['op']:<22}{r['median_wall_s']:>9.2f}{fmt(r['ratio_to_cp'], '>7.2f')}{r['peak_rss_mib']:>10.0f}"
            f"{fmt(r['peak_minus_baseline_mib'], '>9.0f')}{fmt(r['peak_rss_anon_mib'], '>9.0f')}"
            f"{fmt(r['peak_rss_file_mib'], '>9.0f')}  {r['identical_all']}"
        )


def parent_main(args: argparse.Namespace) -> int:
    size_bytes = int(args.size_gib * GIB)
    if args.workdir is None:
        DEFAULT_TMP_PARENT.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=DEFAULT_TMP_PARENT))
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="copy-rss-", dir=args.workdir))
    free = shutil.disk_usage(workdir).free
    if free < 2.5 * size_bytes:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"{workdir}: {free / GIB:.1f} GiB free, need {2.5 * size_bytes / GIB:.1f}")
    ops = [o for o in (args.ops.split(",") if args.ops else OPERATIONS)]
    try:
        info = machine_info(workdir)
        prov = provenance(machine=info)
        src = workdir / "source.safetensors"
        dst = workdir / "out.safetensors"
        print(f"workdir {workdir}; generating {args.size_gib} GiB source ...", flush=True)
        t0 = time.perf_counter()
        src_sha, size, described = generate_source(src, size_bytes)
        gen_s = time.perf_counter() - t0
        print(f"generated {size} bytes in {gen_s:.1f} s, sha256 {src_sha[:16]}...", flush=True)
        if "load_save" in ops:
            avail = mem_available_bytes()
            if avail < 3 * size + 2 * GIB:
                print(f"skipping load_save: {avail / GIB:.1f} GiB available < 3 x size + 2 GiB", flush=True)
                ops.remove("load_save")
        if args.cold:
            print("cold runs: the source is evicted from the page cache before each run", flush=True)
        runs: dict[str, list[dict]] = {op: [] for op in ops}
        for rep in range(args.repeats):
            for op in ops:
                if dst.exists():
                    dst.unlink()
                if args.cold:
                    _drop_file_cache(src)
                r = run_once(op, src, dst)
                out_sha = sha256_file(dst)
                r["repeat"] = rep
                r["output_bytes"] = dst.stat().st_size
                r["identical"] = out_sha == src_sha
                r["output_sha256"] = out_sha
                dst.unlink()
                runs[op].append(r)
                print(
                    f"[{rep + 1}/{args.repeats}] {op:<22} {r['op_seconds']:7.2f} s  peak {r['peak_rss_kib'] / 1024:8.0f} MiB"
                    f"  identical={r['identical']}",
                    flush=True,
                )
                if op in IDENTICAL_REQUIRED and not r["identical"]:
                    raise RuntimeError(f"{op}: output differs from the source")
        rows = summarize(runs)
        print_table(rows, size)
        doc = {
            "benchmark": "copy_rss",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "size_gib_requested": args.size_gib,
            "source_bytes": size,
            "source_sha256": src_sha,
            "source_tensors": described,
            "generate_seconds": gen_s,
            "repeats": args.repeats,
            "page_cache": "cold: source evicted (posix_fadvise DONTNEED) before each run" if args.cold
            else "warm: the source stays in the page cache for every run; page cache is not RSS",
            "copy_buffer_bytes": 64 * MIB,
            "row_block_bytes": ROW_BLOCK_BYTES,
            "machine": info,
            "summary": rows,
            "runs": runs,
        }
        label = args.label or ("cold" if args.cold else None)
        out = write_result("copy_rss", doc, label=label, prov=prov, json_out=args.json_out)
        print(f"\nwrote {out}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.workdir is None:
            try:
                DEFAULT_TMP_PARENT.rmdir()
            except OSError:
                pass  # another run is using it
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0, help="source file size in GiB (default 4.0)")
    p.add_argument("--workdir", default=None, help="folder for the scratch files (a temp folder inside it is removed at the end)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default=None,
                   help="write the results here instead of benchmarks/results/copy_rss/current.json (a trial run)")
    p.add_argument("--label", default=None, help="a word naming this result in the archive (default: cold with --cold)")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPERATIONS)}")
    p.add_argument("--cold", action="store_true", help="evict the source from the page cache before each run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child, Path(args.src), Path(args.dst))
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
