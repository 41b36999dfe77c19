"""What the mixing layer offers, by name: weighting schemes and compute devices. Free of torch, so
that the command line can list them without loading it."""

from __future__ import annotations

# Methods of initialisation: clp (helper neighbours weighted by similarity), omp (helper atoms
# with least-squares coefficients), fvt (the mean of the token's pieces under the source tokenizer,
# no helper model).
METHODS = ("clp", "omp", "fvt")
HELPER_FREE_METHODS = ("fvt",)
SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
DEVICES = ("auto", "cpu", "cuda")  # where search and combine run; auto takes the GPU when there is one
# float64 bytes one block of OMP's rows may take for its candidate atoms (the memory model reads it).
OMP_BLOCK_BYTES = 64 * 1024 * 1024
