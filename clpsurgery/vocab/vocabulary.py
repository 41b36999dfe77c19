"""Vocabularies, what their tokens stand for, and the overlap between two of them.

The overlap is a list of (target id, source id) pairs built from two kinds of match:

- **role**: special tokens are matched by what they do (eos, bos, unk, pad, sep, cls, mask), not by
  spelling: the source's eos row goes to the target's eos id whether they are spelled `</s>` or
  `<|endoftext|>`. A special token with no role in common falls back to its exact string.
- **string**: every other token, under `--match exact` (the paper: identical token strings) or
  `--match canonical` (identical *meaning*: the bytes a token stands for, with the byte-level
  character map inverted, `▁` read as a space, `<0xNN>` read as its byte, a WordPiece word start
  read with its leading space and a `##` continuation without). Under `canonical` the pairs whose
  strings also agree are counted apart from those that only agree in meaning.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.tokenizer_files import (
    BYTE_TOKEN,
    ROLES,
    SENTENCEPIECE_FILES,
    TokenizerData,
    fill_roles,
    read_gguf_vocabulary,
    read_json_object,
    read_sentencepiece_model,
    read_tokenizer_json,
    read_vocab_json,
    read_vocab_txt,
)

TOKENIZER_FILE = "tokenizer.json"
# Files that describe a tokenizer and travel with it into the output folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
MATCH_KINDS = ("role", "string", "canonical", "map", "padding")
# map: a pair set by hand (--map); padding: a source vocab-padding row an extension keeps at its id


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's token strings by id, added and special tokens included."""

    path: Path
    token_to_id: dict[str, int]
    special_tokens: tuple[str, ...]
    style: str = "plain"
    roles: dict[str, int] = field(default_factory=dict)
    added_ids: frozenset[int] = frozenset()
    byte_ids: frozenset[int] = frozenset()
    continuing_prefix: str = "##"
    format: str = "tokenizer.json"

    @property
    def size(self) -> int:
        """Rows an embedding needs: one past the largest id."""
        return max(self.token_to_id.values()) + 1

    def id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in self.token_to_id.items()}

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.token_to_id[t] for t in self.special_tokens)

    def meaning(self, token: str, token_id: int) -> bytes:
        """The bytes a (non-special) token stands for in running text."""
        if token_id in self.added_ids:
            return token.encode("utf-8")
        if token_id in self.byte_ids:
            m = BYTE_TOKEN.fullmatch(token)
            if m:
                return bytes([int(m.group(1), 16)])
        if self.style == "byte-level":
            inverse = byte_decoder()
            if all(c in inverse for c in token):
                return bytes(inverse[c] for c in token)
            return token.encode("utf-8")
        if self.style == "metaspace":
            return token.replace("▁", " ").encode("utf-8")
        if self.style == "wordpiece":
            prefix = self.continuing_prefix
            if token.startswith(prefix) and len(token) > len(prefix):
                return token[len(prefix):].encode("utf-8")
            if all(unicodedata.category(c)[0] in "PS" for c in token):
                return token.encode("utf-8")  # punctuation is its own word and takes no space
            return b" " + token.encode("utf-8")
        return token.encode("utf-8")


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's byte-to-character map (printable bytes as themselves, the rest shifted past 255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_encoder().items()}


def tokenizer_path(place: Path) -> Path:
    """The tokenizer.json of a model folder, or the file itself."""
    place = Path(place)
    return place / TOKENIZER_FILE if place.is_dir() else place


def find_tokenizer_file(place: Path) -> Path | None:
    """The file a folder's vocabulary is read from: tokenizer.json, then a SentencePiece model,
    then vocab.json (+ merges.txt), then vocab.txt."""
    if not place.is_dir():
        return place if place.is_file() else None
    for name in (TOKENIZER_FILE, *SENTENCEPIECE_FILES, "vocab.json", "vocab.txt"):
        if (place / name).is_file():
            return place / name
    return None


def read_tokenizer_data(path: Path) -> TokenizerData:
    """Read by name, then by content: GGUF magic, a JSON object, else a SentencePiece protobuf."""
    name = path.name
    if name == "vocab.json":
        return read_vocab_json(path.parent)
    if name == "vocab.txt":
        return read_vocab_txt(path.parent)
    try:
        with open(path, "rb") as f:
            start = f.read(64)
    except OSError as e:
        raise SurgeryError(path, f"cannot read the tokenizer: {e.strerror or e}") from e
    if start.startswith(b"GGUF"):
        return read_gguf_vocabulary(path)
    if start.lstrip()[:1] != b"{" and (".model" in name or start[:1] == b"\x0a"):
        return read_sentencepiece_model(path)
    return read_tokenizer_json(path)


def check_json_files(folder: Path, read: Path) -> None:
    """Every JSON file of TOKENIZER_FILES in `folder` is a JSON object, checked before anything is
    written: they are copied into the output as they are. `read`, the file the vocabulary came
    from, was parsed already."""
    for name in TOKENIZER_FILES:
        if name.endswith(".json") and folder / name != read:
            read_json_object(folder / name)


