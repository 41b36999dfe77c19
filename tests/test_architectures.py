"""Every model family clpsurgery claims: a small checkpoint built from the model library's own config
class (no download), converted to the German tokenizer, loaded back with the model library.

For each: finite logits over the target vocabulary, overlap rows (embedding, untied head, vocab-sized
bias and the copies some checkpoints store) equal to the source rows they copy, every other tensor
byte-identical to the source.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clpsurgery.vocab.architecture import KNOWN_MODEL_TYPES, find_vocab_tensors
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.cli import main
from conftest import save_model
from clpsurgery.pipeline.tensor_io import as_tensor

transformers = pytest.importorskip("transformers")

GERMAN_TEXT = "Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder lachen in der Schule."
VOCAB = 50257  # the real GPT-2 vocabulary for every source
SPECIAL = dict(bos="<|endoftext|>", eos="<|endoftext|>")


def llama_like(config_class, **extra):
    return lambda: config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=50256, eos_token_id=50256, **extra
    )


# name: (config factory, model class, what find_vocab_tensors must report (embedding, head, bias, copies))
ARCHITECTURES = {
    "gpt2": (
        lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64),
        transformers.GPT2LMHeadModel,
        ("transformer.wte.weight", None, None, ()),
    ),
    "bloom": (
        lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2),
        transformers.BloomForCausalLM,
        ("transformer.word_embeddings.weight", None, None, ()),
    ),
    "llama": (llama_like(transformers.LlamaConfig, tie_word_embeddings=False), transformers.LlamaForCausalLM, ("model.embed_tokens.weight", "lm_head.weight", None, ())),
    "mistral": (llama_like(transformers.MistralConfig, tie_word_embeddings=False), transformers.MistralForCausalLM, ("model.embed_tokens.weight", "lm_head.weight", None, ())),
    "qwen2-tied": (llama_like(transformers.Qwen2Config, tie_word_embeddings=True), transformers.Qwen2ForCausalLM, ("model.embed_tokens.weight", None, None, ())),
    "qwen2-untied": (llama_like(transformers.Qwen2Config, tie_word_embeddings=False), transformers.Qwen2ForCausalLM, ("model.embed_tokens.weight", "lm_head.weight", None, ())),
    "gemma": (llama_like(transformers.GemmaConfig, head_dim=16), transformers.GemmaForCausalLM, ("model.embed_tokens.weight", None, None, ())),
    "gpt-neox": (
        lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
        transformers.GPTNeoXForCausalLM,
        ("gpt_neox.embed_in.weight", "embed_out.weight", None, ()),
    ),
    "falcon": (
        lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
        transformers.FalconForCausalLM,
        ("transformer.word_embeddings.weight", None, None, ()),
    ),
    "opt": (
        lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64),
        transformers.OPTForCausalLM,
        ("model.decoder.embed_tokens.weight", None, None, ()),
    ),
    "phi": (
        lambda: transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
        transformers.PhiForCausalLM,
        ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", ()),
    ),
    "mpt": (
        lambda: transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=64),
        transformers.MptForCausalLM,
        ("transformer.wte.weight", None, None, ()),
    ),
    "t5": (
        lambda: transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0),
        transformers.T5ForConditionalGeneration,
        ("shared.weight", None, None, ()),
    ),
    "t5-untied": (
        # transformers 5 always builds T5 tied; untied files (T5 v1.1, flan-T5) store lm_head.weight
        # beside shared.weight with tie_word_embeddings false: build_source writes one so.
        lambda: transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0),
        transformers.T5ForConditionalGeneration,
        ("shared.weight", "lm_head.weight", None, ()),
    ),
    "bert": (
        lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
        transformers.BertForMaskedLM,
        ("bert.embeddings.word_embeddings.weight", None, "cls.predictions.bias", ()),
    ),
    "xlm-roberta": (
        lambda: transformers.XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=80),
        transformers.XLMRobertaForMaskedLM,
        ("roberta.embeddings.word_embeddings.weight", None, "lm_head.bias", ()),
    ),
}


def run_init(*args) -> None:
    try:
        main(["init", "--quiet", *map(str, args)])
    except SystemExit as e:  # pragma: no cover - only on failure
        pytest.fail(f"clpsurgery init exited with {e.code}")


def vocab_of(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def shared_pairs(source: Path, target: Path) -> tuple[np.ndarray, np.ndarray]:
    """(target ids, source ids): same token string, plus special tokens paired by role."""
    s, t = vocab_of(source), vocab_of(target)
    pairs = {t[tok]: s[tok] for tok in t if tok in s}
    sc, tc = (json.loads((f / "tokenizer_config.json").read_text()) for f in (source, target))
    for role in ("eos_token", "bos_token", "unk_token", "pad_token"):
        if sc.get(role) and tc.get(role) and t[tc[role]] not in pairs:
            pairs[t[tc[role]]] = s[sc[role]]
    order = sorted(pairs)
    return np.array(order), np.array([pairs[i] for i in order])


def sha(checkpoint: Checkpoint, name: str) -> str:
    return hashlib.sha256(checkpoint.raw_bytes(name)).hexdigest()


def logits_of(model_class, folder: Path) -> torch.Tensor:
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(GERMAN_TEXT).ids])
    model = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=ids, decoder_input_ids=ids[:, :5])
        else:
            out = model(input_ids=ids)
    return out.logits


def randomise_vocab_biases(model) -> None:
    """Library init zeroes vocab-sized biases; give them values so copied rows can be told apart."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.shape == (VOCAB,):
                p.copy_(torch.randn(VOCAB, generator=g))


