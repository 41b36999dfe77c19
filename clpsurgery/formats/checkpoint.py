"""A checkpoint on disk: one safetensors file, or a folder of one file or of shards plus an index.

Headers are validated on open; tensor bytes are read through memory maps, only the rows asked
for, so opening a 7B folder costs its headers and nothing more.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.formats.safetensors_header import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
GATHER_WINDOW_BYTES = 64 * 1024 * 1024
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class StoredRows:
    """Rows of a tensor as stored: `data` is uint8 [rows, bytes per row] (flat for a scalar), in
    the file's little-endian `dtype`; `shape` is the rows' tensor shape. Frameworks view it
    without a copy (pipeline.tensor_io.as_tensor)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @classmethod
    def of(cls, owned_bytes: np.ndarray, info: TensorInfo, rows: int) -> StoredRows:
        shape = (rows, *info.shape[1:]) if info.shape else ()
        return cls(info.dtype, shape, owned_bytes.reshape(rows, info.row_bytes) if info.shape else owned_bytes.reshape(-1))

    def finite_rows(self) -> np.ndarray:
        """Per row, whether every element is finite (no NaN, no Inf); integers always are."""
        rows = self.data if self.shape else self.data.reshape(1, -1)  # [rows, bytes per row], zero rows included
        if self.dtype not in FLOAT_BITS:
            return np.ones(rows.shape[0], dtype=bool)
        view, exponent = FLOAT_BITS[self.dtype]
        bits = rows.view(view)
        if self.dtype == "F8_E4M3":  # no Inf; NaN is S.1111.111 only
            return ~((bits & 0x7F) == 0x7F).any(axis=1)
        return ~((bits & exponent) == exponent).any(axis=1)  # all-ones exponent: Inf or NaN


# Unsigned view and exponent mask of each float dtype: a value is Inf or NaN when its exponent
# bits are all ones (IEEE 754 and bfloat16; F8_E4M3 has only NaN, handled apart).
FLOAT_BITS = {
    "F64": (np.uint64, np.uint64(0x7FF0_0000_0000_0000)),
    "F32": (np.uint32, np.uint32(0x7F80_0000)),
    "F16": (np.uint16, np.uint16(0x7C00)),
    "BF16": (np.uint16, np.uint16(0x7F80)),
    "F8_E5M2": (np.uint8, np.uint8(0x7C)),
    "F8_E4M3": (np.uint8, np.uint8(0x7F)),
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file's header and its entry."""

    header: Header
    info: TensorInfo

    @property
    def path(self) -> Path:
        return self.header.path

    def absolute_range(self) -> tuple[int, int]:
        return self.header.absolute_range(self.info.name)


@dataclass(frozen=True, eq=False)
class CheckpointLayout:
    """What a checkpoint holds, from its validated headers and index alone: a plain value, no
    open file (a plan keeps it; Checkpoint reads through it)."""

    root: Path
    headers: list[Header]
    index: dict | None
    index_path: Path | None
    tensors: dict[str, TensorRef] = field(init=False)

    def __post_init__(self) -> None:
        tensors: dict[str, TensorRef] = {}
        for header in self.headers:
            for name, info in header.tensors.items():
                if name in tensors:
                    raise SurgeryError(header.path, f"tensor {name!r} also in {tensors[name].path.name}")
                tensors[name] = TensorRef(header, info)
        object.__setattr__(self, "tensors", tensors)

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointLayout:
        """A .safetensors file or a model folder, every header and the index validated."""
        path = Path(path)
        if not path.exists():
            raise SurgeryError(path, "does not exist")
        if path.is_file():
            if path.name.endswith(".index.json"):
                return cls._open_index(path.parent, path)
            return cls(path.parent, [read_header(path)], None, None)
        if not path.is_dir():
            raise SurgeryError(path, "is neither a file nor a folder")
        index_path = path / INDEX_NAME
        if index_path.is_file():
            return cls._open_index(path, index_path)
        if (path / SINGLE_NAME).is_file():
            return cls(path, [read_header(path / SINGLE_NAME)], None, None)
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(files) == 1:
            return cls(path, [read_header(files[0])], None, None)
        if not files:
            raise SurgeryError(path, "no .safetensors file in this folder")
        raise SurgeryError(path, f"{len(files)} .safetensors files but no {INDEX_NAME} saying how they fit together")

    @classmethod
    def _open_index(cls, root: Path, index_path: Path) -> CheckpointLayout:
        index = read_json_file(index_path, "index", unique_keys=True)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SurgeryError(index_path, "has no weight_map object")
        shard_names: list[str] = []
        for tensor, shard in weight_map.items():
            _check_shard_name(index_path, root, tensor, shard)
            if shard not in shard_names:
                shard_names.append(shard)
        headers = []
        for shard in sorted(shard_names):
            shard_path = root / shard
            if not shard_path.is_file():
                raise SurgeryError(index_path, f"names shard {shard!r}, which is missing")
            headers.append(read_header(shard_path))
        layout = cls(root, headers, index, index_path)
        for tensor, shard in weight_map.items():
            ref = layout.tensors.get(tensor)
            if ref is None or ref.path.name != shard:
                raise SurgeryError(index_path, f"maps tensor {tensor!r} to {shard}, which does not hold it")
        unlisted = sorted(set(layout.tensors) - set(weight_map))
        if unlisted:
            raise SurgeryError(index_path, f"does not list tensor {unlisted[0]!r} found in {layout.tensors[unlisted[0]].path.name}")
        return layout

    # --- facts ---------------------------------------------------------------------------

    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.headers)

    @property
    def parameter_count(self) -> int:
        return sum(ref.info.numel for ref in self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name].info


