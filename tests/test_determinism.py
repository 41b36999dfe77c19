"""Two runs on the same inputs write the same bytes, whatever the thread count.

What used to differ, and why it no longer does:
- FAISS scores candidates with BLAS in fp32, and its rounding changed with the thread count: the
  similarities, hence the weights, hence the rows, differed in the last bits. Its best k + 4
  candidates are now scored again exactly (neighbours.rescore).
- MKL splits small matrix products (5 to 11 rows here) differently with 1 or 2 threads: the dense
  form's last row block could differ. clpsurgery turns on MKL's strict reproducible mode
  (MKL_CBWR=AUTO,STRICT, set on import).
- torch splits a long reduction with a single output across threads: the weights of a block of
  one row. Such a block is reduced on one thread (weights._one_thread_for_one_row).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import clpsurgery  # noqa: F401  (sets MKL_CBWR before the first matrix product)
from clpsurgery.mixing.weights import mixing_weights


def hashes(folder: Path) -> dict[str, str]:
    """Every output file's SHA-256, the manifest's list of them included (its timings are not)."""
    result = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "clpsurgery.json"}
    manifest = json.loads((folder / "clpsurgery.json").read_text())
    result["manifest outputs"] = json.dumps(manifest["outputs"])
    result["manifest weights"] = json.dumps(manifest["weights"])
    return result


def init_with_threads(source: Path, helper: Path, out: Path, threads: int, *options: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-m", "clpsurgery", "init", "--quiet", *options, str(source), str(helper), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return hashes(out)


@pytest.fixture(scope="module")
def wide_helper(german_helper, tmp_path_factory) -> Path:
    """The German helper with a 128-wide embedding: at the fixture's width of 16, FAISS happens to
    give the same bits with 1 and 2 threads; at 128 it does not (without the rescoring)."""
    from clpsurgery.formats.writer import write_file
    from clpsurgery.pipeline.tensor_io import planned_from_tensor
    from conftest import anisotropic_helper_embedding

    folder = tmp_path_factory.mktemp("wide-helper")
    for side in german_helper.iterdir():
        if side.suffix == ".json" and side.name != "model.safetensors.index.json":
            (folder / side.name).write_bytes(side.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    embedding = anisotropic_helper_embedding(config["vocab_size"], 128, seed=5)
    write_file(folder / "model.safetensors", [planned_from_tensor("transformer.wte.weight", embedding)])
    return folder


@pytest.mark.parametrize("options", [("--method", "clp", "--top-k", "10", "--weighting", "clp"), ("--method", "clp", "--top-k", "all", "--weighting", "clp")], ids=["top-k", "dense"])
def test_same_bytes_with_one_or_two_threads(options, gpt2_source, wide_helper, tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        one, two = pool.map(lambda t: init_with_threads(gpt2_source, wide_helper, tmp_path / f"threads-{t}", t, *options), (1, 2))
    assert one == two


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="environment: torch has no MKL here, and MKL_CBWR is an MKL setting")
def test_small_matrix_products_do_not_depend_on_the_thread_count():
    assert "MKL_CBWR" in os.environ
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for rows in (5, 7, 9, 11):
            a, b = torch.randn(rows, 2276, generator=g), torch.randn(2276, 64, generator=g)
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append((a @ b).numpy().tobytes())
            assert len(set(results)) == 1, rows
    finally:
        torch.set_num_threads(threads)


def test_weights_of_a_lone_row_equal_those_of_the_same_row_in_a_block():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(3, 100_000, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for scheme in ("clp", "clp-clipped", "softmax", "sparsemax"):
            block, _ = mixing_weights(sims, scheme)
            alone, _ = mixing_weights(sims[:1], scheme)
            assert torch.equal(block[:1], alone), scheme
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
