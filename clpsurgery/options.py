"""The options of a transfer and their defaults (kept free of heavy imports for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SurgeryError

SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
DEFAULT_TOP_K = 10
DEFAULT_WEIGHTING = "clp-clipped"
DEFAULT_WORKING_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TransferOptions:
    """Every option of a transfer; `top_k=None` is the paper's dense form over the whole overlap."""

    top_k: int | None = DEFAULT_TOP_K
    weighting: str = DEFAULT_WEIGHTING
    temperature: float = DEFAULT_TEMPERATURE
    working_bytes: int = DEFAULT_WORKING_BYTES
    embedding_tensor: str | None = None
    head_tensor: str | None = None

    def __post_init__(self) -> None:
        if self.weighting not in SCHEMES:
            raise SurgeryError("--weighting", f"unknown scheme {self.weighting!r}; choose from {', '.join(SCHEMES)}")
        if self.top_k is not None and self.top_k < 1:
            raise SurgeryError("--top-k", f"must be a positive integer or 'all', not {self.top_k}")
        if not self.temperature > 0:
            raise SurgeryError("--temperature", f"must be positive, not {self.temperature}")

    def as_dict(self) -> dict:
        return {
            "top_k": "all" if self.top_k is None else self.top_k,
            "weighting": self.weighting,
            "temperature": self.temperature,
            "working_bytes": self.working_bytes,
            "embedding_tensor": self.embedding_tensor,
            "head_tensor": self.head_tensor,
        }


