"""Where the arithmetic runs: `--device auto|cpu|cuda`, and the GPU paths of search and combine.

A `ComputeBackend` does the two compute stages for `transfer.py` and records which path ran:

  search   faiss-cpu (the CPU default: FAISS's flat index), torch-topk-cpu (exact top-k by blocked
           matrix products, torch's BLAS, where faiss is not installed or OPENBLAS_CORETYPE holds
           faiss's bundled OpenBLAS to another kernel, which measured 2.6x slower: docs/search.md),
           faiss-gpu (when the installed faiss has GPU support), torch-topk-cuda (the blocked
           top-k on the GPU, when it has not)
  combine  torch-cpu (embedding_bag over fp32 rows, combine.py), triton (kernels/clpsurgery_kernels/combine.py),
           torch-cuda (the CPU code on CUDA tensors, when triton is missing or fails),
           torch-cpu-matmul / torch-cuda-matmul (the dense form, chunked matrix products)

Whatever the path, the arithmetic is the same: fp32 products, fp32 accumulation, one cast to
the source dtype; every search path's candidates are rescored by neighbours.rescore (fp32
products summed in fp64) and ties go to the lower position, so every path returns the same
neighbours and similarities.
"""

from __future__ import annotations

import os

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.mixing.choices import DEVICES
from clpsurgery.mixing.combine import ColumnBlocks, combine_dense, combine_top_k
from clpsurgery.mixing.neighbours import (
    RESCORE_BYTES,
    RESCORE_MARGIN,
    Neighbours,
    rescore,
    search_top_k,
)

