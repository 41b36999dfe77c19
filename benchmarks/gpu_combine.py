"""The combine and the search on a GPU, in one go: check, then time, then end to end.

1. The card: name, multiprocessors, L2, and its copy bandwidth (a 2 GiB device-to-device copy,
   counting bytes read plus written), the ceiling for memory-bound work.
2. Checks first, on fresh random inputs: the Triton kernel (output poisoned with NaN before the
   launch) against the CPU path (clpsurgery.mixing.combine.combine_top_k) on a sample of rows, and
   against the same fp32 arithmetic in torch on the GPU for every row (within one bf16 rounding
   step); the engine's GPU paths (clpsurgery.mixing.backend) likewise; the exact GPU top-k against the
   same code on the CPU (which tests/test_kernels.py ties to FAISS); the dense chunked combine.
3. Timings (CUDA events around each call, L2 flushed before each, medians): the kernel, a sweep
   of its tile shapes, and torch.nn.functional.embedding_bag(..., per_sample_weights, mode="sum"),
   at BLOOM-7b1 scale (source 250,880 x 4,096 bf16; 20,000 overlap rows, 30,000 missing; k = 10
   and 64) and at 190,000 missing tokens (a 250,880-token target: 60,880 overlap rows). Bytes per
   variant: logical (every gathered row and the output, as the issue counts them) and the floor
   (each distinct row read once, the output written once) over the measured copy bandwidth.
4. End to end: `clpsurgery init --device cpu` and `--device cuda` on a synthetic checkpoint with
   BLOOM-7b1's embedding (250,880 x 4,096 bf16, 2 layers) and a 50,004-token helper; outputs
   compared (bf16 rows within one rounding step), seconds per stage and paths from the manifests.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_combine.py

The report, with its provenance (commit, machine, date, command), goes to
benchmarks/results/gpu_combine/current.json, rewritten after every section; the previous
current.json (another run's) moves to archive/. On a machine that holds a copy of the tree
without .git, set CLPSURGERY_BENCH_COMMIT to the checkout's `git describe --always --dirty --tags`
and write with --json-out $OUT/gpu_combine.json; back home,
`python benchmarks/measure.py install gpu_combine FILE` makes that file the current one.

On a machine without CUDA it says so and exits 2. `--cpu-dry-run` runs every step on the CPU with
tiny shapes and Triton's interpreter (timings meaningless), to check the script itself; it writes
a report only with --json-out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "kernels"))  # clpsurgery_kernels, where the project is not installed
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import provenance, write_result  # noqa: E402

# (name, overlap rows n, missing rows m); h = 4096, bf16, the table 250,880 rows.
SCALES = [("bloom-7b1", 20_000, 30_000), ("190k-missing", 60_880, 190_000)]
DRY_SCALES = [("dry", 120, 48)]
KS = (64, 10)  # k = 64 first: the 3x goal
TABLE_ROWS, HIDDEN = 250_880, 4096
# Tile shapes swept at the first scale (block_k is the launcher's default for k unless given).
SWEEP = [
    {"block_m": 8, "block_h": 128, "num_warps": 4},  # the default for bf16, h = 4096
    {"block_m": 4, "block_h": 256, "num_warps": 4},
    {"block_m": 8, "block_h": 256, "num_warps": 8},
    {"block_m": 16, "block_h": 128, "num_warps": 8},
    {"block_m": 4, "block_h": 512, "num_warps": 8},
    {"block_m": 2, "block_h": 512, "num_warps": 4},
    {"block_m": 16, "block_h": 64, "num_warps": 4},
    {"block_m": 1, "block_h": 1024, "num_warps": 4},
    {"block_m": 4, "block_h": 128, "num_warps": 2},
    {"block_m": 8, "block_h": 128, "num_warps": 4, "block_k": 8},  # fewer registers, more programs per SM
    {"block_m": 8, "block_h": 128, "num_warps": 4, "block_k": 4},
    {"block_m": 8, "block_h": 128, "num_warps": 4, "num_stages": 2},
    {"block_m": 8, "block_h": 128, "num_warps": 4, "h_major": False},  # the L2 reuse, taken away
]
# Checked (not timed) at the first scale besides KS: k = 50 (four unrolled steps of 13, the last
# two slots masked), k = 1, and k = 17 (two steps of 9, one slot masked).
CHECK_ONLY_KS = (50, 1, 17)


def log(message: str) -> None:
    print(message, flush=True)


class Bench:
    """Device, timers and the report being filled in (written after every section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.dry = args.cpu_dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.report: dict = {"benchmark": "gpu_combine", "date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "checks": [], "timings": [], "errors": []}
        self.provenance = provenance(workdir=REPO)
        self.flush_buffer = None if self.dry else torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        self.deadline = time.monotonic() + args.budget_s

    def left(self) -> float:
        """Seconds left of --budget-s."""
        return self.deadline - time.monotonic()

    def skip(self, what: str, need_s: float) -> bool:
        """True (and noted) when fewer than need_s seconds of the budget are left for `what`."""
        if self.left() >= need_s:
            return False
        self.report.setdefault("skipped", []).append(what)
        log(f"  skip  {what}: {self.left():.0f} s of the budget left, about {need_s:.0f} s needed")
        return True

    def save(self) -> None:
        """The report so far: --json-out, or benchmarks/results/gpu_combine/current.json (not for a dry run)."""
        if self.args.json_out or not self.dry:
            write_result("gpu_combine", self.report, label=self.args.label, prov=self.provenance, json_out=self.args.json_out)

    def time_ms(self, fn, repeats: int, flush: bool = True) -> dict:
        """Median, min and max milliseconds of fn() over repeats, after one warm-up call."""
        torch = self.torch
        fn()
        samples = []
        if self.dry:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
        else:
            torch.cuda.synchronize()
            for _ in range(repeats):
                if flush:
                    self.flush_buffer.zero_()  # evict the inputs from L2 (60 MB at most on Hopper)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "repeats": repeats}

    def check(self, name: str, ok: bool, **facts) -> None:
        self.report["checks"].append({"check": name, "ok": bool(ok), **facts})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items())
        log(f"  {'PASS' if ok else 'FAIL'}  {name}  {shown}")
        self.save()


def ulp_distance(a, b):
    """Per-element distance in units in the last place between two bf16/fp16 tensors of one shape
    (sign-magnitude bit patterns mapped to a monotonic integer line; +0 and -0 coincide)."""
    import torch

    def key(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a) - key(b)).abs()


