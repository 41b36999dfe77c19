"""The top-k combine as a Triton kernel: out[r] = sum_j w[r, j] * source[idx[r, j]].

Tensors in, tensors out; no file I/O. fp32 accumulation, the result cast once at the store (round
to nearest even, as torch's `.to()` does), so the output differs from the CPU path only by the
order of the fp32 additions: within half a rounding step of the exact sum (plus fp32 error), and
at most one rounding step from the CPU path's output.

Design (for Hopper; every choice below is a parameter the benchmark sweeps):

* A program owns a tile of BLOCK_M output rows x BLOCK_H columns. For each neighbour slot j it
  loads the BLOCK_M indices and weights once (tiny, L1-resident), then gathers a
  [BLOCK_M, BLOCK_H] tile of source rows: BLOCK_M independent contiguous segments of
  BLOCK_H * elem bytes, 16-byte vectors per thread when BLOCK_M * BLOCK_H >= 8 * 32 * num_warps
  (bf16) and the row stride is a multiple of 8 elements (Triton specialises on that).
* The k loop is unrolled BLOCK_K deep (`tl.static_range`), so BLOCK_K gathers per row are in
  flight before the first is used: BLOCK_M * BLOCK_K * BLOCK_H * elem bytes per program
  (8 x 16 x 128 x 2 = 32 KiB), against one 2-byte load per thread for embedding_bag.
* Column blocks are the slow axis of the grid (H_MAJOR): the programs resident at any moment all
  read the same BLOCK_H-wide column slice of the source, n_source * BLOCK_H * elem bytes
  (20,000 x 128 x 2 = 5 MiB at BLOOM scale), which stays in L2 (50 MiB on an H100, 60 on an
  H200). Each source row is referenced m * k / n times (30,000 x 64 / 20,000 = 96 at k = 64), so
  the gathers hit L2 and device memory sees the source about once. The price is that the indices
  and weights are read once per column block: m * k * (idx + 4) * ceil(h / BLOCK_H) bytes.
* The slots of a k step are unrolled, each a [BLOCK_M, BLOCK_H] gather behind its own BLOCK_M
  index loads, summed in k order (bit-identical to torch's fp32 path in the tests). The k step is
  not a tensor axis ([BLOCK_M, BLOCK_K, BLOCK_H] gathers, a tree sum): that form is slower, and
  wrong on the GPU with triton 3.6 though right under the interpreter (kernels/NOTES.md).

Bytes per output row (what a kernel must move at the least, if nothing is reused):
    k * h * elem (gathered source rows) + h * elem (the output row) + k * (idx bytes + 4)
e.g. BLOOM-7b1, bf16, h = 4096, k = 64: 524,288 + 8,192 + 512 bytes; 30,000 rows: 15.99 GB of
logical traffic. With the L2 reuse above, device memory moves only the distinct source rows once
(20,000 x 8 KiB = 164 MB), the output (246 MB) and the index/weight re-reads (int32: 30,000 x 64
x 8 x 32 column blocks = 492 MB; 16 blocks of 256 halve that): the gathers are served by L2.

Why this should beat `torch.nn.functional.embedding_bag(..., per_sample_weights=..., mode="sum")`
on CUDA (aten/src/ATen/native/cuda/EmbeddingBag.cu, EmbeddingBag_updateOutputKernel_sum_mean):
it does not upcast the table (a bf16 table is read as bf16 and accumulated in fp32, acc_type),
but each thread owns one (bag, feature) element and walks the bag's k indices in a loop of
dependent loads (index, then one 2-byte element), so a warp has a single 64-byte request in
flight per step; grid 1024 x (32 x 8) threads, bags in row order, so the resident warps span the
whole table and L2 reuse is left to chance; it also writes offset2bag (8 bytes per index) and
validates every index first. And its per_sample_weights must share the table's dtype: with a
bf16 table the weights are rounded to bf16 (8 bits) before use, which this kernel avoids (fp32
weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_UNROLL = 16  # neighbour slots gathered per unrolled step (BLOCK_K upper bound by default)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, in integer arithmetic (finite x). The GPU's own
    conversion (cvt.rn.bf16.f32) rounds the same way, but Triton's interpreter truncates, so the
    kernel spells the rounding out: the same bits on the GPU, under the interpreter and in torch."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _combine_kernel(
    src_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    M,
    H,
    K,
    stride_src,
    stride_idx,
    stride_w,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_MAJOR: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    if H_MAJOR:
        # Column block slow: resident programs share one column slice of the source (L2 reuse).
        blocks_m = tl.cdiv(M, BLOCK_M)
        pid_h = pid // blocks_m
        pid_m = pid % blocks_m
    else:
        blocks_h = tl.cdiv(H, BLOCK_H)
        pid_m = pid // blocks_h
        pid_h = pid % blocks_h
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < M
    col_ok = cols < H
    idx_row = idx_ptr + rows * stride_idx
    w_row = w_ptr + rows * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        for kk in tl.static_range(BLOCK_K):
            # rows < (M if slot k0 + kk exists else 0): one compare, and a plain bool mask
            # (bool & scalar bool comes out as int under the interpreter).
            ok = rows < tl.where(k0 + kk < K, M, 0)
            j = tl.load(idx_row + (k0 + kk), mask=ok, other=0).to(tl.int64)
            wj = tl.load(w_row + (k0 + kk), mask=ok, other=0.0)
            v = tl.load(
                src_ptr + j[:, None] * stride_src + cols[None, :],
                mask=ok[:, None] & col_ok[None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
            acc += wj[:, None] * v.to(tl.float32)
    _store(out_ptr, acc, rows, cols, row_ok, col_ok, stride_out)


@triton.jit
def _store(out_ptr, acc, rows, cols, row_ok, col_ok, stride_out):
    out = out_ptr + rows[:, None] * stride_out + cols[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        result = _round_to_bf16(acc)
    else:
        result = acc.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even; fp32: as is
    tl.store(out, result, mask=row_ok[:, None] & col_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_config(h: int, k: int, elem_size: int) -> dict:
    """Tile sizes for a source of width h and element size elem_size at k neighbours.

    256-byte row segments per program (128 bf16 or 64 fp32 columns) keep the resident column slice
    small enough for L2; 8 rows per program give each of 128 threads one 16-byte vector per gather;
    the k loop unrolled up to 16 deep, in equal steps (k = 50: 4 steps of 13, not 4 of 16). No tile
    shape in the sweep does meaningfully better (kernels/NOTES.md).
    """
    block_h = min(max(1, 256 // elem_size), _next_pow2(max(1, h)))
    steps = max(1, -(-k // MAX_UNROLL))
    block_k = max(1, -(-k // steps))
    return {"block_m": 8, "block_h": block_h, "block_k": block_k, "num_warps": 4, "h_major": True, "num_stages": 1}


def combine_rows(
    source: torch.Tensor,
    positions: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_h: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    h_major: bool | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """out[r] = sum_j weights[r, j] * source[positions[r, j]], fp32 accumulation, written as out_dtype.

    source [n, h] (bf16, fp16 or fp32; rows may be strided, columns contiguous), positions [m, k]
    int32 or int64 (each in [0, n): not checked here), weights [m, k] (used as fp32), all on one
    device (a CUDA device, or the CPU under TRITON_INTERPRET=1). out_dtype defaults to the
    source's. Any m, k and h: edges are masked. The tile arguments override default_config's.
    """
    if source.dim() != 2 or positions.dim() != 2 or positions.shape != weights.shape:
        raise ValueError(f"need source [n, h] and positions, weights [m, k]; got {tuple(source.shape)}, {tuple(positions.shape)}, {tuple(weights.shape)}")
    if source.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"source dtype {source.dtype} is not supported by the kernel (bf16, fp16, fp32)")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, not {positions.dtype}")
    out_dtype = out_dtype or source.dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"output dtype {out_dtype} is not supported by the kernel (bf16, fp16, fp32)")
    m, k = positions.shape
    h = source.shape[1]
    if out is None:
        out = torch.empty((m, h), dtype=out_dtype, device=source.device)
    elif out.shape != (m, h) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a [{m}, {h}] {out_dtype} tensor with contiguous rows")
    if m == 0 or h == 0:
        return out
    if source.stride(1) != 1:
        source = source.contiguous()
    if positions.stride(1) != 1:
        positions = positions.contiguous()
    weights = weights.to(torch.float32)
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    config = default_config(h, k, source.element_size())
    for name, value in (("block_m", block_m), ("block_h", block_h), ("block_k", block_k), ("num_warps", num_warps), ("h_major", h_major), ("num_stages", num_stages)):
        if value is not None:
            config[name] = value
    grid = (triton.cdiv(m, config["block_m"]) * triton.cdiv(h, config["block_h"]),)
    global last_compiled
    last_compiled = _combine_kernel[grid](
        source,
        positions,
        weights,
        out,
        m,
        h,
        k,
        source.stride(0),
        positions.stride(0),
        weights.stride(0),
        out.stride(0),
        BLOCK_M=config["block_m"],
        BLOCK_H=config["block_h"],
        BLOCK_K=config["block_k"],
        H_MAJOR=bool(config["h_major"]),
        NUM_STAGES=config["num_stages"],
        num_warps=config["num_warps"],
    )
    return out


last_compiled = None  # the compiled kernel of the last launch (registers, spills, PTX), for the benchmark


def compiled_facts(compiled=None) -> dict:
    """Registers, spills and the widths of the global loads in the PTX of a compiled kernel
    (the last launch's by default); empty under the interpreter."""
    compiled = compiled if compiled is not None else last_compiled
    facts: dict = {}
    for name in ("n_regs", "n_spills", "shared"):
        value = getattr(compiled, name, None)
        if value is None:
            value = getattr(getattr(compiled, "metadata", None), name, None)
        if isinstance(value, int):
            facts[name] = value
    try:
        ptx = compiled.asm["ptx"]
    except Exception:
        return facts
    loads = [line.strip() for line in ptx.splitlines() if "ld.global" in line]
    facts["ptx_global_loads"] = {
        "v4": sum(".v4." in line for line in loads),
        "v2": sum(".v2." in line for line in loads),
        "scalar": sum(".v4." not in line and ".v2." not in line for line in loads),
    }
    return facts


def reference_combine(source: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The float64 oracle: sum_j w[r, j] * source[idx[r, j]] (weights and rows as given, upcast)."""
    return (weights.to(torch.float64).unsqueeze(2) * source.to(torch.float64)[positions.long()]).sum(dim=1)


def moved_bytes(m: int, k: int, h: int, elem_size: int, idx_size: int = 4) -> dict[str, int]:
    """Logical bytes of one combine: gathered rows, written rows, indices and weights."""
    return {"gathered": m * k * h * elem_size, "written": m * h * elem_size, "indices": m * k * (idx_size + 4)}
