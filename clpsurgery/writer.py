"""Streaming safetensors writer: byte copies for unchanged tensors, row blocks for new ones.

A file is described by a list of planned tensors. An unchanged tensor is a `CopiedTensor`, a
byte range of a source file copied verbatim (in the kernel with `os.copy_file_range` where the
OS has it, through a bounded buffer otherwise). A new tensor is a `ComputedTensor` whose
producer yields row blocks in order; no tensor is ever held whole by the writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SurgeryError
from .safetensors_header import TensorSpec, encode_header, layout_order
from .torch_dtypes import DTYPE_NAMES

COPY_BUFFER_BYTES = 64 * 1024 * 1024
KERNEL_COPY_CHUNK = 256 * 1024 * 1024
DEFAULT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class CopiedTensor:
    """A tensor copied byte for byte from `source[offset : offset + spec.nbytes]`."""

    spec: TensorSpec
    source: Path
    offset: int


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor whose row blocks come from `produce()`, in row order, in `spec.dtype`."""

    spec: TensorSpec
    produce: Callable[[], Iterable[torch.Tensor]]


PlannedTensor = CopiedTensor | ComputedTensor


@dataclass
class WriteStats:
    """Bytes moved by the writer, for the report."""

    copied_bytes: int = 0
    computed_bytes: int = 0
    kernel_copies: int = 0
    buffered_copies: int = 0
    files: list[Path] = field(default_factory=list)
    on_bytes: Callable[[int], None] | None = None  # progress: called with each chunk's size

    def advance(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)


def write_file(
    path: Path,
    tensors: list[PlannedTensor],
    metadata: dict[str, str] | None = None,
    stats: WriteStats | None = None,
    copy_buffer_bytes: int = COPY_BUFFER_BYTES,
) -> WriteStats:
    """Write one safetensors file from planned tensors; the data order is `layout_order`."""
    stats = stats if stats is not None else WriteStats()
    metadata = DEFAULT_METADATA if metadata is None else metadata
    by_name = {t.spec.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise ValueError(f"{path}: duplicate tensor names")
    header, offsets = encode_header([t.spec for t in tensors], metadata)
    with open(path, "wb") as out:
        out.write(header)
        for spec in layout_order([t.spec for t in tensors]):
            planned = by_name[spec.name]
            if isinstance(planned, CopiedTensor):
                _copy_range(planned.source, planned.offset, spec.nbytes, out, stats, copy_buffer_bytes)
                stats.copied_bytes += spec.nbytes
            else:
                written = _write_blocks(out, spec, planned.produce(), stats)
                stats.computed_bytes += written
            expected_end = len(header) + offsets[spec.name][1]
            if out.tell() != expected_end:
                raise AssertionError(f"{path}: tensor {spec.name} ends at {out.tell()}, expected {expected_end}")
        out.flush()
        os.fsync(out.fileno())
    stats.files.append(path)
    return stats


def _write_blocks(out, spec: TensorSpec, blocks: Iterable[torch.Tensor], stats: WriteStats) -> int:
    """Write row blocks of a computed tensor, checking dtype and the total size."""
    written = 0
    for block in blocks:
        if DTYPE_NAMES.get(block.dtype) != spec.dtype:
            raise AssertionError(f"tensor {spec.name}: block dtype {block.dtype}, planned {spec.dtype}")
        if tuple(block.shape[1:]) != spec.shape[1:]:
            raise AssertionError(f"tensor {spec.name}: block shape {tuple(block.shape)}, planned rows of {spec.shape[1:]}")
        data = tensor_bytes(block)
        out.write(data)
        written += data.nbytes
        stats.advance(data.nbytes)
    if written != spec.nbytes:
        raise AssertionError(f"tensor {spec.name}: producer wrote {written} bytes, planned {spec.nbytes}")
    return written


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _copy_range(source: Path, offset: int, length: int, out, stats: WriteStats, buffer_bytes: int) -> None:
    """Copy `length` bytes at `offset` of `source` to the current position of `out`."""
    if length == 0:
        return
    out.flush()
    with open(source, "rb") as src:
        if hasattr(os, "copy_file_range"):
            done = _kernel_copy(src.fileno(), offset, out.fileno(), length, stats)
            if done == length:
                stats.kernel_copies += 1
                out.seek(0, os.SEEK_END)
                return
            offset += done
            length -= done
            out.seek(0, os.SEEK_END)
        stats.buffered_copies += 1
        src.seek(offset)
        buffer = bytearray(min(buffer_bytes, length))
        view = memoryview(buffer)
        while length:
            n = src.readinto(view[: min(len(buffer), length)])
            if not n:
                raise SurgeryError(source, f"ended early while copying {length} more bytes at offset {offset}")
            out.write(view[:n])
            stats.advance(n)
            length -= n
            offset += n


def copy_whole_file(source: Path, target: Path, stats: WriteStats, buffer_bytes: int = COPY_BUFFER_BYTES) -> None:
    """Copy a whole unchanged file with the cheapest copy the OS offers."""
    size = source.stat().st_size
    with open(target, "wb") as out:
        _copy_range(source, 0, size, out, stats, buffer_bytes)
        out.flush()
        os.fsync(out.fileno())
    stats.copied_bytes += size
    stats.files.append(target)


def _kernel_copy(src_fd: int, offset: int, dst_fd: int, length: int, stats: WriteStats) -> int:
    """Copy in the kernel (reflink or in-kernel copy where the filesystem offers it)."""
    done = 0
    dst_offset = os.lseek(dst_fd, 0, os.SEEK_END)
    try:
        while done < length:
            # Bounded calls, so that progress moves and an interrupt is seen between them.
            n = os.copy_file_range(src_fd, dst_fd, min(length - done, KERNEL_COPY_CHUNK), offset + done, dst_offset + done)
            if n == 0:
                break
            done += n
            stats.advance(n)
    except OSError:
        pass  # EXDEV, ENOSYS, EINVAL...: fall back to the buffer for what is left
    return done


def row_blocks(rows: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering `rows` in blocks of at most `block_rows`."""
    for start in range(0, rows, max(1, block_rows)):
        yield start, min(rows, start + block_rows)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int, extra_metadata: dict | None = None) -> Path:
    """Write `model.safetensors.index.json` for a sharded output."""
    metadata = {"total_size": total_size}
    if extra_metadata:
        metadata.update({k: v for k, v in extra_metadata.items() if k != "total_size"})
    doc = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def planned_from_tensor(name: str, tensor: torch.Tensor, block_rows: int = 4096) -> ComputedTensor:
    """A ComputedTensor over an in-memory tensor (for tests, small tensors and tools)."""
    spec = TensorSpec(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))

    def produce() -> Iterator[torch.Tensor]:
        if tensor.dim() == 0:
            yield tensor.reshape(())
            return
        for start, stop in row_blocks(tensor.shape[0], block_rows):
            yield tensor[start:stop]
        if tensor.shape[0] == 0:
            yield tensor

    return ComputedTensor(spec, produce)


def as_numpy_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor as a uint8 array (for hashing and comparisons)."""
    return np.frombuffer(tensor_bytes(t), dtype=np.uint8)