def load_vocabulary(place: str | os.PathLike[str], config: dict | None = None) -> Vocabulary:
    """Read a tokenizer (a file, or the one in a folder) and the roles of its special tokens.

    `config` (the model's config.json) supplies roles the tokenizer files do not declare.
    """
    place = Path(place)
    path = find_tokenizer_file(place)
    if path is None:
        where = place / TOKENIZER_FILE if place.is_dir() else place
        raise SurgeryError(
            where, "tokenizer not found (a tokenizer.json, tokenizer.model, vocab.json + merges.txt or vocab.txt is needed)"
        )
    data = read_tokenizer_data(path)
    if not data.token_to_id:
        raise SurgeryError(path, "tokenizer has an empty vocabulary")
    check_json_files(path.parent, read=path)
    fill_roles(data, path.parent, config)
    id_to_token = {i: t for t, i in data.token_to_id.items()}
    special = tuple(sorted({id_to_token[i] for i in data.special_ids if i in id_to_token}, key=data.token_to_id.get))
    return Vocabulary(
        path=path,
        token_to_id=data.token_to_id,
        special_tokens=special,
        style=data.style,
        roles=dict(data.roles),
        added_ids=frozenset(data.added_ids),
        byte_ids=frozenset(data.byte_ids),
        continuing_prefix=data.continuing_prefix,
        format=data.format,
    )


@dataclass(frozen=True)
class Overlap:
    """Tokens in both vocabularies and the target ids left over.

    `target_ids[i]` and `source_ids[i]` are one pair (sorted by target id; a source id may serve
    several target ids), `kinds[i]` says how they matched (an index into MATCH_KINDS);
    `missing_ids` are the target ids [0, target_size) no pair covers, gaps in the id space included.
    """

    target_ids: np.ndarray
    source_ids: np.ndarray
    missing_ids: np.ndarray
    target_size: int
    kinds: np.ndarray | None = None
    match: str = "exact"

    @property
    def count(self) -> int:
        return int(self.target_ids.size)

    def counts(self) -> dict[str, int]:
        """Pairs by kind: role (special tokens), string (same spelling), canonical (same meaning only)."""
        if self.kinds is None:
            return {"string": self.count}
        counts = {kind: int((self.kinds == i).sum()) for i, kind in enumerate(MATCH_KINDS)}
        for rare in ("map", "padding"):  # only where --map set some, or extend kept padding rows
            if not counts[rare]:
                del counts[rare]
        return counts


def role_pairs(source: Vocabulary, target: Vocabulary, source_rows: int) -> list[tuple[int, int, str]]:
    """(target id, source id, role) for each role both tokenizers declare; a target id takes the
    first role it has in ROLES order."""
    pairs, taken = [], set()
    for role in ROLES:
        t, s = target.roles.get(role), source.roles.get(role)
        if t is None or s is None or t in taken or not 0 <= s < source_rows:
            continue
        pairs.append((t, s, role))
        taken.add(t)
    return pairs


def match_overlap(source: Vocabulary, target: Vocabulary, source_rows: int, match: str = "exact") -> Overlap:
    """The overlap under a match rule; source ids past the source embedding are ignored."""
    if match not in ("exact", "canonical"):
        raise SurgeryError("--match", f"unknown rule {match!r}")
    chosen: dict[int, tuple[int, int]] = {t: (s, 0) for t, s, _ in role_pairs(source, target, source_rows)}
    target_special = target.special_ids
    source_special = source.special_ids
    # Special tokens without a shared role: the same string, as the paper would.
    for token in target.special_tokens:
        t = target.token_to_id[token]
        s = source.token_to_id.get(token)
        if t not in chosen and s is not None and s < source_rows:
            chosen[t] = (s, 1)
    if match == "exact":
        for token, t in target.token_to_id.items():
            s = source.token_to_id.get(token)
            if t in chosen or t in target_special or s is None or s >= source_rows or s in source_special:
                continue
            chosen[t] = (s, 1)
    else:
        by_meaning: dict[bytes, int] = {}
        # Regular tokens before byte tokens, lower ids first: a meaning names one source row.
        for token, s in sorted(source.token_to_id.items(), key=lambda ts: (ts[1] in source.byte_ids, ts[1])):
            if s >= source_rows or s in source_special:
                continue
            by_meaning.setdefault(source.meaning(token, s), s)
        source_tokens = source.id_to_token()
        for token, t in target.token_to_id.items():
            if t in chosen or t in target_special:
                continue
            s = by_meaning.get(target.meaning(token, t))
            if s is None:
                continue
            chosen[t] = (s, 1 if source_tokens.get(s) == token else 2)
    order = sorted(chosen)
    target_ids = np.array(order, dtype=np.int64)
    source_ids = np.array([chosen[t][0] for t in order], dtype=np.int64)
    kinds = np.array([chosen[t][1] for t in order], dtype=np.int8)
    covered = np.zeros(target.size, dtype=bool)
    covered[target_ids] = True
    missing_ids = np.flatnonzero(~covered).astype(np.int64)
    return Overlap(target_ids, source_ids, missing_ids, target.size, kinds, match)


def exact_overlap(source: Vocabulary, target: Vocabulary, source_rows: int) -> Overlap:
    """Overlap by identical token string (special tokens by role)."""
    return match_overlap(source, target, source_rows, "exact")


def special_mapping(source: Vocabulary, target: Vocabulary, overlap: Overlap) -> list[dict]:
    """Each target special token and the source row it gets (or none: combined from neighbours)."""
    source_tokens, target_roles = source.id_to_token(), {}
    for role, i in target.roles.items():
        target_roles.setdefault(i, role)
    pairs = dict(zip(overlap.target_ids.tolist(), overlap.source_ids.tolist()))
    rows = []
    for token in target.special_tokens:
        t = target.token_to_id[token]
        s = pairs.get(t)
        rows.append({
            "target": token,
            "target_id": t,
            "role": target_roles.get(t),
            "source": source_tokens.get(s) if s is not None else None,
            "source_id": s,
        })
    return rows
