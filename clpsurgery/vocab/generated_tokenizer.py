"""The tokenizer.json an output carries where the target tokenizer has none, written from the
files it has: a SentencePiece model, vocab.json + merges.txt, or a WordPiece vocab.txt.

The model library reads a SentencePiece model only through protobuf and sentencepiece, and builds
a tokenizer from vocabulary files by the recipe of the config's model type (the source's, in an
output); a tokenizer.json loads as it is (output_tokenizer). Its model, normaliser and
pre-tokenizer are those extend reads the same files into (vocab.extension); every special and
added token of the target's vocabulary is an added token at its id, matched whole as the library's
own converters write them, and a WordPiece vocabulary with cls and sep tokens gets BERT's
`[CLS] ... [SEP]`. The document is written only where it reads back as the target's id -> token
map with the same special tokens: the output's vocabulary is then read from it (it is found
first), and the transfer record's fingerprint of the target vocabulary, which apply checks, must
still hold.
"""

from __future__ import annotations

import json

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.extension import read_sentencepiece, sentencepiece_document, vocab_json_document, vocab_txt_document
from clpsurgery.vocab.vocabulary import Vocabulary

# The keys of a tokenizer.json, in the order the tokenizers library writes them.
DOCUMENT_KEYS = ("version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model")


def generated_tokenizer_json(target: Vocabulary) -> tuple[bytes | None, dict]:
    """The bytes of a tokenizer.json for `target`, and what the manifest says of it: the files it
    was written from, or why none was written ((None, {}) where the target was read from a
    tokenizer.json, or from a file no document is made from)."""
    folder = target.path.parent
    if target.format == "sentencepiece":
        made_from = [target.path.name]
    elif target.format == "vocab.json+merges.txt":
        made_from = ["vocab.json", "merges.txt"]
    elif target.format == "vocab.txt":
        made_from = ["vocab.txt"]
    else:
        return None, {}
    try:
        if target.format == "sentencepiece":
            document = sentencepiece_document(read_sentencepiece(target.path), target.path)
        elif target.format == "vocab.json+merges.txt":
            document = vocab_json_document(folder)
        else:
            document = vocab_txt_document(folder, target)
        text = json.dumps(_with_vocabulary_tokens(document, target), indent=2, ensure_ascii=False) + "\n"
        _check_reads_back(text, target)
    except SurgeryError as e:
        return None, {"generated_from": made_from, "not_written": e.problem}
    return text.encode("utf-8"), {"generated_from": made_from}


def _with_vocabulary_tokens(document: dict, target: Vocabulary) -> dict:
    """`document` in the full layout, with the target's special and added tokens it lacks as added
    tokens (normalised where not special, the library's default), and BERT's post-processor for a
    WordPiece vocabulary with cls and sep tokens."""
    tokens = target.id_to_token()
    special = target.special_ids
    added = [{**entry, "special": entry["special"] or entry["id"] in special} for entry in document.get("added_tokens") or []]
    listed = {entry["id"] for entry in added}
    for token_id in sorted((special | target.added_ids) - listed):
        added.append({
            "id": token_id, "content": tokens[token_id], "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": token_id not in special, "special": token_id in special,
        })
    document = {key: document.get(key) for key in DOCUMENT_KEYS} | {"version": "1.0", "added_tokens": sorted(added, key=lambda entry: entry["id"])}
    if target.format == "vocab.txt" and document["post_processor"] is None and {"cls", "sep"} <= target.roles.keys():
        cls, sep = target.roles["cls"], target.roles["sep"]
        document["post_processor"] = {"type": "BertProcessing", "sep": [tokens[sep], sep], "cls": [tokens[cls], cls]}
    return document


def _check_reads_back(text: str, target: Vocabulary) -> None:
    """The document loads, with the target's ids, tokens and special tokens."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # the library's own parse errors
        raise SurgeryError(target.path, f"the tokenizers library cannot load the tokenizer.json written from it ({' '.join(str(e).split())[:200]})") from e
    if tokenizer.get_vocab(with_added_tokens=True) != target.token_to_id:
        raise SurgeryError(target.path, "the tokenizer.json written from it has other ids or tokens (a token listed twice?)")
    specials = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    if specials != set(target.special_ids):
        raise SurgeryError(target.path, "the tokenizer.json written from it has other special tokens")
