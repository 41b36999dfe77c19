"""The options of a transfer and their defaults (kept free of heavy imports for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SurgeryError

SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
MATCH_RULES = ("exact", "canonical")
DEVICES = ("auto", "cpu", "cuda")  # where search and combine run; auto takes the GPU when there is one
DEFAULT_DEVICE = "auto"
DEFAULT_MATCH = "exact"
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
# Chosen by benchmarks/quality (SmolLM2-135M to German, bits per byte of held-out text): softmax
# over few neighbours at WECHSEL's temperature won zero-shot and after continued training; k = 5
# tied k = 3 after training and the reconstruction proxy (benchmarks/choose_defaults) favours it
# over 3. See the README.
DEFAULT_TOP_K = 5
DEFAULT_WEIGHTING = "softmax"
# Peak memory of a run, tensors and buffers (the Python runtime, torch and FAISS come on top, about
# 0.25 GiB): a 7B conversion fits a laptop-class machine with room to spare.
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024


@dataclass(frozen=True)
class TransferOptions:
    """Every option of a transfer; `top_k=None` is the paper's dense form over the whole overlap."""

    top_k: int | None = DEFAULT_TOP_K
    weighting: str = DEFAULT_WEIGHTING
    temperature: float = DEFAULT_TEMPERATURE
    max_memory: int = DEFAULT_MAX_MEMORY
    embedding_tensor: str | None = None
    head_tensor: str | None = None
    head_bias_tensor: str | None = None
    match: str = DEFAULT_MATCH
    pad_vocab_to_multiple: int | None = None
    device: str = DEFAULT_DEVICE

    def __post_init__(self) -> None:
        if self.weighting not in SCHEMES:
            raise SurgeryError("--weighting", f"unknown scheme {self.weighting!r}; choose from {', '.join(SCHEMES)}")
        if self.top_k is not None and self.top_k < 1:
            raise SurgeryError("--top-k", f"must be a positive integer or 'all', not {self.top_k}")
        if not self.temperature > 0:
            raise SurgeryError("--temperature", f"must be positive, not {self.temperature}")
        if self.match not in MATCH_RULES:
            raise SurgeryError("--match", f"unknown rule {self.match!r}; choose from {', '.join(MATCH_RULES)}")
        if self.pad_vocab_to_multiple is not None and self.pad_vocab_to_multiple < 1:
            raise SurgeryError("--pad-vocab-to-multiple", f"must be a positive integer, not {self.pad_vocab_to_multiple}")
        if self.device not in DEVICES:
            raise SurgeryError("--device", f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")

    def as_dict(self) -> dict:
        return {
            "top_k": "all" if self.top_k is None else self.top_k,
            "weighting": self.weighting,
            "temperature": self.temperature,
            "max_memory": self.max_memory,
            "embedding_tensor": self.embedding_tensor,
            "head_tensor": self.head_tensor,
            "head_bias_tensor": self.head_bias_tensor,
            "match": self.match,
            "pad_vocab_to_multiple": self.pad_vocab_to_multiple,
            "device": self.device,
        }


