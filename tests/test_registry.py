"""A method of initialisation is one function and one registry entry (docs/adding-a-method.md is
written from this test): a method defined here, the plain mean of the k nearest overlap rows, runs
through init, inspect --against, verify and apply like the built-in ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from clpsurgery.cli import main
from clpsurgery.mixing.matrix import MixingMatrix
from clpsurgery.mixing.registry import Method, MixingInputs, get_method, method_names, register, unregister
from clpsurgery.mixing.weights import WeightStats

from conftest import apply_reproduces


def nearest_mean(inputs: MixingInputs) -> MixingMatrix:
    """Each new token: the plain mean of its k nearest overlap tokens' rows in the helper's space."""
    with inputs.progress("neighbour search", int(inputs.missing_ids.size)) as advance:
        neighbours = inputs.search(inputs.missing_vectors, inputs.neighbours, on_chunk=advance)
    k = neighbours.positions.shape[1]
    weights = np.full(neighbours.positions.shape, 1.0 / k, dtype=np.float32)
    return MixingMatrix(neighbours.positions, weights, WeightStats(rows=len(weights), max_abs_weight=1.0 / k))


NEAREST_MEAN = Method(
    name="nearest-mean",
    help="the plain mean of the k nearest overlap rows",
    mix=nearest_mean,
    describe=lambda options, side: f"nearest-mean: the mean of the {options['top_k']} nearest overlap rows",
)


@pytest.fixture
def registered():
    register(NEAREST_MEAN)
    yield NEAREST_MEAN
    unregister(NEAREST_MEAN.name)


def test_a_method_defined_here_runs_through_every_command(registered, gpt2_source, german_helper, tmp_path, capsys):
    out = tmp_path / "out"
    main(["init", "--quiet", "--method", "nearest-mean", "--top-k", "3", str(gpt2_source), str(german_helper), str(out)])

    # The rows: overlap rows copied, every new row the mean of 3 source rows named in the record.
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["options"]["method"] == "nearest-mean"
    with safe_open(str(out / "clpsurgery.transfer"), "pt") as record:
        positions, weights = record.get_tensor("input.positions"), record.get_tensor("input.weights")
        overlap_source_ids, missing_ids = record.get_tensor("overlap.source_ids"), record.get_tensor("missing_ids")
    assert positions.shape[1] == 3 and torch.all(weights == torch.tensor(1 / 3, dtype=torch.float32))
    with safe_open(str(gpt2_source / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        source_rows, target_rows = src.get_tensor("transformer.wte.weight"), dst.get_tensor("transformer.wte.weight")
    expected = source_rows[overlap_source_ids[positions[0]]].to(torch.float64).mean(dim=0).to(torch.float32)
    assert torch.allclose(target_rows[missing_ids[0]], expected, atol=1e-6)

    capsys.readouterr()
    main(["inspect", str(out)])
    assert "nearest-mean: the mean of the 3 nearest overlap rows" in capsys.readouterr().out
    main(["inspect", "--method", "nearest-mean", "--top-k", "3", str(gpt2_source), "--against", str(german_helper)])
    assert "nearest-mean: the mean of the 3 nearest overlap rows" in capsys.readouterr().out

    main(["verify", "--quiet", str(out), "--source", str(gpt2_source)])
    assert "PASS" in capsys.readouterr().out
    assert apply_reproduces(out, gpt2_source, tmp_path / "again")


def test_the_registry_declares_what_the_engine_asks(registered):
    assert method_names()[:4] == ("clp", "omp", "fvt", "clp+fvt") and "nearest-mean" in method_names()
    assert get_method("fvt").needs_helper is False and get_method("fvt").needs_pieces is True
    assert get_method("clp").dense_form and not get_method("omp").dense_form
    # width: the memory model's source rows per new token
    assert get_method("clp").width(5) == 5 and get_method("clp+fvt").width(5) == 5 + get_method("fvt").width(5)
    assert NEAREST_MEAN.width(7) == 7


def test_an_unregistered_method_is_one_line(gpt2_source, german_helper, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init", "--method", "nearest-mean", str(gpt2_source), str(german_helper), str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert not (tmp_path / "out").exists()
