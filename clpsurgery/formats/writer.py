"""Streaming safetensors writer: byte copies for unchanged tensors, row blocks for new ones.

A file is described by a list of planned tensors. An unchanged tensor is a `CopiedTensor`, a
byte range of a source file copied verbatim (in the kernel with `os.copy_file_range` where the
OS has it, through a bounded buffer otherwise). A new tensor is a `ComputedTensor` whose
producer yields row blocks in order; no tensor is ever held whole by the writer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.output_folder import write_output_file
from clpsurgery.formats.safetensors_header import TensorSpec, encode_header
from clpsurgery.stage_hooks import reached

Buffer = object  # any bytes-like object: memoryview, bytes, a numpy array

COPY_BUFFER_BYTES = 64 * 1024 * 1024
KERNEL_COPY_CHUNK = 256 * 1024 * 1024
# Direct I/O (O_DIRECT): whole 4 KiB blocks, 8 MiB at a time through two page-aligned buffers;
# ranges shorter than DIRECT_MIN_BYTES go the regular way.
DIRECT_BLOCK = 4096
DIRECT_CHUNK = 8 * 1024 * 1024
DIRECT_MIN_BYTES = 1024 * 1024
DEFAULT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class CopiedTensor:
    """A tensor copied byte for byte from `source[offset : offset + spec.nbytes]`."""

    spec: TensorSpec
    source: Path
    offset: int


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor whose bytes come from `produce()` as row blocks, in row order, in `spec.dtype`
    (any bytes-like object: memoryview, bytes, a numpy array); None when the rows are given to
    `write_computed` once they can be computed (the file is laid out before)."""

    spec: TensorSpec
    produce: Callable[[], Iterable[Buffer]] | None = None


PlannedTensor = CopiedTensor | ComputedTensor


@dataclass
class WriteStats:
    """Bytes moved by the writer, for the report."""

    copied_bytes: int = 0
    computed_bytes: int = 0
    kernel_copies: int = 0
    buffered_copies: int = 0
    direct_copies: int = 0
    files: list[Path] = field(default_factory=list)
    on_bytes: Callable[[int], None] | None = None  # progress: called with each chunk's size
    should_stop: Callable[[], bool] | None = None  # checked between chunks: a background copy's brake

    def advance(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)
        if self.should_stop is not None and self.should_stop():
            raise CopyStopped("copy stopped")

    def add(self, other: WriteStats) -> None:
        self.copied_bytes += other.copied_bytes
        self.computed_bytes += other.computed_bytes
        self.kernel_copies += other.kernel_copies
        self.buffered_copies += other.buffered_copies
        self.direct_copies += other.direct_copies
        self.files.extend(other.files)


class CopyStopped(Exception):
    """A background copy was told to stop (the run failed or was interrupted elsewhere)."""


@dataclass(frozen=True)
class FileLayout:
    """Where every tensor of a new file goes: header bytes and absolute [begin, end) offsets.

    With the layout fixed up front, copies and computed tensors can be written in any order
    (and copies in the background while the rows to compute are still being searched for).
    """

    path: Path
    header: bytes
    offsets: dict[str, tuple[int, int]]
    tensors: dict[str, PlannedTensor]

    @property
    def size(self) -> int:
        return max((end for _, end in self.offsets.values()), default=len(self.header))

    def copies(self) -> list[CopiedTensor]:
        return [t for t in self.tensors.values() if isinstance(t, CopiedTensor)]

    def computed(self) -> list[ComputedTensor]:
        """Computed tensors in data order."""
        return [t for name, t in sorted(self.tensors.items(), key=lambda item: self.offsets[item[0]]) if isinstance(t, ComputedTensor)]


