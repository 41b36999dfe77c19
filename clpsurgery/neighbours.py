"""Neighbour search in the helper's embedding space: FAISS top-k, or the whole overlap (dense)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Neighbours:
    """For each missing token, k overlap positions and their cosine similarities (best first)."""

    positions: np.ndarray  # [missing, k] int64, positions into the overlap
    similarities: np.ndarray  # [missing, k] float32


def normalise_rows(vectors: torch.Tensor) -> tuple[torch.Tensor, int]:
    """L2-normalised fp32 rows, and how many rows were all zero (they stay zero)."""
    vectors = vectors.to(torch.float32)
    norms = vectors.norm(dim=1, keepdim=True)
    zero_rows = int((norms == 0).sum())
    return vectors / torch.where(norms == 0, torch.ones_like(norms), norms), zero_rows


def search_top_k(
    overlap_vectors: torch.Tensor,
    query_vectors: torch.Tensor,
    k: int,
    chunk_rows: int = 8192,
    on_chunk: Callable[[int], None] | None = None,
) -> Neighbours:
    """Exact top-k by inner product over normalised vectors with a FAISS flat index."""
    import faiss  # imported late: a big library, needed only for the search

    k = min(k, overlap_vectors.shape[0])
    base = np.ascontiguousarray(overlap_vectors.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    queries = np.ascontiguousarray(query_vectors.numpy(), dtype=np.float32)
    positions = np.empty((queries.shape[0], k), dtype=np.int64)
    similarities = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk_rows):
        stop = min(start + chunk_rows, queries.shape[0])
        similarities[start:stop], positions[start:stop] = index.search(queries[start:stop], k)
        if on_chunk:
            on_chunk(stop - start)
    return Neighbours(positions, similarities)


def dense_similarities(overlap_vectors: torch.Tensor, query_vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query to every overlap vector: [queries, overlap] fp32."""
    return query_vectors @ overlap_vectors.T