def build_source(name: str, folder: Path, gpt2_tokenizer) -> Path:
    factory, model_class, _ = ARCHITECTURES[name]
    torch.manual_seed(hash(name) % 1000)
    model = model_class(factory()).eval()
    randomise_vocab_biases(model)
    save_model(model, folder, gpt2_tokenizer, **SPECIAL)
    if name == "t5-untied":
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=torch.Generator().manual_seed(9))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def check_conversion(source: Path, helper: Path, out: Path, model_class, expected: tuple) -> None:
    target_ids, source_ids = shared_pairs(source, helper)
    size = len(vocab_of(helper))
    with Checkpoint.open(source) as src, Checkpoint.open(out) as tgt:
        config = json.loads((source / "config.json").read_text())
        found = find_vocab_tensors({n: r.info.shape for n, r in src.tensors.items()}, str(source), config=config)
        embedding, head, bias, copies = expected
        assert (found.embedding, found.head, found.head_bias) == (embedding, head, bias)
        assert set(found.copies) >= set(copies)
        assert set(tgt.tensors) == set(src.tensors)
        for name in src.tensors:
            if name in found.names:
                assert tgt.info(name).shape == (size, *src.info(name).shape[1:]), name
                assert tgt.info(name).dtype == src.info(name).dtype
                assert torch.equal(as_tensor(tgt.gather_rows(name, target_ids)), as_tensor(src.gather_rows(name, source_ids))), name
                assert torch.isfinite(as_tensor(tgt.read_tensor(name)).float()).all(), name
            else:
                assert sha(src, name) == sha(tgt, name), name
        if found.head_bias:
            assert not torch.equal(as_tensor(tgt.read_tensor(found.head_bias)), torch.zeros(size))
    written = json.loads((out / "config.json").read_text())
    assert written["vocab_size"] == size
    assert max(vocab_of(out).values()) < written["vocab_size"]
    logits = logits_of(model_class, out)
    assert logits.shape[-1] == size
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_converts_and_loads(name, gpt2_tokenizer, german_helper, tmp_path):
    source = build_source(name, tmp_path / "source", gpt2_tokenizer)
    out = tmp_path / "out"
    run_init(source, german_helper, out, "--top-k", "4")
    _, model_class, expected = ARCHITECTURES[name]
    check_conversion(source, german_helper, out, model_class, expected)


