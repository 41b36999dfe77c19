"""Helpers shared by the byte-level tests: random tensors of any dtype, byte comparison."""

from __future__ import annotations

import math

import numpy as np
import torch

from clpsurgery.formats.safetensors_header import DTYPE_SIZES
from clpsurgery.pipeline.tensor_io import TORCH_DTYPES


def random_tensor(dtype_name: str, shape: tuple[int, ...], rng: np.random.Generator | int) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaNs included) for floats, 0/1 for BOOL."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    n = math.prod(shape) * DTYPE_SIZES[dtype_name]
    if n == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype_name])
    raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    if dtype_name == "BOOL":
        raw %= 2
    return torch.from_numpy(raw).view(TORCH_DTYPES[dtype_name]).reshape(shape)


def as_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert as_bytes(a) == as_bytes(b)
