"""JSON from files we do not trust: any flaw becomes one SurgeryError naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SurgeryError


def parse_json(place: str | os.PathLike[str], data: bytes, what: str = "JSON") -> object:
    """Decode UTF-8 JSON, refusing what the reference loaders refuse (lone surrogates included)."""
    try:
        doc = json.loads(data.decode("utf-8"))
        # Python accepts "\ud800" escapes that no UTF-8 writer (nor safetensors) can handle.
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except RecursionError as e:
        raise SurgeryError(place, f"{what} is not valid JSON (nested too deeply)") from e
    except UnicodeEncodeError as e:
        raise SurgeryError(place, f"{what} holds a string that is not valid Unicode (a lone surrogate)") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers past the digit limit
        raise SurgeryError(place, f"{what} is not valid JSON ({e})") from e
    return doc


def read_json_file(path: Path, what: str = "file") -> object:
    """Read and decode a JSON file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SurgeryError(path, f"cannot read: {e.strerror or e}") from e
    return parse_json(path, data, what)
