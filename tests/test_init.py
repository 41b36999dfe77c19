"""`clpsurgery init` end to end on small real checkpoints with real tokenizers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.cli import main
from clpsurgery.pipeline.options import DEFAULT_TOP_K, DEFAULT_WEIGHTING
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.mixing.reference import reference_clp
from clpsurgery.mixing.weights import TINY_SUM_FRACTION
from conftest import recorded_run, tree_hashes

transformers = pytest.importorskip("transformers")

GERMAN_TEXT = "Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder lachen in der Schule."


def run_init(*args) -> None:
    """Run `clpsurgery init` in this process; fail the test on a non-zero exit."""
    try:
        main(["init", "--quiet", *map(str, args)])
    except SystemExit as e:  # pragma: no cover - only on failure
        pytest.fail(f"clpsurgery init exited with {e.code}")


def run_cli_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clpsurgery", *map(str, args)], capture_output=True, text=True, timeout=300)


def vocab_of(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def shared_tokens(source: Path, target: Path) -> list[tuple[str, int, int]]:
    """Tokens with the same string, plus special tokens paired by role (eos, bos, unk, pad)."""
    s, t = vocab_of(source), vocab_of(target)
    pairs = {t[tok]: (tok, t[tok], s[tok]) for tok in t if tok in s}
    source_config, target_config = (json.loads((f / "tokenizer_config.json").read_text()) for f in (source, target))
    for role in ("eos_token", "bos_token", "unk_token", "pad_token"):
        if source_config.get(role) and target_config.get(role) and t[target_config[role]] not in pairs:
            pairs[t[target_config[role]]] = (target_config[role], t[target_config[role]], s[source_config[role]])
    return sorted(pairs.values())


def tensor_sha(checkpoint: Checkpoint, name: str) -> str:
    return hashlib.sha256(checkpoint.raw_bytes(name)).hexdigest()


def finite_logits(model_class, folder: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = model_class.from_pretrained(folder).eval()
    ids = tokenizer(GERMAN_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    return logits


def test_gpt2_tied_end_to_end(gpt2_source, german_helper, tmp_path):
    before = tree_hashes(gpt2_source), tree_hashes(german_helper)
    out = tmp_path / "gpt2-de"
    run_init(gpt2_source, german_helper, out)
    assert (tree_hashes(gpt2_source), tree_hashes(german_helper)) == before

    target_vocab = vocab_of(german_helper)
    with Checkpoint.open(gpt2_source) as source, Checkpoint.open(out) as target:
        assert "lm_head.weight" not in target.tensors, "a tied source must stay tied"
        assert set(target.tensors) == set(source.tensors)
        emb = "transformer.wte.weight"
        assert target.info(emb).shape == (len(target_vocab), 32)
        for name in source.tensors:
            if name != emb:
                assert tensor_sha(source, name) == tensor_sha(target, name), name
        pairs = shared_tokens(gpt2_source, german_helper)
        assert len(pairs) > 300
        target_rows = as_tensor(target.gather_rows(emb, [p[1] for p in pairs]))
        source_rows = as_tensor(source.gather_rows(emb, [p[2] for p in pairs]))
        assert torch.equal(target_rows, source_rows)
        assert torch.isfinite(as_tensor(target.read_tensor(emb))).all()

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(target_vocab)
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert (out / "tokenizer.json").read_bytes() == (german_helper / "tokenizer.json").read_bytes()
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["vocabulary"]["overlap"] == len(pairs)
    assert manifest["vocabulary"]["missing"] == len(target_vocab) - len(pairs)
    assert manifest["options"]["top_k"] == DEFAULT_TOP_K and manifest["options"]["weighting"] == DEFAULT_WEIGHTING
    assert set(manifest["seconds"]) >= {"search", "read", "write"}
    assert not list(tmp_path.glob(".*clpsurgery-partial*"))

    logits = finite_logits(transformers.GPT2LMHeadModel, out)
    assert logits.shape[-1] == len(target_vocab)


def test_llama_untied_head_rebuilt(llama_source, german_helper, tmp_path):
    out = tmp_path / "llama-de"
    run_init(llama_source, german_helper, out, "--method", "clp", "--top-k", "5", "--weighting", "clp")
    pairs = shared_tokens(llama_source, german_helper)
    target_ids = np.array([p[1] for p in pairs])
    source_ids = np.array([p[2] for p in pairs])
    size = len(vocab_of(german_helper))
    with Checkpoint.open(llama_source) as source, Checkpoint.open(out) as target, Checkpoint.open(german_helper) as helper:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert target.info(name).dtype == "BF16"
            assert target.info(name).shape == (size, 32)
            assert torch.equal(as_tensor(target.gather_rows(name, target_ids)), as_tensor(source.gather_rows(name, source_ids))), name
            # Every row, overlap or not, against the float64 formula with the same neighbours.
            expected = reference_clp(
                as_tensor(source.read_tensor(name)).double().numpy(),
                as_tensor(helper.read_tensor("transformer.wte.weight")).double().numpy(),
                target_ids,
                source_ids,
                size,
                top_k=5,
            )
            written = as_tensor(target.read_tensor(name)).double().numpy()
            # bf16 output: within one rounding step (2^-8 relative) of the exact value.
            assert np.allclose(written, expected, rtol=2**-7, atol=1e-6 * np.abs(expected).max()), name
        assert not torch.equal(as_tensor(target.read_tensor("lm_head.weight")), as_tensor(target.read_tensor("model.embed_tokens.weight")))
        for name in source.tensors:
            if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                assert tensor_sha(source, name) == tensor_sha(target, name), name
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)
    assert generation["max_new_tokens"] == 20
    logits = finite_logits(transformers.LlamaForCausalLM, out)
    assert logits.shape[-1] == size


def test_dense_clp_equals_paper_formula(gpt2_source, german_helper, tmp_path):
    """--top-k all --weighting clp reproduces cos / sum(cos) over the whole overlap."""
    out = tmp_path / "dense"
    run_init(gpt2_source, german_helper, out, "--method", "clp", "--top-k", "all", "--weighting", "clp")
    pairs = shared_tokens(gpt2_source, german_helper)
    target_ids = np.array([p[1] for p in pairs])
    source_ids = np.array([p[2] for p in pairs])
    size = len(vocab_of(german_helper))
    with Checkpoint.open(gpt2_source) as source, Checkpoint.open(out) as target, Checkpoint.open(german_helper) as helper:
        helper_rows = as_tensor(helper.read_tensor("transformer.wte.weight")).double().numpy()[:size]
        expected = reference_clp(as_tensor(source.read_tensor("transformer.wte.weight")).double().numpy(), helper_rows, target_ids, source_ids, size)
        written = as_tensor(target.read_tensor("transformer.wte.weight")).double().numpy()
    assert target.info("transformer.wte.weight").dtype == "F32"
    # Rows whose similarity sum is healthy follow the formula to fp32 precision.
    unit = helper_rows / np.linalg.norm(helper_rows, axis=1, keepdims=True)
    cosines = unit @ unit[target_ids].T
    healthy = cosines.sum(1) > TINY_SUM_FRACTION * np.abs(cosines).sum(1)
    relative = np.linalg.norm(written - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert healthy.sum() > 0.9 * size
    assert relative[healthy].max() < 1e-5
    assert np.isfinite(written).all()
    manifest = json.loads((out / "clpsurgery.json").read_text())
    missing = np.setdiff1d(np.arange(size), target_ids)
    assert manifest["weights"]["degenerate_rows"] == int((~healthy[missing]).sum())
    assert manifest["weights"]["neighbours_per_token"] == len(pairs)


def test_single_file_source_with_named_side_files(gpt2_source, german_helper, tmp_path):
    """SOURCE as a lone .safetensors file; tokenizer and config named by options."""
    lone = tmp_path / "weights" / "english.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(gpt2_source / "model.safetensors", lone)
    out = tmp_path / "out"
    result = run_cli_process("init", "--quiet", lone, german_helper, out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--source-config" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    run_init(lone, german_helper, out, "--source-tokenizer", gpt2_source / "tokenizer.json", "--source-config", gpt2_source)
    assert (out / "model.safetensors").is_file()
    finite_logits(transformers.GPT2LMHeadModel, out)


def test_sharded_source_keeps_its_layout(sharded_llama_source, german_helper, tmp_path):
    """A sharded source: same shard names and index; shards without vocab tensors copied whole."""
    out = tmp_path / "out"
    run_init(sharded_llama_source, german_helper, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded_llama_source / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(out) as target:
        assert index["metadata"]["total_size"] == sum(r.info.nbytes for r in target.tensors.values())
    middle = "model-00002-of-00003.safetensors"
    assert (out / middle).read_bytes() == (sharded_llama_source / middle).read_bytes()
    finite_logits(transformers.LlamaForCausalLM, out)


@pytest.mark.parametrize("weighting", ["clp-clipped", "softmax", "sparsemax"])
def test_other_weightings_give_convex_combinations(gpt2_source, german_helper, tmp_path, weighting):
    """Non-negative weights that sum to one keep every new row inside the span of its neighbours."""
    out = tmp_path / weighting
    run_init(gpt2_source, german_helper, out, "--weighting", weighting, "--top-k", "8")
    with Checkpoint.open(gpt2_source) as source, Checkpoint.open(out) as target:
        pairs = shared_tokens(gpt2_source, german_helper)
        overlap_rows = as_tensor(source.gather_rows("transformer.wte.weight", [p[2] for p in pairs]))
        rows = as_tensor(target.read_tensor("transformer.wte.weight"))
    low, high = overlap_rows.min(0).values, overlap_rows.max(0).values
    assert torch.isfinite(rows).all()
    assert ((rows >= low - 1e-6) & (rows <= high + 1e-6)).all()
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["weights"]["signed_rows"] == 0


def test_out_exists_and_force(gpt2_source, german_helper, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli_process("init", "--quiet", gpt2_source, german_helper, out)
    assert result.returncode == 1 and "already exists" in result.stderr
    result = run_cli_process("init", "--quiet", "--force", gpt2_source, german_helper, out)
    assert result.returncode == 1 and "not a clpsurgery output" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    shutil.rmtree(out)
    run_init(gpt2_source, german_helper, out)
    first = (out / "model.safetensors").read_bytes()
    run_init(gpt2_source, german_helper, out, "--force", "--weighting", "clp")
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_inside_source_refused(gpt2_source, german_helper):
    before = tree_hashes(gpt2_source)
    result = run_cli_process("init", gpt2_source, german_helper, gpt2_source / "de")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "inside" in result.stderr and result.stderr.count("\n") == 1
    assert tree_hashes(gpt2_source) == before


def test_zero_overlap_refused(gpt2_source, tmp_path):
    """A helper whose tokenizer shares no string with the source's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from clpsurgery.pipeline.demo import gpt2_config, gpt2_tensors, write_model_folder

    vocab = {f"§{i}§": i for i in range(64)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="§0§"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    helper = tmp_path / "helper"
    config = gpt2_config(64, n_embd=8, n_layer=1, n_head=1, bos=0, eos=0)
    write_model_folder(helper, config, gpt2_tensors(config, torch.float32, seed=0))
    tokenizer.save(str(helper / "tokenizer.json"))
    result = run_cli_process("init", gpt2_source, helper, tmp_path / "out")
    assert result.returncode == 1 and "shares no token" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pad_vocab_to_multiple(llama_source, german_helper, tmp_path):
    """--pad-vocab-to-multiple: vocab_size rounded up, the extra rows the mean of the combined rows."""
    out = tmp_path / "padded"
    run_init(llama_source, german_helper, out, "--pad-vocab-to-multiple", "128")
    size = len(vocab_of(german_helper))
    padded = -(-size // 128) * 128
    assert padded > size
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == padded
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["vocabulary"]["padding_rows"] == padded - size
    pairs = shared_tokens(llama_source, german_helper)
    missing = np.setdiff1d(np.arange(size), [p[1] for p in pairs])
    with Checkpoint.open(out) as target:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = as_tensor(target.read_tensor(name))
            assert rows.shape == (padded, 32)
            expected = rows[torch.from_numpy(missing)].double().mean(0)
            assert torch.allclose(rows[size:].double(), expected.expand(padded - size, 32), rtol=2**-7, atol=1e-3)
    logits = finite_logits(transformers.LlamaForCausalLM, out)
    assert logits.shape[-1] == padded


def test_copies_start_before_torch_is_imported(llama_source, german_helper, tmp_path):
    """The CLI reads the plan and starts the byte copies before it imports torch (about 2 s on a
    2-core machine, time the copies would otherwise lose): in a fresh interpreter, torch is not
    loaded when the background copier starts, and the run still completes."""
    prelude = """
    from clpsurgery.formats import writer
    start = writer.BackgroundCopier.start
    def recording_start(self):
        seen.append('torch' in sys.modules)
        start(self)
    writer.BackgroundCopier.start = recording_start
    """
    assert recorded_run(prelude, ["init", "--quiet", llama_source, german_helper, tmp_path / "out"]) == "[False]"
    assert (tmp_path / "out" / "clpsurgery.json").is_file()


def test_the_plan_is_a_value_that_holds_no_open_file(gpt2_source, german_helper):
    """make_plan reads headers, configs and tokenizers and keeps none of their files open: the
    transfer opens its readers itself, so a plan can be printed, kept or dropped freely."""
    import os

    from clpsurgery.formats.checkpoint import Checkpoint, CheckpointLayout
    from clpsurgery.pipeline.inputs import resolve_inputs
    from clpsurgery.pipeline.options import TransferOptions
    from clpsurgery.pipeline.plan import make_plan

    inputs = resolve_inputs(gpt2_source, german_helper)
    before = set(os.listdir("/proc/self/fd"))
    plan = make_plan(inputs, TransferOptions())
    assert set(os.listdir("/proc/self/fd")) == before
    assert isinstance(plan.source, CheckpointLayout) and isinstance(plan.helper, CheckpointLayout)
    assert not any(isinstance(getattr(plan, f), Checkpoint) for f in plan.__dataclass_fields__)


def test_rows_at_their_own_id_and_moved_rows_in_one_block(gpt2_source, tmp_path):
    """A target that keeps most source tokens at their ids, moves some (ids 1000-1999 rotated) and
    adds 300: rows copied to their own id are read block by block, the moved ones come from the
    held rows, the new ones are mixed, the first two in the same blocks."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    doc = json.loads((gpt2_source / "tokenizer.json").read_text())
    source_ids = dict(doc["model"]["vocab"])
    by_id = {i: t for t, i in source_ids.items()}
    moved = {by_id[i]: 1000 + (i - 1000 + 7) % 1000 for i in range(1000, 2000)}
    vocab = {t: moved.get(t, i) for t, i in source_ids.items()}
    vocab.update({f"ZZneu{k}": 50257 + k for k in range(300)})  # target-only tokens
    doc["model"]["vocab"] = vocab
    helper = tmp_path / "helper"
    shutil.copytree(gpt2_source, helper)
    (helper / "tokenizer.json").write_text(json.dumps(doc))
    assert Tokenizer.from_file(str(helper / "tokenizer.json")).get_vocab_size() == 50557
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=50557, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.randn(50557, 16) + 1.5 * torch.randn(1, 16))
    model.save_pretrained(helper, safe_serialization=True)
    out = tmp_path / "out"
    main(["init", "--quiet", "--method", "clp", str(gpt2_source), str(helper), str(out)])
    with Checkpoint.open(out) as target, Checkpoint.open(gpt2_source) as source:
        written = as_tensor(target.read_tensor("transformer.wte.weight")).numpy()
        original = as_tensor(source.read_tensor("transformer.wte.weight")).numpy()
    assert written.shape[0] == 50557
    for token, source_id in source_ids.items():
        assert written[vocab[token]].tobytes() == original[source_id].tobytes(), token
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["vocabulary"]["missing"] == 300 and manifest["weights"]["rows"] == 300
    assert np.isfinite(written[50257:]).all() and not (written[50257:] == 0).all(axis=1).any()


@pytest.mark.parametrize("method", ["clp+fvt", "omp"])
def test_every_progress_bar_reaches_its_total(gpt2_source, german_helper, tmp_path, method):
    """Each bar's updates sum to its total: a bar that stops short ends at 0% on a terminal."""
    from contextlib import contextmanager

    import clpsurgery

    bars: dict[str, list[int]] = {}

    @contextmanager
    def recorder(label: str, total: int):
        done = bars.setdefault(label, [total, 0])
        yield lambda n: done.__setitem__(1, done[1] + n)

    clpsurgery.init(gpt2_source, german_helper, tmp_path / "out", clpsurgery.TransferOptions(method=method), progress=recorder)
    assert "source pieces" in bars or method == "omp"
    assert {label: done for label, (total, done) in bars.items()} == {label: total for label, (total, done) in bars.items()}


def test_a_helper_configs_null_ids_are_not_copied(llama_source, german_helper, tmp_path):
    """A helper whose config.json says `"bos_token_id": null` (and the like) gives no id: OUT's ids
    come from the target tokenizer (the source's token by its string, else the token the target
    tokenizer declares for that role), a field the source lacks is not added as null, and an id
    the source leaves null stays null."""
    helper = tmp_path / "helper"
    shutil.copytree(german_helper, helper)
    config = json.loads((helper / "config.json").read_text())
    config.update({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "unk_token_id": None, "sep_token_id": None})
    (helper / "config.json").write_text(json.dumps(config))
    source_config = json.loads((llama_source / "config.json").read_text())
    assert "unk_token_id" not in source_config and "sep_token_id" not in source_config
    out = tmp_path / "out"
    run_init(llama_source, helper, out, "--method", "clp")
    written = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    # <|endoftext|> is not a German token; the German tokenizer's bos and eos are <s> and </s>.
    assert (written["bos_token_id"], written["eos_token_id"]) == (0, 1)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)
    for doc in (written, generation):
        assert "unk_token_id" not in doc and "sep_token_id" not in doc
    assert ("pad_token_id" in written, written.get("pad_token_id")) == ("pad_token_id" in source_config, None)
    assert "pad_token_id" not in generation
