"""OMP (mixing/omp.py) against a plain float64 OMP and against scikit-learn's; and `init --method
omp` end to end, its rows the float64 formula on the source rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clpsurgery.mixing.neighbours import Neighbours
from clpsurgery.mixing.omp import omp_block, omp_mixing
from clpsurgery.mixing.reference import reference_omp


def random_problem(seed: int, n: int = 300, d: int = 24, m: int = 40, c: int = 50):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n, d))
    targets = rng.standard_normal((m, d))
    candidates = np.stack([rng.choice(n, size=c, replace=False) for _ in range(m)])
    return atoms, targets, candidates


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_omp_equals_the_plain_float64_omp(seed, k):
    atoms, targets, candidates = random_problem(seed)
    result = omp_block(atoms, targets, candidates, k)
    assert result.positions.shape == result.coefficients.shape == (len(targets), k)
    for row in range(len(targets)):
        expected = reference_omp(atoms, targets[row], candidates[row], k)
        got: dict[int, float] = {}
        for position, coefficient in zip(result.positions[row], result.coefficients[row]):
            if coefficient != 0.0:
                got[int(position)] = got.get(int(position), 0.0) + float(coefficient)
        assert set(got) == set(expected)
        for position, coefficient in expected.items():
            assert got[position] == pytest.approx(coefficient, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("k", [2, 6])
def test_batched_omp_equals_scikit_learn(k):
    """scikit-learn's OrthogonalMatchingPursuit (no intercept) on each target's candidates."""
    from sklearn.linear_model import OrthogonalMatchingPursuit

    atoms, targets, candidates = random_problem(3)
    result = omp_block(atoms, targets, candidates, k)
    for row in range(len(targets)):
        model = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(atoms[candidates[row]].T, targets[row])
        expected = {int(candidates[row][i]): float(model.coef_[i]) for i in np.flatnonzero(model.coef_)}
        got = {int(p): float(w) for p, w in zip(result.positions[row], result.coefficients[row]) if w != 0.0}
        assert set(got) == set(expected)
        for position, coefficient in expected.items():
            assert got[position] == pytest.approx(coefficient, rel=1e-6, abs=1e-9)


def test_exact_reconstruction_stops_early_and_zero_targets_are_counted():
    """A target that is one atom exactly needs one atom; a zero target has nothing to explain and
    gets the plain mean of its nearest candidates (counted), never a NaN; dependent atoms are
    solvable (counted as singular)."""
    atoms, _, candidates = random_problem(4, m=3)
    atoms[candidates[2][1]] = atoms[candidates[2][0]] * 2.0  # two dependent atoms
    targets = np.stack([3.0 * atoms[candidates[0][5]], np.zeros(atoms.shape[1]), atoms[candidates[2][0]] + 0.5 * atoms[candidates[2][7]]])
    result = omp_block(atoms, targets, candidates, 4)
    assert result.atoms[0] == 1 and result.coefficients[0][0] == pytest.approx(3.0)
    assert result.no_atom_rows == 1 and np.allclose(result.coefficients[1], 0.25)
    assert np.isfinite(result.coefficients).all()
    rebuilt = np.einsum("k,kd->d", result.coefficients[2], atoms[result.positions[2]])
    assert rebuilt == pytest.approx(targets[2], abs=1e-6)


def test_blocks_give_the_same_result_as_one_block():
    atoms, targets, candidates = random_problem(5, m=70)
    whole = omp_block(atoms, targets, candidates, 5)
    seen = []

    def search(start: int, stop: int) -> Neighbours:
        seen.append((start, stop))
        return Neighbours(candidates[start:stop], np.zeros((stop - start, candidates.shape[1]), np.float32))

    import clpsurgery.mixing.omp as omp

    old = omp.BLOCK_BYTES
    omp.BLOCK_BYTES = 1  # one row a block
    try:
        blocked = omp_mixing(atoms, targets, 5, search)
    finally:
        omp.BLOCK_BYTES = old
    assert len(seen) == 70
    assert np.array_equal(blocked.positions, whole.positions)
    assert np.array_equal(blocked.coefficients, whole.coefficients)


def test_init_method_omp_writes_the_float64_formula(gpt2_source, german_helper, tmp_path):
    """`init --method omp`: overlap rows copied, every other row the OMP coefficients (on the
    helper's raw vectors) applied to the source rows; verify passes; the manifest records it."""
    from clpsurgery.cli import main
    from clpsurgery.formats.checkpoint import Checkpoint
    from clpsurgery.pipeline.manifest import decode_pairs
    from clpsurgery.pipeline.tensor_io import as_tensor
    from clpsurgery.pipeline.verify import verify_output

    out = tmp_path / "out"
    main(["init", "--quiet", "--method", "omp", "--top-k", "4", str(gpt2_source), str(german_helper), str(out)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["options"]["method"] == "omp"
    assert all(c.ok for c in verify_output(out, gpt2_source))
    target_ids, source_ids = decode_pairs(manifest["overlap_pairs"])
    with Checkpoint.open(out) as target, Checkpoint.open(gpt2_source) as source, Checkpoint.open(german_helper) as helper:
        name = "transformer.wte.weight"
        written = as_tensor(target.read_tensor(name)).double().numpy()
        src = as_tensor(source.read_tensor(name)).double().numpy()
        h = as_tensor(helper.read_tensor(name)).double().numpy()[: written.shape[0]]
    missing = np.setdiff1d(np.arange(written.shape[0]), target_ids)
    atoms = h[target_ids]
    rng = np.random.default_rng(0)
    for m in rng.choice(missing, size=25, replace=False):
        cos = (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)) @ (h[m] / np.linalg.norm(h[m]))
        candidates = np.argsort(-cos, kind="stable")[:32]
        expected = reference_omp(atoms, h[m], candidates, 4)
        row = sum(w * src[source_ids[p]] for p, w in expected.items())
        assert written[m] == pytest.approx(row, rel=1e-4, abs=1e-5)


def test_omp_refuses_the_dense_form_in_one_line(gpt2_source, german_helper, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "clpsurgery", "init", "--method", "omp", "--top-k", "all", str(gpt2_source), str(german_helper), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stderr == "error: --top-k: omp picks a few atoms per token: give a number, not 'all' (the dense form is --method clp's)\n"
    assert not (tmp_path / "out").exists()
