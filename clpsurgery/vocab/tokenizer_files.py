"""Read a tokenizer's vocabulary from the files models ship: tokenizer.json, a SentencePiece
`tokenizer.model`, `vocab.json` + `merges.txt`, a WordPiece `vocab.txt`, or a GGUF file.

Each reader returns `TokenizerData`: token strings by id, which ids are special (matched by role,
never by string), which are added tokens read literally, the spelling convention of the rest
(`byte-level`: GPT-2's byte-to-character map, `Ġ` for a space; `metaspace`: SentencePiece's `▁`
for a space, `<0xNN>` byte tokens; `wordpiece`: `##` continuations; `plain`), and the roles
(bos, eos, unk, pad, sep, cls, mask) the tokenizer's own files declare.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import parse_json, read_json_file

ROLES = ("eos", "bos", "unk", "pad", "sep", "cls", "mask")
STYLES = ("byte-level", "metaspace", "wordpiece", "plain")
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# Well-known spellings, used only when no file declares a role.
ROLE_GUESSES = {
    "eos": ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "sep": ("[SEP]",),
    "cls": ("[CLS]",),
    "mask": ("<mask>", "[MASK]"),
}
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class TokenizerData:
    """What a tokenizer file says about its vocabulary."""

    path: Path
    format: str
    token_to_id: dict[str, int]
    special_ids: set[int] = field(default_factory=set)
    added_ids: set[int] = field(default_factory=set)
    byte_ids: set[int] = field(default_factory=set)
    style: str = "plain"
    continuing_prefix: str = "##"
    roles: dict[str, int] = field(default_factory=dict)


# --- tokenizer.json ---------------------------------------------------------------------------


def _components(node: object) -> list[dict]:
    """A pre-tokenizer/normalizer/decoder and, for a Sequence, its members, flattened."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("pretokenizers", "normalizers", "decoders"):
        for child in node.get(key) or []:
            found.extend(_components(child))
    return found


def _style_from_counts(token_to_id: dict[str, int]) -> str:
    """Guess the convention from the spelling of the tokens themselves."""
    tokens = list(token_to_id)
    if not tokens:
        return "plain"
    g = sum(t.startswith("Ġ") for t in tokens)
    m = sum(t.startswith("▁") for t in tokens)
    w = sum(t.startswith("##") for t in tokens)
    best = max((g, "byte-level"), (m, "metaspace"), (w, "wordpiece"))
    return best[1] if best[0] > 0.02 * len(tokens) else "plain"


def tokenizer_json_style(doc: dict) -> tuple[str, str]:
    """(style, continuing prefix) of a tokenizer.json document."""
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    parts = _components(doc.get("pre_tokenizer")) + _components(doc.get("decoder")) + _components(doc.get("normalizer"))
    types = {p.get("type") for p in parts}
    prefix = model.get("continuing_subword_prefix") or "##"
    if "ByteLevel" in types:
        return "byte-level", prefix
    replaces_space = any(
        p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts
    )
    if "Metaspace" in types or replaces_space or model.get("type") == "Unigram":
        return "metaspace", prefix
    if model.get("type") == "WordPiece" or "WordPiece" in types:
        return "wordpiece", prefix
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return _style_from_counts(vocab), prefix
    return "plain", prefix


def read_tokenizer_json(path: Path) -> TokenizerData:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SurgeryError(path, f"cannot read the tokenizer: {first_line}") from e
    token_to_id = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = {}
    style, prefix = tokenizer_json_style(doc if isinstance(doc, dict) else {})
    data = TokenizerData(path, "tokenizer.json", token_to_id, style=style, continuing_prefix=prefix)
    data.special_ids = {i for i, t in added.items() if t.special}
    data.added_ids = set(added)
    model = doc.get("model") if isinstance(doc, dict) and isinstance(doc.get("model"), dict) else {}
    if model.get("byte_fallback") or style == "metaspace":
        data.byte_ids = {i for t, i in token_to_id.items() if BYTE_TOKEN.fullmatch(t) and i not in data.added_ids}
    return data