# FAISS's GPU flat index returns at most this many neighbours per query.
FAISS_GPU_MAX_K = 2048
# The CPU's exact search: a query chunk's [queries, overlap] fp32 scores take at most this, and
# a chunk has at least this many queries (fewer, and each product packs the overlap again for
# too little work); the overlap is chunked where both cannot hold. Measured in
# benchmarks/search_speed.py (docs/search.md).
CPU_SCORE_BYTES = 32 << 20
CPU_MIN_QUERY_ROWS = 256
# What the Triton kernel reads and writes (clpsurgery_kernels.combine.SUPPORTED_DTYPES; not imported: triton may be missing).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a CUDA device; else why not, in a few words."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    except Exception as e:  # a broken driver raises rather than answering False
        return f"CUDA could not be initialised ({' '.join(str(e).split())})"
    return "torch finds no CUDA device (no GPU, or no driver)"


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' for `--device requested`; `auto` takes the GPU when there is one."""
    if requested not in DEVICES:
        raise SurgeryError("--device", f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if requested == "cuda":
        raise SurgeryError("--device", f"cuda was asked for, but no CUDA device is available: {reason}")
    return "cpu"


def faiss_gpu_reason() -> str | None:
    """None when faiss is installed with GPU support; else why it cannot search on the GPU."""
    try:
        import faiss
    except ImportError:
        return "faiss is not installed"
    if not hasattr(faiss, "StandardGpuResources"):
        return "the installed faiss has no GPU support"
    try:
        if faiss.get_num_gpus() < 1:
            return "faiss sees no GPU"
    except Exception as e:
        return f"faiss could not query its GPUs ({' '.join(str(e).split())})"
    return None


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matrix products in full fp32 on the GPU (no TF32), whatever the process had set."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def exact_top_k(
    overlap_vectors: torch.Tensor,
    query_vectors: torch.Tensor,
    k: int,
    device: str | torch.device = "cpu",
    budget_bytes: int = 256 << 20,
    on_chunk: Callable[[int], None] | None = None,
    query_rows: int | None = None,
    overlap_rows: int | None = None,
    threads: Callable[[], int | None] | None = None,
) -> Neighbours:
    """Exact top-k by inner product, by chunked matrix product and torch.topk, on any device.

    Query rows come in chunks and the overlap in chunks, each chunk's [queries, overlap] fp32
    score matrix within `budget_bytes` (on the CPU, within CPU_SCORE_BYTES too: a block that
    stays near the cache), each overlap chunk's best k + RESCORE_MARGIN are merged into the
    running best, and the survivors are rescored exactly as the FAISS path rescores its
    candidates: the same neighbours and similarities. Where scores tie across the last
    candidate, the lower positions are the candidates (`_lowest_positions_on_ties`).
    `query_rows` and `overlap_rows` fix the chunk sizes instead (tests); `threads()`, asked
    before each query chunk, sets torch's thread count for it (None: leave it as it is).
    """
    base = overlap_vectors.to(device=device, dtype=torch.float32).contiguous()
    n = base.shape[0]
    k = min(k, n)
    candidates = min(k + RESCORE_MARGIN, n)
    kept = min(candidates + 1, n)  # one more than the candidates: a tie across the last one shows
    m = query_vectors.shape[0]
    positions = np.empty((m, k), dtype=np.int64)
    similarities = np.empty((m, k), dtype=np.float32)
    if m == 0 or k == 0:
        return Neighbours(positions, similarities)
    score_budget = max(1 << 20, budget_bytes // 2)  # scores, plus as much again for topk and the merge
    if not base.is_cuda:
        score_budget = min(score_budget, CPU_SCORE_BYTES)
    fewest = 1 if base.is_cuda else min(m, CPU_MIN_QUERY_ROWS)
    query_rows = query_rows or int(min(m, max(fewest, score_budget // (4 * n)), 16384))
    overlap_rows = int(min(n, max(kept, overlap_rows or score_budget // (4 * query_rows))))
    rescore_bytes = max(1 << 20, budget_bytes // 8) if base.is_cuda else RESCORE_BYTES
    context = exact_fp32() if base.is_cuda else nullcontext()
    with context:
        for start in range(0, m, query_rows):
            stop = min(m, start + query_rows)
            wanted = threads() if threads else None
            if wanted:
                torch.set_num_threads(wanted)
            queries = query_vectors[start:stop].to(device=device, dtype=torch.float32)
            best_scores = best_found = None
            for first in range(0, n, overlap_rows):
                last = min(n, first + overlap_rows)
                scores = queries @ base[first:last].T
                top_scores, top_found = scores.topk(min(kept, last - first), dim=1)
                top_found += first
                if best_scores is not None:
                    top_scores = torch.cat([best_scores, top_scores], dim=1)
                    top_found = torch.cat([best_found, top_found], dim=1)
                    top_scores, picked = top_scores.topk(kept, dim=1)
                    top_found = top_found.gather(1, picked)
                best_scores, best_found = top_scores, top_found
                del scores
            found = _lowest_positions_on_ties(base, queries, best_scores, best_found, candidates, score_budget)
            sims, found = rescore(base, queries, found, k, step_bytes=rescore_bytes)
            similarities[start:stop] = sims.cpu().numpy()
            positions[start:stop] = found.cpu().numpy()
            if on_chunk:
                on_chunk(stop - start)
    return Neighbours(positions, similarities)


def _lowest_positions_on_ties(base: torch.Tensor, queries: torch.Tensor, scores: torch.Tensor, found: torch.Tensor, candidates: int, score_budget: int) -> torch.Tensor:
    """The first `candidates` of `found` (best first, one more kept), except in rows where the
    last candidate's score equals the next one's: there topk's pick among equal scores is
    arbitrary, so such a row's candidates are chosen again over the whole overlap, ties to the
    lower position, as FAISS's scan in position order and the float64 reference choose them
    (duplicate vectors, zero vectors)."""
    if found.shape[1] <= candidates:
        return found
    chosen = found[:, :candidates].clone()
    tied = (scores[:, candidates - 1] == scores[:, candidates]).nonzero().flatten()
    step = max(1, score_budget // (4 * base.shape[0]))
    for start in range(0, tied.numel(), step):
        rows = tied[start:start + step]
        order = torch.sort(queries[rows] @ base.T, dim=1, descending=True, stable=True).indices
        chosen[rows] = order[:, :candidates]
    return chosen


def faiss_cpu_reason() -> str | None:
    """Why FAISS's flat index is not the CPU search here (None: it is). Its wheel carries its own
    OpenBLAS, which OPENBLAS_CORETYPE holds to the kernel it names (set where older OpenBLAS
    builds crash or compute wrong results): there FAISS measured 2.6x slower than torch's
    products, which MKL computes whatever the variable says (docs/search.md)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "faiss is not installed"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced:
        return f"OPENBLAS_CORETYPE={forced} holds faiss's bundled OpenBLAS to that kernel"
    return None


def faiss_gpu_top_k(overlap_vectors: torch.Tensor, query_vectors: torch.Tensor, k: int, chunk_rows: int = 8192, on_chunk: Callable[[int], None] | None = None) -> Neighbours:
    """FAISS's GPU flat inner-product index, then the same exact rescoring as the CPU path."""
    import faiss

    resources = faiss.StandardGpuResources()
    return search_top_k(overlap_vectors, query_vectors, k, chunk_rows, on_chunk, make_index=lambda width: faiss.GpuIndexFlatIP(resources, width))


def combine_dense_chunked(source_rows: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype, chunk_rows: int = 4096) -> torch.Tensor:
    """combine_dense on the rows' device, with TF32 off on a GPU so products stay exact fp32."""
    with exact_fp32() if source_rows.is_cuda else nullcontext():
        return combine_dense(source_rows, weights, out_dtype, chunk_rows)


class ComputeBackend:
    """The compute stages on one device, and a record of the paths that ran."""

    def __init__(self, device: str, search_budget: int) -> None:
        self.device = device
        self.search_budget = search_budget  # bytes a search chunk's scores may take
        # Asked before each query chunk of the CPU search: the threads it may take (one while the
        # background copies run, every core once they are done); None leaves torch's setting.
        self.search_threads: Callable[[], int | None] | None = None
        self.paths: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._kernel_failed = False

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def record(self, stage: str, path: str) -> None:
        taken = self.paths.setdefault(stage, [])
        if path not in taken:
            taken.append(path)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def describe(self) -> dict:
        """For the manifest: the device, and which path each stage took (and why, if not the first choice)."""
        described: dict = {"device": self.device}
        if self.gpu:
            described["device_name"] = torch.cuda.get_device_name(0)
        for stage in ("search", "combine"):
            taken = self.paths.get(stage, [])
            described[stage] = taken[0] if len(taken) == 1 else taken if taken else "none"
        if self.notes:
            described["notes"] = list(self.notes)
        return described

    # search

    def search_top_k(self, overlap_vectors: torch.Tensor, query_vectors: torch.Tensor, k: int, on_chunk: Callable[[int], None] | None = None) -> Neighbours:
        if self.gpu:
            reason = faiss_gpu_reason()
            if reason is None and min(k, overlap_vectors.shape[0]) + RESCORE_MARGIN <= FAISS_GPU_MAX_K:
                self.record("search", "faiss-gpu")
                return faiss_gpu_top_k(overlap_vectors, query_vectors, k, on_chunk=on_chunk)
            self.note(f"search: exact top-k by matrix product on the GPU ({reason or f'k above faiss-gpu limit {FAISS_GPU_MAX_K}'})")
            self.record("search", "torch-topk-cuda")
            return exact_top_k(overlap_vectors, query_vectors, k, "cuda", self.search_budget, on_chunk)
        reason = faiss_cpu_reason()
        if reason is None:
            self.record("search", "faiss-cpu")
            return search_top_k(overlap_vectors, query_vectors, k, on_chunk=on_chunk)
        self.note(f"search: exact top-k by blocked matrix products on the CPU ({reason})")
        self.record("search", "torch-topk-cpu")
        return exact_top_k(overlap_vectors, query_vectors, k, "cpu", self.search_budget, on_chunk, threads=self.search_threads)

    # combine

    def rows_for_combine(self, source_rows: torch.Tensor) -> torch.Tensor:
        """The overlap rows on the device, in their own dtype (the kernel reads bf16 as is); on
        the CPU as given when there is no GPU, or when they would take over half its free memory."""
        if not self.gpu:
            return source_rows
        free, _ = torch.cuda.mem_get_info()
        need = source_rows.numel() * source_rows.element_size()
        if need > free // 2:
            self.note(f"combine: the overlap rows ({need >> 20} MiB) take over half the GPU's free memory ({free >> 20} MiB); combined on the CPU")
            return source_rows
        return source_rows.to("cuda")

    def combine_top_k(self, rows: torch.Tensor | ColumnBlocks, positions: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """out[r] = sum_j weights[r, j] * rows[positions[r, j]] on the rows' device, returned on the CPU."""
        if isinstance(rows, ColumnBlocks) or not rows.is_cuda:
            self.record("combine", "torch-cpu")
            return combine_top_k(rows, positions, weights, out_dtype)
        if rows.shape[0] < 2**31:
            positions = positions.to(torch.int32)
        positions = positions.to(rows.device)
        weights = weights.to(device=rows.device, dtype=torch.float32)
        if rows.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
            self.note(f"combine: {rows.dtype} rows are combined by torch on the GPU (the Triton kernel takes bf16, fp16 and fp32)")
        elif not self._kernel_failed:
            try:
                from clpsurgery_kernels.combine import combine_rows

                out = combine_rows(rows, positions, weights, out_dtype)
                self.record("combine", "triton")
                return out.cpu()
            except Exception as e:  # triton missing, or no compiler for this card: the torch path
                self._kernel_failed = True
                self.note(f"combine: the Triton kernel is unavailable ({type(e).__name__}: {' '.join(str(e).split())[:200]}); torch on the GPU instead")
        self.record("combine", "torch-cuda")
        return combine_top_k(rows, positions.long(), weights, out_dtype).cpu()

    def combine_dense(self, rows: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:
        """out = weights @ rows over the whole overlap, chunked, on the rows' device; returned on the CPU."""
        if not rows.is_cuda:
            self.record("combine", "torch-cpu-matmul")
            return combine_dense(rows, weights, out_dtype, chunk_rows)
        self.record("combine", "torch-cuda-matmul")
        return combine_dense_chunked(rows, weights, out_dtype, chunk_rows).cpu()


def make_backend(requested: str, search_budget: int) -> ComputeBackend:
    """The engine for `--device requested` (SurgeryError for `cuda` without a CUDA device)."""
    return ComputeBackend(resolve_device(requested), search_budget)
