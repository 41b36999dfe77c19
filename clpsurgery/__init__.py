"""clpsurgery: CLP-Transfer as weight surgery on safetensors files."""

from .checkpoint import Checkpoint
from .errors import SurgeryError
from .safetensors_header import Header, TensorInfo, TensorSpec, read_header
from .writer import ComputedTensor, CopiedTensor, write_file

__all__ = [
    "Checkpoint",
    "ComputedTensor",
    "CopiedTensor",
    "Header",
    "SurgeryError",
    "TensorInfo",
    "TensorSpec",
    "read_header",
    "write_file",
]
__version__ = "0.1.0"
