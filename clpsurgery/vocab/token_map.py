"""Per-token overrides, `--map TARGET=SOURCE`: the row of one target token decided by hand.

- `TARGET=SOURCE`, SOURCE a source token (its exact string): the target row is that source row,
  copied like an overlap pair (kind `map`), whatever the overlap had decided.
- `TARGET=text:SOME TEXT`: the target row combines the source rows of the text's pieces under the
  source tokenizer (their mean, as fvt makes rows), whatever the method made it.

TARGET is a target token's exact string. Maps come from `--map` (repeatable) and `--map-file`
(one per line; blank lines and lines starting with `#` skipped); a later map of the same target
wins. Any name that is not a token is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.vocabulary import MATCH_KINDS, Overlap, Vocabulary

TEXT_PREFIX = "text:"


@dataclass(frozen=True)
class TokenMap:
    """One override: the target token, and the source row it copies or the pieces it combines."""

    target: str
    target_id: int
    source: str | None = None  # a source token's string: its row is copied
    source_id: int | None = None
    text: str | None = None  # text whose pieces under the source tokenizer are combined
    pieces: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        if self.source_id is not None:
            return {"target": self.target, "target_id": self.target_id, "source": self.source, "source_id": self.source_id}
        return {"target": self.target, "target_id": self.target_id, "text": self.text, "pieces": list(self.pieces)}


def read_map_lines(maps: tuple[str, ...], map_file: str | None) -> list[tuple[str, str, str]]:
    """(where, TARGET, SOURCE) for each map, the file's first, then --map's in order."""
    lines: list[tuple[str, str]] = []
    if map_file is not None:
        path = Path(map_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SurgeryError(path, f"cannot read the map file ({type(e).__name__})") from e
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((f"{path}:{number}", line))
    lines += [("--map", m) for m in maps]
    out = []
    for where, line in lines:
        target, sep, source = line.partition("=")
        if not sep or not target or not source:
            raise SurgeryError(where, f"{line!r} is not TARGET=SOURCE (a source token, or text:SOME TEXT)")
        out.append((where, target, source))
    return out


def resolve_maps(lines: list[tuple[str, str, str]], source: Vocabulary, target: Vocabulary, source_rows: int, encode) -> tuple[TokenMap, ...]:
    """Each map checked against the two vocabularies; `encode(texts)` gives the source pieces of
    texts (the source tokenizer, called only when some map has text)."""
    chosen: dict[int, TokenMap] = {}
    texts: list[tuple[int, str, str, str]] = []
    for where, target_token, spec in lines:
        target_id = target.token_to_id.get(target_token)
        if target_id is None:
            raise SurgeryError(where, f"{target_token!r} is not a token of the target tokenizer")
        if spec.startswith(TEXT_PREFIX):
            text = spec[len(TEXT_PREFIX):]
            if not text:
                raise SurgeryError(where, f"{spec!r} names no text")
            texts.append((target_id, target_token, text, where))
            chosen.pop(target_id, None)
            continue
        source_id = source.token_to_id.get(spec)
        if source_id is None:
            raise SurgeryError(where, f"{spec!r} is not a token of the source tokenizer (write text:{spec} to combine its pieces)")
        if source_id >= source_rows:
            raise SurgeryError(where, f"source token {spec!r} has id {source_id}, past the source embedding's {source_rows} rows")
        chosen[target_id] = TokenMap(target_token, target_id, source=spec, source_id=source_id)
        texts = [t for t in texts if t[0] != target_id]
    if texts:
        for (target_id, target_token, text, where), pieces in zip(texts, encode([t[2] for t in texts])):
            pieces = [p for p in pieces if 0 <= p < source_rows]
            if not pieces:
                raise SurgeryError(where, f"the source tokenizer gives no piece for {text!r}")
            chosen[target_id] = TokenMap(target_token, target_id, text=text, pieces=tuple(pieces))
    return tuple(chosen[t] for t in sorted(chosen))


def mapped_overlap(overlap: Overlap, maps: tuple[TokenMap, ...]) -> Overlap:
    """The overlap with the maps applied: a copy map is a pair of kind `map`; a text map takes its
    target out of the pairs (its row is combined)."""
    if not maps:
        return overlap
    pairs = dict(zip(overlap.target_ids.tolist(), zip(overlap.source_ids.tolist(), overlap.kinds.tolist() if overlap.kinds is not None else [1] * overlap.count)))
    for m in maps:
        if m.source_id is not None:
            pairs[m.target_id] = (m.source_id, MATCH_KINDS.index("map"))
        else:
            pairs.pop(m.target_id, None)
    order = sorted(pairs)
    target_ids = np.array(order, dtype=np.int64)
    covered = np.zeros(overlap.target_size, dtype=bool)
    covered[target_ids] = True
    return Overlap(
        target_ids,
        np.array([pairs[t][0] for t in order], dtype=np.int64),
        np.flatnonzero(~covered).astype(np.int64),
        overlap.target_size,
        np.array([pairs[t][1] for t in order], dtype=np.int8),
        overlap.match,
    )