# --- SentencePiece tokenizer.model (a protobuf, read by hand) ----------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; values are ints or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
            if pos > len(buf):
                raise ValueError("truncated field")
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _int32(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def read_sentencepiece_model(path: Path) -> TokenizerData:
    """A SentencePiece model file: pieces, their types, and the trainer's special ids."""
    try:
        buf = path.read_bytes()
        pieces: list[tuple[str, int]] = []
        trainer: dict[int, int] = {}
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 2:
                piece, kind = "", SP_NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 3 and w == 0:
                        kind = v
                pieces.append((piece, kind))
            elif number == 2 and wire == 2:
                trainer = {n: v for n, w, v in _fields(value) if w == 0}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SurgeryError(path, f"cannot read the SentencePiece model: {e}") from e
    if not pieces:
        raise SurgeryError(path, "SentencePiece model has no pieces")
    token_to_id: dict[str, int] = {}
    for i, (piece, _) in enumerate(pieces):
        token_to_id.setdefault(piece, i)
    data = TokenizerData(path, "sentencepiece", token_to_id, style="metaspace")
    data.special_ids = {i for i, (_, kind) in enumerate(pieces) if kind in (SP_CONTROL, SP_UNKNOWN)}
    data.byte_ids = {i for i, (_, kind) in enumerate(pieces) if kind == SP_BYTE}
    data.added_ids = {i for i, (_, kind) in enumerate(pieces) if kind == SP_USER_DEFINED}
    defaults = {"unk": (40, 0), "bos": (41, 1), "eos": (42, 2), "pad": (43, -1)}
    for role, (number, default) in defaults.items():
        value = _int32(trainer[number]) if number in trainer else default
        if 0 <= value < len(pieces):
            data.roles[role] = value
    return data


# --- vocab.json + merges.txt, vocab.txt -------------------------------------------------------


def read_vocab_json(folder: Path) -> TokenizerData:
    """A byte-level BPE folder (GPT-2, RoBERTa): vocab.json, merges.txt, optional added_tokens.json."""
    path = folder / "vocab.json"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(path, f"cannot read the vocabulary: {e}") from e
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise SurgeryError(path, "is not an object of token to id")
    if not (folder / "merges.txt").is_file():
        raise SurgeryError(folder / "merges.txt", "not found (vocab.json needs its merges.txt)")
    token_to_id = dict(vocab)
    data = TokenizerData(path, "vocab.json+merges.txt", token_to_id, style="byte-level")
    for token, i in read_json_object(folder / "added_tokens.json").items():
        if isinstance(i, int):
            token_to_id[token] = i
            data.added_ids.add(i)
    _merge_tokenizer_config_added(folder, data)
    return data


def read_vocab_txt(folder: Path) -> TokenizerData:
    """A WordPiece vocab.txt: one token per line, the line number is the id."""
    path = folder / "vocab.txt"
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    token_to_id: dict[str, int] = {}
    for i, token in enumerate(lines):
        token_to_id.setdefault(token, i)
    data = TokenizerData(path, "vocab.txt", token_to_id, style="wordpiece")
    data.special_ids = {i for t, i in token_to_id.items() if re.fullmatch(r"\[[A-Z]+\]", t)}
    _merge_tokenizer_config_added(folder, data)
    return data


def _merge_tokenizer_config_added(folder: Path, data: TokenizerData) -> None:
    """Added tokens declared in tokenizer_config.json's added_tokens_decoder."""
    config = read_json_object(folder / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return
    for key, entry in decoder.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not str(key).isdigit():
            continue
        i = int(key)
        data.token_to_id.setdefault(entry["content"], i)
        data.added_ids.add(i)
        if entry.get("special"):
            data.special_ids.add(i)


# --- GGUF (vocab-only or full files) -----------------------------------------------------------

GGUF_STYLES = {"gpt2": "byte-level", "llama": "metaspace", "t5": "metaspace", "bert": "metaspace", "plamo2": "plain", "rwkv": "plain"}

# Value types of the GGUF format (ggml's gguf.GGUFValueType): scalars by struct code, then the two
# variable-length types. A string is a u64 length and UTF-8 bytes; an array is an element type, a
# u64 count and the elements.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, key-value count
GGUF_MAX_NESTING = 8  # arrays of arrays, deeper than any file needs
# The fewest bytes a value of each type takes: what a declared count is checked against.
_GGUF_LEAST = {**{k: struct.calcsize("<" + c) for k, c in _GGUF_SCALARS.items()}, GGUF_STRING: 8, GGUF_ARRAY: 12}
_GGUF_LEAST_KV = 8 + 4 + 1  # key length, value type, a one-byte value

GGUF_TOKENS = "tokenizer.ggml.tokens"
GGUF_TOKEN_TYPE = "tokenizer.ggml.token_type"
GGUF_MODEL = "tokenizer.ggml.model"
# The role ids as llama.cpp's converter names them (gguf.Keys.Tokenizer; "seperator" is its spelling;
# cls_token_id is written by older converters only).
GGUF_ROLE_KEYS = {
    "eos": "tokenizer.ggml.eos_token_id",
    "bos": "tokenizer.ggml.bos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}


def read_gguf_metadata(path: Path, wanted: str | Collection[str] = "tokenizer.") -> dict[str, object]:
    """The key-value metadata of a GGUF file (version 2 or 3): the keys that start with `wanted`
    (a prefix), or the keys named in it (a collection).

    Read from the file's header only (tensor infos and data are not touched), every length and
    count checked against the bytes left before anything is read or allocated: a damaged or
    hostile file is a SurgeryError. Strings are decoded as UTF-8 (bad bytes replaced).
    """
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(GGUF_HEADER.size)
            if head[:4] != b"GGUF":
                raise SurgeryError(path, "is not a GGUF file (no GGUF magic)")
            if len(head) < GGUF_HEADER.size:
                raise SurgeryError(path, f"truncated GGUF header ({len(head)} bytes of {GGUF_HEADER.size})")
            _, version, _tensors, count = GGUF_HEADER.unpack(head)
            if version not in (2, 3):
                if version and not version & 0xFFFF:
                    raise SurgeryError(path, "GGUF file is big-endian; only little-endian files are supported")
                raise SurgeryError(path, f"GGUF version {version} is not supported (2 or 3)")
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # something that is not a regular file
                raise SurgeryError(path, f"cannot read the GGUF file: {e}") from e
            with buf:
                return _gguf_key_values(path, buf, count, wanted)
    except OSError as e:
        raise SurgeryError(path, f"cannot read the GGUF file: {e.strerror or e}") from e


def _gguf_key_values(path: Path, buf, count: int, wanted: str | Collection[str]) -> dict[str, object]:
    end = len(buf)

    def need(at: int, n: int, what: str) -> None:
        if n > end - at:
            raise SurgeryError(path, f"truncated GGUF metadata: {what} at byte {at} needs {n} bytes, {max(end - at, 0)} left")

    def string(at: int, what: str, keep: bool) -> tuple[str | None, int]:
        need(at, 8, what)
        (n,) = struct.unpack_from("<Q", buf, at)
        need(at + 8, n, what)
        text = buf[at + 8 : at + 8 + n].decode("utf-8", errors="replace") if keep else None
        return text, at + 8 + n

    def value(kind: int, at: int, key: str, keep: bool, depth: int = 0) -> tuple[object, int]:
        if kind in _GGUF_SCALARS:
            code = "<" + _GGUF_SCALARS[kind]
            need(at, _GGUF_LEAST[kind], f"the value of {key!r}")
            return (struct.unpack_from(code, buf, at)[0] if keep else None), at + _GGUF_LEAST[kind]
        if kind == GGUF_STRING:
            return string(at, f"the value of {key!r}", keep)
        if kind != GGUF_ARRAY:
            raise SurgeryError(path, f"GGUF key {key!r} has unknown value type {kind}")
        if depth >= GGUF_MAX_NESTING:
            raise SurgeryError(path, f"GGUF key {key!r} nests arrays more than {GGUF_MAX_NESTING} deep")
        need(at, 12, f"the array header of {key!r}")
        inner, n = struct.unpack_from("<IQ", buf, at)
        at += 12
        if inner not in _GGUF_LEAST:
            raise SurgeryError(path, f"GGUF key {key!r} is an array of unknown value type {inner}")
        if n > (end - at) // _GGUF_LEAST[inner]:
            raise SurgeryError(path, f"GGUF key {key!r} declares {n} elements, more than the {end - at} bytes left can hold")
        if inner in _GGUF_SCALARS:
            items = list(struct.unpack_from(f"<{n}{_GGUF_SCALARS[inner]}", buf, at)) if keep else None
            return items, at + n * _GGUF_LEAST[inner]
        items = [] if keep else None
        for _ in range(n):
            item, at = value(inner, at, key, keep, depth + 1)
            if keep:
                items.append(item)
        return items, at

    pos = GGUF_HEADER.size
    if count > (end - pos) // _GGUF_LEAST_KV:
        raise SurgeryError(path, f"GGUF header declares {count} metadata keys, more than the file's {end} bytes can hold")
    out: dict[str, object] = {}
    seen: set[str] = set()
    for index in range(count):
        key, pos = string(pos, f"metadata key {index}", True)
        if key in seen:
            raise SurgeryError(path, f"GGUF key {key!r} appears twice")
        seen.add(key)
        need(pos, 4, f"the value type of {key!r}")
        (kind,) = struct.unpack_from("<I", buf, pos)
        keep = key.startswith(wanted) if isinstance(wanted, str) else key in wanted
        item, pos = value(kind, pos + 4, key, keep)
        if keep:
            out[key] = item
    return out


_KIND_NAMES = {bool: "bool", int: "integer", float: "float", str: "string", list: "array"}


def _kind_of(value: object, element: type | None = None) -> str:
    """How a metadata value reads in a message: "a string", "an array of integers" (an array is
    named by its first element that is not of type `element`)."""
    name = _KIND_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, list):
        odd = next((v for v in value if type(v) is not element), None)
        if odd is not None:
            name += f" of {_KIND_NAMES.get(type(odd), type(odd).__name__)}s"
    return ("an " if name[0] in "aeiou" else "a ") + name


def read_gguf_vocabulary(path: Path) -> TokenizerData:
    """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`); a key the reader uses
    with the wrong type is an error, a role id outside the vocabulary is ignored (as llama.cpp does)."""
    meta = read_gguf_metadata(path, {GGUF_TOKENS, GGUF_TOKEN_TYPE, GGUF_MODEL, *GGUF_ROLE_KEYS.values()})
    tokens = meta.get(GGUF_TOKENS)
    if tokens is None or tokens == []:
        raise SurgeryError(path, f"GGUF file holds no tokenizer ({GGUF_TOKENS})")
    if not isinstance(tokens, list) or any(type(t) is not str for t in tokens):
        raise SurgeryError(path, f"GGUF key {GGUF_TOKENS!r} is {_kind_of(tokens, str)}, not an array of strings")
    types = meta.get(GGUF_TOKEN_TYPE)
    if types is None:
        types = [SP_NORMAL] * len(tokens)
    elif not isinstance(types, list) or any(type(k) is not int for k in types):
        raise SurgeryError(path, f"GGUF key {GGUF_TOKEN_TYPE!r} is {_kind_of(types, int)}, not an array of integers")
    elif len(types) != len(tokens):
        raise SurgeryError(path, f"GGUF key {GGUF_TOKEN_TYPE!r} has {len(types)} entries for {len(tokens)} tokens")
    model = meta.get(GGUF_MODEL, "")
    if not isinstance(model, str):
        raise SurgeryError(path, f"GGUF key {GGUF_MODEL!r} is {_kind_of(model)}, not a string")
    token_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        token_to_id.setdefault(t, i)
    style = GGUF_STYLES.get(model) or ("metaspace" if model.startswith("gemma") else _style_from_counts(token_to_id))
    data = TokenizerData(path, f"gguf ({model})", token_to_id, style=style)
    data.special_ids = {i for i, k in enumerate(types) if k in (SP_CONTROL, SP_UNKNOWN)}
    data.added_ids = {i for i, k in enumerate(types) if k == SP_USER_DEFINED}
    data.byte_ids = {i for i, k in enumerate(types) if k == SP_BYTE}
    for role, key in GGUF_ROLE_KEYS.items():
        value = meta.get(key)
        if value is None:
            continue
        if type(value) is not int:
            raise SurgeryError(path, f"GGUF key {key!r} is {_kind_of(value)}, not a token id")
        if 0 <= value < len(tokens):
            data.roles[role] = value
    return data


# --- roles -------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict:
    """A JSON object file beside the tokenizer (tokenizer_config.json, special_tokens_map.json,
    added_tokens.json), {} where there is none. One that is not a JSON object is an error naming
    it: these files travel into the output as they are."""
    if not path.is_file():
        return {}
    return json_object(path, read_json_file(path, "tokenizer file"))


def parse_json_object(path: Path, data: bytes) -> dict:
    """The bytes of a JSON object file read earlier from `path` (see read_json_object)."""
    return json_object(path, parse_json(path, data, "tokenizer file"))


def json_object(path: Path, doc: object) -> dict:
    if not isinstance(doc, dict):
        raise SurgeryError(path, f"tokenizer file is not a JSON object (it holds a JSON {_json_kind(doc)})")
    return doc


def _json_kind(doc: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(doc), "number")


def token_string(value: object) -> str | None:
    """A special token as a config spells it: a string, or an added-token object's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def fill_roles(data: TokenizerData, folder: Path | None, config: dict | None = None) -> None:
    """Roles from tokenizer_config.json and special_tokens_map.json, then config.json ids (of special
    tokens only), then well-known spellings; a role the reader already found (SentencePiece, GGUF)
    is kept."""
    size = max(data.token_to_id.values()) + 1 if data.token_to_id else 0
    if folder is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            doc = read_json_object(folder / name)
            for role in ROLES:
                token = token_string(doc.get(f"{role}_token"))
                if role not in data.roles and token is not None and token in data.token_to_id:
                    data.roles[role] = data.token_to_id[token]
    if config:
        from clpsurgery.vocab.architecture import text_config

        for role in ROLES:
            value = text_config(config).get(f"{role}_token_id", config.get(f"{role}_token_id"))
            if isinstance(value, list) and value:
                value = value[0]
            # Config ids are often a library's defaults: trusted only where they name a special token.
            if role not in data.roles and isinstance(value, int) and 0 <= value < size and value in data.special_ids:
                data.roles[role] = value
    for role, spellings in ROLE_GUESSES.items():
        if role in data.roles:
            continue
        for token in spellings:
            if token in data.token_to_id:
                data.roles[role] = data.token_to_id[token]
                break
    data.special_ids |= set(data.roles.values())
