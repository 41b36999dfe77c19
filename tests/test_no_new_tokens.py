"""A transfer with no new token (issue 26, item 2): a target tokenizer the source already covers,
or `extend --max-new-tokens 0`. Every method and every command writes the output, every row copied
from the source, and says so in one note line; the record (empty mixing matrices) replays it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.replay import TRANSFER_NAME
from clpsurgery.pipeline.verify import verify_output

from conftest import apply_reproduces

NOTE = "note: no new tokens: every target token is in the source, so every row is copied from it"
METHODS = {
    "clp+fvt": [],  # the default
    "clp": ["--method", "clp", "--weighting", "clp"],
    "softmax": ["--method", "clp", "--weighting", "softmax"],
    "dense": ["--method", "clp", "--top-k", "all"],
    "omp": ["--method", "omp"],
    "fvt": ["--method", "fvt"],
}


def run(args: list, capsys) -> list[str]:
    """Run the CLI in this process; its stderr lines (the test fails on a non-zero exit)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        pytest.fail(f"{args[0]} exited with {e.code}: {capsys.readouterr().err}")
    return capsys.readouterr().err.splitlines()


def tensors_of(folder: Path) -> dict[str, bytes]:
    with Checkpoint.open(folder) as checkpoint:
        return {name: bytes(checkpoint.raw_bytes(name)) for name in checkpoint.tensors}


def assert_a_copy_of_the_source(out: Path, source: Path) -> None:
    """Every tensor the source's, byte for byte; the checks of verify pass; the model class loads it
    and gives finite logits."""
    transformers = pytest.importorskip("transformers")
    assert tensors_of(out) == tensors_of(source)
    checks = verify_output(out, source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(**tokenizer("The schools will open again next week.", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_init_with_the_source_as_helper(method, gpt2_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["init", "--quiet", *METHODS[method], gpt2_source, gpt2_source, out], capsys) == [NOTE]
    assert json.loads((out / "clpsurgery.json").read_text())["vocabulary"]["missing"] == 0
    assert_a_copy_of_the_source(out, gpt2_source)
    if method == "dense":  # the dense form keeps no weights, with or without new tokens
        assert not (out / TRANSFER_NAME).exists()
        return
    capsys.readouterr()
    assert apply_reproduces(out, gpt2_source, tmp_path / "again")
    assert capsys.readouterr().err.splitlines() == [NOTE]


def test_init_an_untied_source_with_its_own_head_method(llama_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["init", "--quiet", "--head-method", "fvt", llama_source, llama_source, out], capsys) == [NOTE]
    assert_a_copy_of_the_source(out, llama_source)
    assert apply_reproduces(out, llama_source, tmp_path / "again")


@pytest.mark.parametrize("method", ["clp+fvt", "fvt"])
def test_extend_with_a_helper_the_source_covers(method, gpt2_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["extend", "--quiet", *METHODS[method], gpt2_source, gpt2_source, out], capsys) == [NOTE]
    assert json.loads((out / "clpsurgery.json").read_text())["extension"]["new_tokens"] == 0
    assert_a_copy_of_the_source(out, gpt2_source)
    assert apply_reproduces(out, gpt2_source, tmp_path / "again")


def test_extend_with_max_new_tokens_0(gpt2_source, german_helper, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["extend", "--quiet", "--max-new-tokens", "0", gpt2_source, german_helper, out], capsys) == [NOTE]
    assert json.loads((out / "clpsurgery.json").read_text())["extension"]["new_tokens"] == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert_a_copy_of_the_source(out, gpt2_source)
    assert apply_reproduces(out, gpt2_source, tmp_path / "again")


def test_inspect_against_the_source_itself(gpt2_source, capsys):
    """inspect --against says what init would do: nothing to combine, for every method."""
    for method in METHODS.values():
        main(["inspect", "--json", *method, str(gpt2_source), "--against", str(gpt2_source)])
        captured = capsys.readouterr()
        assert captured.err == "" and json.loads(captured.out)["overlap"]["exact"]["missing"] == 0
