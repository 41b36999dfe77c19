"""Two methods' rows blended: `clp+fvt` writes each new row as share * clp's + (1 - share) * fvt's.

CLP's rows know what a token means in the helper's space but come out short (a mean of a few
neighbours), so through an output head they under-predict new tokens; FVT's rows (the token's own
pieces) over-predict them. A blend of the two mixing matrices is itself a mixing matrix: both
rows' source positions side by side, their weights scaled by the shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.weights import WeightStats

if TYPE_CHECKING:
    from clpsurgery.mixing.registry import MixingInputs


def _rebase(matrix: MixingMatrix, overlap_count: int, extra: np.ndarray) -> np.ndarray:
    """Positions of `matrix` against a new list of extra source rows (`extra`, sorted, holding the matrix's own)."""
    positions = matrix.positions.copy()
    beyond = positions >= overlap_count
    if beyond.any():
        source_ids = matrix.extra_source_ids[positions[beyond] - overlap_count]
        positions[beyond] = overlap_count + np.searchsorted(extra, source_ids)
    return positions


def blend(first: MixingMatrix, second: MixingMatrix, share: float, overlap_count: int) -> MixingMatrix:
    """share * first + (1 - share) * second, row by row; a row one of them leaves empty (all
    weights zero: fvt's token with no piece) takes the other whole."""
    extra = np.union1d(first.extra_source_ids, second.extra_source_ids).astype(np.int64)
    positions = np.concatenate([_rebase(first, overlap_count, extra), _rebase(second, overlap_count, extra)], axis=1)
    a = first.weights.astype(np.float64)
    b = second.weights.astype(np.float64)
    a_empty = ~a.any(axis=1, keepdims=True)
    b_empty = ~b.any(axis=1, keepdims=True)
    share_a = np.where(b_empty, 1.0, np.where(a_empty, 0.0, share))
    weights = np.concatenate([a * share_a, b * (1.0 - share_a)], axis=1).astype(np.float32)
    stats = WeightStats()
    stats.add(first.stats)
    stats.add(second.stats)
    stats.rows = int(weights.shape[0])
    stats.empty_rows = int((a_empty & b_empty).sum())
    stats.max_abs_weight = float(np.abs(weights).max(initial=0.0))
    return MixingMatrix(positions, weights, stats, extra)


def mix(inputs: MixingInputs) -> MixingMatrix:
    """clp+fvt: --blend of clp's row (top-k neighbours), the rest fvt's (the token's pieces)."""
    from clpsurgery.mixing import clp, fvt

    neighbours = clp.mix(inputs)
    pieces = fvt.mix(inputs)
    if neighbours is None:  # the options refuse --top-k all for a blend; kept whole for safety
        return pieces
    return blend(neighbours, pieces, inputs.options.blend, int(inputs.overlap_source_ids.size))
