"""What the mixing layer offers, by name: weighting schemes and compute devices. Free of torch, so
that the command line can list them without loading it."""

from __future__ import annotations

SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
DEVICES = ("auto", "cpu", "cuda")  # where search and combine run; auto takes the GPU when there is one
