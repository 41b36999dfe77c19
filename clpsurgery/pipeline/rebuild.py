"""The rebuilt tensors' rows: neighbours in the helper space, mixing weights, and row blocks with
the overlap rows copied and the others combined. The compute of a transfer (torch, FAISS), kept
apart from transfer.py, which imports it only once the byte copies are running.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import Checkpoint, StoredRows
from clpsurgery.formats.writer import row_blocks
from clpsurgery.mixing.backend import ComputeBackend
from clpsurgery.mixing.blend import blend
from clpsurgery.mixing.choices import PIECE_METHODS
from clpsurgery.mixing.clp import clp_matrix
from clpsurgery.mixing.combine import ColumnBlocks
from clpsurgery.mixing.fvt import fvt_mixing
from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.neighbours import Neighbours, dense_similarities, normalise_rows
from clpsurgery.mixing.omp import candidate_count, omp_mixing
from clpsurgery.mixing.overrides import with_rows
from clpsurgery.mixing.weights import WeightStats, mixing_weights
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.plan import RebuiltTensor, TransferPlan
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.stage_hooks import reached

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

    def neighbours_and_weights(self, start: int, stop: int, record: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(positions or None for dense, fp32 weights) of missing tokens [start, stop)."""
        if self.matrix is not None:
            return self._positions[start:stop], self._weights[start:stop]
        sims = dense_similarities(self.overlap_vectors, self.missing_vectors[start:stop])
        weights, stats = mixing_weights(sims, self.plan.options.weighting, self.plan.options.temperature)
        if record:
            self.stats.add(stats)
        return None, weights


def find_mixings(plan: TransferPlan, source_vocab_pieces, helper: Checkpoint | None, progress: ProgressFactory, result: TransferResult, backend: ComputeBackend) -> dict[str, Mixing]:
    """Each side's mixing (plan.sides: the input's, and the output's where it differs): fvt from
    the pieces under the source tokenizer (`source_vocab_pieces(missing ids)`), clp and omp from
    the helper's vectors. The output side shares the input's Mixing where they are the same."""
    methods = {side: plan.side_method(side) for side in plan.sides}
    pieces = None
    if set(methods.values()) & set(PIECE_METHODS):
        with progress("source pieces", int(plan.overlap.missing_ids.size)):
            pieces = source_vocab_pieces(plan.overlap.missing_ids)
    vectors = None
    if any(m != "fvt" for m in methods.values()):
        vectors = _helper_vectors(plan, helper, result)
    reached("search")  # test hook (stage_hooks.py): a no-op unless CLPSURGERY_PAUSE_AT names it
    mixings = {}
    for side, method in methods.items():
        if method == "fvt":
            mixings[side] = Mixing(plan, fvt_mixing(pieces, plan.overlap.source_ids, plan.options.piece_weighting, side))
        elif method == "clp+fvt":
            clp = _helper_mixing(plan, side, vectors, progress, backend).matrix
            fvt = fvt_mixing(pieces, plan.overlap.source_ids, plan.options.piece_weighting, side)
            mixings[side] = Mixing(plan, blend(clp, fvt, plan.options.blend, plan.overlap.count) if clp is not None else fvt)
        else:
            mixings[side] = _helper_mixing(plan, side, vectors, progress, backend)
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


def _helper_mixing(plan: TransferPlan, side: str, vectors, progress: ProgressFactory, backend: ComputeBackend) -> Mixing:
    """One side's clp or omp mixing from the helper's vectors."""
    helper_rows, overlap_vectors, missing_vectors = vectors
    overlap = plan.overlap
    k = plan.k_for(side) - (memory.FVT_PIECES if plan.side_method(side) == "clp+fvt" else 0)  # the helper's part
    if plan.side_method(side) == "omp" and overlap.missing_ids.size:
        raw = helper_rows.numpy()  # OMP rebuilds the helper's vectors as they are, norms included
        candidates = candidate_count(k, overlap.count)

        def search(start: int, stop: int) -> Neighbours:
            return backend.search_top_k(overlap_vectors, missing_vectors[start:stop], candidates)

        with progress("orthogonal matching pursuit", int(overlap.missing_ids.size)) as advance:
            pursuit = omp_mixing(raw[overlap.target_ids], raw[overlap.missing_ids], k, search, on_rows=advance)
        return Mixing(plan, pursuit.matrix())
    if not plan.dense_for(side) and overlap.missing_ids.size:
        with progress("neighbour search", int(overlap.missing_ids.size)) as advance:
            neighbours = backend.search_top_k(overlap_vectors, missing_vectors, k, on_chunk=advance)
        return Mixing(plan, clp_matrix(neighbours, plan.options.weighting, plan.options.temperature))
    return Mixing(plan, None, overlap_vectors, missing_vectors)


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


