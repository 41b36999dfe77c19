"""mixing.blend: a clp+fvt row is share * clp's row + (1 - share) * fvt's, as one mixing matrix.

Both matrices are real: clp's from a FAISS search over random helper vectors, fvt's from German
words' pieces under the real GPT-2 tokenizer. The rows each matrix makes are computed here in
float64, from its own positions, weights and extra source rows, over a random source embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpsurgery.mixing.blend import blend
from clpsurgery.mixing.clp import clp_matrix
from clpsurgery.mixing.fvt import fvt_mixing
from clpsurgery.mixing.neighbours import normalise_rows, search_top_k
from conftest import matrix_rows, matrix_source_ids

WORDS = ["Bundesregierung", "Schule", "geöffnet", "Straßenbahn", "", "Wetter", "Kindergarten"]
NO_PIECES = WORDS.index("")  # the token fvt cannot split: no piece, an empty row
SOURCE_ROWS, WIDTH, HELPER_WIDTH, OVERLAP, K = 50257, 6, 12, 400, 4


@pytest.fixture(scope="module")
def parts(gpt2_tokenizer):
    """(clp, fvt, overlap source ids, source embedding in float64) for the words above."""
    rng = np.random.default_rng(0)
    pieces = [gpt2_tokenizer.encode(w, add_special_tokens=False).ids if w else [] for w in WORDS]
    # some pieces are overlap rows (positions below OVERLAP), the others extra source rows
    in_overlap = [p[0] for p in pieces if p]
    others = rng.choice(np.setdiff1d(np.arange(SOURCE_ROWS), np.concatenate([np.concatenate(pieces), in_overlap])), OVERLAP - len(in_overlap), replace=False)
    overlap_source_ids = rng.permutation(np.concatenate([in_overlap, others])).astype(np.int64)
    helper = torch.from_numpy(rng.standard_normal((OVERLAP + len(WORDS), HELPER_WIDTH)).astype(np.float32))
    vectors, _ = normalise_rows(helper)
    clp = clp_matrix(search_top_k(vectors[:OVERLAP], vectors[OVERLAP:], K), "softmax", 0.1)
    fvt = fvt_mixing(pieces, overlap_source_ids)
    source = rng.standard_normal((SOURCE_ROWS, WIDTH))
    return clp, fvt, overlap_source_ids, source


def test_the_parts_are_what_the_test_means(parts):
    clp, fvt, overlap_source_ids, _ = parts
    assert not fvt.weights[NO_PIECES].any() and clp.weights[NO_PIECES].any()
    assert len(fvt.extra_source_ids) > 0 and (fvt.positions[fvt.weights > 0] < OVERLAP).any()
    assert len(clp.extra_source_ids) == 0 and clp.width == K


@pytest.mark.parametrize("share", [0.3, 0.75])
def test_each_row_is_the_share_of_clp_and_fvt_rows(parts, share):
    clp, fvt, overlap_source_ids, source = parts
    blended = blend(clp, fvt, share, OVERLAP)
    clp_rows, fvt_rows = matrix_rows(clp, overlap_source_ids, source), matrix_rows(fvt, overlap_source_ids, source)
    expected = share * clp_rows + (1 - share) * fvt_rows
    expected[NO_PIECES] = clp_rows[NO_PIECES]  # no piece: clp's row whole, not share * clp's
    np.testing.assert_allclose(matrix_rows(blended, overlap_source_ids, source), expected, rtol=1e-6, atol=1e-6)
    assert matrix_rows(blended, overlap_source_ids, source)[NO_PIECES] == pytest.approx(clp_rows[NO_PIECES], rel=1e-6)


def test_the_two_rows_positions_side_by_side(parts):
    """The blended row holds clp's positions, then fvt's, each naming the same source rows as
    before, rebased onto the union of the extra source rows; the weights scaled by the shares."""
    clp, fvt, overlap_source_ids, _ = parts
    blended = blend(clp, fvt, 0.3, OVERLAP)
    assert blended.width == clp.width + fvt.width
    assert np.array_equal(blended.extra_source_ids, np.union1d(clp.extra_source_ids, fvt.extra_source_ids))
    ids = matrix_source_ids(blended, overlap_source_ids)
    assert np.array_equal(ids[:, : clp.width], matrix_source_ids(clp, overlap_source_ids))
    assert np.array_equal(ids[:, clp.width :], matrix_source_ids(fvt, overlap_source_ids))
    split = np.arange(len(WORDS)) != NO_PIECES
    np.testing.assert_array_equal(blended.weights[split, : clp.width], (clp.weights[split].astype(np.float64) * 0.3).astype(np.float32))
    np.testing.assert_array_equal(blended.weights[split, clp.width :], (fvt.weights[split].astype(np.float64) * 0.7).astype(np.float32))
    np.testing.assert_array_equal(blended.weights[NO_PIECES], np.concatenate([clp.weights[NO_PIECES], np.zeros(fvt.width, np.float32)]))
    assert blended.stats.rows == len(WORDS) and blended.stats.empty_rows == 0
    assert blended.stats.max_abs_weight == float(np.abs(blended.weights).max())


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_share_zero_is_fvt_and_one_is_clp(parts, share):
    """share 1: clp's weights exactly, fvt's all zero; share 0: fvt's, but a token with no piece
    still takes clp's row whole (a zero row would be no row at all)."""
    clp, fvt, overlap_source_ids, source = parts
    blended = blend(clp, fvt, share, OVERLAP)
    on_clp = blended.weights[:, : clp.width]
    on_fvt = blended.weights[:, clp.width :]
    if share == 1.0:
        assert np.array_equal(on_clp, clp.weights) and not on_fvt.any()
        expected = matrix_rows(clp, overlap_source_ids, source)
    else:
        split = np.arange(len(WORDS)) != NO_PIECES
        assert np.array_equal(on_fvt[split], fvt.weights[split]) and not on_clp[split].any()
        assert np.array_equal(on_clp[NO_PIECES], clp.weights[NO_PIECES]) and not on_fvt[NO_PIECES].any()
        expected = matrix_rows(fvt, overlap_source_ids, source)
        expected[NO_PIECES] = matrix_rows(clp, overlap_source_ids, source)[NO_PIECES]
    np.testing.assert_allclose(matrix_rows(blended, overlap_source_ids, source), expected, rtol=1e-12, atol=1e-12)


