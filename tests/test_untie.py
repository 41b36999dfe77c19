"""An untied output head and the output side's own mixing (issue 15): `--untie-head` writes a tied
source's head as a tensor of its own, `--head-method` makes its new rows by another method, and
`--piece-weighting` weights fvt's pieces by position, apart for the input and the output side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.mixing.fvt import piece_weights
from clpsurgery.pipeline.manifest import decode_pairs
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output
from clpsurgery.vocab.vocabulary import load_vocabulary

from conftest import Env, shard


def tensor(folder, name) -> np.ndarray:
    with Checkpoint.open(folder) as ckpt:
        return as_tensor(ckpt.read_tensor(name)).double().numpy()


def first_pieces(source, helper, ids: np.ndarray) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    target = load_vocabulary(helper)
    tokens = target.id_to_token()
    return [tok.encode(target.meaning(tokens[i], i).decode("utf-8"), add_special_tokens=False).ids for i in ids.tolist()]


@pytest.mark.parametrize(
    ("weighting", "side", "expected"),
    [
        ("mean", "input", [1 / 3, 1 / 3, 1 / 3]),
        ("mean", "output", [1 / 3, 1 / 3, 1 / 3]),
        ("first-last", "input", [0, 0, 1]),
        ("first-last", "output", [1, 0, 0]),
        ("linear", "input", [1 / 6, 2 / 6, 3 / 6]),
        ("linear", "output", [3 / 6, 2 / 6, 1 / 6]),
    ],
)
def test_piece_weights_lean_on_the_last_piece_for_input_and_the_first_for_output(weighting, side, expected):
    assert piece_weights(3, weighting, side) == pytest.approx(expected)
    assert piece_weights(1, weighting, side) == pytest.approx([1.0])


@pytest.fixture(scope="module")
def plain_and_untied(gpt2_source, german_helper, tmp_path_factory):
    """The tied GPT-2 source converted twice: as it is, and with --untie-head --head-method fvt
    --piece-weighting first-last."""
    base = tmp_path_factory.mktemp("untie")
    plain, untied = base / "plain", base / "untied"
    main(["init", "--quiet", "--method", "clp", str(gpt2_source), str(german_helper), str(plain)])
    main(["init", "--quiet", "--method", "clp", "--untie-head", "--head-method", "fvt", "--piece-weighting", "first-last", str(gpt2_source), str(german_helper), str(untied)])
    return plain, untied


def test_untie_head_writes_a_head_of_its_own(plain_and_untied, gpt2_source, german_helper):
    """The embedding is the plain run's byte for byte; lm_head.weight holds the source rows of the
    shared tokens and, for each new token, the source row of its first piece; the config unties."""
    plain, untied = plain_and_untied
    manifest = json.loads((untied / "clpsurgery.json").read_text())
    assert manifest["tensors"]["rebuilt_from"] == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest["tensors"]["output_side"] == ["lm_head.weight"] and manifest["tensors"]["untied_head"] is True
    assert manifest["head_weights"]["method"] == "fvt" and manifest["head_weights"]["rows"] == manifest["vocabulary"]["missing"]
    config = json.loads((untied / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert manifest["config_changes"]["config.json"]["tie_word_embeddings"] == {"source": True, "target": False}
    embedding = tensor(untied, "transformer.wte.weight")
    assert np.array_equal(embedding, tensor(plain, "transformer.wte.weight"))
    head = tensor(untied, "lm_head.weight")
    source = tensor(gpt2_source, "transformer.wte.weight")
    target_ids, source_ids = decode_pairs(manifest["overlap_pairs"])
    assert np.array_equal(head[target_ids], source[source_ids])
    missing = np.setdiff1d(np.arange(head.shape[0]), target_ids)
    pieces = first_pieces(gpt2_source, german_helper, missing)
    assert all(pieces)
    assert np.array_equal(head[missing], source[[p[0] for p in pieces]])
    assert not np.array_equal(head[missing], embedding[missing])
    checks = verify_output(untied, gpt2_source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]
    assert any(c.what == "overlap rows lm_head.weight" and c.ok for c in checks)


def test_untied_output_loads_and_runs_in_transformers(plain_and_untied):
    """transformers reads tie_word_embeddings false and keeps the two tensors apart: the logits are
    the last hidden state times the written head, not the embedding."""
    transformers = pytest.importorskip("transformers")
    _, untied = plain_and_untied
    model = transformers.AutoModelForCausalLM.from_pretrained(str(untied)).eval()
    head = torch.from_numpy(tensor(untied, "lm_head.weight")).float()
    assert torch.equal(model.lm_head.weight.detach(), head)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[0, 5, 300, 1000]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(out.logits, out.hidden_states[-1] @ head.T, atol=1e-5)


def test_head_method_on_an_untied_source(llama_source, german_helper, tmp_path):
    """An untied source needs no --untie-head: --head-method fvt makes the head's new rows the mean
    of their pieces' head rows, the embedding's stay clp's."""
    plain, out = tmp_path / "plain", tmp_path / "out"
    main(["init", "--quiet", "--method", "clp", str(llama_source), str(german_helper), str(plain)])
    main(["init", "--quiet", "--method", "clp", "--head-method", "fvt", "--untie-head", str(llama_source), str(german_helper), str(out)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["tensors"]["untied_head"] is False and manifest["tensors"]["rebuilt_from"] == {}
    assert "tie_word_embeddings" not in manifest["config_changes"]["config.json"]
    assert np.array_equal(tensor(out, "model.embed_tokens.weight"), tensor(plain, "model.embed_tokens.weight"))
    head, source_head = tensor(out, "lm_head.weight"), tensor(llama_source, "lm_head.weight")
    target_ids, _ = decode_pairs(manifest["overlap_pairs"])
    missing = np.setdiff1d(np.arange(head.shape[0]), target_ids)
    pieces = first_pieces(llama_source, german_helper, missing)
    expected = np.stack([source_head[p].astype(np.float32).mean(axis=0) for p in pieces])
    # bf16 rows: the mean in fp32, rounded once to bf16 (within one bf16 step of it)
    assert np.allclose(head[missing], expected, rtol=2**-7, atol=1e-6)
    assert not np.allclose(head[missing], tensor(plain, "lm_head.weight")[missing], rtol=2**-7, atol=1e-6)
    assert all(c.ok is not False for c in verify_output(out, llama_source))


def test_untie_head_on_a_sharded_source(gpt2_source, german_helper, tmp_path):
    """The added head goes into the embedding's shard, and the index names it there."""
    folder = Env(tmp_path / "env", gpt2_source, gpt2_source).src()
    shard(folder)
    out = tmp_path / "out"
    main(["init", "--quiet", "--untie-head", str(folder), str(german_helper), str(out)])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["transformer.wte.weight"]
    total = 0
    for name in set(index["weight_map"].values()):
        with Checkpoint.open(out / name) as ckpt:
            total += sum(ckpt.info(t).nbytes for t in ckpt.tensors)
    assert index["metadata"]["total_size"] == total
    assert np.array_equal(tensor(out, "lm_head.weight"), tensor(out, "transformer.wte.weight"))  # same method both sides
    assert all(c.ok is not False for c in verify_output(out, folder))


def one_line_error(args, tmp_path) -> str:
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", *args], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_head_method_needs_an_untied_head(gpt2_source, german_helper, tmp_path):
    out = tmp_path / "out"
    err = one_line_error(["init", "--quiet", "--head-method", "fvt", str(gpt2_source), str(german_helper), str(out)], tmp_path)
    assert "--head-method" in err and "--untie-head" in err
    assert not out.exists()


def test_inspect_against_shows_the_output_side(gpt2_source, german_helper):
    from click.testing import CliRunner

    from clpsurgery.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(gpt2_source), "--against", str(german_helper), "--untie-head", "--head-method", "fvt", "--piece-weighting", "first-last"])
    assert result.exit_code == 0, result.output
    assert "untie        lm_head.weight added" in result.output
    assert "output side  lm_head.weight: new rows by fvt: each new token its first piece" in result.output
    report = CliRunner().invoke(cli, ["inspect", "--json", str(gpt2_source), "--against", str(german_helper), "--untie-head"])
    assert json.loads(report.output)["would_write"]["rebuilt_tensors"]["lm_head.weight"] == [json.loads(report.output)["would_write"]["vocab_size"], 32]


