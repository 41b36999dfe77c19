"""Vocabularies read with `tokenizers`, and the overlap between two of them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import SurgeryError

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
)


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's token strings by id, added and special tokens included."""

    path: Path
    token_to_id: dict[str, int]
    special_tokens: tuple[str, ...]

    @property
    def size(self) -> int:
        """Rows an embedding needs: one past the largest id."""
        return max(self.token_to_id.values()) + 1

    def id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in self.token_to_id.items()}


def tokenizer_path(place: Path) -> Path:
    """The tokenizer.json of a model folder, or the file itself."""
    place = Path(place)
    return place / TOKENIZER_FILE if place.is_dir() else place


def load_vocabulary(place: str | os.PathLike[str]) -> Vocabulary:
    """Read a tokenizer.json (or the one in a folder) with `tokenizers`."""
    path = tokenizer_path(Path(place))
    if not path.is_file():
        raise SurgeryError(path, "tokenizer not found (a tokenizer.json is needed)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SurgeryError(path, f"cannot read the tokenizer: {first_line}") from e
    token_to_id = tokenizer.get_vocab(with_added_tokens=True)
    if not token_to_id:
        raise SurgeryError(path, "tokenizer has an empty vocabulary")
    special = tuple(
        sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special), key=token_to_id.get)
    )
    return Vocabulary(path=path, token_to_id=token_to_id, special_tokens=special)


@dataclass(frozen=True)
class Overlap:
    """Tokens in both vocabularies (by string, as the paper does) and the target ids left over.

    `target_ids[i]` and `source_ids[i]` name the same token string; `missing_ids` are the target
    ids [0, target_size) that no shared token covers, gaps in the id space included.
    """

    target_ids: np.ndarray
    source_ids: np.ndarray
    missing_ids: np.ndarray
    target_size: int

    @property
    def count(self) -> int:
        return int(self.target_ids.size)


def exact_overlap(source: Vocabulary, target: Vocabulary, source_rows: int) -> Overlap:
    """Overlap by identical token string; source ids past the source embedding are ignored."""
    pairs = sorted(
        (target_id, source.token_to_id[token])
        for token, target_id in target.token_to_id.items()
        if token in source.token_to_id and source.token_to_id[token] < source_rows
    )
    target_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    source_ids = np.array([p[1] for p in pairs], dtype=np.int64)
    covered = np.zeros(target.size, dtype=bool)
    covered[target_ids] = True
    missing_ids = np.flatnonzero(~covered).astype(np.int64)
    return Overlap(target_ids, source_ids, missing_ids, target.size)
