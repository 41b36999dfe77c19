"""mixing.overrides: rows set by hand (`--map TARGET=text:...`) replace some rows of any method's
mixing matrix with the mean of given source rows; the other rows make what they made before.

The matrices are real (a clp search over random helper vectors); the pieces are German words'
under the real GPT-2 tokenizer; the rows are computed here in float64 over a random embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpsurgery.mixing.clp import clp_matrix
from clpsurgery.mixing.fvt import fvt_mixing
from clpsurgery.mixing.neighbours import normalise_rows, search_top_k
from clpsurgery.mixing.overrides import with_rows
from conftest import matrix_rows, matrix_source_ids

SOURCE_ROWS, WIDTH, OVERLAP, MISSING = 50257, 5, 300, 9


@pytest.fixture(scope="module")
def setting():
    """(overlap source ids, source embedding, a factory of clp matrices with k neighbours)."""
    rng = np.random.default_rng(3)
    overlap_source_ids = rng.choice(SOURCE_ROWS, OVERLAP, replace=False).astype(np.int64)
    source = rng.standard_normal((SOURCE_ROWS, WIDTH))
    vectors, _ = normalise_rows(torch.from_numpy(rng.standard_normal((OVERLAP + MISSING, 8)).astype(np.float32)))

    def clp(k: int):
        return clp_matrix(search_top_k(vectors[:OVERLAP], vectors[OVERLAP:], k), "clp", 0.1)

    return overlap_source_ids, source, clp


def pieces_of(tokenizer, *texts: str) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def test_no_rows_to_set_is_the_matrix_itself(setting):
    overlap_source_ids, _, clp = setting
    matrix = clp(4)
    assert with_rows(matrix, np.zeros(0, dtype=np.int64), [], overlap_source_ids) is matrix


@pytest.mark.parametrize("k", [2, 8], ids=["override-wider", "matrix-wider"])
def test_set_rows_are_their_pieces_mean_and_the_others_unchanged(setting, gpt2_tokenizer, k):
    overlap_source_ids, source, clp = setting
    matrix = clp(k)
    pieces = pieces_of(gpt2_tokenizer, " Straßenbahn", " Haus")
    assert len(pieces[0]) > 2 and len(pieces[0]) < 8  # wider than k=2, narrower than k=8
    at = np.array([6, 1], dtype=np.int64)
    out = with_rows(matrix, at, pieces, overlap_source_ids)

    assert out.width == max(k, len(pieces[0]))
    assert np.array_equal(out.extra_source_ids, np.unique(np.concatenate(pieces)))  # every piece lies outside this overlap
    assert not set(out.extra_source_ids.tolist()) & set(overlap_source_ids.tolist())
    got, before = matrix_rows(out, overlap_source_ids, source), matrix_rows(matrix, overlap_source_ids, source)
    for row, token_pieces in zip(at, pieces):
        np.testing.assert_allclose(got[row], source[token_pieces].mean(axis=0), rtol=1e-6, atol=1e-7)
    kept = np.setdiff1d(np.arange(MISSING), at)
    np.testing.assert_allclose(got[kept], before[kept], rtol=0, atol=1e-15)
    # the kept rows name the same source rows with the same weights; the padding weighs nothing
    assert np.array_equal(matrix_source_ids(out, overlap_source_ids)[kept, :k], matrix_source_ids(matrix, overlap_source_ids)[kept])
    assert np.array_equal(out.weights[kept, :k], matrix.weights[kept]) and not out.weights[kept, k:].any()
    assert out.stats is matrix.stats


def test_pieces_in_the_overlap_point_at_overlap_rows_and_extras_are_merged(gpt2_tokenizer):
    """A matrix that has extra source rows of its own (fvt's) keeps them, merged with the
    override's; a piece the overlap copies is read from the overlap row."""
    haus, comma = pieces_of(gpt2_tokenizer, " Haus", ",")
    overlap_source_ids = np.array([comma[0], 198, 262], dtype=np.int64)
    source = np.random.default_rng(5).standard_normal((SOURCE_ROWS, WIDTH))
    matrix = fvt_mixing(pieces_of(gpt2_tokenizer, " Wetter", " Garten", " Schule"), overlap_source_ids)
    override = [haus + comma]
    out = with_rows(matrix, np.array([1]), override, overlap_source_ids)
    assert np.array_equal(out.extra_source_ids, np.union1d(matrix.extra_source_ids, haus))
    assert out.positions[1, len(haus)] == 0  # the comma: overlap position 0
    got, before = matrix_rows(out, overlap_source_ids, source), matrix_rows(matrix, overlap_source_ids, source)
    np.testing.assert_allclose(got[1], source[override[0]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got[[0, 2]], before[[0, 2]], rtol=0, atol=1e-15)