def test_untie_head_refused_where_the_model_ties_in_code(tmp_path, gpt2_source, german_helper):
    """MPT has no separate head in its code: one line, nothing written."""
    source = tmp_path / "mpt"
    shutil.copytree(gpt2_source, source)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "mpt"
    (source / "config.json").write_text(json.dumps(config))
    err = one_line_error(["init", "--quiet", "--untie-head", str(source), str(german_helper), str(tmp_path / "out")], tmp_path)
    assert "--untie-head" in err and "mpt" in err
    assert not (tmp_path / "out").exists()


def test_blend_is_the_share_of_clp_and_fvt_rows(llama_source, german_helper, tmp_path):
    """clp+fvt: each new row is share * clp's row + (1 - share) * fvt's (float64 reference from the
    two methods' own outputs); on an untied source it can serve the head alone."""
    runs = {}
    for name, options in (("clp", ["--method", "clp"]), ("fvt", ["--method", "fvt"]), ("blend", ["--method", "clp+fvt", "--blend", "0.3"]),
                          ("head", ["--method", "clp", "--head-method", "clp+fvt", "--blend", "0.3"])):
        runs[name] = tmp_path / name
        main(["init", "--quiet", *options, str(llama_source), str(german_helper), str(runs[name])])
    manifest = json.loads((runs["blend"] / "clpsurgery.json").read_text())
    target_ids, _ = decode_pairs(manifest["overlap_pairs"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        clp, fvt, blended = (tensor(runs[r], name) for r in ("clp", "fvt", "blend"))
        missing = np.setdiff1d(np.arange(blended.shape[0]), target_ids)
        # bf16 outputs: each of the three rounded once, so within a few bf16 steps of the parts' sizes
        scale = 0.3 * np.abs(clp[missing]) + 0.7 * np.abs(fvt[missing]) + np.abs(blended[missing])
        assert (np.abs(blended[missing] - (0.3 * clp[missing] + 0.7 * fvt[missing])) <= 2**-7 * scale + 1e-7).all()
        assert np.array_equal(blended[target_ids], clp[target_ids])
    head_run = runs["head"]
    assert np.array_equal(tensor(head_run, "model.embed_tokens.weight"), tensor(runs["clp"], "model.embed_tokens.weight"))
    assert np.array_equal(tensor(head_run, "lm_head.weight"), tensor(runs["blend"], "lm_head.weight"))
    assert json.loads((head_run / "clpsurgery.json").read_text())["head_weights"]["method"] == "clp+fvt"
    assert all(c.ok is not False for c in verify_output(runs["blend"], llama_source))
