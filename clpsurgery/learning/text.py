"""The user's text for score and refine: read strictly (UTF-8, not empty, not binary) and cut into
segments at line breaks, the unit each model tokenises and scores on its own."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError

# A segment holds whole lines up to about this many UTF-8 bytes: short enough that most fit one
# context window, long enough that little of the text sits at a segment's start.
SEGMENT_BYTES = 1500
# Beyond --max-bytes, read this much more so that the last segment still ends at a line break.
READ_MARGIN = 4 * SEGMENT_BYTES


@dataclass(frozen=True)
class Text:
    """A text file as read: its content (at most --max-bytes and a margin), its size and SHA-256."""

    path: Path
    content: str
    file_bytes: int
    sha256: str

    def segments(self, max_bytes: int | None = None) -> list[str]:
        return cut_segments([self.content], max_bytes)


def read_text(path: str | os.PathLike[str], max_bytes: int | None = None) -> Text:
    """The file as UTF-8 text; one clear line for a file that is empty, binary or not UTF-8.

    With `max_bytes`, only the start of the file is read (cut after its last whole line)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + READ_MARGIN)
    except IsADirectoryError as e:
        raise SurgeryError(path, "is a folder, not a text file") from e
    except OSError as e:
        raise SurgeryError(path, f"cannot be read: {e.strerror or e}") from e
    digest = _sha256(path) if max_bytes is not None and len(data) < size else hashlib.sha256(data).hexdigest()
    if len(data) < size:  # a prefix: end it at a line break, never inside a character
        data = data[: data.rfind(b"\n") + 1] or data
    if not data.strip():
        raise SurgeryError(path, "is empty (or only white space): there is no text to read")
    if b"\x00" in data:
        raise SurgeryError(path, f"is binary (a NUL byte at offset {data.index(0)}), not text")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(data) < size and e.start >= len(data) - 3:  # a character cut by the prefix
            content = data[: e.start].decode("utf-8")
        else:
            raise SurgeryError(path, f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from e
    return Text(path, content.removeprefix("\ufeff"), size, digest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _lines(document: str) -> Iterable[str]:
    """The document's lines, each with its line break (the last one may have none)."""
    start = 0
    while start < len(document):
        end = document.find("\n", start)
        end = len(document) if end < 0 else end + 1
        yield document[start:end]
        start = end


def cut_segments(documents: Iterable[str], max_bytes: int | None = None, segment_bytes: int = SEGMENT_BYTES) -> list[str]:
    """Whole lines gathered into segments of at most about `segment_bytes` UTF-8 bytes (a longer
    line is a segment of its own), never across documents; at most `max_bytes` in all (the
    segment that reaches it is the last). A document's last segment is dropped if it is only
    white space."""
    segments: list[str] = []
    total = 0
    for document in documents:
        current, current_bytes = "", 0
        for line in _lines(document):
            line_bytes = len(line.encode("utf-8"))
            if current and current_bytes + line_bytes > segment_bytes:
                segments.append(current)
                total += current_bytes
                current, current_bytes = "", 0
                if max_bytes is not None and total >= max_bytes:
                    return segments
            current += line
            current_bytes += line_bytes
        if current.strip():
            segments.append(current)
            total += current_bytes
        if max_bytes is not None and total >= max_bytes:
            return segments
    return segments
