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


# FAISS (and the GPU's matrix products) score candidates in fp32 with a summation order that
# depends on the thread count and the device; each query's best k + RESCORE_MARGIN are scored
# again by `rescore` (fp32 products, rounded the same way everywhere, summed in fp64: any
# summation order gives the same fp32 result but for a sum within ~1e-13 of a rounding
# boundary) and the best k kept, ties to the lower position. So the neighbours and similarities
# are the same whatever the thread count, the CPU type or the device.
RESCORE_MARGIN = 4
# Gathered candidate rows per rescoring step: 2 MiB stays in a core's cache (docs/design.md, the combine).
RESCORE_BYTES = 2 * 1024 * 1024
NO_CANDIDATE = torch.iinfo(torch.int64).max


def search_top_k(
    overlap_vectors: torch.Tensor,
    query_vectors: torch.Tensor,
    k: int,
    chunk_rows: int = 8192,
    on_chunk: Callable[[int], None] | None = None,
    make_index: Callable[[int], object] | None = None,
) -> Neighbours:
    """Exact top-k by inner product over normalised vectors: a FAISS flat index (IndexFlatIP, or
    what `make_index(width)` builds: the GPU's), then `rescore`."""
    import faiss  # imported late: a big library, needed only for the search

    k = min(k, overlap_vectors.shape[0])
    candidates = min(k + RESCORE_MARGIN, overlap_vectors.shape[0])
    base = np.ascontiguousarray(overlap_vectors.numpy(), dtype=np.float32)
    index = make_index(base.shape[1]) if make_index else faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    queries = np.ascontiguousarray(query_vectors.numpy(), dtype=np.float32)
    positions = np.empty((queries.shape[0], k), dtype=np.int64)
    similarities = np.empty((queries.shape[0], k), dtype=np.float32)
    base_t = torch.from_numpy(base)
    for start in range(0, queries.shape[0], chunk_rows):
        stop = min(start + chunk_rows, queries.shape[0])
        _, found = index.search(queries[start:stop], candidates)
        sims, picked = rescore(base_t, torch.from_numpy(queries[start:stop]), torch.from_numpy(found), k)
        similarities[start:stop], positions[start:stop] = sims.numpy(), picked.numpy()
        if on_chunk:
            on_chunk(stop - start)
    return Neighbours(positions, similarities)


def rescore(base: torch.Tensor, queries: torch.Tensor, found: torch.Tensor, k: int, step_bytes: int = RESCORE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of each query's candidates `found` ([rows, c] positions into `base`; -1 for
    none, as FAISS pads), each scored as fp32 products summed in fp64, ties to the lower
    position: (similarities fp32, positions int64), [rows, k], on the inputs' device."""
    found = torch.where(found < 0, NO_CANDIDATE, found.to(torch.int64)).sort(dim=1).values
    valid = found != NO_CANDIDATE
    picked = torch.where(valid, found, 0)
    rows, width = queries.shape[0], base.shape[1]
    scores = torch.empty(found.shape, dtype=torch.float64, device=base.device)
    step = max(1, step_bytes // max(1, found.shape[1] * width * 4))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        products = base[picked[start:stop]] * queries[start:stop, None, :]  # [step, c, width] fp32
        scores[start:stop] = torch.sum(products, dim=-1, dtype=torch.float64)
    scores.masked_fill_(~valid, -np.inf)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]  # stable: equal scores keep position order
    return scores.gather(1, order).to(torch.float32), found.gather(1, order)


def dense_similarities(overlap_vectors: torch.Tensor, query_vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query to every overlap vector: [queries, overlap] fp32."""
    return query_vectors @ overlap_vectors.T
