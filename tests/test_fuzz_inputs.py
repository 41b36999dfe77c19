"""Fuzzing: valid files and indexes, mutated at random; nothing may escape but SurgeryError.

Mutations: bytes of the header flipped, inserted or deleted; the length prefix replaced; the file
cut short or grown; JSON fields of a tensor entry, of `__metadata__` and of the index replaced by
arbitrary JSON values; index entries pointed at other names and paths. For every mutant,
`Checkpoint.open` either succeeds, and then every tensor's bytes are within the file and read
back at their stated size, or it raises SurgeryError with a one-line message.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clpsurgery.formats.checkpoint import INDEX_NAME, Checkpoint
from clpsurgery.errors import SurgeryError
from clpsurgery.formats.safetensors_header import DTYPE_SIZES, TensorSpec, encode_header
from clpsurgery.pipeline.tensor_io import as_tensor

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TENSORS = [
    TensorSpec("model.embed_tokens.weight", "F32", (4, 3)),
    TensorSpec("norm", "BF16", (5,)),
    TensorSpec("step", "I64", ()),
    TensorSpec("empty", "U8", (0, 7)),
    TensorSpec("mask", "BOOL", (3,)),
]


def encoded(specs: list[TensorSpec]) -> tuple[bytes, bytes]:
    """(8-byte prefix + header, data) of a valid file."""
    header, offsets = encode_header(specs, {"format": "pt"})
    size = max((end for _, end in offsets.values()), default=0)
    return header, bytes((i * 37 + 11) % 256 for i in range(size))


def header_doc(specs: list[TensorSpec]) -> tuple[dict, bytes]:
    header, data = encoded(specs)
    return json.loads(header[8:]), data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)
small_ints = st.integers(min_value=-16, max_value=64)
near_values = st.one_of(
    json_values,
    st.sampled_from(sorted(DTYPE_SIZES) + ["F33", "", "f32"]),
    st.lists(small_ints, max_size=4),
    st.lists(st.integers(min_value=-(2**64), max_value=2**64), max_size=3),
)


def check_open(path: Path) -> None:
    """The property: SurgeryError or a checkpoint whose every tensor reads back at its size."""
    try:
        checkpoint = Checkpoint.open(path)
    except SurgeryError as e:
        assert "\n" not in str(e) and str(e) == f"{e.place}: {e.problem}"
        return
    with checkpoint:
        for name, ref in checkpoint.tensors.items():
            info = ref.info
            assert info.nbytes == math.prod(info.shape) * DTYPE_SIZES[info.dtype]
            begin, end = ref.absolute_range()
            assert 0 <= begin <= end <= ref.header.file_size
            assert len(checkpoint.raw_bytes(name)) == info.nbytes
            if info.nbytes and info.shape:
                as_tensor(checkpoint.read_rows(name, 0, min(1, info.rows)))


# --- one file ------------------------------------------------------------------------------------

byte_edits = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]), st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=4)),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(edits=byte_edits, fix_length=st.booleans())
def test_header_bytes(edits, fix_length):
    header, data = encoded(TENSORS)
    body = bytearray(header[8:])
    for op, where, payload in edits:
        at = where % (len(body) + 1)
        if op == "flip" and body:
            body[at % len(body)] ^= payload[0] or 1
        elif op == "insert":
            body[at:at] = payload
        elif op == "delete":
            del body[at : at + len(payload)]
        elif op == "set" and body:
            body[at % len(body)] = payload[0]
    prefix = struct.pack("<Q", len(body) if fix_length else len(header) - 8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(prefix + bytes(body) + data)
        check_open(path)


@SETTINGS
@given(length=st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=4096)), cut=st.integers(min_value=-64, max_value=64))
def test_length_prefix_and_file_size(length, cut):
    header, data = encoded(TENSORS)
    raw = struct.pack("<Q", length) + header[8:] + data
    raw = raw[: len(raw) + cut] if cut < 0 else raw + bytes(cut)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(raw)
        check_open(path)


@SETTINGS
@given(
    tensor=st.sampled_from([t.name for t in TENSORS] + ["__metadata__"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),
    value=near_values,
    rename=st.one_of(st.none(), st.text(max_size=6)),
    pad=st.booleans(),
    grow=st.integers(min_value=-8, max_value=8),
)
@example(tensor="model.embed_tokens.weight", field="dtype", value=[], rename=None, pad=True, grow=0)  # found: TypeError, unhashable dtype
def test_header_json_fields(tensor, field, value, rename, pad, grow):
    doc, data = header_doc(TENSORS)
    if field is None:
        doc[tensor] = value
    elif isinstance(doc.get(tensor), dict):
        doc[tensor][field] = value
    if rename is not None and tensor in doc:
        doc[rename] = doc.pop(tensor)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    data = data[: len(data) + grow] if grow < 0 else data + bytes(grow)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        check_open(path)


# --- a sharded folder -------------------------------------------------------------------------------

SHARDS = {"model-00001-of-00002.safetensors": TENSORS[:2], "model-00002-of-00002.safetensors": TENSORS[2:]}


def write_folder(folder: Path, index: bytes) -> None:
    for name, specs in SHARDS.items():
        header, data = encoded(specs)
        (folder / name).write_bytes(header + data)
    (folder / INDEX_NAME).write_bytes(index)


def valid_index() -> dict:
    return {"metadata": {"total_size": 123}, "weight_map": {t.name: shard for shard, specs in SHARDS.items() for t in specs}}


file_names = st.one_of(
    st.sampled_from(list(SHARDS) + ["../model-00001-of-00002.safetensors", "/etc/passwd", "", ".", "..", "sub/x.safetensors", "missing.safetensors", "a\x00b"]),
    st.text(max_size=12),
    json_values,
)


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.sampled_from([t.name for t in TENSORS] + ["extra", ""]), file_names), max_size=3),
    drop=st.lists(st.sampled_from([t.name for t in TENSORS]), max_size=2),
    top=st.one_of(st.none(), st.tuples(st.sampled_from(["weight_map", "metadata", "other"]), json_values)),
    duplicate=st.booleans(),
)
def test_index_fields(edits, drop, top, duplicate):
    doc = valid_index()
    for tensor, shard in edits:
        doc["weight_map"][tensor] = shard
    for tensor in drop:
        doc["weight_map"].pop(tensor, None)
    if top is not None:
        doc[top[0]] = top[1]
    text = json.dumps(doc)
    if duplicate and isinstance(doc.get("weight_map"), dict) and doc["weight_map"]:
        key, value = next(iter(doc["weight_map"].items()))
        text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps(key) + ": " + json.dumps(value) + ", ", 1)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        write_folder(folder, text.encode())
        check_open(folder)


@SETTINGS
@given(edits=byte_edits)
def test_index_bytes(edits):
    body = bytearray(json.dumps(valid_index()).encode())
    for op, where, payload in edits:
        at = where % (len(body) + 1)
        if op == "flip" and body:
            body[at % len(body)] ^= payload[0] or 1
        elif op == "insert":
            body[at:at] = payload
        elif op == "delete":
            del body[at : at + len(payload)]
        elif op == "set" and body:
            body[at % len(body)] = payload[0]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        write_folder(folder, bytes(body))
        check_open(folder)


def test_the_unmutated_inputs_open():
    """The starting points are valid (else the properties above prove little)."""
    with tempfile.TemporaryDirectory() as d:
        header, data = encoded(TENSORS)
        path = Path(d) / "m.safetensors"
        path.write_bytes(header + data)
        with Checkpoint.open(path) as c:
            assert set(c.tensors) == {t.name for t in TENSORS}
        folder = Path(d) / "model"
        folder.mkdir()
        write_folder(folder, json.dumps(valid_index()).encode())
        with Checkpoint.open(folder) as c:
            assert c.is_sharded and set(c.tensors) == {t.name for t in TENSORS}