def rebuilt_rows(plan: TransferPlan, source: Checkpoint, mixing: Mixing, tensor: RebuiltTensor, record: bool, clock: StageClock, backend: ComputeBackend) -> Iterator[torch.Tensor]:
    """Row blocks of one rebuilt tensor: overlap rows copied, the others mixed, in row order.

    The held source rows (HeldRows) are read when the first block is asked for and dropped after
    the last, so only one rebuilt tensor's rows are held at a time; rows copied to their own id
    are read block by block.
    """
    overlap = plan.overlap
    held = HeldRows.of(plan, mixing)
    info = source.info(tensor.source_name)
    with clock.stage("read"):
        source_held_rows = read_source_rows(plan, source, tensor.source_name, held.source_ids)
    dtype = source_held_rows.dtype
    row_shape = tuple(info.shape[1:])
    width = math.prod(row_shape)
    source_2d = source_held_rows.reshape(source_held_rows.shape[0], width)
    budget = plan.block_budget
    position_at = None if held.position_at is None else torch.from_numpy(held.position_at)
    # The held rows in fp32 once (in column blocks for the top-k combine), when that takes at
    # most half the block budget: converting them per block costs more than the combine itself.
    if backend.gpu:
        mixing_rows = backend.rows_for_combine(source_2d)  # on the GPU, in the source dtype
    elif source_2d.numel() * 4 <= budget // 2:
        if not mixing.dense:
            mixing_rows = ColumnBlocks.of(source_2d)
            budget -= mixing_rows.nbytes
        else:
            mixing_rows = source_2d.to(torch.float32)
            budget -= mixing_rows.numel() * 4 if mixing_rows.dtype != source_2d.dtype else 0
    else:
        mixing_rows = source_2d
    missing_position = np.full(plan.target_size, -1, dtype=np.int64)
    missing_position[overlap.missing_ids] = np.arange(overlap.missing_ids.size)
    mixed_sum = torch.zeros(width, dtype=torch.float64)
    # with nothing mixed, vocab padding takes the copied rows' mean
    copied_sum = torch.zeros(width, dtype=torch.float64) if not overlap.missing_ids.size and plan.output_rows > plan.target_size else None
    for start, stop in row_blocks(plan.target_size, memory.block_rows(budget, plan.target_size, width, mixing.width, plan.overlap.count, mixing.dense)):
        own = held.own_row[start:stop]
        if own.all():  # a block of rows copied as they are: straight from the file
            with clock.stage("read"):
                block = own_rows(plan, source, tensor.source_name, np.arange(start, stop)).reshape(stop - start, width)
            if copied_sum is not None:
                copied_sum += block.to(torch.float64).sum(dim=0)
            yield block.reshape(stop - start, *row_shape)
            continue
        block = torch.empty((stop - start, width), dtype=dtype)
        if own.any():
            with clock.stage("read"):
                block[torch.from_numpy(own)] = own_rows(plan, source, tensor.source_name, np.flatnonzero(own) + start).reshape(-1, width)
        copied = held.copy_at[start:stop]
        is_copied = torch.from_numpy(copied >= 0)
        block[is_copied] = source_2d[torch.from_numpy(copied[copied >= 0])]
        if copied_sum is not None:
            copied_sum += block[is_copied | torch.from_numpy(own)].to(torch.float64).sum(dim=0)
        mixed = missing_position[start:stop]
        if (mixed >= 0).any():
            first, last = int(mixed[mixed >= 0][0]), int(mixed[mixed >= 0][-1]) + 1
            with clock.stage("combine"):
                positions, weights = mixing.neighbours_and_weights(first, last, record)
                if positions is None:
                    rows = backend.combine_dense(mixing_rows, weights, dtype, memory.DENSE_CHUNK_ROWS)
                else:
                    rows = backend.combine_top_k(mixing_rows, position_at[positions], weights, dtype)
            block[torch.from_numpy(mixed >= 0)] = rows
            mixed_sum += rows.to(torch.float64).sum(dim=0)
        yield block.reshape(stop - start, *row_shape)
        reached("combine")  # test hook
    padding = plan.output_rows - plan.target_size
    if padding:
        # Rows past the tokenizer's ids (vocab padded for speed) are never looked up as inputs,
        # but a head scores them: the mean of the combined rows keeps them unremarkable.
        fill = mixed_sum / overlap.missing_ids.size if overlap.missing_ids.size else copied_sum / max(1, overlap.count)
        yield fill.to(dtype).expand(padding, width).reshape(padding, *row_shape).contiguous()


@contextmanager
def leave_a_core_for_copies() -> Iterator[None]:
    """Compute on one core fewer while the background copy runs.

    The kernel's copy keeps a core busy; OpenMP threads (torch, FAISS) that spin on every core
    beside it slow both down (README, 7B section).
    """
    cores = os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    faiss = sys.modules.get("faiss")  # loaded only by a GPU search now: not imported for the CPU's
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
