"""The CPU neighbour search (blocked products and topk, ComputeBackend.search_top_k) against
FAISS's flat index path it replaced (neighbours.search_top_k) and a float64 reference: the same
neighbour ids and similarity bits, ties to the lower position, on 1 and 2 threads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from clpsurgery.mixing.backend import ComputeBackend, exact_top_k
from clpsurgery.mixing.neighbours import Neighbours, normalise_rows, search_top_k
from conftest import anisotropic_helper_embedding


def reference(overlap: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by the similarity as defined (neighbours.rescore: fp32 products summed in
    float64), plainly in float64, ties to the lower position (reference.reference_clp's choice)."""
    exact = (queries[:, None, :] * overlap[None, :, :]).double().sum(dim=-1).numpy()
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(exact, order, 1)


def assert_best_in_float64(overlap: torch.Tensor, queries: torch.Tensor, found) -> None:
    """Against float64 products throughout (clpsurgery.mixing.reference): the found neighbours
    score the k best float64 cosines, to 1e-6 (two neighbours may swap within that)."""
    exact = (queries.double() @ overlap.double().T).numpy()
    best = -np.sort(-exact, axis=1)[:, : found.positions.shape[1]]
    assert np.allclose(np.take_along_axis(exact, found.positions, 1), best, rtol=0, atol=1e-6)
    assert np.allclose(found.similarities, best, rtol=0, atol=1e-6)


def tied_vectors(overlap_rows: int, query_rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic overlap and queries (as trained embeddings), with exact ties built in: 24 copies
    of one overlap vector (more than k + the rescoring margin, so they tie across the last
    candidate), queries on that vector, and an all-zero query (every score ties at 0)."""
    vectors = normalise_rows(anisotropic_helper_embedding(overlap_rows + query_rows, width, seed=11))[0]
    overlap, queries = vectors[:overlap_rows].clone(), vectors[overlap_rows:].clone()
    overlap[torch.arange(3, overlap_rows, overlap_rows // 24)[:24]] = overlap[1].clone()
    queries[0] = overlap[1]
    queries[1] = normalise_rows(overlap[1:2] + 0.01 * queries[2:3])[0][0]
    queries[2] = 0.0
    return overlap, queries


def cpu_search(overlap: torch.Tensor, queries: torch.Tensor, k: int):
    """The CPU's blocked top-k, as the engine runs it where FAISS's OpenBLAS is held to another
    kernel (OPENBLAS_CORETYPE set: only the choice reads it, not the products)."""
    engine = ComputeBackend("cpu", 1 << 28)
    previous = os.environ.get("OPENBLAS_CORETYPE")
    os.environ["OPENBLAS_CORETYPE"] = "Prescott"
    try:
        found = engine.search_top_k(overlap, queries, k)
    finally:
        if previous is None:
            del os.environ["OPENBLAS_CORETYPE"]
        else:
            os.environ["OPENBLAS_CORETYPE"] = previous
    return found, engine.describe()


def test_the_cpu_search_is_faiss_unless_its_openblas_is_held_to_another_kernel(monkeypatch):
    """faiss-cpu is the default; where OPENBLAS_CORETYPE forces faiss's bundled OpenBLAS to a
    kernel (2.6x slower, docs/search.md) the blocked top-k runs, with a note saying why; the same
    neighbours either way."""
    plain = normalise_rows(anisotropic_helper_embedding(400, 64, seed=13))[0]
    overlap, queries = plain[:300], plain[300:]
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    engine = ComputeBackend("cpu", 1 << 28)
    default = engine.search_top_k(overlap, queries, 5)
    assert engine.describe()["search"] == "faiss-cpu" and "notes" not in engine.describe()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    engine = ComputeBackend("cpu", 1 << 28)
    blocked = engine.search_top_k(overlap, queries, 5)
    described = engine.describe()
    assert described["search"] == "torch-topk-cpu" and "OPENBLAS_CORETYPE=Haswell" in described["notes"][0]
    assert np.array_equal(default.positions, blocked.positions) and np.array_equal(default.similarities, blocked.similarities)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 5, 160])  # 160: above half the overlap of 300
def test_cpu_search_equals_faiss_path_and_float64_reference(k, threads):
    plain = normalise_rows(anisotropic_helper_embedding(700, 64, seed=12))[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for overlap, queries, tied in ((plain[:300], plain[300:], False), (*tied_vectors(300, 400, 64), True)):
            found, described = cpu_search(overlap, queries, k)
            faiss_found = search_top_k(overlap, queries, k)
            expected, similarities = reference(overlap, queries, k)
            assert described["search"] == "torch-topk-cpu"
            assert np.array_equal(found.positions, expected)
            assert np.array_equal(found.similarities, similarities.astype(np.float32))
            assert_best_in_float64(overlap, queries, found)
            if tied:
                # FAISS's heap keeps later copies where more equal scores than its k + 4
                # candidates straddle the last one (row 81 at k = 5): the reference decides.
                assert found.positions[2].tolist() == list(range(k)), "a zero query's scores all tie: the first k positions"
                same = (faiss_found.positions == expected).all(axis=1)
                found = Neighbours(found.positions[same], found.similarities[same])
                faiss_found = Neighbours(faiss_found.positions[same], faiss_found.similarities[same])
            assert np.array_equal(found.positions, faiss_found.positions), "not the FAISS path's neighbours"
            assert np.array_equal(found.similarities.view(np.int32), faiss_found.similarities.view(np.int32)), "not the FAISS path's similarity bits"
    finally:
        torch.set_num_threads(before)


def test_ties_across_the_last_candidate_go_to_the_lower_positions():
    """More equal scores than candidates (k + 4): topk's pick among them was arbitrary (it kept
    copies 34, 106, ... of vector 7 rather than 7, 10, 16, ...); the lower positions now, in every
    chunking, as FAISS's scan and the float64 reference choose."""
    g = torch.Generator().manual_seed(3)
    overlap = normalise_rows(torch.randn(200, 8, generator=g))[0]
    overlap[torch.arange(10, 200, 6)] = overlap[7].clone()  # 32 copies of row 7
    queries = torch.stack([overlap[7], torch.zeros(8)])
    expected, _ = reference(overlap, queries, 5)
    assert expected.tolist() == [[7, 10, 16, 22, 28], [0, 1, 2, 3, 4]]
    for overlap_rows in (None, 16, 9, 13):
        for query_rows in (None, 1):
            found = exact_top_k(overlap, queries, 5, overlap_rows=overlap_rows, query_rows=query_rows)
            assert np.array_equal(found.positions, expected), (overlap_rows, query_rows)
    assert np.array_equal(search_top_k(overlap, queries, 5).positions, expected)


