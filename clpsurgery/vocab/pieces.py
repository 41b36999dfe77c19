"""A target token's pieces under the source tokenizer: the token's text (the bytes it stands for),
encoded by the source's own tokenizer. What FVT (Fast Vocabulary Transfer) mixes, with no helper."""

from __future__ import annotations

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.vocabulary import Vocabulary, byte_encoder


def _source_tokenizer(source: Vocabulary):
    from tokenizers import Tokenizer

    path = source.path / "tokenizer.json" if source.path.is_dir() else source.path
    if path.name != "tokenizer.json" or not path.is_file():
        raise SurgeryError(source.path, "--method fvt encodes with the source's tokenizer.json, which is not there")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library's own parse errors
        raise SurgeryError(path, f"the tokenizers library cannot load it ({' '.join(str(e).split())[:200]})") from e


def _byte_pieces(source: Vocabulary, data: bytes) -> list[int] | None:
    """The source's own byte tokens for raw bytes (GPT-2's byte characters, or <0xNN>), if it has them."""
    if source.style == "byte-level":
        chars = byte_encoder()
        ids = [source.token_to_id.get(chars[b]) for b in data]
    else:
        ids = [source.token_to_id.get(f"<0x{b:02X}>") for b in data]
    return None if any(i is None for i in ids) else [int(i) for i in ids]


def text_pieces(source: Vocabulary, texts: list[str]) -> list[list[int]]:
    """The source ids of each text under the source's own tokenizer."""
    tokenizer = _source_tokenizer(source)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def source_pieces(source: Vocabulary, target: Vocabulary, target_ids: np.ndarray, source_rows: int) -> list[list[int]]:
    """For each target id, the source ids of its text under the source tokenizer (an empty list
    where it has no token, or its bytes are neither text nor bytes the source has)."""
    tokenizer = _source_tokenizer(source)
    tokens = target.id_to_token()
    pieces: list[list[int]] = [[] for _ in range(len(target_ids))]
    texts: list[str] = []
    at: list[int] = []
    for row, target_id in enumerate(target_ids.tolist()):
        token = tokens.get(target_id)
        if token is None:
            continue
        data = target.meaning(token, target_id)
        try:
            texts.append(data.decode("utf-8"))
            at.append(row)
        except UnicodeDecodeError:  # part of a character: its bytes, where the source has byte tokens
            pieces[row] = _byte_pieces(source, data) or []
    for row, encoding in zip(at, tokenizer.encode_batch(texts, add_special_tokens=False)):
        pieces[row] = encoding.ids
    return [[i for i in ids if 0 <= i < source_rows] for ids in pieces]
