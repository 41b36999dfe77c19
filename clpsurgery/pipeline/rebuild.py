"""The rebuilt tensors' rows: neighbours in the helper space, mixing weights, and row blocks with
the overlap rows copied and the others combined. The compute of a transfer (torch, FAISS), kept
apart from transfer.py, which imports it only once the byte copies are running.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import Checkpoint, StoredRows
from clpsurgery.formats.writer import row_blocks
from clpsurgery.mixing.backend import ComputeBackend
from clpsurgery.mixing.combine import ColumnBlocks
from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.neighbours import Neighbours, dense_similarities, normalise_rows
from clpsurgery.mixing.overrides import with_rows
from clpsurgery.mixing.registry import MixingInputs
from clpsurgery.mixing.weights import WeightStats, mixing_weights
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.plan import RebuiltTensor, TransferPlan
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.stage_hooks import reached
from clpsurgery.vocab.pieces import source_pieces

if TYPE_CHECKING:
    from clpsurgery.pipeline.result import ProgressFactory, StageClock, TransferResult


class Mixing:
    """The method's mixing matrix over source rows, or the dense form (clp over the whole overlap,
    its weights computed block by block from the helper's vectors)."""

    def __init__(self, plan: TransferPlan, matrix: MixingMatrix | None, overlap_vectors: torch.Tensor | None = None, missing_vectors: torch.Tensor | None = None) -> None:
        self.plan = plan
        self.matrix = matrix
        self.overlap_vectors = overlap_vectors
        self.missing_vectors = missing_vectors
        self.stats = WeightStats() if matrix is None else matrix.stats
        self.extra_source_ids = np.zeros(0, dtype=np.int64) if matrix is None else matrix.extra_source_ids
        self._counted = 0  # dense: the rows whose weight statistics are counted so far
        if matrix is not None:
            self._positions = torch.from_numpy(matrix.positions)
            self._weights = torch.from_numpy(matrix.weights)

    @property
    def dense(self) -> bool:
        return self.matrix is None

    @property
    def width(self) -> int:
        """Source rows mixed per new token."""
        return self.plan.overlap.count if self.matrix is None else self.matrix.width

    def neighbours_and_weights(self, start: int, stop: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(positions or None for dense, fp32 weights) of missing tokens [start, stop), asked in
        row order. The dense form computes its weights here, and counts their statistics on the
        first pass over the rows only (every rebuilt tensor of a side asks for the same weights)."""
        if self.matrix is not None:
            return self._positions[start:stop], self._weights[start:stop]
        sims = dense_similarities(self.overlap_vectors, self.missing_vectors[start:stop])
        weights, stats = mixing_weights(sims, self.plan.options.weighting, self.plan.options.temperature)
        if start == self._counted:
            self.stats.add(stats)
            self._counted = stop
        return None, weights


def search_mixings(plan: TransferPlan, progress: ProgressFactory, result: TransferResult, backend: ComputeBackend) -> dict[str, Mixing]:
    """Each side's mixing, found from the helper (opened here, for the search only) and the
    source tokenizer, on one core fewer while the background copies run."""
    source_rows = plan.source_rows

    def pieces(ids: np.ndarray) -> list[list[int]]:
        return source_pieces(plan.source_vocab, plan.target_vocab, ids, source_rows)

    with leave_a_core_for_copies(), Checkpoint(plan.helper) if plan.helper is not None else nullcontext() as helper:
        return find_mixings(plan, pieces, helper, progress, result, backend)


def recorded_mixings(plan: TransferPlan, matrices: dict[str, MixingMatrix]) -> dict[str, Mixing]:
    """Each side's mixing as a transfer record holds it (apply) or extend turned it into: no
    helper, no search. The output side shares the input's where the record has one mixing."""
    mixings = {side: Mixing(plan, matrix) for side, matrix in matrices.items()}
    mixings.setdefault("output", mixings["input"])
    return mixings


def find_mixings(plan: TransferPlan, source_vocab_pieces, helper: Checkpoint | None, progress: ProgressFactory, result: TransferResult, backend: ComputeBackend) -> dict[str, Mixing]:
    """Each side's mixing (plan.sides: the input's, and the output's where it differs), made by its
    registered method from what it needs: the new tokens' pieces under the source tokenizer
    (`source_vocab_pieces(missing ids)`), the helper's vectors. The output side shares the input's
    Mixing where they are the same."""
    methods = {side: plan.method_for(side) for side in plan.sides}
    pieces = None
    if any(m.needs_pieces for m in methods.values()):
        with progress("source pieces", int(plan.overlap.missing_ids.size)) as advance:
            pieces = source_vocab_pieces(plan.overlap.missing_ids)  # one batch encode: the bar fills when it ends
            advance(len(pieces))
    helper_rows = overlap_vectors = missing_vectors = None
    if any(m.needs_helper for m in methods.values()):
        helper_rows, overlap_vectors, missing_vectors = _helper_vectors(plan, helper, result)
    reached("search")  # test hook (stage_hooks.py): a no-op unless CLPSURGERY_PAUSE_AT names it

    def search(queries: torch.Tensor, k: int, on_chunk=None) -> Neighbours:
        return backend.search_top_k(overlap_vectors, queries, k, on_chunk=on_chunk)

    mixings = {}
    for side, method in methods.items():
        inputs = MixingInputs(
            side=side, options=plan.options, neighbours=plan.neighbours,
            overlap_target_ids=plan.overlap.target_ids, overlap_source_ids=plan.overlap.source_ids, missing_ids=plan.overlap.missing_ids,
            pieces=pieces, helper_rows=helper_rows, overlap_vectors=overlap_vectors, missing_vectors=missing_vectors,
            search=search, progress=progress,
        )
        mixings[side] = Mixing(plan, method.make(inputs), overlap_vectors, missing_vectors)
    text_maps = [m for m in plan.maps if m.text is not None]
    if text_maps:
        at = np.searchsorted(plan.overlap.missing_ids, [m.target_id for m in text_maps])
        for side, mixing in mixings.items():
            mixings[side] = Mixing(plan, with_rows(mixing.matrix, at, [list(m.pieces) for m in text_maps], plan.overlap.source_ids))
    mixings.setdefault("output", mixings["input"])
    return mixings


def _helper_vectors(plan: TransferPlan, helper: Checkpoint, result: TransferResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The helper's rows in fp32 (as stored, checked finite), and the overlap's and the missing
    tokens' normalised vectors. One fp32 copy serves the finiteness check, the normalised vectors
    and OMP's raw vectors."""
    overlap = plan.overlap
    # Ids past the helper's own (source special tokens the output keeps, which copy the source's
    # rows) have no helper vector: zero, so never a neighbour by positive similarity.
    stored = min(plan.target_size, plan.helper.info(plan.helper_embedding).shape[0])
    helper_rows = as_tensor(helper.read_rows(plan.helper_embedding, 0, stored)).to(torch.float32)
    finite = torch.isfinite(helper_rows).all(dim=1)
    if not finite.all():
        bad = int((~finite).nonzero()[0])
        raise SurgeryError(plan.helper_path, f"helper embedding {plan.helper_embedding!r} has NaN or Inf in row {bad}")
    vectors, result.zero_helper_rows = normalise_rows(helper_rows)
    if stored < plan.target_size:
        pad = torch.zeros(plan.target_size - stored, helper_rows.shape[1])
        helper_rows, vectors = torch.cat([helper_rows, pad]), torch.cat([vectors, pad])
    return helper_rows, vectors[torch.from_numpy(overlap.target_ids)], vectors[torch.from_numpy(overlap.missing_ids)]


def read_source_rows(plan: TransferPlan, source: Checkpoint, name: str, source_ids: np.ndarray) -> torch.Tensor:
    """The source rows of a rebuilt tensor that the target copies or mixes, checked finite."""
    return _checked_finite(plan, name, source_ids, source.gather_rows(name, source_ids))


def _checked_finite(plan: TransferPlan, name: str, source_ids: np.ndarray, stored: StoredRows) -> torch.Tensor:
    """Stored rows as a tensor, after checking them finite (from their bits, no conversion)."""
    finite = stored.finite_rows()
    if not finite.all():
        source_id = int(source_ids[int(np.flatnonzero(~finite)[0])])
        raise SurgeryError(plan.source_path, f"tensor {name!r} has NaN or Inf in row {source_id}, which the target copies or mixes")
    return as_tensor(stored)


@dataclass(frozen=True)
class HeldRows:
    """Which source rows the write stage holds for one rebuilt tensor, and where each row goes.

    Rows copied to their own id (every source row of an extension) are not held: each block
    reads them from the file, one range where they are contiguous. The others copied, and the
    rows the mixing combines, are held once each, sorted by source id; the dense form holds the
    whole overlap in its order, since its weights run over the overlap's positions."""

    source_ids: np.ndarray  # the rows read and held
    copy_at: np.ndarray  # per target row: the held row it copies, -1 where none
    own_row: np.ndarray  # per target row: copied from the same source row, read block by block
    position_at: np.ndarray | None  # the mixing's positions -> held rows (None: the same)

    @classmethod
    def of(cls, plan: TransferPlan, mixing: Mixing) -> HeldRows:
        overlap = plan.overlap
        copy_at = np.full(plan.target_size, -1, dtype=np.int64)
        own_row = np.zeros(plan.target_size, dtype=bool)
        space = np.concatenate([overlap.source_ids, mixing.extra_source_ids])  # what positions index
        if mixing.dense:
            copy_at[overlap.target_ids] = np.arange(overlap.count)
            return cls(space, copy_at, own_row, None)
        same = overlap.target_ids == overlap.source_ids
        own_row[overlap.target_ids[same]] = True
        used = space[np.unique(mixing.matrix.positions)] if mixing.matrix.positions.size else space[:0]
        held = np.unique(np.concatenate([overlap.source_ids[~same], used]))
        copy_at[overlap.target_ids[~same]] = np.searchsorted(held, overlap.source_ids[~same])
        # positions no row uses may point past the held rows: clipped, never read
        position_at = np.minimum(np.searchsorted(held, space), max(0, held.size - 1))
        return cls(held, copy_at, own_row, position_at)


def own_rows(plan: TransferPlan, source: Checkpoint, name: str, ids: np.ndarray) -> torch.Tensor:
    """Source rows `ids` (sorted) of a tensor read for one block: one range when contiguous."""
    if ids.size and int(ids[-1]) - int(ids[0]) + 1 == ids.size:
        stored = source.read_rows(name, int(ids[0]), int(ids[-1]) + 1)
    else:
        stored = source.gather_rows(name, ids)
    return _checked_finite(plan, name, ids, stored)


class RebuiltRows:
    """The rebuilt tensors' row blocks as the write stage streams them, for one output: the source
    they read, the backend that combines, the clock that times both.

    For each tensor (`blocks`) the held source rows (HeldRows) are read when the first block is
    asked for and dropped after the last, so only one rebuilt tensor's rows are held at a time.
    A block is either rows copied to their own id, read straight from the file (`_own_block`), or
    a mixed block: rows copied from the held rows and new rows combined (`_mixed_block`).
    """

    def __init__(self, plan: TransferPlan, source: Checkpoint, backend: ComputeBackend, clock: StageClock) -> None:
        self.plan, self.source, self.backend, self.clock = plan, source, backend, clock
        self.missing_position = np.full(plan.target_size, -1, dtype=np.int64)
        self.missing_position[plan.overlap.missing_ids] = np.arange(plan.overlap.missing_ids.size)

    def blocks(self, tensor: RebuiltTensor, mixing: Mixing) -> Iterator[torch.Tensor]:
        """Row blocks of one rebuilt tensor: overlap rows copied, the others mixed, in row order;
        then its vocab padding rows."""
        plan = self.plan
        held = HeldRows.of(plan, mixing)
        info = self.source.info(tensor.source_name)
        with self.clock.stage("read"):
            held_rows = read_source_rows(plan, self.source, tensor.source_name, held.source_ids)
        dtype, row_shape = held_rows.dtype, tuple(info.shape[1:])
        width = math.prod(row_shape)
        held_2d = held_rows.reshape(held_rows.shape[0], width)
        mixing_rows, budget = self._rows_for_combine(held_2d, mixing)
        position_at = None if held.position_at is None else torch.from_numpy(held.position_at)
        sums = _RowSums(width, fill_from_copies=not plan.overlap.missing_ids.size and plan.output_rows > plan.target_size)
        rows_per_block = memory.block_rows(budget, plan.target_size, width, mixing.width, plan.overlap.count, mixing.dense)
        for start, stop in row_blocks(plan.target_size, rows_per_block):
            own_block = bool(held.own_row[start:stop].all())  # rows copied as they are: straight from the file
            if own_block:
                block = self._own_block(tensor, start, stop, width, sums)
            else:
                block = self._mixed_block(tensor, mixing, held, held_2d, mixing_rows, position_at, start, stop, width, dtype, sums)
            yield block.reshape(stop - start, *row_shape)
            if not own_block:
                reached("combine")  # test hook
        padding = plan.output_rows - plan.target_size
        if padding:
            # Rows past the tokenizer's ids (vocab padded for speed) are never looked up as inputs,
            # but a head scores them: the mean of the combined rows keeps them unremarkable.
            fill = sums.mean(plan.overlap.missing_ids.size, plan.overlap.count)
            yield fill.to(dtype).expand(padding, width).reshape(padding, *row_shape).contiguous()

    def _rows_for_combine(self, held_2d: torch.Tensor, mixing: Mixing) -> tuple[torch.Tensor | ColumnBlocks, int]:
        """The held rows as the combine reads them, and the block budget left. On the CPU they are
        converted to fp32 once (in column blocks for the top-k combine) when that takes at most
        half the block budget: converting them per block costs more than the combine itself."""
        budget = self.plan.block_budget
        if self.backend.gpu:
            return self.backend.rows_for_combine(held_2d), budget  # on the GPU, in the source dtype
        if held_2d.numel() * 4 > budget // 2:
            return held_2d, budget
        if not mixing.dense:
            rows = ColumnBlocks.of(held_2d)
            return rows, budget - rows.nbytes
        rows = held_2d.to(torch.float32)
        return rows, budget - (rows.numel() * 4 if rows.dtype != held_2d.dtype else 0)

    def _own_block(self, tensor: RebuiltTensor, start: int, stop: int, width: int, sums: _RowSums) -> torch.Tensor:
        with self.clock.stage("read"):
            block = own_rows(self.plan, self.source, tensor.source_name, np.arange(start, stop)).reshape(stop - start, width)
        sums.add_copied(block)
        return block

    def _mixed_block(self, tensor: RebuiltTensor, mixing: Mixing, held: HeldRows, held_2d: torch.Tensor, mixing_rows, position_at,
                     start: int, stop: int, width: int, dtype: torch.dtype, sums: _RowSums) -> torch.Tensor:
        block = torch.empty((stop - start, width), dtype=dtype)
        own = held.own_row[start:stop]
        if own.any():
            with self.clock.stage("read"):
                block[torch.from_numpy(own)] = own_rows(self.plan, self.source, tensor.source_name, np.flatnonzero(own) + start).reshape(-1, width)
        copied = held.copy_at[start:stop]
        is_copied = torch.from_numpy(copied >= 0)
        block[is_copied] = held_2d[torch.from_numpy(copied[copied >= 0])]
        sums.add_copied(block[is_copied | torch.from_numpy(own)])
        mixed = self.missing_position[start:stop]
        if (mixed >= 0).any():
            first, last = int(mixed[mixed >= 0][0]), int(mixed[mixed >= 0][-1]) + 1
            with self.clock.stage("combine"):
                positions, weights = mixing.neighbours_and_weights(first, last)
                if positions is None:
                    rows = self.backend.combine_dense(mixing_rows, weights, dtype, memory.DENSE_CHUNK_ROWS)
                else:
                    rows = self.backend.combine_top_k(mixing_rows, position_at[positions], weights, dtype)
            block[torch.from_numpy(mixed >= 0)] = rows
            sums.add_mixed(rows)
        return block


class _RowSums:
    """The float64 sums of a tensor's mixed rows (and, when nothing is mixed, of its copied rows),
    for the vocab padding rows' fill."""

    def __init__(self, width: int, fill_from_copies: bool) -> None:
        self.mixed = torch.zeros(width, dtype=torch.float64)
        self.copied = torch.zeros(width, dtype=torch.float64) if fill_from_copies else None

    def add_mixed(self, rows: torch.Tensor) -> None:
        self.mixed += rows.to(torch.float64).sum(dim=0)

    def add_copied(self, rows: torch.Tensor) -> None:
        if self.copied is not None:
            self.copied += rows.to(torch.float64).sum(dim=0)

    def mean(self, mixed_count: int, copied_count: int) -> torch.Tensor:
        return self.mixed / mixed_count if mixed_count else self.copied / max(1, copied_count)


@contextmanager
def leave_a_core_for_copies() -> Iterator[None]:
    """Compute on one core fewer while the background copy runs.

    The kernel's copy keeps a core busy; OpenMP threads (torch, FAISS) that spin on every core
    beside it slow both down (docs/design.md, pipelining).
    """
    cores = os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    try:
        import faiss
    except ImportError:
        faiss = None
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else None
    compute = max(1, min(torch_threads, cores - 1))
    torch.set_num_threads(compute)
    if faiss is not None:
        faiss.omp_set_num_threads(max(1, min(faiss_threads, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)