class Checkpoint:
    """Reads a checkpoint's tensors through memory maps, row by row; its facts are its layout's."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self._maps: dict[Path, mmap.mmap] = {}
        self._files: dict[Path, object] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Open a .safetensors file or a model folder, validating every header and the index."""
        return cls(CheckpointLayout.open(path))

    root = property(lambda self: self.layout.root)
    headers = property(lambda self: self.layout.headers)
    index = property(lambda self: self.layout.index)
    index_path = property(lambda self: self.layout.index_path)
    tensors = property(lambda self: self.layout.tensors)
    is_sharded = property(lambda self: self.layout.is_sharded)
    total_bytes = property(lambda self: self.layout.total_bytes)
    parameter_count = property(lambda self: self.layout.parameter_count)

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def info(self, name: str) -> TensorInfo:
        return self.layout.info(name)

    # --- reading -------------------------------------------------------------------------

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            f = open(path, "rb")
            self._files[path] = f
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = m
        return m

    def raw_bytes(self, name: str, start_row: int = 0, stop_row: int | None = None) -> memoryview:
        """A zero-copy view of rows [start_row, stop_row) of a tensor's bytes in its mapped file."""
        ref = self.tensors[name]
        info = ref.info
        stop_row = info.rows if stop_row is None else stop_row
        if not 0 <= start_row <= stop_row <= info.rows:
            raise IndexError(f"rows {start_row}:{stop_row} outside {name} with {info.rows} rows")
        begin, _ = ref.absolute_range()
        m = self._map(ref.path)
        return memoryview(m)[begin + start_row * info.row_bytes : begin + stop_row * info.row_bytes]

    def read_rows(self, name: str, start_row: int = 0, stop_row: int | None = None) -> StoredRows:
        """Rows [start_row, stop_row) of a tensor, copied out of the file."""
        info = self.tensors[name].info
        stop_row = info.rows if stop_row is None else stop_row
        raw = self.raw_bytes(name, start_row, stop_row)
        rows = StoredRows.of(np.frombuffer(raw, dtype=np.uint8).copy(), info, stop_row - start_row)
        del raw
        self._release(name, start_row, stop_row)
        return rows

    def read_tensor(self, name: str) -> StoredRows:
        """A whole tensor, copied out of the file."""
        return self.read_rows(name)

    def gather_rows(self, name: str, rows: np.ndarray | list[int]) -> StoredRows:
        """The given rows of a 2-D-or-more tensor, in the order given, touching only those rows."""
        info = self.tensors[name].info
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= info.rows):
            raise IndexError(f"row index outside {name} with {info.rows} rows")
        gathered = np.empty((rows.size, info.row_bytes), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # Walk the tensor in windows of at most GATHER_WINDOW_BYTES, dropping each window's mapped
        # pages once its rows are copied out, so a 2 GB embedding never counts whole in our RSS.
        window_rows = max(1, GATHER_WINDOW_BYTES // max(1, info.row_bytes))
        start = 0
        while start < sorted_rows.size:
            first = int(sorted_rows[start])
            last = min(info.rows, first + window_rows)
            stop = int(np.searchsorted(sorted_rows, last, side="left"))
            window = np.frombuffer(self.raw_bytes(name, first, last), dtype=np.uint8).reshape(last - first, info.row_bytes)
            gathered[order[start:stop]] = window[sorted_rows[start:stop] - first]
            del window
            self._release(name, first, last)
            start = stop
        return StoredRows.of(gathered, info, rows.size)

    def prefetch_rows(self, name: str, rows: np.ndarray | list[int]) -> int:
        """Ask the kernel to read the given rows of a tensor into the page cache, in the
        background (posix_fadvise WILLNEED, one call per run of adjacent rows), so that a later
        gather_rows finds them there. Costs no memory of this process. Returns the calls made
        (0 where the OS has no posix_fadvise)."""
        if not hasattr(os, "posix_fadvise"):
            return 0
        ref = self.tensors[name]
        row_bytes = ref.info.row_bytes
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= ref.info.rows):
            raise IndexError(f"row index outside {name} with {ref.info.rows} rows")
        if rows.size == 0 or row_bytes == 0:
            return 0
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = rows[np.concatenate(([0], breaks))]
        lasts = rows[np.concatenate((breaks - 1, [rows.size - 1]))] + 1
        begin, _ = ref.absolute_range()
        fd = os.open(ref.path, os.O_RDONLY)
        try:
            for first, last in zip(firsts.tolist(), lasts.tolist()):
                os.posix_fadvise(fd, begin + first * row_bytes, (last - first) * row_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return int(firsts.size)

    def _release(self, name: str, start_row: int, stop_row: int) -> None:
        """Drop mapped pages of rows already copied out, so they stop counting as our memory.

        The pages stay in the page cache; only this process's mapping of them is dropped.
        """
        ref = self.tensors[name]
        m = self._maps.get(ref.path)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, _ = ref.absolute_range()
        start = begin + start_row * ref.info.row_bytes
        stop = begin + stop_row * ref.info.row_bytes
        aligned = start - start % mmap.PAGESIZE
        if stop > aligned:
            m.madvise(mmap.MADV_DONTNEED, aligned, stop - aligned)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the map closes when it is collected
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._maps.clear()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_shard_name(index_path: Path, root: Path, tensor: str, shard: object) -> None:
    """A weight_map entry must be a plain file name inside the model folder."""
    if not isinstance(shard, str) or not shard:
        raise SurgeryError(index_path, f"weight_map entry for {tensor!r} is not a file name: {shard!r}")
    if os.path.isabs(shard) or "/" in shard or "\\" in shard or shard in (".", "..") or "\x00" in shard:
        raise SurgeryError(index_path, f"weight_map entry for {tensor!r} points outside the folder: {shard!r}")
    if (root / shard).resolve().parent != root.resolve() and not in_hub_cache_blobs(root, shard):
        raise SurgeryError(index_path, f"weight_map entry for {tensor!r} points outside the folder: {shard!r}")


def in_hub_cache_blobs(folder: Path, name: str) -> bool:
    """`folder/name` is a file of the Hugging Face cache in its own layout: `folder` is a
    models--org--name/snapshots/<commit>/ folder and the file a symlink into that repository's
    blobs/ folder, where the bytes themselves live."""
    snapshots = folder.resolve().parent
    path = folder / name
    return path.is_symlink() and snapshots.name == "snapshots" and path.resolve().parent == (snapshots.parent / "blobs").resolve()
