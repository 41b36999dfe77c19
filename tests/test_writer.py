"""The streaming writer: exact round trips for every dtype, order independence, byte copies."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.errors import SurgeryError
from clpsurgery.formats.safetensors_header import DTYPE_SIZES, TensorSpec, read_header
from conftest import assert_same, random_tensor

from clpsurgery.formats.writer import (
    ComputedTensor,
    CopiedTensor,
    WriteStats,
    write_file,
)
from clpsurgery.pipeline.tensor_io import as_tensor, planned_from_tensor

ALL_DTYPES = sorted(DTYPE_SIZES)
assert len(ALL_DTYPES) == 15


def write_tensors(path, tensors: dict[str, torch.Tensor], block_rows: int = 2, **kw) -> WriteStats:
    return write_file(path, [planned_from_tensor(n, t, block_rows) for n, t in tensors.items()], **kw)


def check_loads(path, tensors: dict[str, torch.Tensor]) -> None:
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert_same(f.get_tensor(name), t)


SHAPES = [(), (0,), (3, 0), (0, 2, 2), (4,), (3, 5), (2, 3, 2), (1, 1, 1)]


@pytest.mark.parametrize("dtype_name", ALL_DTYPES)
def test_round_trip_every_dtype(tmp_path, dtype_name):
    rng = np.random.default_rng(sum(map(ord, dtype_name)))
    tensors = {f"t{i}": random_tensor(dtype_name, shape, rng) for i, shape in enumerate(SHAPES)}
    path = tmp_path / f"{dtype_name}.safetensors"
    stats = write_tensors(path, tensors)
    assert stats.files == [path]
    assert stats.computed_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats.copied_bytes == 0
    check_loads(path, tensors)
    # the header reader accepts it too
    assert read_header(path).file_size == path.stat().st_size


def test_round_trip_all_dtypes_in_one_file(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {}
    for i, d in enumerate(ALL_DTYPES):
        tensors[f"{d.lower()}.w"] = random_tensor(d, (3, i % 4 + 1), rng)
        tensors[f"{d.lower()}.s"] = random_tensor(d, (), rng)
        tensors[f"{d.lower()}.e"] = random_tensor(d, (0, 3), rng)
    path = tmp_path / "all.safetensors"
    write_tensors(path, tensors)
    check_loads(path, tensors)
    # every tensor is aligned to its element size within the data buffer
    header = read_header(path)
    for info in header.tensors.values():
        assert info.begin % DTYPE_SIZES[info.dtype] == 0


def test_non_contiguous_input_tensor(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "s": base[:, ::2]}
    path = tmp_path / "nc.safetensors"
    write_tensors(path, tensors, block_rows=1)
    check_loads(path, {k: v.contiguous() for k, v in tensors.items()})


def test_order_independent_bytes(tmp_path):
    rng = np.random.default_rng(3)
    items = [(f"layer.{i}.{d}", random_tensor(d, (i % 3 + 1, 2), rng)) for i, d in enumerate(ALL_DTYPES)]
    items.append(("scalar", random_tensor("F32", (), rng)))
    items.append(("empty", random_tensor("BF16", (0,), rng)))
    outputs = []
    shuffler = random.Random(11)
    for k in range(4):
        order = list(items)
        if k == 1:
            order.reverse()
        elif k > 1:
            shuffler.shuffle(order)
        path = tmp_path / f"o{k}.safetensors"
        write_file(path, [planned_from_tensor(n, t, block_rows=k + 1) for n, t in order])
        outputs.append(path.read_bytes())
    assert all(o == outputs[0] for o in outputs[1:])


def _reference_file(tmp_path) -> tuple[object, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(5)
    tensors = {f"w.{d}": random_tensor(d, (5, 3), rng) for d in ALL_DTYPES}
    tensors["scalar"] = random_tensor("I64", (), rng)
    tensors["empty"] = random_tensor("F16", (0, 4), rng)
    tensors["big"] = random_tensor("F32", (64, 33), rng)
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _copies_of(path) -> list[CopiedTensor]:
    header = read_header(path)
    return [
        CopiedTensor(TensorSpec(name, info.dtype, info.shape), path, header.absolute_range(name)[0])
        for name, info in header.tensors.items()
    ]


def test_copy_every_tensor_of_a_reference_file(tmp_path):
    src, tensors = _reference_file(tmp_path)
    before = src.read_bytes()
    out = tmp_path / "copy.safetensors"
    stats = write_file(out, _copies_of(src))
    check_loads(out, tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats.copied_bytes == total and stats.computed_bytes == 0
    nonempty = sum(1 for t in tensors.values() if t.numel())
    assert stats.kernel_copies + stats.buffered_copies == nonempty
    assert src.read_bytes() == before


def test_copy_and_compute_mixed(tmp_path):
    src, tensors = _reference_file(tmp_path)
    copies = [c for c in _copies_of(src) if c.spec.name != "big"]
    replacement = torch.full((64, 33), 1.5, dtype=torch.float32)
    out = tmp_path / "mixed.safetensors"
    stats = write_file(out, copies + [planned_from_tensor("big", replacement, block_rows=10)])
    expected = dict(tensors, big=replacement)
    check_loads(out, expected)
    assert stats.computed_bytes == replacement.numel() * 4


def test_computed_tensors_are_hashed_as_written(tmp_path):
    """write_computed returns the SHA-256 of each computed tensor's bytes as they land in the file,
    written before or after the copies; the computed tensor is laid out after the copied ones of
    its element size."""
    import hashlib

    from clpsurgery.formats.writer import copy_tensors, lay_out, start_file, write_computed

    src, tensors = _reference_file(tmp_path)
    copies = [c for c in _copies_of(src) if c.spec.name != "big"]
    replacement = torch.arange(64 * 33, dtype=torch.float32).reshape(64, 33)
    for first in ("computed", "copies"):
        layout = lay_out(tmp_path / f"rebuilt-{first}.safetensors", copies + [planned_from_tensor("big", replacement, block_rows=10)])
        four_byte = [c.spec.name for c in copies if DTYPE_SIZES[c.spec.dtype] == 4]
        assert four_byte and all(layout.offsets["big"][0] >= layout.offsets[name][1] for name in four_byte)
        start_file(layout)
        if first == "copies":
            copy_tensors(layout, WriteStats())
        digests = write_computed(layout, WriteStats())
        if first == "computed":
            copy_tensors(layout, WriteStats())
        begin, end = layout.offsets["big"]
        assert digests == {"big": hashlib.sha256(layout.path.read_bytes()[begin:end]).hexdigest()}
        assert digests["big"] == hashlib.sha256(replacement.numpy().tobytes()).hexdigest()
        check_loads(layout.path, dict(tensors, big=replacement))


def test_copy_without_copy_file_range_and_tiny_buffer(tmp_path, monkeypatch):
    src, tensors = _reference_file(tmp_path)
    copies = _copies_of(src)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    out = tmp_path / "buffered.safetensors"
    stats = write_file(out, copies, copy_buffer_bytes=7)
    check_loads(out, tensors)
    nonempty = sum(1 for t in tensors.values() if t.numel())
    assert stats.kernel_copies == 0
    assert stats.buffered_copies == nonempty
    assert stats.copied_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats.computed_bytes == 0
    # the same bytes as the kernel path
    monkeypatch.undo()
    out2 = tmp_path / "kernel.safetensors"
    write_file(out2, copies)
    assert out.read_bytes() == out2.read_bytes()


def test_stats_accumulate_across_files(tmp_path):
    src, tensors = _reference_file(tmp_path)
    stats = WriteStats()
    write_file(tmp_path / "a.safetensors", _copies_of(src), stats=stats)
    write_file(tmp_path / "b.safetensors", [planned_from_tensor("x", torch.ones(3))], stats=stats)
    assert stats.files == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert stats.computed_bytes == 12
    assert stats.copied_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_from_short_source_raises(tmp_path, monkeypatch, kernel):
    src = tmp_path / "short.bin"
    src.write_bytes(bytes(range(10)))
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    with pytest.raises(SurgeryError) as e:
        write_file(tmp_path / "o.safetensors", [CopiedTensor(TensorSpec("x", "U8", (20,)), src, 4)], copy_buffer_bytes=3)
    assert "short.bin" in str(e.value)


def test_computed_tensor_wrong_total_bytes_raises(tmp_path):
    """Blocks are bytes (numpy arrays here): too few, too many, none, or a partial row is a bug."""
    spec = TensorSpec("x", "F32", (4, 2))
    too_few = ComputedTensor(spec, lambda: iter([np.zeros((3, 2), np.float32)]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "a.safetensors", [too_few])
    too_many = ComputedTensor(spec, lambda: iter([np.zeros((4, 2), np.float32), np.zeros((1, 2), np.float32)]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "b.safetensors", [too_many])
    nothing = ComputedTensor(spec, lambda: iter([]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "c.safetensors", [nothing])
    partial_row = ComputedTensor(spec, lambda: iter([np.zeros(3, np.float32), np.zeros(5, np.float32)]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "d.safetensors", [partial_row])
    exact = ComputedTensor(spec, lambda: iter([np.arange(4, dtype=np.float32), b"\0" * 16]))
    write_file(tmp_path / "e.safetensors", [exact])
    assert load_file(tmp_path / "e.safetensors")["x"].tolist() == [[0, 1], [2, 3], [0, 0], [0, 0]]


def test_computed_tensor_wrong_dtype_or_row_shape_raises(tmp_path):
    """The torch edge checks each block's dtype and row shape against the plan."""
    from clpsurgery.pipeline.tensor_io import checked_blocks

    spec = TensorSpec("x", "BF16", (4, 2))
    wrong_dtype = ComputedTensor(spec, lambda: checked_blocks(spec, [torch.zeros(4, 2, dtype=torch.float16)]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "a.safetensors", [wrong_dtype])
    # same byte count, different row shape
    wrong_rows = ComputedTensor(spec, lambda: checked_blocks(spec, [torch.zeros(2, 4, dtype=torch.bfloat16)]))
    with pytest.raises(AssertionError):
        write_file(tmp_path / "b.safetensors", [wrong_rows])


def test_duplicate_names_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_file(tmp_path / "d.safetensors", [planned_from_tensor("x", torch.ones(1)), planned_from_tensor("x", torch.ones(2))])


# --- property test -----------------------------------------------------------------------

NAME = st.text(alphabet="abcxyz._0123456789é", min_size=1, max_size=10).filter(lambda s: s != "__metadata__")
TENSOR_PLAN = st.tuples(
    st.sampled_from(ALL_DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plans=st.dictionaries(NAME, TENSOR_PLAN, min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    block_rows=st.integers(1, 4),
    data=st.data(),
)
def test_property_write_load_and_read_rows(tmp_path_factory, plans, seed, block_rows, data):
    rng = np.random.default_rng(seed)
    tensors = {name: random_tensor(d, shape, rng) for name, (d, shape) in plans.items()}
    path = tmp_path_factory.mktemp("prop") / "p.safetensors"
    write_tensors(path, tensors, block_rows=block_rows)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    with Checkpoint.open(path) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        for name, t in tensors.items():
            assert_same(as_tensor(ckpt.read_tensor(name)), t)
            if t.dim() == 0:
                continue
            rows = t.shape[0]
            a = data.draw(st.integers(0, rows), label=f"{name} start")
            b = data.draw(st.integers(a, rows), label=f"{name} stop")
            assert_same(as_tensor(ckpt.read_rows(name, a, b)), t[a:b])
            if rows:
                idx = data.draw(st.lists(st.integers(0, rows - 1), max_size=8), label=f"{name} rows")
            else:
                idx = []
            expected = t[torch.tensor(idx, dtype=torch.int64)] if idx else t[:0]
            assert_same(as_tensor(ckpt.gather_rows(name, idx)), expected)
            assert_same(as_tensor(ckpt.gather_rows(name, np.asarray(idx, dtype=np.int64))), expected)


def resident_pages(path) -> int:
    """Pages of a file in the page cache, by mincore(2) over a private mapping: unlike an
    RWF_NOWAIT probe, asking starts no readahead."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor
    return sum(v & 1 for v in vec)


def evict(path) -> None:
    """Write a file back and drop it from the page cache: the next read goes to the disk.

    DONTNEED skips pages still under I/O (writeback, or a readahead an RWF_NOWAIT probe started),
    which a busy machine shows now and then: asked again until mincore finds no page cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(40):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not resident_pages(path):
                return
            time.sleep(0.025)
    finally:
        os.close(fd)


def filesystem_of(folder: Path) -> str:
    """The type of the filesystem holding `folder` (its longest mount point in /proc/mounts)."""
    best, kind = "", "an unknown filesystem"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(folder.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/")) and len(fields[1]) >= len(best):
            best, kind = fields[1], fields[2]
    return kind


def without_direct_io(folder: Path) -> str | None:
    """Why `folder` offers no direct I/O (tmpfs before Linux 6.6, many network filesystems), or None."""
    from clpsurgery.formats.writer import DIRECT_BLOCK, DirectCopier

    probe = folder / "direct-io-probe"
    probe.write_bytes(bytes(DIRECT_BLOCK))
    try:
        with DirectCopier.open(probe) as direct:
            return None if direct is not None else f"{filesystem_of(folder)} at {folder} offers no O_DIRECT"
    finally:
        probe.unlink()


def without_page_cache_probe(folder: Path) -> str | None:
    """Why init cannot tell cached from uncached ranges in `folder`, or None: a file just read must
    probe as cached (RWF_NOWAIT reads) and, once evicted, as not cached."""
    from clpsurgery.formats.writer import DIRECT_CHUNK, in_page_cache

    probe = folder / "page-cache-probe"
    probe.write_bytes(bytes(DIRECT_CHUNK))
    try:
        probe.read_bytes()
        if not in_page_cache(probe, 0, DIRECT_CHUNK):
            return f"{filesystem_of(folder)} at {folder} answers no RWF_NOWAIT read, so every range counts as uncached"
        evict(probe)
        if in_page_cache(probe, 0, DIRECT_CHUNK):
            return f"{filesystem_of(folder)} at {folder} keeps files in memory (no eviction to the disk)"
        return None
    finally:
        probe.unlink()


def unaligned_files(tmp_path: Path, src_offset: int, dst_offset: int) -> tuple[Path, Path, int, bytes]:
    """A random source and a random target, a range to copy that spans more than one direct chunk."""
    from clpsurgery.formats.writer import DIRECT_CHUNK, DIRECT_MIN_BYTES

    rng = np.random.default_rng(src_offset + dst_offset)
    length = DIRECT_CHUNK + 3 * DIRECT_MIN_BYTES + 1234  # more than one chunk, ragged end
    source = tmp_path / "source.bin"
    source.write_bytes(rng.integers(0, 256, src_offset + length + 5000, dtype=np.uint8).tobytes())
    target = tmp_path / "target.bin"
    before = rng.integers(0, 256, dst_offset + length + 3000, dtype=np.uint8).tobytes()
    target.write_bytes(before)
    evict(source)  # a cached source is copied from memory instead (test_cached_source_is_not_read_again)
    return source, target, length, before


def assert_copied(source: Path, target: Path, src_offset: int, dst_offset: int, length: int, before: bytes) -> None:
    data = target.read_bytes()
    assert data[dst_offset : dst_offset + length] == source.read_bytes()[src_offset : src_offset + length]
    assert data[:dst_offset] == before[:dst_offset] and data[dst_offset + length :] == before[dst_offset + length :]


UNALIGNED = [(8 * 4096, 4096), (12_345, 4096), (12_345, 70_001), (4096 + 17, 17)]


@pytest.mark.parametrize("src_offset,dst_offset", UNALIGNED)
def test_direct_copy_of_unaligned_ranges(tmp_path, monkeypatch, src_offset, dst_offset):
    """Ranges larger than DIRECT_MIN_BYTES are copied with O_DIRECT in whole destination blocks
    (moved in memory where source and destination differ modulo the block size), the edges the
    regular way: the bytes land exactly, neighbours untouched."""
    from clpsurgery.formats import writer
    from clpsurgery.formats.writer import DirectCopier, copy_range

    reason = without_direct_io(tmp_path)
    if reason:
        pytest.skip(f"environment: {reason}; test_copy_where_there_is_no_direct_io tests the copy used there")
    source, target, length, before = unaligned_files(tmp_path, src_offset, dst_offset)
    # the mechanics of the direct path, whatever the page cache holds (the choice between the
    # paths is test_cached_source_is_not_read_again's; a busy machine can cache the source again)
    monkeypatch.setattr(writer, "in_page_cache", lambda *args, **kwargs: False)
    stats = WriteStats()
    with open(target, "r+b") as out, DirectCopier.open(target) as direct:
        assert direct is not None
        copy_range(source, src_offset, length, out.fileno(), dst_offset, stats, direct=direct)
    assert_copied(source, target, src_offset, dst_offset, length, before)
    assert stats.direct_copies == 1


@pytest.mark.parametrize("src_offset,dst_offset", UNALIGNED)
def test_copy_where_there_is_no_direct_io(tmp_path, src_offset, dst_offset):
    """Without direct I/O (the folder offers none: DirectCopier.open gives None) the same ranges go
    through copy_file_range or a buffer, exactly."""
    from clpsurgery.formats.writer import DirectCopier, copy_range

    source, target, length, before = unaligned_files(tmp_path, src_offset, dst_offset)
    offered = without_direct_io(tmp_path) is None
    stats = WriteStats()
    with open(target, "r+b") as out, DirectCopier.open(target) as direct:
        assert (direct is not None) == offered
        copy_range(source, src_offset, length, out.fileno(), dst_offset, stats, direct=None)  # what init passes where none is offered
    assert_copied(source, target, src_offset, dst_offset, length, before)
    assert stats.direct_copies == 0 and stats.kernel_copies + stats.buffered_copies >= 1


def test_direct_copy_refused_falls_back(tmp_path, monkeypatch):
    """Where O_DIRECT is refused mid-way (EINVAL), the regular copy does the rest, the same bytes."""
    import errno

    from clpsurgery.formats import writer
    from clpsurgery.formats.writer import DIRECT_CHUNK, DirectCopier, copy_range

    reason = without_direct_io(tmp_path)
    if reason:
        pytest.skip(f"environment: {reason}; nothing to refuse mid-way there")
    rng = np.random.default_rng(5)
    length = 3 * DIRECT_CHUNK
    source = tmp_path / "source.bin"
    source.write_bytes(rng.integers(0, 256, length + 8192, dtype=np.uint8).tobytes())
    target = tmp_path / "target.bin"
    target.write_bytes(bytes(length + 8192))
    evict(source)
    monkeypatch.setattr(writer, "in_page_cache", lambda *args, **kwargs: False)  # the direct path, whatever is cached
    real_pwrite_all, calls = writer._pwrite_all, []

    def refuse_second(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "refused")
        real_pwrite_all(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", refuse_second)
    stats = WriteStats()
    with open(target, "r+b") as out, DirectCopier.open(target) as direct:
        copy_range(source, 100, length, out.fileno(), 4096, stats, direct=direct)
    assert target.read_bytes()[4096 : 4096 + length] == source.read_bytes()[100 : 100 + length]
    assert stats.direct_copies == 1 and stats.kernel_copies + stats.buffered_copies >= 1
    monkeypatch.delattr(os, "O_DIRECT")
    with DirectCopier.open(target) as direct:
        assert direct is None


def test_cached_source_is_not_read_again(tmp_path):
    """A source range found in the page cache (RWF_NOWAIT probes) is copied from memory, not with
    O_DIRECT from the disk; once evicted, the same range goes direct. The bytes are the same."""
    from clpsurgery.formats.writer import DIRECT_CHUNK, DirectCopier, copy_range, in_page_cache

    reason = without_direct_io(tmp_path) or without_page_cache_probe(tmp_path)
    if reason:
        pytest.skip(f"environment: {reason}; there every range is copied as uncached, as test_direct_copy_of_unaligned_ranges and test_copy_where_there_is_no_direct_io test")
    rng = np.random.default_rng(9)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.integers(0, 256, 2 * DIRECT_CHUNK, dtype=np.uint8).tobytes())
    source.read_bytes()
    assert in_page_cache(source, 0, 2 * DIRECT_CHUNK)
    expected = source.read_bytes()

    def copy(name: str) -> WriteStats:
        target = tmp_path / name
        target.write_bytes(bytes(2 * DIRECT_CHUNK))
        stats = WriteStats()
        with open(target, "r+b") as out, DirectCopier.open(target) as direct:
            copy_range(source, 0, 2 * DIRECT_CHUNK, out.fileno(), 0, stats, direct=direct)
        assert target.read_bytes() == expected
        return stats

    assert copy("cached.bin").direct_copies == 0
    # Evicted, the range goes direct. A busy machine now and then has the pages back before the
    # copy probes them (a readahead, writeback): evicted again and retried, it must go direct.
    went_direct = []
    for attempt in range(5):
        evict(source)
        went_direct.append(copy(f"evicted-{attempt}.bin").direct_copies == 1)
        if went_direct[-1]:
            break
    assert any(went_direct), went_direct