def device_info(bench: Bench) -> dict:
    torch = bench.torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if not bench.dry:
        props = torch.cuda.get_device_properties(0)
        info.update(
            card=props.name,
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            capability=f"{props.major}.{props.minor}",
        )
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["card"] = "cpu (dry run: Triton interpreter)"
    return info


def copy_bandwidth(bench: Bench) -> dict:
    """A large device-to-device copy: (bytes read + bytes written) / time."""
    torch = bench.torch
    size = (16 << 20) if bench.dry else (2 << 30)
    src = torch.randint(-100, 100, (size,), dtype=torch.int8, device=bench.device)
    dst = torch.empty_like(src)
    timing = bench.time_ms(lambda: dst.copy_(src), 3 if bench.dry else 20, flush=False)
    assert torch.equal(src[:: max(1, size // 4096)], dst[:: max(1, size // 4096)])
    return {"bytes": 2 * size, **timing, "gb_per_s": 2 * size / timing["median_ms"] / 1e6}


def make_inputs(bench: Bench, n: int, m: int, k: int, seed: int):
    """Fresh random inputs: overlap rows (from a random bf16 table), neighbour positions, softmax weights."""
    torch = bench.torch
    g = torch.Generator(device=bench.device).manual_seed(seed)
    hidden = 64 if bench.dry else HIDDEN
    table_rows = n * 4 if bench.dry else TABLE_ROWS
    table = (torch.randn(table_rows, hidden, generator=g, device=bench.device) * 0.02).to(torch.bfloat16)
    overlap_ids = torch.randperm(table_rows, generator=g, device=bench.device)[:n]
    source = table[overlap_ids].contiguous()  # the overlap rows, gathered once (as transfer.py does)
    positions = torch.randint(0, n, (m, k), generator=g, device=bench.device, dtype=torch.int32)
    weights = torch.softmax(torch.randn(m, k, generator=g, device=bench.device) / 0.1, dim=1)
    return table, overlap_ids, source, positions, weights


def check_combine(bench: Bench, label: str, source, positions, weights):
    """Kernel vs the CPU path (sampled rows) and vs torch's fp32 path on the device (all rows)."""
    torch = bench.torch
    from clpsurgery.mixing.combine import combine_top_k
    from clpsurgery.mixing.backend import ComputeBackend
    from clpsurgery_kernels.combine import combine_rows

    m = positions.shape[0]
    out = torch.full((m, source.shape[1]), float("nan"), dtype=torch.bfloat16, device=bench.device)  # poisoned
    combine_rows(source, positions, weights, out=out)
    bench.check(f"{label}: every output element written (NaN poison)", bool(torch.isfinite(out).all()))
    again = torch.full_like(out, float("nan"))
    combine_rows(source, positions, weights, out=again)
    bench.check(f"{label}: a second launch gives the same bits", torch.equal(out, again))
    del again
    sample = torch.randperm(m, device=bench.device)[: min(m, 2048)]
    cpu = combine_top_k(source.cpu(), positions[sample].long().cpu(), weights[sample].cpu(), torch.bfloat16)
    ulps = ulp_distance(out[sample].cpu(), cpu)
    bench.check(f"{label}: kernel vs CPU path ({len(sample)} rows)", int(ulps.max()) <= 1, max_ulp=int(ulps.max()), identical=float((ulps == 0).float().mean()))
    torch_path = combine_top_k(source, positions.long(), weights, torch.bfloat16)  # the CPU code, on the device
    ulps = ulp_distance(out, torch_path)
    bench.check(f"{label}: kernel vs torch fp32 path on the device (all rows)", int(ulps.max()) <= 1, max_ulp=int(ulps.max()), identical=float((ulps == 0).float().mean()))
    few = sample[:256]
    reference = (weights[few].double().unsqueeze(2) * source[positions[few].long()].double()).sum(1)
    rel = float((out[few].double() - reference).norm() / reference.norm())
    bench.check(f"{label}: kernel vs float64 ({len(few)} rows, relative norm; bf16 rounding alone: < 2e-3)", rel < 2.5e-3, rel_error=rel)
    if not bench.dry:
        engine = ComputeBackend("cuda", 1 << 28)
        rows = engine.rows_for_combine(source.cpu())
        via_engine = engine.combine_top_k(rows, positions[sample].long().cpu(), weights[sample].cpu(), torch.bfloat16)
        bench.check(f"{label}: engine (transfer.py's GPU path) = kernel", torch.equal(via_engine, out[sample].cpu()) and engine.describe()["combine"] == "triton", paths=json.dumps(engine.describe()))
    from torch.nn.functional import embedding_bag

    bag = embedding_bag(positions, source, per_sample_weights=weights.to(source.dtype), mode="sum")
    ulps = ulp_distance(bag, out)
    bench.report.setdefault("embedding_bag_vs_kernel", {})[label] = {"max_ulp": int(ulps.max()), "mean_ulp": float(ulps.float().mean())}
    log(f"  note  {label}: embedding_bag (bf16 weights) vs kernel: max {int(ulps.max())} ulp, mean {float(ulps.float().mean()):.3f} ulp")
    return out


def time_combine(bench: Bench, scale: str, n: int, m: int, k: int, source, positions, weights, table, overlap_ids, copy_gbs: float, sweep: bool, checked) -> None:
    torch = bench.torch
    import triton
    from torch.nn.functional import embedding_bag

    from clpsurgery_kernels.combine import combine_rows, compiled_facts, default_config

    h, elem = source.shape[1], source.element_size()
    logical = m * k * h * elem + m * h * elem
    repeats = 1 if bench.dry else (20 if m * k <= 2_000_000 else 8)
    out = torch.empty((m, h), dtype=source.dtype, device=bench.device)
    bag_weights = weights.to(source.dtype)  # embedding_bag wants per_sample_weights in the table's dtype

    def record(variant: str, timing: dict, config: dict | None = None, dram_bytes: int | None = None) -> dict:
        entry = {"scale": scale, "n": n, "m": m, "k": k, "h": h, "variant": variant, "config": config, **timing}
        entry["logical_gb_per_s"] = logical / timing["median_ms"] / 1e6
        if dram_bytes is not None:
            entry["floor_bytes"] = dram_bytes
            entry["floor_ms_at_copy_bw"] = dram_bytes / copy_gbs / 1e6
        bench.report["timings"].append(entry)
        bench.save()
        log(f"  {scale:13s} k={k:3d} {variant:34s} {timing['median_ms']:9.3f} ms  {entry['logical_gb_per_s']:8.0f} GB/s logical")
        return entry

    floor = n * h * elem + m * h * elem + m * k * 8  # distinct rows once, output once, int32 idx + fp32 w once
    bag = record("embedding_bag (bf16 w)", bench.time_ms(lambda: embedding_bag(positions, source, per_sample_weights=bag_weights, mode="sum"), repeats), dram_bytes=floor)
    configs = (SWEEP[:3] if bench.dry else SWEEP) if sweep else [{}]
    best = None
    for position, extra in enumerate(configs):
        if position and bench.skip(f"{scale} k={k} triton {_short(extra)}", 20 if k == KS[0] else 15):
            continue
        config = {**default_config(h, k, elem), **extra}
        blocks_h = triton.cdiv(h, config["block_h"])
        dram = n * h * elem + m * h * elem + m * k * 8 * (blocks_h if config["h_major"] else 1)
        label = "triton default" if config == default_config(h, k, elem) else "triton " + _short(extra)
        try:
            out.fill_(float("nan"))
            combine_rows(source, positions, weights, out=out, **extra)  # compile, and check before timing
            facts = compiled_facts()
            ulps = int(ulp_distance(out, checked).max()) if bool(torch.isfinite(out).all()) else -1
            entry = record(label, bench.time_ms(lambda extra=extra: combine_rows(source, positions, weights, out=out, **extra), repeats), config, dram)
        except Exception as e:  # a config that does not compile (registers, shared memory): note it, go on
            bench.report["errors"].append({"scale": scale, "k": k, "config": config, "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"  {scale:13s} k={k:3d} triton {_short(extra):27s} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        entry["max_ulp_vs_checked"] = ulps
        entry["compiled"] = facts
        if facts:
            log(f"  {'':13s}       {'':34s} regs {facts.get('n_regs')}, spills {facts.get('n_spills')}, PTX global loads {facts.get('ptx_global_loads')}")
        entry["speedup_vs_embedding_bag"] = bag["median_ms"] / entry["median_ms"]
        if not 0 <= ulps <= 1:
            log(f"  {scale:13s} k={k:3d} {label}: WRONG ({'unwritten elements' if ulps < 0 else f'{ulps} ulp off'}); not a candidate")
            bench.report["errors"].append({"scale": scale, "k": k, "config": config, "error": f"wrong output: max ulp {ulps}"})
            continue
        if best is None or entry["median_ms"] < best["median_ms"]:
            best = entry
    if sweep and best is not None:
        bench.report.setdefault("best_config", {})[f"{scale} k={k}"] = best["config"]
    # The table itself as the source (indices into 250,880 rows, no gathered overlap copy).
    table_positions = overlap_ids[positions.long()].to(torch.int32)
    entry = record("triton default, whole table", bench.time_ms(lambda: combine_rows(table, table_positions, weights, out=out), repeats), default_config(h, k, elem))
    entry["speedup_vs_embedding_bag"] = bag["median_ms"] / entry["median_ms"]


def _short(config: dict) -> str:
    names = {"block_m": "m", "block_h": "h", "block_k": "k", "num_warps": "w", "h_major": "hmaj", "num_stages": "s", "variant": ""}
    return " ".join(f"{names.get(a, a)}{int(b) if isinstance(b, bool) else b}" for a, b in config.items())


def search_and_dense(bench: Bench, copy_gbs: float) -> None:
    """The exact GPU top-k (checked against the same code on the CPU) and the dense combine."""
    torch = bench.torch
    from clpsurgery.mixing.combine import combine_dense
    from clpsurgery.mixing.backend import ComputeBackend, combine_dense_chunked, exact_top_k
    from clpsurgery.mixing.neighbours import normalise_rows

    n, m, d, k = (300, 200, 32, 10) if bench.dry else (20_000, 30_000, 768, 64)
    g = torch.Generator().manual_seed(11)
    overlap = normalise_rows(torch.randn(n, d, generator=g))[0]
    queries = normalise_rows(torch.randn(m, d, generator=g))[0]
    engine = ComputeBackend(bench.device, 1 << 28)
    found = engine.search_top_k(overlap, queries, k) if not bench.dry else exact_top_k(overlap, queries, k)
    sample = torch.randperm(m, generator=g)[: min(m, 1024)]
    cpu = exact_top_k(overlap, queries[sample], k)
    same = float((torch.from_numpy(found.positions[sample.numpy()]) == torch.from_numpy(cpu.positions)).all(dim=1).float().mean())
    bench.check("search: GPU top-k rows equal to the CPU's (ties aside)", same >= 0.999, rows_equal=same, path=json.dumps(engine.describe().get("search")))
    if not bench.dry:
        timing = bench.time_ms(lambda: exact_top_k(overlap, queries, k, "cuda", (1 << 30) // 4), 3, flush=False)
        bench.report["search"] = {"n": n, "m": m, "d": d, "k": k, **timing, "note": "host-to-device copies and the result's return included"}
        log(f"  search        exact top-k on the GPU, {m} x {n} x {d}, k={k}: {timing['median_ms']:.1f} ms")
    # Dense: weights [m, n] fp32 @ source [n, h], source chunks in fp32.
    h = 64 if bench.dry else HIDDEN
    gd = torch.Generator(device=bench.device).manual_seed(12)
    source = (torch.randn(n, h, generator=gd, device=bench.device) * 0.02).to(torch.bfloat16)
    weights = torch.softmax(torch.randn(m, n, generator=gd, device=bench.device), dim=1)
    out = combine_dense_chunked(source, weights, torch.bfloat16, 4096)
    cpu_rows = combine_dense(source.cpu(), weights[:64].cpu(), torch.bfloat16, 4096)
    ulps = ulp_distance(out[:64].cpu(), cpu_rows)
    # Each output is a sum of 20,000 terms of both signs (|sum| ~ 1e-4 against terms of 0.02):
    # elements near zero are many bf16 steps apart between two fp32 summation orders, so the
    # device's result and the CPU's are each measured against float64 (normwise), not against each other.
    exact = weights[:64].double().cpu() @ source.double().cpu()
    rel_gpu = float((out[:64].cpu().double() - exact).norm() / exact.norm())
    rel_cpu = float((cpu_rows.double() - exact).norm() / exact.norm())
    bench.check("dense: chunked matmul on the device vs float64, as close as the CPU path (64 rows)", rel_gpu <= 1.5 * rel_cpu + 1e-6 and rel_gpu < 2.5e-3, rel_gpu=rel_gpu, rel_cpu=rel_cpu, max_ulp_vs_cpu=int(ulps.max()), identical=float((ulps == 0).float().mean()))
    if not bench.dry:
        timing = bench.time_ms(lambda: combine_dense_chunked(source, weights, torch.bfloat16, 4096), 3)
        flops = 2 * m * n * h
        bench.report["dense"] = {"n": n, "m": m, "h": h, **timing, "tflop_per_s": flops / timing["median_ms"] / 1e9}
        log(f"  dense         {m} x {n} x {h} fp32 chunked matmul: {timing['median_ms']:.1f} ms, {flops / timing['median_ms'] / 1e9:.1f} TFLOP/s")


# End to end.


def build_e2e_inputs(work: Path, small: bool) -> tuple[Path, Path, dict]:
    """A BLOOM-shaped source (the embedding at full size, 2 layers) with a synthetic byte-level
    vocabulary, and a GPT-2-shaped helper whose 50,004 tokens share 20,000 strings with it."""
    import numpy as np
    import torch
    from seven_b import bloom_tensors, write_random_shard
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from clpsurgery.pipeline.demo import gpt2_config, gpt2_tensors, write_model_folder
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    vocab, hidden, shared, new = (5_000, 64, 1_000, 1_500) if small else (TABLE_ROWS, HIDDEN, 20_000, 30_000)
    rng = np.random.default_rng(3)

    def tokenizer(tokens: list[str], specials: list[str]) -> Tokenizer:
        ids = {t: i for i, t in enumerate(specials + tokens)}
        tok = Tokenizer(models.BPE(vocab=ids, merges=[], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        return tok

    source_tokens = [f"\u0120s{i:06d}" for i in range(vocab - 1)]
    source, helper = work / "source-bloom", work / "helper"
    source.mkdir(parents=True)
    save_tokenizer_folder(tokenizer(source_tokens, ["<|endoftext|>"]), source, bos="<|endoftext|>", eos="<|endoftext|>")
    write_random_shard(source / "model.safetensors", bloom_tensors(vocab=vocab, hidden=hidden, layers=2), rng)
    config = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": vocab, "hidden_size": hidden, "n_layer": 2, "n_head": 32 if not small else 4, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    (source / "config.json").write_text(json.dumps(config, indent=2))
    picked = sorted(rng.choice(len(source_tokens), size=shared, replace=False).tolist())
    target_tokens = [source_tokens[i] for i in picked] + [f"\u0120t{i:06d}" for i in range(new)]
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    target = tokenizer(target_tokens, specials)
    helper_config = gpt2_config(target.get_vocab_size(), n_embd=768 if not small else 32, n_layer=1, n_head=12 if not small else 2, bos=0, eos=1)
    helper_config["torch_dtype"] = "float32"
    write_model_folder(helper, helper_config, gpt2_tensors(helper_config, torch.float32, seed=4))
    save_tokenizer_folder(target, helper, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    return source, helper, {"source_vocab": vocab, "hidden": hidden, "target_vocab": target.get_vocab_size(), "shared_strings": shared}


def run_init(source: Path, helper: Path, out: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clpsurgery", "init", str(source), str(helper), str(out), "--quiet", "--device", device], check=False, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"init --device {device} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    manifest = json.loads((out / "clpsurgery.json").read_text())
    return {"device": device, "wall_seconds": seconds, "stage_seconds": manifest["seconds"], "paths": manifest.get("paths"), "stdout": done.stdout.strip()[-500:]}


def end_to_end(bench: Bench) -> None:
    from safetensors import safe_open

    work = Path(tempfile.mkdtemp(prefix="clpsurgery-e2e-"))
    try:
        started = time.perf_counter()
        source, helper, facts = build_e2e_inputs(work, small=bench.dry)
        facts["build_seconds"] = time.perf_counter() - started
        log(f"  e2e inputs built in {facts['build_seconds']:.1f} s: {facts}")
        runs = {}
        for position, device in enumerate(("cpu",) + (("cpu", "cpu") if bench.dry else ("cuda", "cuda"))):
            label = f"{device}-{position}"
            runs[label] = run_init(source, helper, work / f"out-{label}", device)
            log(f"  init --device {device}: {runs[label]['wall_seconds']:.1f} s wall, stages {runs[label]['stage_seconds']}, paths {runs[label]['paths']}")
        first, second, third = list(runs)
        name = "transformer.word_embeddings.weight"
        with safe_open(work / f"out-{first}" / "model.safetensors", framework="pt") as a, safe_open(work / f"out-{second}" / "model.safetensors", framework="pt") as b:
            ta, tb = a.get_tensor(name), b.get_tensor(name)
        ulps = ulp_distance(ta, tb)
        rows_differing = int((ulps > 0).any(dim=1).sum())
        bench.report["end_to_end"] = {"inputs": facts, "runs": runs, "max_ulp": int(ulps.max()), "identical": float((ulps == 0).float().mean()), "rows_differing": rows_differing}
        bench.check(f"e2e: init --device {runs[second]['device']} = init --device cpu (bf16, within one rounding step)", int(ulps.max()) <= 1 and ta.shape == tb.shape, max_ulp=int(ulps.max()), identical=float((ulps == 0).float().mean()), rows_differing=rows_differing)
        hashes = {label: hashlib.sha256((work / f"out-{label}" / "model.safetensors").read_bytes()).hexdigest() for label in (second, third)}
        bench.check(f"e2e: init --device {runs[third]['device']} twice gives the same file", hashes[second] == hashes[third], sha256=hashes[second][:16])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_summary(bench: Bench) -> None:
    r = bench.report
    info = r.get("device", {})
    log("")
    log(f"card {info.get('card')} ({info.get('multiprocessors')} SMs, L2 {info.get('l2_mib')} MiB), torch {info.get('torch')}, triton {info.get('triton')}, {r['date']}")
    if "copy" in r:
        log(f"copy bandwidth {r['copy']['gb_per_s']:.0f} GB/s (read + write)")
    log(f"{'scale':13s} {'k':>3s} {'variant':34s} {'ms':>9s} {'GB/s log.':>9s} {'x bag':>6s} {'floor ms':>8s}")
    for t in r["timings"]:
        floor = f"{t['floor_ms_at_copy_bw']:.3f}" if "floor_ms_at_copy_bw" in t else ""
        speed = f"{t['speedup_vs_embedding_bag']:.2f}" if "speedup_vs_embedding_bag" in t else "1.00" if t["variant"].startswith("embedding_bag") else ""
        log(f"{t['scale']:13s} {t['k']:3d} {t['variant']:34s} {t['median_ms']:9.3f} {t['logical_gb_per_s']:9.0f} {speed:>6s} {floor:>8s}")
    for k in KS:
        mine = [t for t in r["timings"] if t["scale"] == "bloom-7b1" and t["k"] == k and "speedup_vs_embedding_bag" in t]
        default = [t for t in mine if t["variant"] == "triton default"]
        best = max(mine, key=lambda t: t["speedup_vs_embedding_bag"], default=None)
        need = 3.0 if k == 64 else 1.0
        for name, t in (("default", default[0] if default else None), ("best", best)):
            if t is not None:
                log(f"goal k={k}: {name} kernel ({t['variant']}) {t['speedup_vs_embedding_bag']:.2f}x embedding_bag, goal {need:.0f}x: {'MET' if t['speedup_vs_embedding_bag'] >= need else 'MISSED'}")
    if r.get("best_config"):
        log(f"best configs: {json.dumps(r['best_config'])}")
    if "end_to_end" in r:
        e = r["end_to_end"]
        for label, run in e["runs"].items():
            log(f"e2e {label}: {run['wall_seconds']:.1f} s wall; stages {run['stage_seconds']}; paths {run['paths']}")
    failed = [c["check"] for c in r["checks"] if not c["ok"]]
    log(f"checks: {len(r['checks']) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    if r["errors"]:
        log(f"errors: {len(r['errors'])} (see the JSON)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-out", type=Path, help="write the full report here (updated after every section) instead of benchmarks/results/gpu_combine/current.json")
    parser.add_argument("--label", help="a word naming this result in the archive (the card, say)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end init runs")
    parser.add_argument("--skip-sweep", action="store_true", help="time only the default tile shape")
    parser.add_argument("--skip-190k", action="store_true", help="leave out the 190,000-missing scale")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=270, help="wall-clock budget: sweep configs and later sections are skipped (and noted) when it runs short, so the summary still prints")
    args = parser.parse_args()
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    from clpsurgery.mixing.backend import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None and not args.cpu_dry_run:
        print(f"no CUDA device: {reason}; this benchmark needs a GPU (--cpu-dry-run checks the script itself)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed (pip install 'triton>=3.0')", file=sys.stderr)
        return 2
    bench = Bench(args)
    torch = bench.torch
    status = 0
    try:
        bench.report["device"] = device_info(bench)
        log(f"device: {bench.report['device']}")
        bench.report["copy"] = copy_bandwidth(bench)
        copy_gbs = bench.report["copy"]["gb_per_s"]
        log(f"copy bandwidth: {copy_gbs:.0f} GB/s")
        bench.save()
        scales = DRY_SCALES if bench.dry else SCALES

        def combine_at(index: int) -> None:
            scale, n, m = scales[index]
            for k in KS:
                table, overlap_ids, source, positions, weights = make_inputs(bench, n, m, k, seed=100 * index + k)
                log(f"{scale}: n={n} overlap rows, m={m} missing, k={k}, h={source.shape[1]}")
                checked = check_combine(bench, f"{scale} k={k}", source, positions, weights)
                time_combine(bench, scale, n, m, k, source, positions, weights, table, overlap_ids, copy_gbs, index == 0 and not args.skip_sweep, checked)
                del table, overlap_ids, source, positions, weights, checked
                if not bench.dry:
                    torch.cuda.empty_cache()

        # In order of importance (the report is saved after each): BLOOM scale, search and dense,
        # end to end, then 190,000 missing rows.
        combine_at(0)
        scale, n, m = scales[0]
        for k in CHECK_ONLY_KS:
            table, overlap_ids, source, positions, weights = make_inputs(bench, n, m, k, seed=7000 + k)
            log(f"{scale}: n={n}, m={m}, k={k}: checks only")
            check_combine(bench, f"{scale} k={k}", source, positions, weights)
            del table, overlap_ids, source, positions, weights
        if not bench.skip("search and dense", 25):
            log("search and dense")
            search_and_dense(bench, copy_gbs)
        if not args.skip_e2e and not bench.skip("end to end", 0 if bench.dry else 100):
            log("end to end")
            end_to_end(bench)
        if len(scales) > 1 and not args.skip_190k and not bench.skip("190k-missing scale", 40):
            combine_at(1)
    except Exception as e:
        bench.report["errors"].append({"stage": "main", "error": traceback.format_exc()[-3000:]})
        log(f"error: {type(e).__name__}: {e}")
        traceback.print_exc()
        status = 1
    finally:
        bench.save()
        print_summary(bench)
    if any(not c["ok"] for c in bench.report["checks"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