def test_overlap_smaller_than_k_and_empty_queries():
    overlap, queries = tied_vectors(48, 20, 16)
    small = overlap[:4]
    found, _ = cpu_search(small, queries, 5)  # all of the overlap, best first
    assert found.positions.shape == found.similarities.shape == (20, 4)
    assert np.array_equal(found.positions, reference(small, queries, 4)[0])
    assert np.array_equal(found.positions, search_top_k(small, queries, 5).positions)
    for k in (1, 5):
        empty, _ = cpu_search(overlap, queries[:0], k)  # init with no new token searches nothing
        assert empty.positions.shape == empty.similarities.shape == (0, k)
        assert empty.positions.dtype == np.int64 and empty.similarities.dtype == np.float32


def test_search_threads_asked_per_chunk_change_nothing_but_the_threads(monkeypatch):
    """The search takes the threads `search_threads()` gives before each query chunk (one while
    the copies run, both after): the neighbours are the same bits whatever it answers."""
    overlap, queries = tied_vectors(300, 700, 32)
    plain, _ = cpu_search(overlap, queries, 5)
    asked, seen = [], []
    engine = ComputeBackend("cpu", 1 << 28)

    def threads():
        asked.append(1 + len(asked) % 2)
        return asked[-1]

    engine.search_threads = threads
    before = torch.get_num_threads()
    try:
        found = exact_top_k(overlap, queries, 5, query_rows=100, on_chunk=lambda rows: seen.append(torch.get_num_threads()), threads=threads)
        monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")  # the engine's blocked path (FAISS's takes no hook)
        via_engine = engine.search_top_k(overlap, queries, 5)
    finally:
        torch.set_num_threads(before)
    assert seen == asked[:7] == [1, 2, 1, 2, 1, 2, 1]
    assert len(asked) > 7, "the engine asked too"
    for other in (found, via_engine):
        assert np.array_equal(other.positions, plain.positions) and np.array_equal(other.similarities, plain.similarities)