def lay_out(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> FileLayout:
    """The layout of a new safetensors file; the data order is `layout_order`, computed tensors
    after the copied ones of their element size."""
    metadata = DEFAULT_METADATA if metadata is None else metadata
    by_name = {t.spec.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise ValueError(f"{path}: duplicate tensor names")
    computed = frozenset(t.spec.name for t in tensors if isinstance(t, ComputedTensor))
    header, offsets = encode_header([t.spec for t in tensors], metadata, late=computed)
    absolute = {name: (len(header) + begin, len(header) + end) for name, (begin, end) in offsets.items()}
    return FileLayout(path, header, absolute, by_name)


def start_file(layout: FileLayout) -> None:
    """Create the file at its final size with its header in place."""
    with open(layout.path, "wb") as out:
        out.write(layout.header)
        out.truncate(layout.size)


def copy_tensors(layout: FileLayout, stats: WriteStats, buffer_bytes: int = COPY_BUFFER_BYTES) -> None:
    """Copy every CopiedTensor of a started file to its place."""
    with open(layout.path, "r+b") as out, DirectCopier.open(layout.path) as direct:
        for planned in layout.copies():
            begin, _ = layout.offsets[planned.spec.name]
            copy_range(planned.source, planned.offset, planned.spec.nbytes, out.fileno(), begin, stats, buffer_bytes, direct)
            stats.copied_bytes += planned.spec.nbytes


def write_computed(layout: FileLayout, stats: WriteStats, blocks_of: Callable[[TensorSpec], Iterable[Buffer]] | None = None) -> dict[str, str]:
    """Write every ComputedTensor of a started file to its place, block by block (from its own
    `produce()`, or from `blocks_of(spec)`); returns the SHA-256 of each one's bytes (for the
    manifest and `verify`), taken as they are written."""
    digests = {}
    with open(layout.path, "r+b") as out:
        for planned in layout.computed():
            begin, end = layout.offsets[planned.spec.name]
            digest = hashlib.sha256()
            blocks = planned.produce() if blocks_of is None else blocks_of(planned.spec)
            written = _write_blocks(out.fileno(), begin, planned.spec, blocks, stats, digest)
            stats.computed_bytes += written
            digests[planned.spec.name] = digest.hexdigest()
    return digests


def finish_file(layout: FileLayout, stats: WriteStats) -> None:
    """Flush a file to disk once every tensor is in place."""
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    stats.files.append(layout.path)


def write_file(
    path: Path,
    tensors: list[PlannedTensor],
    metadata: dict[str, str] | None = None,
    stats: WriteStats | None = None,
    copy_buffer_bytes: int = COPY_BUFFER_BYTES,
) -> WriteStats:
    """Write one safetensors file from planned tensors, in one go."""
    stats = stats if stats is not None else WriteStats()
    layout = lay_out(path, tensors, metadata)
    start_file(layout)
    copy_tensors(layout, stats, copy_buffer_bytes)
    write_computed(layout, stats)
    finish_file(layout, stats)
    return stats


def _write_blocks(fd: int, offset: int, spec: TensorSpec, blocks: Iterable[Buffer], stats: WriteStats, digest) -> int:
    """Write the row blocks of a computed tensor from `offset` on, checking the total size;
    `digest` (a hashlib object) is fed every byte written."""
    written = 0
    for block in blocks:
        data = memoryview(block).cast("B")  # flat bytes, whatever the block's element type
        if data.nbytes and spec.shape and data.nbytes % spec.row_bytes:
            raise AssertionError(f"tensor {spec.name}: a block of {data.nbytes} bytes is not whole rows of {spec.row_bytes}")
        if written + data.nbytes > spec.nbytes:
            raise AssertionError(f"tensor {spec.name}: producer wrote more than the planned {spec.nbytes} bytes")
        _pwrite_all(fd, data, offset + written)
        digest.update(data)
        written += data.nbytes
        stats.advance(data.nbytes)
    if written != spec.nbytes:
        raise AssertionError(f"tensor {spec.name}: producer wrote {written} bytes, planned {spec.nbytes}")
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def copy_range(
    source: Path, offset: int, length: int, dst_fd: int, dst_offset: int, stats: WriteStats,
    buffer_bytes: int = COPY_BUFFER_BYTES, direct: DirectCopier | None = None,
) -> None:
    """Copy `length` bytes at `offset` of `source` to `dst_offset` of an open file.

    With `direct` (the destination open for direct I/O), the whole destination blocks of the
    range are copied with O_DIRECT and only the edges the regular way; see DirectCopier.
    """
    if length == 0:
        return
    reached("copy", stats.should_stop)  # test hook (stage_hooks.py): a no-op unless CLPSURGERY_PAUSE_AT names it
    if direct is not None:
        head = min(length, -dst_offset % DIRECT_BLOCK)
        body = (length - head) // DIRECT_BLOCK * DIRECT_BLOCK
        if body >= DIRECT_MIN_BYTES and not in_page_cache(source, offset, length):
            _copy_regular(source, offset, head, dst_fd, dst_offset, stats, buffer_bytes)
            done = head + direct.copy(source, offset + head, body, dst_offset + head, stats)
            _copy_regular(source, offset + done, length - done, dst_fd, dst_offset + done, stats, buffer_bytes)
            return
    _copy_regular(source, offset, length, dst_fd, dst_offset, stats, buffer_bytes)


def in_page_cache(source: Path, offset: int, length: int, probes: int = 5) -> bool:
    """Whether a range of a file looks cached: a 4 KiB read with RWF_NOWAIT (which fails instead
    of going to the disk) at `probes` places across it all succeed. A cached source is copied
    from memory faster than direct I/O reads it again from the disk (benchmarks/README.md, the 7B section); where
    the probe is not available, False."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or length <= 0:
        return False
    buffer = bytearray(DIRECT_BLOCK)
    fd = os.open(source, os.O_RDONLY)
    try:
        for i in range(probes):
            at = offset + (length - 1) * i // max(1, probes - 1)
            try:
                if os.preadv(fd, [buffer], at - at % DIRECT_BLOCK, flag) <= 0:
                    return False
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no way to tell
                return False
    finally:
        os.close(fd)
    return True


def _copy_regular(source: Path, offset: int, length: int, dst_fd: int, dst_offset: int, stats: WriteStats, buffer_bytes: int) -> None:
    """In the kernel (copy_file_range) where the OS has it, else through a bounded buffer."""
    if length == 0:
        return
    with open(source, "rb") as src:
        if hasattr(os, "copy_file_range"):
            done = _kernel_copy(src.fileno(), offset, dst_fd, dst_offset, length, stats)
            if done == length:
                stats.kernel_copies += 1
                return
            offset += done
            dst_offset += done
            length -= done
        stats.buffered_copies += 1
        buffer = bytearray(min(buffer_bytes, length))
        view = memoryview(buffer)
        while length:
            n = os.preadv(src.fileno(), [view[: min(len(buffer), length)]], offset)
            if not n:
                raise SurgeryError(source, f"ended early while copying {length} more bytes at offset {offset}")
            _pwrite_all(dst_fd, view[:n], dst_offset)
            stats.advance(n)
            length -= n
            offset += n
            dst_offset += n


class DirectCopier:
    """Copies whole 4 KiB blocks of a destination file with direct I/O (O_DIRECT), past the page cache.

    A copy through the page cache can be bound by the CPU rather than the disk (it was on the
    2-core machine of the 7B benchmark: benchmarks/README.md, the 7B section); a direct copy costs almost no CPU,
    so the copies finish sooner and leave the cores to the search and the combine.

    The source is read in aligned blocks around each chunk; where the source and destination
    offsets differ modulo the block size, the chunk is moved to the second buffer to align it.
    Edges of a range that do not fill a destination block are left to the regular copy (they
    share a block with a neighbouring tensor). Where the OS or filesystem refuses O_DIRECT (no
    flag, or EINVAL on open or on a transfer), the regular copy does the rest; a range whose
    source is already in the page cache (in_page_cache) is copied the regular way from memory.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.read_buffer = mmap.mmap(-1, DIRECT_CHUNK + DIRECT_BLOCK)  # page-aligned memory
        self.write_buffer = mmap.mmap(-1, DIRECT_CHUNK)
        self.usable = True

    @classmethod
    @contextmanager
    def open(cls, path: Path) -> Iterator[DirectCopier | None]:
        """The destination opened for direct writes, or None where the OS or filesystem has none."""
        flag = getattr(os, "O_DIRECT", None)
        fd = None
        if flag is not None:
            try:
                fd = os.open(path, os.O_WRONLY | flag)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if fd is None:
            yield None
            return
        copier = cls(fd)
        try:
            yield copier
        finally:
            os.close(fd)
            copier.read_buffer.close()
            copier.write_buffer.close()

    def copy(self, source: Path, offset: int, length: int, dst_offset: int, stats: WriteStats) -> int:
        """Copy `length` bytes (whole blocks) to the block-aligned `dst_offset`; returns the bytes
        copied, fewer than `length` only where direct I/O turned out to be refused."""
        if not self.usable:
            return 0
        try:
            src = os.open(source, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self.usable = False
            return 0
        read_view, write_view = memoryview(self.read_buffer), memoryview(self.write_buffer)
        done = 0
        try:
            while done < length:
                n = min(DIRECT_CHUNK, length - done)
                start = offset + done
                shift = start % DIRECT_BLOCK
                want = shift + n
                span = -(-want // DIRECT_BLOCK) * DIRECT_BLOCK
                got = 0
                while got < want:
                    r = os.preadv(src, [read_view[got:span]], start - shift + got)
                    if r == 0:
                        raise SurgeryError(source, f"ended early while copying {length - done} more bytes at offset {start}")
                    got += r
                if shift:
                    write_view[:n] = read_view[shift:want]
                    out = write_view[:n]
                else:
                    out = read_view[:n]
                _pwrite_all(self.fd, out, dst_offset + done)
                done += n
                stats.advance(n)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self.usable = False  # an alignment this filesystem refuses: the rest the regular way
        finally:
            os.close(src)
            read_view.release()
            write_view.release()
        if done:
            stats.direct_copies += 1
        return done


def copy_whole_file(source: Path, target: Path, stats: WriteStats, buffer_bytes: int = COPY_BUFFER_BYTES) -> None:
    """Copy a whole unchanged file with the cheapest copy the OS offers."""
    size = source.stat().st_size
    with open(target, "wb") as out:
        out.truncate(size)
        with DirectCopier.open(target) as direct:
            copy_range(source, 0, size, out.fileno(), 0, stats, buffer_bytes, direct)
        os.fsync(out.fileno())
    stats.copied_bytes += size
    stats.files.append(target)


def _kernel_copy(src_fd: int, offset: int, dst_fd: int, dst_offset: int, length: int, stats: WriteStats) -> int:
    """Copy in the kernel (reflink or in-kernel copy where the filesystem offers it)."""
    done = 0
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
    write_output_file(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


class BackgroundCopier(threading.Thread):
    """Runs the byte copies of a conversion in a thread, while the main thread searches and computes.

    Copies spend their time in the kernel (copy_file_range) or in preadv/pwrite, which release
    the GIL, so they overlap with FAISS and torch work (and with importing them). Bytes done are counted for the progress
    bar of the main thread; `stop()` makes the copy give up at its next chunk.

    Jobs run in the order given; more can be given while the first run (`add`), until `close()`
    says there are no more: a conversion whose plan is still being made (`extend`) starts the files
    it knows are copied whole, and adds the rest once the plan is complete.
    """

    def __init__(self, jobs: list[Callable[[WriteStats], None]], more: bool = False) -> None:
        super().__init__(name="clpsurgery-copy", daemon=True)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for job in jobs:
            self._jobs.put(job)
        self._closed = False
        if not more:
            self.close()
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._bytes = 0
        self.stats = WriteStats(on_bytes=self._count, should_stop=self._stop_requested.is_set)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def add(self, jobs: list[Callable[[WriteStats], None]]) -> None:
        """More jobs, after those given so far."""
        for job in jobs:
            self._jobs.put(job)

    def close(self) -> None:
        """No more jobs: the thread ends once those given are done."""
        self._closed = True
        self._jobs.put(None)

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def take_bytes(self) -> int:
        """Bytes copied since the last call."""
        with self._lock:
            n, self._bytes = self._bytes, 0
        return n

    def run(self) -> None:
        started = time.perf_counter()
        try:
            while (job := self._jobs.get()) is not None and not self._stop_requested.is_set():
                job(self.stats)
        except CopyStopped:
            pass
        except BaseException as e:  # handed to the main thread by finish()
            self.error = e
        finally:
            self.seconds = time.perf_counter() - started

    def stop(self) -> None:
        self._stop_requested.set()
        self.close()  # a thread waiting for more jobs wakes and ends
        if self.is_alive():
            self.join()

    def finish(self, advance: Callable[[int], None]) -> None:
        """Wait for the copies, feeding the progress bar; re-raise a copy's error here."""
        if not self._closed:
            raise AssertionError("BackgroundCopier.finish before close: it would wait for jobs forever")
        while self.is_alive():
            self.join(timeout=0.2)
            advance(self.take_bytes())
        advance(self.take_bytes())
        if self.error is not None:
            raise self.error
