"""CLP-Transfer's method (Ostendorff & Rehm, 2023): each new token mixes its nearest overlap tokens
in the helper's space, weighted by similarity under the chosen scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.neighbours import Neighbours
from clpsurgery.mixing.weights import mixing_weights

if TYPE_CHECKING:
    from clpsurgery.mixing.registry import MixingInputs


def clp_matrix(neighbours: Neighbours, scheme: str, temperature: float) -> MixingMatrix:
    """The top-k neighbours' positions, with their similarities turned into weights."""
    weights, stats = mixing_weights(torch.from_numpy(neighbours.similarities), scheme, temperature)
    return MixingMatrix(neighbours.positions, weights.numpy(), stats)


def mix(inputs: MixingInputs) -> MixingMatrix | None:
    """The new tokens' top-k neighbours in the helper's space, weighted by similarity; None for
    --top-k all, the paper's dense form, whose weights are computed block by block as rows are written."""
    if inputs.options.top_k is None:
        return None
    with inputs.progress("neighbour search", int(inputs.missing_ids.size)) as advance:
        neighbours = inputs.search(inputs.missing_vectors, inputs.neighbours, on_chunk=advance)
    return clp_matrix(neighbours, inputs.options.weighting, inputs.options.temperature)
