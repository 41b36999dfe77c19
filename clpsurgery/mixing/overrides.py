"""Rows set by hand (`--map TARGET=text:...`): some new tokens' rows replaced by the mean of given
source rows, in a mixing matrix whatever method made the others."""

from __future__ import annotations

import numpy as np

from clpsurgery.mixing.fvt import fvt_mixing
from clpsurgery.mixing.matrix import MixingMatrix


def with_rows(matrix: MixingMatrix, at: np.ndarray, pieces: list[list[int]], overlap_source_ids: np.ndarray) -> MixingMatrix:
    """`matrix` with the rows at positions `at` (into the missing list) made the mean of `pieces`'
    source rows; both widened to the wider of the two, extra source rows merged."""
    if not len(at):
        return matrix
    override = fvt_mixing(pieces, overlap_source_ids)
    count = len(overlap_source_ids)
    extra = np.union1d(matrix.extra_source_ids, override.extra_source_ids).astype(np.int64)
    width = max(matrix.width, override.width)

    def widened(m: MixingMatrix) -> tuple[np.ndarray, np.ndarray]:
        positions = m.positions.copy()
        beyond = positions >= count
        positions[beyond] = count + np.searchsorted(extra, m.extra_source_ids[positions[beyond] - count])
        pad = width - m.width
        positions = np.concatenate([positions, np.repeat(positions[:, :1], pad, axis=1)], axis=1)
        weights = np.concatenate([m.weights, np.zeros((len(m.weights), pad), dtype=np.float32)], axis=1)
        return positions, weights

    positions, weights = widened(matrix)
    new_positions, new_weights = widened(override)
    positions[at], weights[at] = new_positions, new_weights
    return MixingMatrix(positions, weights, matrix.stats, extra)
