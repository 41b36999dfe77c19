"""The safetensors header: exact encoding, padding, and reading files written by safetensors itself."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from clpsurgery.formats.safetensors_header import (
    DTYPE_SIZES,
    TensorSpec,
    encode_header,
    layout_order,
    read_header,
)
from clpsurgery.pipeline.tensor_io import TORCH_DTYPES


def test_golden_header_bytes():
    # Given out of layout order on purpose: the F32 goes first (widest), then BF16, then BOOL.
    specs = [
        TensorSpec("z_bool", "BOOL", (1,)),
        TensorSpec("m_f32", "F32", (2, 2)),
        TensorSpec("a_bf16", "BF16", (3,)),
    ]
    header, offsets = encode_header(specs, {"format": "pt"})
    expected_json = (
        b'{"__metadata__":{"format":"pt"},'
        b'"m_f32":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
        b'"a_bf16":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},'
        b'"z_bool":{"dtype":"BOOL","shape":[1],"data_offsets":[22,23]}}'
    )
    assert len(expected_json) == 214
    expected = b"\xd8\x00\x00\x00\x00\x00\x00\x00" + expected_json + b"  "
    assert header == expected
    assert offsets == {"m_f32": (0, 16), "a_bf16": (16, 22), "z_bool": (22, 23)}


def test_golden_header_without_metadata_and_scalar():
    header, offsets = encode_header([TensorSpec("s", "F64", ())], None)
    expected_json = b'{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}'
    assert len(expected_json) == 53
    assert header == struct.pack("<Q", 56) + expected_json + b"   "
    assert offsets == {"s": (0, 8)}


def test_layout_order_is_dtype_size_then_name():
    specs = [TensorSpec(n, d, (1,)) for n, d in [("b", "U8"), ("a", "U8"), ("c", "I64"), ("d", "F16"), ("a2", "F64")]]
    assert [s.name for s in layout_order(specs)] == ["a2", "c", "d", "a", "b"]


def test_encode_header_rejects_duplicates_and_reserved_name():
    with pytest.raises(ValueError):
        encode_header([TensorSpec("x", "U8", (1,)), TensorSpec("x", "U8", (2,))], None)
    with pytest.raises(ValueError):
        encode_header([TensorSpec("__metadata__", "U8", (1,))], None)


def test_header_length_is_multiple_of_8_for_many_name_lengths():
    rng = random.Random(1234)
    alphabet = "abcdefghijklmnopqrstuvwxyz._0123456789éü"
    for trial in range(300):
        count = rng.randint(1, 4)
        names = set()
        while len(names) < count:
            names.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        specs = [TensorSpec(n, rng.choice(sorted(DTYPE_SIZES)), (rng.randint(0, 3),)) for n in sorted(names)]
        metadata = {"format": "pt", "k" * rng.randint(0, 9): "v" * rng.randint(0, 9)} if trial % 2 else None
        header, offsets = encode_header(specs, metadata)
        (n,) = struct.unpack("<Q", header[:8])
        assert n == len(header) - 8
        assert n % 8 == 0, (trial, n)
        raw = header[8:]
        assert raw.rstrip(b" ") == raw.strip()  # only trailing spaces are padding
        assert len(raw) - len(raw.rstrip(b" ")) < 8
        doc = json.loads(raw)
        if metadata is not None:
            assert next(iter(doc)) == "__metadata__"
        # offsets contiguous in layout order
        cursor = 0
        for spec in layout_order(specs):
            assert offsets[spec.name] == (cursor, cursor + spec.nbytes)
            assert doc[spec.name]["data_offsets"] == [cursor, cursor + spec.nbytes]
            cursor += spec.nbytes


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(5, 3, generator=g),
        "norm.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(4, dtype=torch.int64).reshape(2, 2),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 4, dtype=torch.float32),
        "naïve": torch.ones(2, dtype=torch.int8),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "pt", "note": "héllo", "n": "3"}])
def test_read_header_accepts_safetensors_save_file(tmp_path, metadata):
    tensors = _sample_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    header = read_header(path)
    assert header.path == path
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(tensors)
    assert header.metadata == metadata
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert header.header_bytes == n
    assert header.data_start == 8 + n
    assert header.raw == data[8 : 8 + n]
    names_by_dtype = {v: k for k, v in TORCH_DTYPES.items()}
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.name == name
        assert info.dtype == names_by_dtype[t.dtype]
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size()
        a, b = header.absolute_range(name)
        expected = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert data[a:b] == expected
    # Header.tensors is in data order
    begins = [info.begin for info in header.tensors.values()]
    assert begins == sorted(begins)


def test_read_header_accepts_own_encoding(tmp_path):
    specs = [TensorSpec("w", "F32", (2, 3)), TensorSpec("b", "U8", (5,))]
    header, offsets = encode_header(specs, {"format": "pt"})
    path = tmp_path / "own.safetensors"
    path.write_bytes(header + bytes(24 + 5))
    h = read_header(path)
    assert h.metadata == {"format": "pt"}
    assert {n: (i.begin, i.end) for n, i in h.tensors.items()} == offsets
    assert h.tensors["w"].row_bytes == 12 and h.tensors["w"].rows == 2
