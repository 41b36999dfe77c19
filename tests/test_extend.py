"""`clpsurgery extend` (issue 16): the source's vocabulary kept, the helper's other tokens appended
to the tokenizer's model, their rows made by init's engine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.replay import TRANSFER_NAME
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output

from conftest import copy_tokenizer_only, tree_hashes

GERMAN = "Die Bundesregierung hat heute beschlossen, dass die Schulen wieder geöffnet werden."
ENGLISH = "The government decided today that the schools will open again next week."


def rows(folder, name) -> np.ndarray:
    with Checkpoint.open(folder) as ckpt:
        return as_tensor(ckpt.read_tensor(name)).numpy()


@pytest.fixture(scope="module")
def extended(gpt2_source, german_helper, tmp_path_factory):
    base = tmp_path_factory.mktemp("extend")
    out, init = base / "extended", base / "init"
    main(["extend", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    main(["init", "--quiet", str(gpt2_source), str(german_helper), str(init)])
    return out, init


def test_source_rows_kept_and_new_rows_as_init_makes_them(extended, gpt2_source):
    """Every source row byte for byte at its own id; each appended token's row is, byte for byte,
    the row init writes for the helper token it comes from."""
    out, init = extended
    manifest = json.loads((out / "clpsurgery.json").read_text())
    ext = manifest["extension"]
    start, stop = ext["new_token_ids"]["start"], ext["new_token_ids"]["stop"]
    assert start == 50257 and stop - start == ext["new_tokens"] > 100
    written, source = rows(out, "transformer.wte.weight"), rows(gpt2_source, "transformer.wte.weight")
    assert written.shape == (stop, source.shape[1])
    assert written[:start].tobytes() == source.tobytes()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == stop and config["eos_token_id"] == json.loads((gpt2_source / "config.json").read_text())["eos_token_id"]
    from clpsurgery.pipeline.extend import make_extend_plans
    from clpsurgery.pipeline.options import TransferOptions

    _, _, extension = make_extend_plans(gpt2_source, json.loads((out / "clpsurgery.json").read_text())["inputs"]["helper"]["path"], TransferOptions())
    init_rows = rows(init, "transformer.wte.weight")
    assert np.array_equal(written[start:], init_rows[list(extension.target_ids)])
    checks = verify_output(out, gpt2_source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]


def test_the_extended_model_loads_and_reads_german_with_new_tokens(extended, gpt2_source):
    transformers = pytest.importorskip("transformers")
    out, _ = extended
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    before = transformers.AutoTokenizer.from_pretrained(str(gpt2_source))
    german = tok(GERMAN)["input_ids"]
    assert len(german) < len(before(GERMAN)["input_ids"]) and max(german) >= 50257
    assert tok.decode(german) == GERMAN
    assert tok(ENGLISH)["input_ids"] == before(ENGLISH)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([german])).logits
    assert logits.shape[-1] == json.loads((out / "config.json").read_text())["vocab_size"] and torch.isfinite(logits).all()


def test_apply_replays_an_extension(extended, gpt2_source, tmp_path):
    out, _ = extended
    again = tmp_path / "again"
    main(["apply", "--quiet", str(out), str(gpt2_source), str(again)])
    ours, theirs = tree_hashes(out), tree_hashes(again)
    ours.pop("clpsurgery.json")
    theirs.pop("clpsurgery.json")
    assert ours == theirs and TRANSFER_NAME in ours


def test_extend_without_a_helper_model(gpt2_source, german_helper, tmp_path):
    """fvt needs only the target tokenizer: each new row the mean of its pieces' source rows."""
    tokenizer_only = copy_tokenizer_only(german_helper, tmp_path / "tokenizer")
    out = tmp_path / "out"
    main(["extend", "--quiet", "--method", "fvt", "--max-new-tokens", "50", str(gpt2_source), str(tokenizer_only), str(out)])
    from tokenizers import Tokenizer

    manifest = json.loads((out / "clpsurgery.json").read_text())
    start, stop = manifest["extension"]["new_token_ids"]["start"], manifest["extension"]["new_token_ids"]["stop"]
    assert 0 < stop - start <= 50 + manifest["extension"]["new_tokens"]
    written, source = rows(out, "transformer.wte.weight").astype(np.float64), rows(gpt2_source, "transformer.wte.weight").astype(np.float64)
    source_tok, extended_tok = Tokenizer.from_file(str(gpt2_source / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))
    for new_id in range(start, stop):
        text = extended_tok.decode([new_id], skip_special_tokens=False)
        pieces = source_tok.encode(text, add_special_tokens=False).ids
        assert written[new_id] == pytest.approx(source[pieces].mean(axis=0), rel=1e-4, abs=1e-5)


def one_line_error(args) -> str:
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", *args], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_extend_refusals(gpt2_source, german_helper, tmp_path):
    assert "--top-k" in one_line_error(["extend", "--quiet", "--top-k", "all", str(gpt2_source), str(german_helper), str(tmp_path / "a")])
    assert "--untie-head" in one_line_error(["extend", "--quiet", "--untie-head", str(gpt2_source), str(german_helper), str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
