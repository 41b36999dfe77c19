"""The neighbour search against the machine's speed: FAISS's flat index, numpy, torch, clpsurgery.

For each shape (the new tokens' helper vectors as queries, the overlap's as the base, k = 5 as
the default options search, so 9 candidates with the rescoring margin), on 1 and on 2 threads:

  gemm            numpy's product alone, in blocks of 4096 queries: the floor, no top-k at all
  numpy           the same product + argpartition of the 9 best: a plain exact top-k
  torch           torch's product + topk of the 9 best, the same blocks: a plain exact top-k
  faiss_flat      faiss.IndexFlatIP.search(queries, 9), the index built before the clock starts
  before          clpsurgery's CPU search as it was: FAISS's flat index, then neighbours.rescore
  after           clpsurgery's CPU search now: ComputeBackend("cpu").search_top_k (blocked
                  products and topk, then the same rescoring)

Shapes (queries x overlap x helper width):

  bloom-1b3    13,052 x 5,585 x 512: BLOOM 1.3B's pair as the issue measured it
  llama-2-7b   23,341 x 8,659 x 768: benchmarks/seven_b.py's LLaMA-2-7B pair (its plan's counts)
  bloom-7b1    25,632 x 6,368 x 768: seven_b.py's BLOOM-7b1 pair
  vocab-250k   2,048 of 220,000 x 30,000 x 1,024: a 250k-vocabulary target (BLOOM's tokenizer)
               with a 1,024-wide helper; a sample of its queries, the full search is ~107x that

The vectors are anisotropic, as trained embeddings are (tests/conftest.py's
anisotropic_helper_embedding: a common direction plus noise), normalised. Each method runs
--repeats times, round robin, and the median is kept. Then, per shape: `after` against `before`
(positions and similarity bits identical, on 1 and on 2 threads) and both against a float64
reference (exact top-k, ties to the lower position); and a constructed case of exact ties
(duplicate vectors, a zero query) through every path. FAISS's own settings are varied on the
first shape (k = 1, which takes FAISS's heap-free top-1 path; its query and database block
sizes), and the BLAS libraries each package runs are recorded (threadpoolctl).

    python benchmarks/search_speed.py

The results go to benchmarks/results/search_speed/current.json with their provenance (commit,
machine, date, command) and the load average before and after (the machine may be shared);
--json-out PATH writes them to PATH instead. It takes about 4 minutes on a quiet 2-core machine
(7 with other jobs beside it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from measure import provenance, write_result  # noqa: E402

import clpsurgery  # noqa: E402,F401  (sets MKL_CBWR before the first product, as a run does)
import faiss  # noqa: E402
import threadpoolctl  # noqa: E402
import torch  # noqa: E402

from clpsurgery.mixing.backend import ComputeBackend  # noqa: E402
from clpsurgery.mixing.neighbours import RESCORE_MARGIN, normalise_rows, search_top_k  # noqa: E402

K = 5  # the default --top-k's neighbours searched in the helper (clp+fvt's helper part)
BLOCK = 4096  # query rows per product for the plain numpy and torch top-k
SEARCH_BUDGET = 128 << 20  # memory.search_budget at the default --max-memory of 1 GiB
SHAPES = {
    "bloom-1b3": dict(queries=13_052, overlap=5_585, width=512),
    "llama-2-7b": dict(queries=23_341, overlap=8_659, width=768),
    "bloom-7b1": dict(queries=25_632, overlap=6_368, width=768),
    "vocab-250k": dict(queries=2_048, overlap=30_000, width=1024, full_queries=220_000),
}


def vectors(rows: int, width: int, seed: int) -> torch.Tensor:
    """Normalised anisotropic rows: noise around a common direction, as trained embeddings."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(rows, width, generator=g) + 1.5 * torch.randn(1, width, generator=g)
    return normalise_rows(raw)[0]


def set_threads(n: int) -> None:
    """The thread count of every pool a method could use: torch's, FAISS's OpenMP, the BLAS libraries'."""
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    threadpoolctl.threadpool_limits(n)


def plain_numpy(base: np.ndarray, queries: np.ndarray, c: int) -> np.ndarray:
    found = np.empty((queries.shape[0], c), dtype=np.int64)
    for s in range(0, queries.shape[0], BLOCK):
        scores = queries[s:s + BLOCK] @ base.T
        found[s:s + BLOCK] = np.argpartition(-scores, c - 1, axis=1)[:, :c]
    return found


def gemm_only(base: np.ndarray, queries: np.ndarray) -> None:
    for s in range(0, queries.shape[0], BLOCK):
        queries[s:s + BLOCK] @ base.T


def plain_torch(base: torch.Tensor, queries: torch.Tensor, c: int) -> torch.Tensor:
    parts = [(queries[s:s + BLOCK] @ base.T).topk(c, dim=1).indices for s in range(0, queries.shape[0], BLOCK)]
    return torch.cat(parts)


