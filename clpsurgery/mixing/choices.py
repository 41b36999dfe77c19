"""What the mixing layer offers, by name: weighting schemes and compute devices (the methods are in
registry.py). Free of torch, so
that the command line can list them without loading it."""

from __future__ import annotations

# clp+fvt: clp's share. 0.3 won zero-shot on German and Italian (benchmarks/quality, 2026-12-04: 0.3 against 0.5, tied)
DEFAULT_BLEND = 0.3
# How fvt weights a token's pieces. mean: every piece alike (FVT). first-last: the input row is its
# last piece's, the output row its first's (a word is read by its end and predicted by its start,
# as tokensurgeon's first_last and AdaptiVocab do). linear: the same lean, with weights 1..n.
PIECE_WEIGHTINGS = ("mean", "first-last", "linear")
# The two sides of a vocabulary: the input rows (embedding) and the output rows (head, head bias).
SIDES = ("input", "output")
SCHEMES = ("clp", "clp-clipped", "softmax", "sparsemax")
DEFAULT_TEMPERATURE = 0.1  # WECHSEL's tau
DEVICES = ("auto", "cpu", "cuda")  # where search and combine run; auto takes the GPU when there is one
# float64 bytes one block of OMP's rows may take for its candidate atoms (the memory model reads it).
OMP_BLOCK_BYTES = 64 * 1024 * 1024
