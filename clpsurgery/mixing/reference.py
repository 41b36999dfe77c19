"""The paper's formula, written plainly in float64: the oracle the fast path is tested against.

T[t] = S[source id of t]                      for a token t in both vocabularies
T[m] = sum_o w(m, o) S[o],  w(m, o) = cos(H[m], H[o]) / sum_o' cos(H[m], H[o'])
"""

from __future__ import annotations

import numpy as np


def reference_clp(
    source_embedding: np.ndarray,
    helper_embedding: np.ndarray,
    target_ids: np.ndarray,
    source_ids: np.ndarray,
    target_size: int,
    top_k: int | None = None,
) -> np.ndarray:
    """The target embedding by CLP-Transfer, one token at a time, in float64.

    With `top_k`, each missing token uses only its k most similar overlap tokens.
    """
    source = np.asarray(source_embedding, dtype=np.float64)
    helper = np.asarray(helper_embedding, dtype=np.float64)
    target = np.zeros((target_size, source.shape[1]), dtype=np.float64)
    overlap_of_target = dict(zip(target_ids.tolist(), source_ids.tolist()))
    overlap_helper = helper[target_ids]
    overlap_helper = overlap_helper / np.linalg.norm(overlap_helper, axis=1, keepdims=True)
    overlap_source = source[source_ids]
    for token in range(target_size):
        if token in overlap_of_target:
            target[token] = source[overlap_of_target[token]]
            continue
        query = helper[token] / np.linalg.norm(helper[token])
        cosines = overlap_helper @ query
        chosen = np.arange(cosines.size)
        if top_k is not None:
            chosen = np.argsort(-cosines, kind="stable")[:top_k]
        weights = cosines[chosen] / cosines[chosen].sum()
        target[token] = weights @ overlap_source[chosen]
    return target


def reference_omp(atoms: np.ndarray, target: np.ndarray, candidates: np.ndarray, k: int) -> dict[int, float]:
    """Orthogonal matching pursuit for one target, plainly: up to k times, take the candidate atom
    most correlated with the residual (the first of equals), refit all chosen atoms' coefficients
    by least squares, and stop once nothing correlates. Returns {atom position: coefficient}."""
    atoms = np.asarray(atoms, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    residual = y.copy()
    chosen: list[int] = []
    coefficients = np.zeros(0)
    for _ in range(min(k, len(candidates))):
        scores = [-1.0 if c in chosen else abs(float(atoms[c] @ residual)) for c in candidates]
        best = int(np.argmax(scores))
        if scores[best] <= 1e-9 * max(float(np.linalg.norm(y)), 1e-300):
            break
        chosen.append(int(candidates[best]))
        basis = atoms[chosen].T
        coefficients = np.linalg.lstsq(basis, y, rcond=None)[0]
        residual = y - basis @ coefficients
    return dict(zip(chosen, coefficients.tolist()))
