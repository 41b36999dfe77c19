"""What the mixing layer offers, by name: weighting schemes and compute devices. Free of torch, so
that the command line can list them without loading it."""

from __future__ import annotations

# Methods of initialisation: clp (helper neighbours weighted by similarity) or omp (helper atoms
# with least-squares coefficients).
METHODS = ("clp", "omp")
SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
DEVICES = ("auto", "cpu", "cuda")  # where search and combine run; auto takes the GPU when there is one
# float64 bytes one block of OMP's rows may take for its candidate atoms (the memory model reads it).
OMP_BLOCK_BYTES = 64 * 1024 * 1024