def test_either_side_empty_takes_the_other_whole_and_both_empty_is_a_zero_row(gpt2_tokenizer):
    """With fvt first and second (each with extra source rows of its own): an empty row on either
    side takes the other's whole; empty on both stays empty, and is counted."""
    overlap_source_ids = np.array([11, 13, 198, 262], dtype=np.int64)  # ",", ".", "\n", " the"
    encode = lambda w: gpt2_tokenizer.encode(w, add_special_tokens=False).ids  # noqa: E731
    first = fvt_mixing([encode(" Haus"), [], encode(" the Schule"), []], overlap_source_ids)
    second = fvt_mixing([encode(" Garten."), encode(" Wetter"), [], []], overlap_source_ids)
    assert len(first.extra_source_ids) and len(second.extra_source_ids) and set(first.extra_source_ids) != set(second.extra_source_ids)
    source = np.random.default_rng(1).standard_normal((SOURCE_ROWS, WIDTH))
    blended = blend(first, second, 0.4, len(overlap_source_ids))
    a, b = matrix_rows(first, overlap_source_ids, source), matrix_rows(second, overlap_source_ids, source)
    got = matrix_rows(blended, overlap_source_ids, source)
    np.testing.assert_allclose(got[0], 0.4 * a[0] + 0.6 * b[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], b[1], rtol=1e-6)
    np.testing.assert_allclose(got[2], a[2], rtol=1e-6)
    assert not blended.weights[3].any() and not got[3].any()
    assert blended.stats.empty_rows == 1 and blended.stats.rows == 4
