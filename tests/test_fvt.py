"""FVT (mixing/fvt.py, vocab/pieces.py): helper-free, each new row the mean of the source rows of
the token's pieces under the real source tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clpsurgery.mixing.fvt import fvt_mixing

from conftest import copy_tokenizer_only


def test_positions_point_at_overlap_rows_then_extra_rows():
    overlap_source_ids = np.array([7, 3, 9, 3])  # 3 serves two target ids: its first position
    result = fvt_mixing([[3, 11], [5], [], [9, 5, 3]], overlap_source_ids)
    assert result.extra_source_ids.tolist() == [5, 11]
    assert result.positions.tolist() == [[1, 5, 1], [4, 4, 4], [0, 0, 0], [2, 4, 1]]
    assert np.allclose(result.weights, [[0.5, 0.5, 0], [1, 0, 0], [0, 0, 0], [1 / 3] * 3])
    assert result.stats.empty_rows == 1 and result.stats.rows == 4


def test_init_method_fvt_needs_only_the_target_tokenizer(gpt2_source, german_helper, tmp_path):
    """HELPER holds only tokenizer files: `init --method fvt` writes every new row as the mean of
    the source rows of its pieces under the real GPT-2 tokenizer, and verify passes."""
    from tokenizers import Tokenizer

    from clpsurgery.cli import main
    from clpsurgery.formats.checkpoint import Checkpoint
    from clpsurgery.pipeline.manifest import decode_pairs
    from clpsurgery.pipeline.tensor_io import as_tensor
    from clpsurgery.pipeline.verify import verify_output
    from clpsurgery.vocab.vocabulary import load_vocabulary

    tokenizer_only = copy_tokenizer_only(german_helper, tmp_path / "german-tokenizer")
    out = tmp_path / "out"
    main(["init", "--quiet", "--method", "fvt", str(gpt2_source), str(tokenizer_only), str(out)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["options"]["method"] == "fvt" and manifest["inputs"]["helper"]["files"] == []
    assert all(c.ok for c in verify_output(out, gpt2_source))
    target_ids, source_ids = decode_pairs(manifest["overlap_pairs"])
    source_tok = Tokenizer.from_file(str(gpt2_source / "tokenizer.json"))
    target = load_vocabulary(tokenizer_only)
    tokens = target.id_to_token()
    with Checkpoint.open(out) as written_ckpt, Checkpoint.open(gpt2_source) as source_ckpt:
        written = as_tensor(written_ckpt.read_tensor("transformer.wte.weight")).double().numpy()
        src = as_tensor(source_ckpt.read_tensor("transformer.wte.weight")).double().numpy()
    assert np.array_equal(written[target_ids], src[source_ids])
    missing = np.setdiff1d(np.arange(written.shape[0]), target_ids)
    checked = 0
    for m in missing.tolist():
        text = target.meaning(tokens[m], m).decode("utf-8", errors="strict")
        pieces = source_tok.encode(text, add_special_tokens=False).ids
        assert pieces, tokens[m]
        assert written[m] == pytest.approx(src[pieces].mean(axis=0), rel=1e-4, abs=1e-5)
        checked += 1
    assert checked == missing.size > 100
    assert manifest["weights"]["empty_rows"] == 0


def test_fvt_source_without_tokenizer_json_is_one_line(tmp_path, gpt2_source, german_helper):
    """The source's pieces need its tokenizer.json: without one, one line naming it."""
    import subprocess
    import sys

    source = tmp_path / "source"
    shutil.copytree(gpt2_source, source)
    data = json.loads((source / "tokenizer.json").read_text())
    (source / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]) + "\n")
    (source / "tokenizer.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", "init", "--quiet", "--method", "fvt", str(source), str(german_helper), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
