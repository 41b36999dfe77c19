"""clpsurgery: CLP-Transfer as weight surgery on safetensors files."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names and the module each lives in; imported on first use, so that header-only
# commands (inspect) start without loading torch.
_EXPORTS = {
    "Checkpoint": "checkpoint",
    "ComputedTensor": "writer",
    "CopiedTensor": "writer",
    "Header": "safetensors_header",
    "SurgeryError": "errors",
    "TensorInfo": "safetensors_header",
    "TensorSpec": "safetensors_header",
    "TransferOptions": "options",
    "make_plan": "plan",
    "read_header": "safetensors_header",
    "run_transfer": "transfer",
    "write_file": "writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'clpsurgery' has no attribute {name!r}")
