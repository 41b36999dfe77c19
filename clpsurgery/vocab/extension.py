"""Extend a source tokenizer with the target tokenizer's tokens, keeping every source id.

The tokenizer is extended in its model, never with `added_tokens` (which match before
pre-tokenisation and break the segmentation the model was trained on):

- **BPE** (byte-level, or SentencePiece-style with `▁` and byte fallback): new vocabulary entries
  and merges, all after the source's merges, which keep their order. BPE applies merges by rank, so
  the source's own merges all fire first: a text's new encoding is its source encoding with some
  neighbouring pieces merged further, and text in which no new token fits encodes as before. Each
  new token gets the merge that builds it (the target's own where both parts are there) and every
  other split into two tokens of the extended vocabulary: without them a new token is reached
  only where the source happened to segment the text as the target does.
- **SentencePiece models** (`tokenizer.model`): new pieces with scores below the source's lowest,
  appended as extra `pieces` records (protobuf lets a repeated field continue later in a message).
  A folder with only a SentencePiece model gets a tokenizer.json written from it as well.
- **Unigram** (tokenizer.json): new (piece, score) entries below the source's lowest score. Unigram
  picks the segmentation of highest total score, so such a piece wins only where the source's
  own pieces score lower still: source text keeps its segmentation, and new pieces are used rarely.
- **WordPiece**: new vocabulary entries (tokenizer.json and vocab.txt).

New ids start where the source's id space ends, after its added and special tokens. Target tokens
of another family (a byte-level target for a SentencePiece source) are respelled in the source's
spelling from the text they stand for under `--match canonical`.
"""

from __future__ import annotations

import json
import os
import struct
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.tokenizer_files import (
    SENTENCEPIECE_FILES,
    SP_CONTROL,
    SP_NORMAL,
    SP_UNKNOWN,
    SP_UNUSED,
    SP_USER_DEFINED,
    _fields,
)
from clpsurgery.vocab.vocabulary import TOKENIZER_FILE, TOKENIZER_FILES, Vocabulary, byte_encoder, load_vocabulary

EXTENDABLE_MODELS = ("BPE", "Unigram", "WordPiece")
SP_BPE, SP_UNIGRAM = 2, 1  # TrainerSpec.model_type