def resave_with(folder: Path, extra: dict[str, str]) -> None:
    """Add tensors the way older savers stored them: a copy of an existing tensor under another name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    for new, existing in extra.items():
        tensors[new] = tensors[existing].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_t5_shared_with_encoder_decoder_copies(gpt2_tokenizer, german_helper, tmp_path):
    """Old T5 files store shared.weight, encoder/decoder.embed_tokens.weight and lm_head.weight:
    all four rebuilt, the three copies staying identical."""
    source = build_source("t5-untied", tmp_path / "source", gpt2_tokenizer)
    resave_with(source, {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"})
    out = tmp_path / "out"
    run_init(source, german_helper, out, "--top-k", "4")
    check_conversion(
        source, german_helper, out, transformers.T5ForConditionalGeneration,
        ("shared.weight", "lm_head.weight", None, ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")),
    )
    with Checkpoint.open(out) as tgt:
        shared = as_tensor(tgt.read_tensor("shared.weight"))
        assert torch.equal(as_tensor(tgt.read_tensor("encoder.embed_tokens.weight")), shared)
        assert torch.equal(as_tensor(tgt.read_tensor("decoder.embed_tokens.weight")), shared)
        assert not torch.equal(as_tensor(tgt.read_tensor("lm_head.weight")), shared)


def test_bert_with_stored_decoder_and_bias_copy(gpt2_tokenizer, german_helper, tmp_path):
    """Older BERT files also store cls.predictions.decoder.weight and .decoder.bias."""
    source = build_source("bert", tmp_path / "source", gpt2_tokenizer)
    resave_with(source, {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.bias": "cls.predictions.bias"})
    out = tmp_path / "out"
    run_init(source, german_helper, out, "--top-k", "4")
    check_conversion(
        source, german_helper, out, transformers.BertForMaskedLM,
        ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias", ("cls.predictions.decoder.bias",)),
    )
    with Checkpoint.open(out) as tgt:
        assert torch.equal(as_tensor(tgt.read_tensor("cls.predictions.decoder.bias")), as_tensor(tgt.read_tensor("cls.predictions.bias")))
        assert torch.equal(as_tensor(tgt.read_tensor("cls.predictions.decoder.weight")), as_tensor(tgt.read_tensor("bert.embeddings.word_embeddings.weight")))


def test_helper_of_another_architecture_and_width(gpt2_tokenizer, german_tokenizer, tmp_path):
    """The paper's own case in miniature: a helper of another family and hidden size (an untied
    LLaMA helper, width 24, for a BLOOM source of width 32)."""
    source = build_source("bloom", tmp_path / "source", gpt2_tokenizer)
    config = transformers.LlamaConfig(
        vocab_size=german_tokenizer.get_vocab_size(), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    torch.manual_seed(5)
    helper = save_model(transformers.LlamaForCausalLM(config).eval(), tmp_path / "helper", german_tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    out = tmp_path / "out"
    run_init(source, helper, out, "--top-k", "4")
    check_conversion(source, helper, out, transformers.BloomForCausalLM, ARCHITECTURES["bloom"][2])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["tensors"]["helper_embedding"] == "model.embed_tokens.weight"


def cli_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clpsurgery", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_unknown_model_type_named_and_tensors_by_hand(gpt2_tokenizer, german_helper, tmp_path):
    source = build_source("gpt2", tmp_path / "source", gpt2_tokenizer)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "mamba-x"
    config["architectures"] = ["MambaXForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    result = cli_process("init", "--quiet", source, german_helper, tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "'mamba-x'" in result.stderr and "MambaXForCausalLM" in result.stderr and "--embedding-tensor" in result.stderr
    assert not (tmp_path / "out").exists()
    result = cli_process("init", "--quiet", "--embedding-tensor", "transformer.wte.weight", source, german_helper, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    with Checkpoint.open(tmp_path / "out") as tgt:
        assert tgt.info("transformer.wte.weight").shape[0] == len(vocab_of(german_helper))


def test_untied_config_without_head_refused(gpt2_tokenizer, german_helper, tmp_path):
    source = build_source("qwen2-tied", tmp_path / "source", gpt2_tokenizer)
    config = json.loads((source / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (source / "config.json").write_text(json.dumps(config))
    result = cli_process("init", "--quiet", source, german_helper, tmp_path / "out")
    assert result.returncode == 1 and "not tied" in result.stderr and "--head-tensor" in result.stderr


def test_head_and_bias_named_by_hand(gpt2_tokenizer, german_helper, tmp_path):
    source = build_source("phi", tmp_path / "source", gpt2_tokenizer)
    out = tmp_path / "out"
    run_init(source, german_helper, out, "--top-k", "4", "--embedding-tensor", "model.embed_tokens.weight", "--head-tensor", "lm_head.weight", "--head-bias-tensor", "lm_head.bias")
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["tensors"]["head_bias"] == "lm_head.bias"
    assert torch.isfinite(logits_of(transformers.PhiForCausalLM, out)).all()


def test_known_model_types_cover_the_issue():
    for t in ("gpt2", "bloom", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "falcon", "opt", "phi", "mpt", "t5", "bert", "xlm-roberta"):
        assert t in KNOWN_MODEL_TYPES
