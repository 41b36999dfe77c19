"""What every method of initialisation produces: a sparse mixing matrix over source rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clpsurgery.mixing.weights import WeightStats


@dataclass(frozen=True)
class MixingMatrix:
    """For each new token (by position in the missing list), source row positions and their
    weights. A position below the overlap's size is an overlap row; past it, one of
    `extra_source_ids` (source rows the overlap does not copy, read beside it)."""

    positions: np.ndarray  # [missing, width] int64; unused slots repeat a position with weight 0
    weights: np.ndarray  # [missing, width] float32
    stats: WeightStats
    extra_source_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def width(self) -> int:
        return int(self.weights.shape[1])