@dataclass(frozen=True)
class TokenizerExtension:
    """A source tokenizer extended with target tokens: the output folder's tokenizer files and what
    was added. Ids below `source_size` are the source's, unchanged; new token `i` has id
    `source_size + i`."""

    files: dict[str, bytes]
    source_size: int
    new_tokens: tuple[str, ...]
    new_merges: int
    skipped: dict[str, int]
    target_ids: tuple[int, ...] = ()  # the target id each new token comes from (its helper row)
    meanings: tuple[bytes, ...] = ()  # the bytes each new token stands for in running text
    model_size: int = 0  # one past the source model's largest id; added tokens may sit past it
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Rows an embedding of the extended tokenizer needs."""
        return self.source_size + len(self.new_tokens)


@dataclass(frozen=True)
class Fertility:
    """Tokens a tokenizer needs for some text, per whitespace-separated word and per UTF-8 byte."""

    tokens: int
    words: int
    bytes: int

    @property
    def per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    @property
    def per_byte(self) -> float:
        return self.tokens / max(self.bytes, 1)


def fertility(tokenizer_json: bytes | str, texts: list[str]) -> Fertility:
    """Fertility of a tokenizer.json (its contents) on texts: special tokens, padding and
    truncation left out."""
    tokenizer = _tokenizer_from(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return Fertility(
        tokens=sum(len(e.ids) for e in encodings),
        words=sum(len(t.split()) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
    )


# --- reading both tokenizers ---------------------------------------------------------------------


@dataclass
class SentencePieceModel:
    """A SentencePiece model file: its bytes, pieces (text, score, type) and the specs encoding needs."""

    raw: bytes
    pieces: list[tuple[str, float, int]]
    trainer: dict[int, int] = field(default_factory=dict)  # TrainerSpec's integer fields by number
    model_type: int = SP_UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def read_sentencepiece(path: Path) -> SentencePieceModel:
    """A SentencePiece model file read by hand (no protobuf library): pieces, trainer and normaliser."""
    try:
        raw = path.read_bytes()
        model = SentencePieceModel(raw, [])
        for number, wire, value in _fields(raw):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, SP_NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif n == 3 and w == 0:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:
                model.trainer = {n: v for n, w, v in _fields(value) if w == 0}
                model.model_type = model.trainer.get(3, SP_UNIGRAM)
                model.byte_fallback = bool(model.trainer.get(35, 0))
                model.unk_id = model.trainer.get(40, 0)
            elif number == 3 and wire == 2:
                spec = {n: v for n, _, v in _fields(value)}
                model.charsmap = spec.get(2, b"")
                model.add_dummy_prefix = bool(spec.get(3, 1))
                model.remove_extra_whitespaces = bool(spec.get(4, 1))
                model.escape_whitespaces = bool(spec.get(5, 1))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise SurgeryError(path, f"cannot read the SentencePiece model: {e}") from e
    if not model.pieces:
        raise SurgeryError(path, "SentencePiece model has no pieces")
    return model


def sentencepiece_document(model: SentencePieceModel, path: Path) -> dict:
    """The tokenizer.json of a SentencePiece model, in the layout the model library writes for
    LLaMA (the dummy prefix and `▁` in the normaliser, so that a text that starts with a space gets
    its prefix as SentencePiece gives it). BPE merges are every split of a piece into two pieces,
    ranked by the piece's score: SentencePiece's BPE merges the neighbours that make the piece of
    highest score."""
    if model.model_type not in (SP_BPE, SP_UNIGRAM):
        raise SurgeryError(path, f"SentencePiece model type {model.model_type} is neither BPE nor Unigram: no tokenizer.json can be written for it")
    if not model.escape_whitespaces:
        raise SurgeryError(path, "SentencePiece model does not escape whitespace with ▁: cannot write a tokenizer.json for it")
    pieces = model.pieces
    added = [
        {"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": kind != SP_USER_DEFINED}
        for i, (p, _, kind) in enumerate(pieces)
        if kind in (SP_CONTROL, SP_UNKNOWN, SP_USER_DEFINED)
    ]
    normalizers = []
    if model.charsmap:
        import base64

        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(model.charsmap).decode("ascii")})
    if model.remove_extra_whitespaces:
        normalizers += [{"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if model.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if model.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = pieces[model.unk_id][0] if 0 <= model.unk_id < len(pieces) else None
    if model.model_type == SP_BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = [(p, s, i) for i, (p, s, kind) in enumerate(pieces) if kind == SP_NORMAL]
        mergeable = {p for p, _, _ in normal}
        merges = [(-s, i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for p, s, i in normal for k in range(1, len(p)) if p[:k] in mergeable and p[k:] in mergeable]
        merges.sort()
        model_doc = {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": model.byte_fallback, "ignore_merges": False,
            "vocab": vocab, "merges": [[a, b] for *_, a, b in merges],
        }
    else:
        model_doc = {"type": "Unigram", "unk_id": model.unk_id, "vocab": [[p, s] for p, s, _ in pieces], "byte_fallback": model.byte_fallback}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        # Unigram pieces never span a word boundary; BPE pieces may (runs of ▁).
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True} if model.model_type == SP_UNIGRAM else None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model_doc,
    }


def _tokenizer_from(doc: dict | bytes | str):
    from tokenizers import Tokenizer

    text = doc if isinstance(doc, str) else doc.decode("utf-8") if isinstance(doc, bytes) else json.dumps(doc, ensure_ascii=False)
    return Tokenizer.from_str(text)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(path, f"cannot read it: {e}") from e
    if not isinstance(doc, dict):
        raise SurgeryError(path, "is not a JSON object")
    return doc


@dataclass
class Side:
    """One tokenizer, read for extension: its vocabulary, its tokenizer.json document (written from
    the SentencePiece model where the folder has only that), and the library tokenizer."""

    vocab: Vocabulary
    folder: Path
    doc: dict
    sentencepiece: SentencePieceModel | None = None
    sentencepiece_name: str | None = None
    has_tokenizer_json: bool = True
    _tokenizer: object = None

    @property
    def model(self) -> dict:
        return self.doc["model"]

    @property
    def kind(self) -> str:
        return self.model.get("type", "?")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            try:
                self._tokenizer = _tokenizer_from(self.doc)
            except Exception as e:  # the library's own parse errors
                raise SurgeryError(self.vocab.path, f"the tokenizers library cannot load it ({' '.join(str(e).split())[:200]})") from e
        return self._tokenizer

    def merges(self) -> list[tuple[str, str]]:
        out = []
        for m in self.model.get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            out.append((a, b))
        return out


def _as_vocabulary(place: Vocabulary | str | os.PathLike[str]) -> Vocabulary:
    return place if isinstance(place, Vocabulary) else load_vocabulary(place)


def _read_side(place: Vocabulary | str | os.PathLike[str], role: str) -> Side:
    vocab = _as_vocabulary(place)
    path = vocab.path
    folder = path.parent
    if vocab.format == "tokenizer.json":
        doc = _read_json(path)
        if not isinstance(doc.get("model"), dict) or not isinstance(doc["model"].get("vocab"), (dict, list)):
            raise SurgeryError(path, "has no model vocabulary")
        side = Side(vocab, folder, doc)
        for name in SENTENCEPIECE_FILES:
            if (folder / name).is_file() and side.kind in ("BPE", "Unigram") and vocab.style == "metaspace":
                side.sentencepiece, side.sentencepiece_name = read_sentencepiece(folder / name), name
                break
    elif vocab.format == "sentencepiece":
        model = read_sentencepiece(path)
        side = Side(vocab, folder, sentencepiece_document(model, path), model, path.name, has_tokenizer_json=False)
    elif role == "target" and vocab.format == "vocab.json+merges.txt":
        side = Side(vocab, folder, vocab_json_document(folder), has_tokenizer_json=False)
    elif role == "target" and vocab.format == "vocab.txt":
        side = Side(vocab, folder, vocab_txt_document(folder, vocab), has_tokenizer_json=False)
    elif role == "source":
        raise SurgeryError(
            path,
            f"cannot extend a tokenizer read from {vocab.format}: extend writes a tokenizer.json and needs the source's"
            " (or its SentencePiece model); a vocabulary file alone does not say how text is normalised and pre-tokenised"
            " (save the tokenizer with the model library to get one)",
        )
    else:
        raise SurgeryError(path, f"cannot read the target's model from {vocab.format}: a tokenizer.json, SentencePiece model, vocab.json + merges.txt or vocab.txt is needed")
    if role == "target":
        return side
    _add_config_tokens(side)
    if side.kind not in EXTENDABLE_MODELS:
        raise SurgeryError(path, f"a {side.kind} tokenizer cannot be extended in its model (BPE, Unigram and WordPiece can)")
    if side.kind == "BPE" and (side.model.get("end_of_word_suffix") or side.model.get("continuing_subword_prefix")):
        raise SurgeryError(path, "a BPE with a continuing-subword prefix or end-of-word suffix cannot be extended")
    return side


def _add_config_tokens(side: Side) -> None:
    """Added tokens that only tokenizer_config.json lists (by id, as the model library adds them at
    load time): they hold their ids too, so new tokens go after them."""
    path = side.folder / "tokenizer_config.json"
    decoder = _read_json(path).get("added_tokens_decoder") if path.is_file() else None
    if not isinstance(decoder, dict):
        return
    added = side.doc.setdefault("added_tokens", [])
    taken = {a["id"] for a in added}
    for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or int(key) in taken:
            continue
        added.append({
            "id": int(key), "content": entry["content"], "single_word": bool(entry.get("single_word", False)),
            "lstrip": bool(entry.get("lstrip", False)), "rstrip": bool(entry.get("rstrip", False)),
            "normalized": bool(entry.get("normalized", False)), "special": bool(entry.get("special", True)),
        })
    side._tokenizer = None


def vocab_json_document(folder: Path) -> dict:
    """A byte-level BPE tokenizer.json for a vocab.json + merges.txt folder (GPT-2's recipe)."""
    vocab = _read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    return {
        "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "fuse_unk": False, "byte_fallback": False},
    }


def vocab_txt_document(folder: Path, vocab: Vocabulary) -> dict:
    """A WordPiece tokenizer.json for a vocab.txt folder (BERT's normaliser; lower case, Chinese
    characters split and accents as the case goes, unless its tokenizer_config.json says otherwise)."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    lower = bool(config.get("do_lower_case", True))
    accents = config.get("strip_accents") if isinstance(config.get("strip_accents"), bool) else None
    unk = next((t for t in ("[UNK]", "<unk>") if t in vocab.token_to_id), "[UNK]")
    return {
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": bool(config.get("tokenize_chinese_chars", True)), "strip_accents": accents, "lowercase": lower},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": dict(vocab.token_to_id)},
    }


# --- the plan: which target tokens, how they are spelled and built --------------------------------


def spell(style: str, meaning: bytes, prefix: str = "##") -> str | None:
    """A token that stands for `meaning` in a tokenizer of `style`, or None where none can."""
    if style == "byte-level":
        chars = byte_encoder()
        return "".join(chars[b] for b in meaning)
    try:
        text = meaning.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    if style == "metaspace":
        return text.replace(" ", "▁")
    if style == "wordpiece":
        if text.startswith(" "):
            word = text[1:]
            return word if word and " " not in word else None
        if " " in text:
            return None
        if all(unicodedata.category(c)[0] in "PS" for c in text):
            return text
        return prefix + text
    return text


def _target_order(target: Side) -> tuple[dict[int, int], dict[str, tuple[str, str]]]:
    """Each target id's place in the target's own order (merge rank for BPE, score for Unigram,
    id for WordPiece), and for BPE the merge that first makes each token."""
    tokens = target.vocab.id_to_token()
    if target.kind == "BPE":
        merges = target.merges()
        made: dict[str, tuple[int, tuple[str, str]]] = {}
        for rank, (a, b) in enumerate(merges):
            made.setdefault(a + b, (rank, (a, b)))
        end = len(merges) + 1
        order = {}
        for i, t in tokens.items():
            order[i] = made[t][0] if t in made else (-1 if len(t) == 1 else end + i)
        return order, {t: m for t, (_, m) in made.items()}
    if target.kind == "Unigram":
        scores = {p: s for p, s in target.model["vocab"]}
        ranked = sorted(tokens, key=lambda i: (-scores.get(tokens[i], float("-inf")), i))
        return {i: r for r, i in enumerate(ranked)}, {}
    return {i: i for i in tokens}, {}


@dataclass
class Candidate:
    token: str  # in the source's spelling
    target_id: int
    order: int
    meaning: bytes
    target_merge: tuple[str, str] | None = None  # the target's merge, respelled


def _check_families(source: Side, target: Side, match: str) -> None:
    s, t = source.vocab.style, target.vocab.style
    if match == "exact" and s != t:
        raise SurgeryError(
            "--match",
            f"the source tokenizer is {s} and the target {t}: their tokens are spelled differently;"
            " --match canonical respells the target's tokens by the text they stand for",
        )


def _reachable(source: Side, token: str, meaning: bytes) -> bool:
    """Whether the source's normaliser and pre-tokeniser leave the token's text in one piece
    (a token split apart before the model sees it can never be produced)."""
    try:
        text = meaning.decode("utf-8")
    except UnicodeDecodeError:
        return True
    tokenizer = source.tokenizer
    if source.kind == "WordPiece":
        if token.startswith(source.vocab.continuing_prefix) and all(unicodedata.category(c)[0] == "P" for c in text):
            return False  # punctuation is always a word of its own
        if tokenizer.normalizer is not None and tokenizer.normalizer.normalize_str(text.strip()) != text.strip():
            return False
    if tokenizer.pre_tokenizer is not None:
        return len(tokenizer.pre_tokenizer.pre_tokenize_str(text)) == 1
    return True


def _script(c: str) -> str | None:
    """A character's Unicode script, near enough (from its name): Common for digits, punctuation,
    symbols and spaces, None for combining marks (they take their base's script)."""
    category = unicodedata.category(c)
    if category[0] == "M":
        return None
    if category[0] in "NPSZC":
        return "Common"
    first = unicodedata.name(c, "?").split(" ")[0]
    return "Han" if first in ("CJK", "HIRAGANA", "KATAKANA") else first


def _sentencepiece_allows(piece: str, trainer: dict[int, int]) -> bool:
    """Whether SentencePiece's trainer, with the source's settings, could have made the piece (its
    IsValidSentencePiece: length, where `▁` may stand, digits alone, one script). A piece it could
    never have made would resegment text the source model was trained on, numbers above all when
    the source splits them into digits. TrainerSpec fields: 20 max_sentencepiece_length,
    21 split_by_unicode_script, 22 split_by_whitespace, 23 split_by_number,
    24 treat_whitespace_as_suffix, 25 split_digits, 26 allow_whitespace_only_pieces."""
    if len(piece) > trainer.get(20, 16):
        return False
    if set(piece) == {"▁"}:
        return len(piece) == 1 or bool(trainer.get(26, 0))
    if trainer.get(22, 1):
        inner = piece[:-1] if trainer.get(24, 0) else piece[1:]
        if "▁" in inner:
            return False
    if trainer.get(25, 0) and len(piece) > 1 and any(unicodedata.category(c) == "Nd" for c in piece):
        return False
    if trainer.get(21, 1):
        numbers_apart = bool(trainer.get(23, 1))
        scripts = {_script(c) for c in piece if c != "▁" and (numbers_apart or unicodedata.category(c)[0] != "N")} - {None}
        return len(scripts) <= 1
    return True


def _candidates(source: Side, target: Side, match: str, skipped: Counter) -> list[Candidate]:
    """Target tokens the source lacks, in the source's spelling and the target's order."""
    order, made = _target_order(target)
    tv, sv = target.vocab, source.vocab
    target_tokens = tv.id_to_token()
    target_special = tv.special_ids
    source_strings = set(sv.token_to_id) | {a["content"] for a in source.doc.get("added_tokens") or []}
    source_meanings: set[bytes] = set()
    if match == "canonical":
        source_meanings = {sv.meaning(t, i) for t, i in sv.token_to_id.items() if i not in sv.special_ids}

    def respell(token: str) -> tuple[str | None, bytes]:
        i = tv.token_to_id.get(token)
        meaning = tv.meaning(token, i if i is not None else -1)
        if match == "exact":
            return token, meaning
        return spell(sv.style, meaning, sv.continuing_prefix), meaning

    found: list[Candidate] = []
    seen: set[str] = set()
    for i in sorted(target_tokens, key=lambda i: (order[i], i)):
        token = target_tokens[i]
        if i in target_special:
            skipped["special"] += 1
            continue
        if i in tv.added_ids:
            skipped["added token"] += 1
            continue
        spelled, meaning = respell(token)
        if spelled is None:
            skipped["no spelling in the source"] += 1
            continue
        if spelled in source_strings or (match == "canonical" and meaning in source_meanings):
            skipped["already in source"] += 1
            continue
        if i in tv.byte_ids:
            skipped["byte token"] += 1
            continue
        if spelled in seen:
            skipped["same spelling as another"] += 1
            continue
        if not _reachable(source, spelled, meaning):
            skipped["split by the source's pre-tokenizer or normalizer"] += 1
            continue
        if source.sentencepiece is not None and not _sentencepiece_allows(spelled, source.sentencepiece.trainer):
            skipped["not a piece the source's SentencePiece trainer could make"] += 1
            continue
        seen.add(spelled)
        merge = None
        if token in made:
            a, b = made[token]
            ra, rb = respell(a)[0], respell(b)[0]
            if ra is not None and rb is not None and ra + rb == spelled:
                merge = (ra, rb)
        found.append(Candidate(spelled, i, order[i], meaning, merge))
    return found


def _builds(source: Side, candidates: list[Candidate], skipped: Counter) -> tuple[list[Candidate], dict[str, tuple[str, str] | None]]:
    """For BPE sources, the merge that builds each buildable candidate: the target's own merge
    where both its parts are source tokens or buildable candidates, else the split into two such
    parts that the target makes earliest. A single character needs no merge."""
    by_token = {c.token: c for c in candidates}
    if source.kind != "BPE":
        return candidates, {c.token: None for c in candidates}
    source_tokens = set(source.model["vocab"])
    builds: dict[str, tuple[str, str] | None] = {}
    buildable: dict[str, bool] = {}

    def available(part: str) -> bool:
        return part in source_tokens or (part in by_token and is_buildable(part))

    def is_buildable(token: str) -> bool:
        if token in buildable:
            return buildable[token]
        buildable[token] = False  # parts are shorter: no cycle reaches here again
        c = by_token[token]
        if len(token) == 1:
            builds[token] = None
            buildable[token] = True
            return True
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        rank = lambda p: -1 if p in source_tokens else by_token[p].order  # noqa: E731
        splits = [s for s in splits if all(p in source_tokens or p in by_token for p in s)]
        splits.sort(key=lambda s: max(rank(s[0]), rank(s[1])))
        if c.target_merge in splits:
            splits.remove(c.target_merge)
            splits.insert(0, c.target_merge)
        for a, b in splits:
            if available(a) and available(b):
                builds[token] = (a, b)
                buildable[token] = True
                return True
        return False

    kept = []
    for c in sorted(candidates, key=lambda c: len(c.token)):
        is_buildable(c.token)
    for c in candidates:
        if buildable[c.token]:
            kept.append(c)
        else:
            skipped["not buildable"] += 1
    return kept, builds


def _usefulness(source: Side, target: Side, candidates: list[Candidate], texts: list[str]) -> dict[str, int]:
    """How many tokens each candidate saves on texts tokenised by the target tokenizer:
    occurrences times (source pieces - 1)."""
    counts: Counter = Counter()
    for encoding in target.tokenizer.encode_batch(list(texts), add_special_tokens=False):
        counts.update(encoding.ids)
    model = source.tokenizer.model
    prefix = source.vocab.continuing_prefix
    useful = {}
    for c in candidates:
        n = counts.get(c.target_id, 0)
        if n:
            word = c.token[len(prefix):] if source.kind == "WordPiece" and c.token.startswith(prefix) else c.token
            useful[c.token] = n * (len(model.tokenize(word)) - 1)
    return useful


def _choose(
    candidates: list[Candidate], builds: dict, limit: int | None, useful: dict[str, int] | None, skipped: Counter
) -> list[Candidate]:
    """The candidates to add, in id order: by usefulness (or the target's order), each after the
    candidates it is built from; with a limit, a token whose closure does not fit is passed over."""
    by_token = {c.token: c for c in candidates}
    ranked = sorted(candidates, key=lambda c: (-(useful or {}).get(c.token, 0), c.order, c.target_id)) if useful else candidates
    chosen: list[Candidate] = []
    taken: set[str] = set()

    def closure(token: str, out: list[str]) -> None:
        if token in taken or token in out:
            return
        merge = builds.get(token)
        for part in merge or ():
            if part in by_token:
                closure(part, out)
        out.append(token)

    for c in ranked:
        if c.token in taken:
            continue
        needed: list[str] = []
        closure(c.token, needed)
        if limit is not None and len(chosen) + len(needed) > limit:
            continue
        for token in needed:
            chosen.append(by_token[token])
            taken.add(token)
    left = len(candidates) - len(chosen)
    if left:
        skipped["past max_new_tokens"] += left
    return chosen


# --- writing -------------------------------------------------------------------------------------


@dataclass
class IdSpace:
    """Where the source's ids end. `gap` fills ids [model_size, size) of the model's vocabulary
    with the added tokens that sit there (their own strings; `special` None marks a placeholder for
    an id no token has), so that new tokens come after them."""

    model_size: int
    size: int
    gap: list[tuple[str, bool | None]]


def _id_space(source: Side) -> IdSpace:
    model = source.model
    in_model = {p for p, _ in model["vocab"]} if source.kind == "Unigram" else set(model["vocab"])
    model_size = len(model["vocab"]) if source.kind == "Unigram" else max(model["vocab"].values(), default=-1) + 1
    added = {a["id"]: (a["content"], bool(a.get("special"))) for a in source.doc.get("added_tokens") or []}
    size = max([model_size, source.vocab.size] + [i + 1 for i in added])
    tokens = source.vocab.id_to_token()
    gap = []
    for i in range(model_size, size):
        token, special = added.get(i) or ((tokens[i], True) if i in tokens else (f"<unused_{i}>", None))
        gap.append((token, special) if token not in in_model else (f"<unused_{i}>", None))
    return IdSpace(model_size, size, gap)


def _scores_below(lowest: float, n: int) -> list[float]:
    """n float32 scores, strictly decreasing, all below `lowest` (one apart where float32 allows)."""
    import numpy as np

    out, previous = [], np.float32(lowest)
    for _ in range(n):
        score = np.float32(float(previous) - 1.0)
        if score >= previous:
            score = np.nextafter(previous, np.float32(-np.inf))
        out.append(float(score))
        previous = score
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _piece_record(piece: str, score: float, kind: int) -> bytes:
    """One `pieces` record (ModelProto field 1: SentencePiece piece = 1, score = 2, type = 3)."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _merge_entries(existing: list, pairs: list[tuple[str, str]]) -> list:
    """New merges in the document's own form ("a b" strings or [a, b] pairs)."""
    as_strings = bool(existing) and isinstance(existing[0], str)
    if as_strings and any(" " in a or " " in b for a, b in pairs):
        existing[:] = [m.split(" ", 1) for m in existing]
        as_strings = False
    return [f"{a} {b}" if as_strings else [a, b] for a, b in pairs]


def _new_merges(source: Side, chosen: list[Candidate], builds: dict) -> list[tuple[str, str]]:
    """Merges for the new tokens, in the target's order: for each, the merge that builds it, then
    every other split into two tokens of the extended vocabulary. The other splits make a new token
    reachable from however the source has segmented the text before (the source's own merges all
    come first), and are how SentencePiece's BPE treats a piece, so tokenizer.json and
    tokenizer.model agree."""
    if source.kind != "BPE":
        return []
    final = set(source.model["vocab"]) | {c.token for c in chosen}
    ids = {**source.model["vocab"], **{c.token: source_id for source_id, c in enumerate(chosen, start=10**9)}}
    merges = []
    for c in sorted(chosen, key=lambda c: (c.order, c.target_id)):
        build = builds.get(c.token)
        if build is None:
            continue
        merges.append(build)
        others = [(c.token[:k], c.token[k:]) for k in range(1, len(c.token))]
        others = [m for m in others if m != build and m[0] in final and m[1] in final]
        merges.extend(sorted(others, key=lambda m: (ids[m[0]], ids[m[1]])))
    return merges


def _new_scores(lowest: float, space: IdSpace, chosen: list[Candidate]) -> tuple[list[float], dict[str, float]]:
    """Scores below the source's lowest: the gap's entries first, then the new tokens in the
    target's order (the order SentencePiece's BPE merges them in)."""
    by_order = sorted(chosen, key=lambda c: (c.order, c.target_id))
    scores = _scores_below(lowest, len(space.gap) + len(chosen))
    return scores[: len(space.gap)], {c.token: s for c, s in zip(by_order, scores[len(space.gap) :])}


def _extended_model(source: Side, space: IdSpace, chosen: list[Candidate], merges: list[tuple[str, str]]) -> dict:
    """The source's tokenizer.json model with the new tokens (and merges) in it."""
    model = dict(source.model)
    if source.kind == "Unigram":
        gap_scores, scores = _new_scores(min(s for _, s in model["vocab"]), space, chosen)
        model["vocab"] = [*model["vocab"], *([t, s] for (t, _), s in zip(space.gap, gap_scores)), *([c.token, scores[c.token]] for c in chosen)]
    else:
        # The added tokens' own strings hold their ids in the model too (as GPT-2's <|endoftext|>
        # does): the tokenizers library numbers added tokens after the model's entries, whatever
        # ids the file gives them.
        model["vocab"] = {**model["vocab"], **{t: space.model_size + k for k, (t, _) in enumerate(space.gap)}}
        model["vocab"].update({c.token: space.size + k for k, c in enumerate(chosen)})
    if source.kind == "BPE":
        model["merges"] = list(model.get("merges") or [])
        model["merges"].extend(_merge_entries(model["merges"], merges))
    return model


def _extended_document(source: Side, space: IdSpace, chosen: list[Candidate], merges: list[tuple[str, str]]) -> str:
    """The source's tokenizer.json with the new tokens (and merges) in its model, checked by loading
    it: every source token and every new one at its id."""
    text = json.dumps({**source.doc, "model": _extended_model(source, space, chosen, merges)}, ensure_ascii=False)
    try:
        tokenizer = _tokenizer_from(text)
    except Exception as e:  # the library's own parse errors
        raise SurgeryError(source.vocab.path, f"the extended tokenizer does not load ({' '.join(str(e).split())[:200]})") from e
    after = tokenizer.get_vocab(with_added_tokens=True)
    expected = {**source.tokenizer.get_vocab(with_added_tokens=True), **{c.token: space.size + k for k, c in enumerate(chosen)}}
    moved = next((t for t, i in expected.items() if after.get(t) != i), None)
    if moved is not None:
        raise SurgeryError(source.vocab.path, f"the extended tokenizer does not keep the id of {moved!r}")
    return text


def _write(source: Side, space: IdSpace, chosen: list[Candidate], merges: list[tuple[str, str]]) -> tuple[dict[str, bytes], list[str]]:
    """The output folder's tokenizer files: tokenizer.json, and beside it each extended file the
    source has (SentencePiece model, vocab.txt, vocab.json + merges.txt); the others copied."""
    # Written from the document, not by the library: the source's entries keep their exact text.
    files = {TOKENIZER_FILE: _extended_document(source, space, chosen, merges).encode("utf-8")}
    notes, left_out, folder = [], set(), source.folder
    if space.gap:
        shown = ", ".join(f"{t} ({space.model_size + k})" for k, (t, _) in enumerate(space.gap[:4])) + (", ..." if len(space.gap) > 4 else "")
        notes.append(f"new ids start at {space.size}, after the source's added tokens past its model vocabulary: {shown}")
    sp = source.sentencepiece
    if sp is not None and len(sp.pieces) != space.model_size:
        notes.append(f"{source.sentencepiece_name} left out: it has {len(sp.pieces)} pieces and tokenizer.json's model {space.model_size}")
        left_out.add(source.sentencepiece_name)
    elif sp is not None:
        gap_scores, scores = _new_scores(min(s for _, s, _ in sp.pieces), space, chosen)
        kinds = {None: SP_UNUSED, True: SP_CONTROL, False: SP_USER_DEFINED}
        records = [_piece_record(t, s, kinds[special]) for (t, special), s in zip(space.gap, gap_scores)]
        records += [_piece_record(c.token, scores[c.token], SP_NORMAL) for c in chosen]
        # Protobuf lets a repeated field continue later in a message: the pieces go at the end.
        files[source.sentencepiece_name] = sp.raw + b"".join(records)
    if source.has_tokenizer_json and source.kind == "WordPiece" and (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) == space.model_size:
            lines += [t for t, _ in space.gap] + [c.token for c in chosen]
            files["vocab.txt"] = ("\n".join(lines) + "\n").encode("utf-8")
        else:
            notes.append(f"vocab.txt left out: it has {len(lines)} tokens and tokenizer.json's model {space.model_size}")
            left_out.add("vocab.txt")
    if source.has_tokenizer_json and source.kind == "BPE" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab_json = _read_json(folder / "vocab.json")
        if vocab_json == source.model["vocab"]:
            vocab_json.update({t: space.model_size + k for k, (t, _) in enumerate(space.gap)})
            vocab_json.update({c.token: space.size + k for k, c in enumerate(chosen)})
            files["vocab.json"] = json.dumps(vocab_json, ensure_ascii=False).encode("utf-8")
            merges_txt = (folder / "merges.txt").read_text(encoding="utf-8").rstrip("\n")
            files["merges.txt"] = (merges_txt + "".join(f"\n{a} {b}" for a, b in merges) + "\n").encode("utf-8")
        else:
            notes.append("vocab.json and merges.txt left out: their vocabulary is not tokenizer.json's")
            left_out |= {"vocab.json", "merges.txt"}
    for name in TOKENIZER_FILES:
        if name not in files and name not in left_out and (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    return files, notes


# --- keeping the source's splits --------------------------------------------------------------------

# Source-language words the source's splits are kept on: the source's own word tokens and English,
# the language of the sources extend is made for, from wordfreq (a dependency, so that the same
# inputs give the same extension on every install).
GUARD_LANGUAGE, GUARD_WORDS = "en", 50_000
RESPLITS = "would re-split source-language words no shorter"


def guard_words(source: Side) -> tuple[list[str], str]:
    """The words (as the source's model sees them: normalised, pre-tokenised) whose source
    encodings a new WordPiece or Unigram entry must not change into one no shorter, and where they
    come from."""
    prefix = source.vocab.continuing_prefix
    texts = [t for t, i in source.vocab.token_to_id.items() if i not in source.vocab.special_ids and not (prefix and t.startswith(prefix))]
    if source.kind == "Unigram":
        texts = [t.replace("▁", " ") for t in texts]
    import wordfreq
    from importlib.metadata import version

    texts += wordfreq.top_n_list(GUARD_LANGUAGE, GUARD_WORDS)
    origin = f"the source's word tokens and wordfreq {version('wordfreq')}'s {GUARD_WORDS} most frequent {GUARD_LANGUAGE!r} words"
    # One text of them all, normalised and pre-tokenised at once: the same words, much faster.
    tokenizer, text = source.tokenizer, " ".join(t for t in texts if t.strip())
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(text) if tokenizer.pre_tokenizer is not None else [(w, None) for w in text.split()]
    return sorted({w for w, _ in pieces if w.strip("▁")}), origin


def _model_encodings(model: dict, words: list[str]) -> list[list[int]]:
    """Each word's ids under a tokenizer.json model alone (no normaliser or pre-tokeniser)."""
    tokenizer = _tokenizer_from({"version": "1.0", "model": model})
    return [e.ids for e in tokenizer.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)]


def _greedy_path(model: dict, word: str) -> list[str]:
    """The pieces WordPiece's longest-match-first takes on a word before it finds no match (the
    library gives only [UNK] for such a word)."""
    vocab, prefix, out, start = model["vocab"], model.get("continuing_subword_prefix") or "", [], 0
    while start < len(word):
        end = len(word)
        while end > start and ((prefix if start else "") + word[start:end]) not in vocab:
            end -= 1
        if end == start:
            return out
        out.append((prefix if start else "") + word[start:end])
        start = end
    return out


def keep_source_splits(source: Side, space: IdSpace, candidates: list[Candidate], skipped: Counter) -> tuple[list[Candidate], str]:
    """The candidates less those that change a guard word's source encoding into a different one
    no shorter (or one with more unknown tokens). WordPiece's longest match first and Unigram's
    best total score can both re-split a word the source splits well once an entry is added (MiniLM:
    `ins ##truct` becomes `instru ##ct`); neither model can prefer the source's split, so such an
    entry is not added. Blamed is the new entry where the encodings part (WordPiece), or every new
    piece in the encoding (Unigram); what is left is checked again until no word is re-split.
    BPE needs no guard: the new merges all come after the source's, so a word's encoding is its
    source encoding, merged further or not at all."""
    if source.kind not in ("WordPiece", "Unigram") or not candidates:
        return candidates, ""
    words, origin = guard_words(source)
    before = _model_encodings(_extended_model(source, space, [], []), words)
    unk = source.model.get("unk_token") if source.kind == "WordPiece" else None
    unk_id = source.model["vocab"].get(unk) if unk is not None else source.model.get("unk_id")
    kept, blamed, check = list(candidates), set(), list(range(len(words)))
    while check:
        model = _extended_model(source, space, kept, [])
        after = _model_encodings(model, [words[k] for k in check])
        new_of = {space.size + k: c.token for k, c in enumerate(kept)}
        now: set[str] = set()
        for k, ids in zip(check, after):
            old = before[k]
            if ids == old or (len(ids) < len(old) and ids.count(unk_id) <= old.count(unk_id)):
                continue
            part = next((j for j, (a, b) in enumerate(zip(ids, old)) if a != b), min(len(ids), len(old)))
            if source.kind == "WordPiece" and part < len(ids) and ids[part] in new_of:
                now.add(new_of[ids[part]])
            elif source.kind == "WordPiece":
                now.update(t for t in _greedy_path(model, words[k]) if t not in source.model["vocab"])
            else:
                now.update(new_of[i] for i in ids if i in new_of)
        if not now:
            break
        blamed |= now
        # Only words whose encoding used a dropped entry can change when it goes.
        dropped = {i for i, t in new_of.items() if t in now}
        check = [k for k, ids in zip(check, after) if dropped.intersection(ids) or (unk_id in ids and unk_id not in before[k])]
        kept = [c for c in kept if c.token not in blamed]
    if blamed:
        skipped[RESPLITS] += len(blamed)
    return kept, f"kept the source's splits of {len(words)} words ({origin}): {len(blamed)} entries left out"


# --- the whole ---------------------------------------------------------------------------------


def extend_tokenizer(
    source: Vocabulary | str | os.PathLike[str],
    target: Vocabulary | str | os.PathLike[str],
    match: str = "exact",
    max_new_tokens: int | None = None,
    rank_texts: list[str] | None = None,
) -> TokenizerExtension:
    """The source tokenizer extended with the target's tokens it lacks, every source id kept.

    All of them that the source can reach, or the `max_new_tokens` most useful: by how much each
    shortens `rank_texts` (target-language text; occurrences under the target tokenizer times the
    source pieces it saves), else in the target's own order; a token's parts come in with it and
    count. `skipped` says why the other target tokens are not added."""
    if match not in ("exact", "canonical"):
        raise SurgeryError("--match", f"unknown rule {match!r}")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise SurgeryError("--max-new-tokens", f"must be 0 or more, not {max_new_tokens}")
    source_side, target_side = _read_side(source, "source"), _read_side(target, "target")
    _check_families(source_side, target_side, match)
    skipped: Counter = Counter()
    candidates = _candidates(source_side, target_side, match, skipped)
    candidates, builds = _builds(source_side, candidates, skipped)
    space = _id_space(source_side)
    candidates, guarded = keep_source_splits(source_side, space, candidates, skipped)
    useful = _usefulness(source_side, target_side, candidates, rank_texts) if rank_texts else None
    chosen = _choose(candidates, builds, max_new_tokens, useful, skipped)
    merges = _new_merges(source_side, chosen, builds)
    files, notes = _write(source_side, space, chosen, merges)
    notes = [guarded, *notes] if guarded else notes
    return TokenizerExtension(
        files=files,
        source_size=space.size,
        new_tokens=tuple(c.token for c in chosen),
        new_merges=len(merges),
        skipped=dict(sorted(skipped.items())),
        target_ids=tuple(c.target_id for c in chosen),
        meanings=tuple(c.meaning for c in chosen),
        model_size=space.model_size,
        notes=tuple(notes),
    )
