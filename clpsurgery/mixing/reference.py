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
