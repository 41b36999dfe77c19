"""The torch edge of the pipeline: stored rows (bytes, from formats) as torch tensors, and torch
tensors as bytes for the writer. Only the stages that compute rows import this (and torch)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from clpsurgery.formats.checkpoint import StoredRows
from clpsurgery.formats.safetensors_header import TensorSpec
from clpsurgery.formats.writer import ComputedTensor, row_blocks

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def as_tensor(rows: StoredRows) -> torch.Tensor:
    """Stored rows as a tensor of their dtype and shape, sharing their memory."""
    dtype = TORCH_DTYPES[rows.dtype]
    if rows.data.size == 0:
        return torch.empty(rows.shape, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(rows.data).reshape(-1)).view(dtype).reshape(rows.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def checked_blocks(spec: TensorSpec, blocks: Iterable[torch.Tensor]) -> Iterator[memoryview]:
    """The bytes of row blocks planned as `spec`, each checked for its dtype and row shape."""
    for block in blocks:
        if DTYPE_NAMES.get(block.dtype) != spec.dtype:
            raise AssertionError(f"tensor {spec.name}: block dtype {block.dtype}, planned {spec.dtype}")
        if tuple(block.shape[1:]) != spec.shape[1:]:
            raise AssertionError(f"tensor {spec.name}: block shape {tuple(block.shape)}, planned rows of {spec.shape[1:]}")
        yield tensor_bytes(block)


def planned_from_tensor(name: str, tensor: torch.Tensor, block_rows: int = 4096) -> ComputedTensor:
    """A ComputedTensor over an in-memory tensor (for tests, small tensors and tools)."""
    spec = TensorSpec(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))

    def blocks() -> Iterator[torch.Tensor]:
        if tensor.dim() == 0:
            yield tensor.reshape(())
            return
        for start, stop in row_blocks(tensor.shape[0], block_rows):
            yield tensor[start:stop]
        if tensor.shape[0] == 0:
            yield tensor

    return ComputedTensor(spec, lambda: checked_blocks(spec, blocks()))
