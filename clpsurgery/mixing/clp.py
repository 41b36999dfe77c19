"""CLP-Transfer's method (Ostendorff & Rehm, 2023): each new token mixes its nearest overlap tokens
in the helper's space, weighted by similarity under the chosen scheme."""

from __future__ import annotations

import torch

from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.neighbours import Neighbours
from clpsurgery.mixing.weights import mixing_weights


def clp_matrix(neighbours: Neighbours, scheme: str, temperature: float) -> MixingMatrix:
    """The top-k neighbours' positions, with their similarities turned into weights."""
    weights, stats = mixing_weights(torch.from_numpy(neighbours.similarities), scheme, temperature)
    return MixingMatrix(neighbours.positions, weights.numpy(), stats)