def reference_top_k(base: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in float64, ties to the lower position: every row scoring at least the k-th
    best value, sorted by (score descending, position), the first k kept."""
    b = base.double().numpy()
    positions = np.empty((queries.shape[0], k), dtype=np.int64)
    sims = np.empty((queries.shape[0], k), dtype=np.float64)
    for s in range(0, queries.shape[0], 2048):
        scores = queries[s:s + 2048].double().numpy() @ b.T
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]
        rows, cols = np.nonzero(scores >= kth[:, None])
        order = np.lexsort((cols, -scores[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        first = np.searchsorted(rows, np.arange(scores.shape[0]))
        take = first[:, None] + np.arange(k)[None, :]
        positions[s:s + 2048] = cols[take]
        sims[s:s + 2048] = scores[rows[take], cols[take]]
    return positions, sims


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def after_search(base: torch.Tensor, queries: torch.Tensor):
    engine = ComputeBackend("cpu", SEARCH_BUDGET)
    found = engine.search_top_k(base, queries, K)
    return found, engine.describe()["search"]


def measure_shape(name: str, shape: dict, threads: list[int], repeats: int) -> dict:
    base = vectors(shape["overlap"], shape["width"], seed=1)
    queries = vectors(shape["queries"], shape["width"], seed=2)
    base_np, queries_np = base.numpy(), queries.numpy()
    c = K + RESCORE_MARGIN
    index = faiss.IndexFlatIP(shape["width"])
    index.add(base_np)
    methods = {
        "gemm": lambda: gemm_only(base_np, queries_np),
        "numpy": lambda: plain_numpy(base_np, queries_np, c),
        "torch": lambda: plain_torch(base, queries, c),
        "faiss_flat": lambda: index.search(queries_np, c),
        "before": lambda: search_top_k(base, queries, K),
        "after": lambda: after_search(base, queries),
    }
    out: dict = {"shape": shape, "k": K, "candidates": c, "seconds": {}, "median_seconds": {}}
    results: dict = {}
    for t in threads:
        set_threads(t)
        runs: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(repeats):
            for m, fn in methods.items():
                runs[m].append(round(timed(fn), 4))
        out["seconds"][str(t)] = runs
        out["median_seconds"][str(t)] = {m: round(statistics.median(v), 4) for m, v in runs.items()}
        results[t] = (search_top_k(base, queries, K), *after_search(base, queries))
    plain_one_core = min(out["median_seconds"][str(threads[0])][m] for m in ("numpy", "torch"))
    out["ratio_to_plain_one_core_top_k"] = {
        str(t): {m: round(v / plain_one_core, 2) for m, v in out["median_seconds"][str(t)].items()} for t in threads
    }
    ref_positions, ref_sims = reference_top_k(base, queries, K)
    checks = {}
    first_after = results[threads[0]][1]
    for t, (before, after, path) in results.items():
        checks[str(t)] = {
            "after_path": path,
            "after_equals_before_positions": bool(np.array_equal(after.positions, before.positions)),
            "after_equals_before_similarity_bits": bool(np.array_equal(after.similarities.view(np.int32), before.similarities.view(np.int32))),
            "after_equals_after_on_first_thread_count": bool(np.array_equal(after.positions, first_after.positions) and np.array_equal(after.similarities, first_after.similarities)),
            "after_rows_equal_to_float64_reference": int((after.positions == ref_positions).all(axis=1).sum()),
            "before_rows_equal_to_float64_reference": int((before.positions == ref_positions).all(axis=1).sum()),
            "rows": int(ref_positions.shape[0]),
            "after_max_abs_similarity_error": float(np.abs(after.similarities.astype(np.float64) - ref_sims).max()),
        }
    out["checks"] = checks
    if "full_queries" in shape:
        out["extrapolated_full_seconds"] = {
            str(t): {m: round(v * shape["full_queries"] / shape["queries"], 1) for m, v in out["median_seconds"][str(t)].items()} for t in threads
        }
    return out


def faiss_settings(repeats: int) -> dict:
    """FAISS on the first shape, one thread: k = 1 (top-1 handler, no heap) against k = 9 (a heap
    per query), and its query and database block sizes (the BLAS path's tiles)."""
    shape = SHAPES["bloom-1b3"]
    base = vectors(shape["overlap"], shape["width"], seed=1).numpy()
    queries = vectors(shape["queries"], shape["width"], seed=2).numpy()
    set_threads(1)
    index = faiss.IndexFlatIP(shape["width"])
    index.add(base)
    defaults = (faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs)
    variants = {"k=9 (defaults)": (9, *defaults), "k=1": (1, *defaults), "k=64": (64, *defaults),
                "k=9, query_bs 1024": (9, 1024, defaults[1]), "k=9, query_bs 16384": (9, 16384, defaults[1]),
                "k=9, database_bs 4096": (9, defaults[0], 4096), "k=9, database_bs 8192": (9, defaults[0], 8192)}
    runs: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for _ in range(repeats):
            for v, (k, qbs, dbs) in variants.items():
                faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = qbs, dbs
                runs[v].append(round(timed(lambda: index.search(queries, k)), 4))
    finally:
        faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = defaults
    return {"shape": "bloom-1b3", "threads": 1, "median_seconds": {v: round(statistics.median(r), 4) for v, r in runs.items()}, "seconds": runs}


def ties_check() -> dict:
    """Exact ties through every path: 40 copies of one vector among 3,000 (queries near it, so
    the copies tie across the candidates' edge), and an all-zero query (every score ties)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3000, 64, generator=g)
    copy = torch.randn(1, 64, generator=g)
    base[torch.randperm(3000, generator=g)[:40]] = copy
    base = normalise_rows(base)[0]
    queries = torch.cat([normalise_rows(copy.repeat(4, 1) + 0.01 * torch.randn(4, 64, generator=g))[0], torch.zeros(1, 64)])
    ref, _ = reference_top_k(base, queries, 30)
    out = {}
    for t in (1, 2):
        set_threads(t)
        for k in (1, 5, 30):
            before = search_top_k(base, queries, k)
            after = ComputeBackend("cpu", SEARCH_BUDGET).search_top_k(base, queries, k)
            out[f"threads {t}, k {k}"] = {
                "after_equals_reference": bool(np.array_equal(after.positions, ref[:, :k])),
                "before_equals_reference": bool(np.array_equal(before.positions, ref[:, :k])),
                "after_equals_before": bool(np.array_equal(after.positions, before.positions) and np.array_equal(after.similarities, before.similarities)),
            }
    return out


def coretype_run(coretype: str, repeats: int) -> dict:
    """The first shape on one thread in a child with OPENBLAS_CORETYPE=coretype (and no
    OPENBLAS_L2_SIZE): the OpenBLAS kernel a machine may be made to run, and what it costs
    each method. torch's products run MKL, which does not read it."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_L2_SIZE"}
        env["OPENBLAS_CORETYPE"] = coretype
        proc = subprocess.run([sys.executable, __file__, "--shapes", "bloom-1b3", "--threads", "1", "--repeats", str(repeats), "--shapes-only", "--json-out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        child = json.loads(out.read_text())
    blas = {i["filepath"].rsplit("/", 1)[-1]: i.get("architecture") for i in child["libraries"]["threadpoolctl"] if i["user_api"] == "blas"}
    shape = child["shapes"]["bloom-1b3"]
    return {"openblas_kernels": blas, "median_seconds": shape["median_seconds"]["1"], "checks": shape["checks"]["1"], "machine_load": child["machine_load"]}


def libraries() -> dict:
    """Which BLAS and OpenMP each package loaded, and the settings that steer them."""
    return {
        "threadpoolctl": threadpoolctl.threadpool_info(),
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options(),
        "faiss_simd_level": faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig") else None,
        "faiss_cvar": {n: getattr(faiss.cvar, n) for n in ("distance_compute_blas_threshold", "distance_compute_blas_query_bs", "distance_compute_blas_database_bs", "distance_compute_min_k_reservoir")},
        "torch": torch.__version__,
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "numpy": np.__version__,
        "env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "OMP_WAIT_POLICY")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from " + ", ".join(SHAPES))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--coretypes", default="Prescott",
                        help="OPENBLAS_CORETYPE values to rerun the first shape under, one thread, in a child each ('' for none)")
    parser.add_argument("--shapes-only", action="store_true", help="the shapes alone: no FAISS settings, ties or coretype runs")
    args = parser.parse_args(argv)
    prov = provenance()
    load_before = os.getloadavg()
    started = time.perf_counter()
    threads = [int(t) for t in args.threads.split(",")]
    shapes = {}
    for name in args.shapes.split(","):
        shapes[name] = measure_shape(name, SHAPES[name], threads, args.repeats)
        med = shapes[name]["median_seconds"]
        print(name, {t: med[t] for t in med}, file=sys.stderr, flush=True)
    result = {
        "benchmark": "search_speed",
        "date": prov["date"][:10],
        "command": " ".join(["benchmarks/search_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine_load": {
            "note": "os.getloadavg() (1, 5, 15 min) before and after; on 2 cores, a 1-minute load above ~1 means other jobs ran beside this one",
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "libraries": libraries(),
        "shapes": shapes,
    }
    if not args.shapes_only:
        result["faiss_settings"] = faiss_settings(args.repeats)
        result["ties"] = ties_check()
        result["openblas_coretype"] = {c: coretype_run(c, args.repeats) for c in args.coretypes.split(",") if c}
    result["machine_load"]["after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = write_result("search_speed", result, prov=prov, json_out=args.json_out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
