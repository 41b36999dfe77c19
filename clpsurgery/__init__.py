"""clpsurgery: CLP-Transfer as weight surgery on safetensors files."""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# Matrix products that are bitwise the same whatever the thread count (Intel MKL's strict CNR
# mode; without it, MKL splits small products differently with 1 or 2 threads): two runs on the
# same inputs write the same bytes. Read by MKL at its first call, so set before torch computes
# anything; a value the user set wins. Costs about 10% on a large fp32 product.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Public names and the module each lives in; imported on first use, so that header-only
# commands (inspect) start without loading torch.
_EXPORTS = {
    "Checkpoint": "formats.checkpoint",
    "ComputedTensor": "formats.writer",
    "CopiedTensor": "formats.writer",
    "Header": "formats.safetensors_header",
    "SurgeryError": "errors",
    "TensorInfo": "formats.safetensors_header",
    "TensorSpec": "formats.safetensors_header",
    "TransferOptions": "pipeline.options",
    "apply": "pipeline.commands",
    "extend": "pipeline.commands",
    "init": "pipeline.commands",
    "inspect": "pipeline.commands",
    "make_plan": "pipeline.plan",
    "read_header": "formats.safetensors_header",
    "register_method": "mixing.registry",
    "Method": "mixing.registry",
    "verify": "pipeline.commands",
    "write_file": "formats.writer",
}
__all__ = sorted(_EXPORTS)


_RENAMED = {"register_method": "register"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"clpsurgery.{_EXPORTS[name]}"), _RENAMED.get(name, name))
    raise AttributeError(f"module 'clpsurgery' has no attribute {name!r}")
