"""FVT (Fast Vocabulary Transfer, Gee et al. 2022), helper-free: a new token's row is the mean of
the source rows of its pieces under the source tokenizer. Pieces in, row ids and weights out.

The pieces may also be weighted by position, apart for the two sides of the vocabulary: a word is
read by its end (the input row leans on the last piece) and predicted by its start (the output row
leans on the first), as tokensurgeon's `first_last` and AdaptiVocab do."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.weights import WeightStats

if TYPE_CHECKING:
    from clpsurgery.mixing.registry import MixingInputs


def piece_weights(count: int, weighting: str, side: str) -> np.ndarray:
    """The weights of a token's `count` pieces, in order, summing to one (float64).

    mean: alike. first-last: all on the last piece for the input side, the first for the output
    side. linear: 1..n towards that piece, normalised.
    """
    if weighting == "mean" or count == 1:
        return np.full(count, 1.0 / count)
    if weighting == "first-last":
        weights = np.zeros(count)
        weights[-1 if side == "input" else 0] = 1.0
        return weights
    if weighting == "linear":
        ramp = np.arange(1, count + 1, dtype=np.float64)
        ramp = ramp if side == "input" else ramp[::-1]
        return ramp / ramp.sum()
    raise ValueError(f"unknown piece weighting {weighting!r}")


def fvt_mixing(pieces: list[list[int]], overlap_source_ids: np.ndarray, weighting: str = "mean", side: str = "input") -> MixingMatrix:
    """Each token's pieces weighted (piece_weights), as positions into [overlap rows, then extra
    source rows]."""
    width = max(1, max((len(p) for p in pieces), default=1))
    used = np.unique(np.fromiter((i for p in pieces for i in p), dtype=np.int64)) if pieces else np.zeros(0, np.int64)
    overlap_ids, first_position = np.unique(overlap_source_ids, return_index=True)
    extra = np.setdiff1d(used, overlap_ids)
    lookup = dict(zip(overlap_ids.tolist(), first_position.tolist()))
    lookup.update({int(s): len(overlap_source_ids) + i for i, s in enumerate(extra.tolist())})
    positions = np.zeros((len(pieces), width), dtype=np.int64)
    weights = np.zeros((len(pieces), width), dtype=np.float32)
    empty = 0
    for row, token_pieces in enumerate(pieces):
        if not token_pieces:
            empty += 1
            continue
        positions[row, : len(token_pieces)] = [lookup[i] for i in token_pieces]
        positions[row, len(token_pieces) :] = positions[row, 0]
        weights[row, : len(token_pieces)] = piece_weights(len(token_pieces), weighting, side)
    # empty_rows: tokens with no piece (all weights zero: a zero row)
    stats = WeightStats(rows=len(pieces), empty_rows=empty, max_abs_weight=float(weights.max(initial=0.0)))
    return MixingMatrix(positions, weights, stats, extra)


def mix(inputs: MixingInputs) -> MixingMatrix:
    """FVT's mixing for one side: each new token's pieces under the source tokenizer."""
    return fvt_mixing(inputs.pieces, inputs.overlap_source_ids, inputs.options.piece_weighting, inputs.side)
