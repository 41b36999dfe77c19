"""vocab.pieces: a target token's pieces under the source tokenizer, what fvt mixes. On the real
GPT-2 tokenizer (source) and the German BPE (target), checked against what the `tokenizers`
library itself encodes the token's text to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.pieces import source_pieces, text_pieces
from clpsurgery.vocab.vocabulary import load_vocabulary

SOURCE_ROWS = 50257


@pytest.fixture(scope="module")
def vocabs(gpt2_tokenizer_folder, german_tokenizer_folder):
    return load_vocabulary(gpt2_tokenizer_folder), load_vocabulary(german_tokenizer_folder)


def expected_pieces(token: str, token_id: int, gpt2_tokenizer, german_tokenizer) -> list[int]:
    """The German token's text (as the German tokenizer decodes it) encoded by GPT-2; a token
    that is part of a character is its bytes, each one GPT-2's token for that byte character (both
    are byte-level BPEs: the German token's characters are GPT-2's byte characters)."""
    text = german_tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text:
        return [gpt2_tokenizer.token_to_id(c) for c in token]
    return gpt2_tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def german_words(german_tokenizer) -> dict[int, str]:
    """German tokens that are whole words with an umlaut or ß (" größer", " für"), by id: their
    characters are several bytes, which GPT-2 spells in several pieces."""
    words = {}
    for token_id in range(german_tokenizer.get_vocab_size()):
        text = german_tokenizer.decode([token_id])
        if text.startswith(" ") and len(text) > 4 and text[1:].isalpha() and set(text) & set("äöüß"):
            words[token_id] = text
    assert len(words) > 10
    return words


def test_german_words_pieces_are_what_gpt2_encodes(vocabs, german_words, gpt2_tokenizer):
    source, target = vocabs
    ids = np.array(sorted(german_words), dtype=np.int64)
    pieces = source_pieces(source, target, ids, SOURCE_ROWS)
    for token_id, got in zip(ids.tolist(), pieces):
        assert got == gpt2_tokenizer.encode(german_words[token_id], add_special_tokens=False).ids, german_words[token_id]
    assert sum(len(p) > 1 for p in pieces) > len(pieces) // 2
    assert gpt2_tokenizer.decode(pieces[0]) == german_words[int(ids[0])]


def test_every_german_token(vocabs, gpt2_tokenizer, german_tokenizer):
    """Each of the 2000 German ids, special tokens and partial characters included."""
    source, target = vocabs
    ids = np.arange(target.size, dtype=np.int64)
    tokens = target.id_to_token()
    pieces = source_pieces(source, target, ids, SOURCE_ROWS)
    partial = 0
    for token_id, got in zip(ids.tolist(), pieces):
        assert got == expected_pieces(tokens[token_id], token_id, gpt2_tokenizer, german_tokenizer), tokens[token_id]
        partial += "\ufffd" in german_tokenizer.decode([token_id], skip_special_tokens=False)
    assert partial > 0  # the byte alphabet's non-ASCII bytes are parts of characters
    assert pieces[target.token_to_id["<s>"]] == gpt2_tokenizer.encode("<s>", add_special_tokens=False).ids


def test_ids_past_the_source_rows_are_dropped_and_an_id_with_no_token_has_none(vocabs, german_words):
    source, target = vocabs
    pieces = source_pieces(source, target, np.array(sorted(german_words)), SOURCE_ROWS)
    word, full = next((w, p) for w, p in zip(sorted(german_words), pieces) if len(set(p)) > 1)
    rows = sorted(full)[-1]  # the largest piece is past the rows, the others not
    assert source_pieces(source, target, np.array([word, target.size + 5]), rows) == [[i for i in full if i < rows], []]


def test_text_pieces_are_the_tokenizers_encoding(vocabs, gpt2_tokenizer):
    source, _ = vocabs
    texts = ["Haus und Hof", " die Schulen werden geöffnet", "日本"]
    assert text_pieces(source, texts) == [gpt2_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def test_a_source_without_tokenizer_json(gpt2_tokenizer, tmp_path, vocabs):
    """vocab.json + merges.txt: a vocabulary, but nothing `tokenizers` encodes with."""
    folder = tmp_path / "gpt2-files"
    folder.mkdir()
    gpt2_tokenizer.model.save(str(folder))
    source = load_vocabulary(folder)
    with pytest.raises(SurgeryError) as e:
        source_pieces(source, vocabs[1], np.array([5]), SOURCE_ROWS)
    assert str(e.value) == f"{source.path}: --method fvt encodes with the source's tokenizer.json, which is not there"
    broken = tmp_path / "broken" / "tokenizer.json"
    broken.parent.mkdir()
    broken.write_text('{"model": {"type": "nothing"}}', encoding="utf-8")
    with pytest.raises(SurgeryError) as e:
        text_pieces(dataclasses.replace(vocabs[0], path=broken.parent), ["Haus"])
    assert e.value.place == str(broken) and e.value.problem.startswith("the tokenizers library cannot load it (")
