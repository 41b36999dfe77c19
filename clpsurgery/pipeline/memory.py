"""The memory model of a transfer, in one place: what each stage holds at once, how big a block of
rebuilt rows may be, and how much a search chunk may take, all within --max-memory.

A run has two stages that hold memory at once:
- search: the helper's vectors (as stored, in fp32, normalised in fp32), the overlap's vectors,
  and the neighbour lists it produces;
- write: one rebuilt tensor's held rows (the overlap's copied to another id and the rows the mixing
  combines, in the source dtype), a gather window of the mapped file, a copy buffer, the neighbour
  lists still alive, plus blocks of rebuilt rows.
The helper's vectors are dropped before writing starts; the neighbour lists are not.
"""

from __future__ import annotations

from clpsurgery.formats.checkpoint import GATHER_WINDOW_BYTES, CheckpointLayout
from clpsurgery.formats.safetensors_header import DTYPE_SIZES
from clpsurgery.formats.writer import COPY_BUFFER_BYTES
from clpsurgery.mixing.registry import Method

FP32, FP64 = 4, 8
# Per neighbour of a new token: its overlap position (int64), its similarity (fp32), its weight
# (fp32), and the similarity again in fp64 while the weights are computed.
NEIGHBOUR_ENTRY_BYTES = 8 + FP32 + FP32 + FP64
# The smallest block budget worth running with: below it, blocks of a few rows make the write
# stage a Python loop.
MIN_BLOCK_BYTES = 16 * 1024 * 1024
# A search chunk's fp32 score matrix (and as much again for top-k's workspace) may take this part
# of --max-memory: the rest holds the vectors and the neighbour lists.
SEARCH_SHARE = 4
# The dense combine converts the overlap rows to fp32 this many at a time.
DENSE_CHUNK_ROWS = 4096


def memory_estimate(
    source: CheckpointLayout, rebuilt: tuple[str, ...], helper: CheckpointLayout | None, helper_embedding: str | None,
    target_size: int, overlap_count: int, held_rows: int, missing_count: int, sides: tuple[tuple[Method | None, int, bool], ...],
) -> dict[str, int]:
    """Bytes held at once by the search and by the write stage (row blocks aside).

    `sides`: (method, neighbours per token, dense) of each mixing (one, or the input's and the
    output's when they differ; None for a recorded mixing); their neighbour lists are all alive
    while the tensors are written.
    """
    methods = {method.name: method for method, _, _ in sides if method is not None}
    dense = any(d for _, _, d in sides)
    # A helper-free method reads no helper vectors (its piece lists are counted as neighbour lists).
    helper_width = 0 if helper is None else helper.info(helper_embedding).shape[1]
    helper_bytes = 0 if helper is None else DTYPE_SIZES[helper.info(helper_embedding).dtype]
    neighbour_lists = sum(0 if d else missing_count * k * NEIGHBOUR_ENTRY_BYTES for _, k, d in sides)
    dense_vectors = target_size * helper_width * FP32 if dense else 0
    # helper rows as stored, in fp32, and normalised; the overlap's normalised vectors
    search = target_size * helper_width * (helper_bytes + FP32 + FP32) + overlap_count * helper_width * FP32 + neighbour_lists
    search += sum(method.extra_search_bytes(target_size, helper_width) for method in methods.values())
    widest = max(source.info(n).row_bytes for n in rebuilt)
    largest = max(ref.info.nbytes for ref in source.tensors.values())
    gather_window = min(GATHER_WINDOW_BYTES, max(source.info(n).nbytes for n in rebuilt))
    copy_buffer = min(COPY_BUFFER_BYTES, largest)
    write = held_rows * widest + gather_window + copy_buffer + neighbour_lists + dense_vectors
    return {"search": search, "write": write}


def block_rows(budget: int, target_size: int, row_width: int, k: int, overlap_count: int, dense: bool) -> int:
    """Target rows per block so that one block's fp32 working set stays within `budget` bytes.

    Top-k: the block in and out in fp32, plus per neighbour of a mixed row one gathered fp32 row
    and 16 bytes for its position and weight. Dense: the block, its similarities and weights
    against the whole overlap, and one fp32 chunk of source rows.
    """
    if dense:
        per_row = FP32 * (row_width * 2 + overlap_count * 3)
        fixed = FP32 * DENSE_CHUNK_ROWS * row_width
    else:
        per_row = FP32 * (row_width * 2 + k * (row_width + 4))
        fixed = 0
    return max(1, min(target_size, (budget - fixed) // per_row))


def search_budget(max_memory: int) -> int:
    """What one search chunk's scores may take."""
    return max_memory // SEARCH_SHARE
