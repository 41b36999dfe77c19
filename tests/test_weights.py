"""Weighting schemes, neighbour search and the CPU combine against plain float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clpsurgery.mixing.combine import COLUMN_BLOCK, ColumnBlocks, combine_dense, combine_top_k
from clpsurgery.mixing.neighbours import normalise_rows, search_top_k
from clpsurgery.mixing.weights import SCHEMES, mixing_weights, sparsemax

similarity_blocks = arrays(
    np.float64,
    st.tuples(st.integers(1, 8), st.integers(1, 12)),
    elements=st.floats(-1, 1, allow_nan=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(similarity_blocks, st.sampled_from(SCHEMES))
def test_every_scheme_gives_finite_rows_summing_to_one(sims, scheme):
    weights, stats = mixing_weights(torch.from_numpy(sims), scheme)
    assert weights.dtype == torch.float32
    assert torch.isfinite(weights).all()
    assert torch.allclose(weights.double().sum(1), torch.ones(sims.shape[0], dtype=torch.float64), atol=1e-5)
    if scheme != "clp":
        assert (weights >= 0).all()
        assert stats.signed_rows == 0


def test_clp_is_the_paper_formula_on_healthy_rows():
    sims = torch.tensor([[0.9, 0.5, -0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    weights, stats = mixing_weights(sims, "clp")
    expected = sims / sims.sum(1, keepdim=True)
    assert torch.allclose(weights.double(), expected, rtol=1e-7)
    assert stats.degenerate_rows == 0 and stats.signed_rows == 1


def test_clp_degenerate_rows_are_clipped_never_flipped():
    # Sums: negative, zero, tiny against the absolute sum, and all non-positive.
    sims = torch.tensor(
        [[-0.5, 0.2, 0.1], [0.3, -0.3, 0.0], [0.5, -0.49995, 0.0], [-0.2, -0.1, 0.0]], dtype=torch.float64
    )
    weights, stats = mixing_weights(sims, "clp")
    assert stats.degenerate_rows == 4
    assert stats.uniform_rows == 1
    assert torch.allclose(weights[0], torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert torch.allclose(weights[1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(weights[3], torch.full((3,), 1 / 3))
    assert (weights >= 0).all()


def test_softmax_temperature_and_sparsemax():
    sims = torch.tensor([[0.9, 0.8, 0.1]], dtype=torch.float64)
    sharp, _ = mixing_weights(sims, "softmax", temperature=0.01)
    soft, _ = mixing_weights(sims, "softmax", temperature=10.0)
    assert sharp[0, 0] > 0.99 and (soft - 1 / 3).abs().max() < 0.05
    # sparsemax projects onto the simplex: the far element gets exactly zero.
    assert torch.allclose(sparsemax(sims), torch.tensor([[0.55, 0.45, 0.0]], dtype=torch.float64))


def test_faiss_top_k_matches_exact_search():
    g = torch.Generator().manual_seed(0)
    overlap, _ = normalise_rows(torch.randn(500, 24, generator=g))
    queries, _ = normalise_rows(torch.randn(300, 24, generator=g))
    found = search_top_k(overlap, queries, k=7, chunk_rows=64)
    exact = (queries.double() @ overlap.double().T).numpy()
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :7]
    assert np.array_equal(found.positions, expected)
    assert np.allclose(found.similarities, np.take_along_axis(exact, expected, 1), atol=1e-6)


def test_zero_helper_vectors_stay_zero():
    vectors, zero_rows = normalise_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert zero_rows == 1
    assert torch.equal(vectors, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_against_float64(dtype):
    g = torch.Generator().manual_seed(1)
    source = torch.randn(50, 33, generator=g).to(dtype)
    positions = torch.randint(0, 50, (20, 6), generator=g)
    weights = torch.rand(20, 6, generator=g)
    expected = (weights.double().unsqueeze(2) * source.double()[positions]).sum(1)
    out = combine_top_k(source, positions, weights, dtype)
    assert out.dtype == dtype
    # One rounding step of the output dtype.
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out.double(), expected, rtol=eps, atol=eps * expected.abs().max())
    dense = torch.zeros(20, 50).scatter_add_(1, positions, weights)
    assert torch.allclose(combine_dense(source, dense, dtype).double(), expected, rtol=eps, atol=eps * expected.abs().max())


@pytest.mark.parametrize("width", [1, 33, COLUMN_BLOCK, 2 * COLUMN_BLOCK + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_blocks_give_the_same_bits(width, dtype):
    """The column-blocked combine (transfer.py's CPU path) sums each element over k in the same
    order as the plain one: the same bits, at widths below, at and across the block edge."""
    g = torch.Generator().manual_seed(width)
    source = torch.randn(70, width, generator=g).to(dtype)
    positions = torch.randint(0, 70, (25, 7), generator=g)
    weights = torch.randn(25, 7, generator=g)  # signed, as the clp scheme's can be
    blocked = ColumnBlocks.of(source)
    assert blocked.shape == (70, width) and blocked.nbytes == blocked.blocks.numel() * 4
    assert torch.equal(combine_top_k(blocked, positions, weights, dtype), combine_top_k(source.float(), positions, weights, dtype))
    assert combine_top_k(blocked, positions[:0], weights[:0], dtype).shape == (0, width)
