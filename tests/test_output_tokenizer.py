"""Every output loads its tokenizer with the model library as the tokenizer itself: for each
output kind (init with a full helper, init with a tokenizer-only helper, extend, apply) and each
tokenizer family (GPT-2's byte-level BPE, extended by extend; a German byte-level BPE; MiniLM's
WordPiece; a SentencePiece model's Metaspace tokenizer.json), `AutoTokenizer.from_pretrained(OUT)` encodes
German and English text to exactly the ids `tokenizers` gives for OUT/tokenizer.json.

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
