"""The safetensors header: parse and validate one before trusting it, and encode new ones.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the tensors' bytes.
Offsets in the JSON are relative to the byte buffer after the header; the tensors must cover
that buffer contiguously, and the file must end at the last tensor byte (as the reference
loader requires).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import parse_json

# Bytes per element of every dtype the format names.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

# The reference loader refuses headers of 100 MB or more.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype, shape and byte range within the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row along the first dimension (the whole tensor for a scalar)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class Header:
    """A validated header of one safetensors file."""

    path: Path
    header_bytes: int  # N, the JSON length
    file_size: int
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str] | None
    raw: bytes  # the JSON bytes as stored, for hashing

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes

    def absolute_range(self, name: str) -> tuple[int, int]:
        """Byte range of a tensor within the file."""
        info = self.tensors[name]
        return self.data_start + info.begin, self.data_start + info.end


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file; raise SurgeryError on any flaw.

    A length that cannot be right (over the limit, or past the end of the file) with no `{`
    after it is some other file (a README given as SOURCE), and said so; with the `{` it is a
    damaged header, and the length is named."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(9)
            if len(prefix) < 8:
                raise SurgeryError(path, f"not a safetensors file: {file_size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix[:8])
            if (n >= MAX_HEADER_BYTES or 8 + n > file_size) and prefix[8:] != b"{":
                raise SurgeryError(path, "not a safetensors file: it does not start with a header length and a JSON header")
            if n >= MAX_HEADER_BYTES:
                raise SurgeryError(path, f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > file_size:
                raise SurgeryError(path, f"header length {n} runs past the end of the file ({file_size} bytes): truncated or damaged")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(path, f"cannot read: {e.strerror or e}") from e
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate header JSON bytes against the file size."""
    doc = parse_json(path, raw, "header")
    if not isinstance(doc, dict):
        raise SurgeryError(path, "header is not a JSON object")
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SurgeryError(path, "__metadata__ must map strings to strings")
    entries = [_tensor_info(path, name, entry) for name, entry in doc.items()]
    entries.sort(key=lambda t: (t.begin, t.end))
    cursor = 0
    for info in entries:
        if info.begin < cursor:
            raise SurgeryError(path, f"tensor {info.name!r} at offset {info.begin} overlaps the previous tensor (which ends at {cursor})")
        if info.begin > cursor:
            raise SurgeryError(path, f"gap of {info.begin - cursor} bytes before tensor {info.name!r} at offset {info.begin}")
        cursor = info.end
    data_size = file_size - 8 - len(raw)
    if cursor != data_size:
        if cursor > data_size:
            raise SurgeryError(path, f"tensors need {cursor} data bytes but the file has {data_size}: truncated")
        raise SurgeryError(path, f"{data_size - cursor} trailing bytes after the last tensor")
    return Header(
        path=path,
        header_bytes=len(raw),
        file_size=file_size,
        tensors={t.name: t for t in entries},
        metadata=metadata,
        raw=raw,
    )


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SurgeryError(path, f"tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or object is unhashable
        raise SurgeryError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SurgeryError(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise SurgeryError(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise SurgeryError(path, f"tensor {name!r}: data_offsets end {end} is before begin {begin}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SurgeryError(
            path,
            f"tensor {name!r}: {end - begin} bytes at offset {begin}, but {dtype} {shape} needs {expected}",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay out a tensor: its name, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row along the first dimension (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * DTYPE_SIZES[self.dtype] if self.shape else self.nbytes


def layout_order(specs: list[TensorSpec], late: frozenset[str] = frozenset()) -> list[TensorSpec]:
    """Data order of a new file: larger elements first, then the tensors not named in `late`,
    then by name.

    Sorting makes the bytes independent of the order tensors were given in, and putting wide
    dtypes first keeps every tensor aligned to its element size (as the reference writer does).
    `late` puts rebuilt tensors after the copied ones of their element size, so the copied bytes
    of a rebuilt file lie in long runs before the rebuilt ones (any data order is valid
    safetensors as long as the ranges tile the buffer; outputs keep this layout across versions).
    """
    return sorted(specs, key=lambda s: (-DTYPE_SIZES[s.dtype], s.name in late, s.name))


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None, late: frozenset[str] = frozenset()) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix and space-padded JSON) for tensors laid out in `layout_order`.

    Returns the bytes and each tensor's (begin, end) offsets in the data buffer.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    if METADATA_KEY in names:
        raise ValueError(f"{METADATA_KEY} is not a tensor name")
    doc: dict[str, object] = {}
    if metadata is not None:
        doc[METADATA_KEY] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for spec in layout_order(specs, late):
        if spec.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {spec.dtype!r}")
        begin, cursor = cursor, cursor + spec.nbytes
        offsets[spec.name] = (begin, cursor)
        doc[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [begin, cursor]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
