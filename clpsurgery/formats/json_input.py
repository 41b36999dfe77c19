"""JSON from files we do not trust: any flaw becomes one SurgeryError naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from clpsurgery.errors import SurgeryError


def parse_json(place: str | os.PathLike[str], data: bytes, what: str = "JSON", unique_keys: bool = False) -> object:
    """Decode UTF-8 JSON, refusing what the reference loaders refuse (lone surrogates included).

    `unique_keys`: refuse an object that names a key twice (Python's json keeps the last silently).
    """

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        doc = dict(pairs)
        if len(doc) != len(pairs):
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise SurgeryError(place, f"{what} names {twice!r} twice")
        return doc

    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates if unique_keys else None)
        # Python accepts "\ud800" escapes that no UTF-8 writer (nor safetensors) can handle.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except RecursionError as e:
        raise SurgeryError(place, f"{what} is not valid JSON (nested too deeply)") from e
    except UnicodeEncodeError as e:
        raise SurgeryError(place, f"{what} holds a string that is not valid Unicode (a lone surrogate)") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers past the digit limit
        raise SurgeryError(place, f"{what} is not valid JSON ({e})") from e
    return doc


def read_json_file(path: Path, what: str = "file", unique_keys: bool = False) -> object:
    """Read and decode a JSON file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SurgeryError(path, f"cannot read: {e.strerror or e}") from e
    return parse_json(path, data, what, unique_keys)
