"""The methods of initialisation, by name: what each needs, how wide its rows are, how it is told.

Every method produces the same thing, a sparse mixing over source rows (`MixingMatrix`): for each
new token a few source row positions and their weights. A method is one module in `mixing/` with
a function `MixingInputs -> MixingMatrix` and one `Method` entry here (or `register`ed by the
user), which declares everything the rest of the code asks of it; nothing outside `mixing/`
compares method names. This module is free of torch: the command line and `inspect` read it
without loading the compute, which is imported on first use (`Method.mix`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clpsurgery.errors import OptionError
from clpsurgery.mixing.choices import OMP_BLOCK_BYTES

if TYPE_CHECKING:
    import numpy as np
    import torch


    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.mixing.neighbours import Neighbours
    from clpsurgery.mixing.weights import WeightStats

# Pieces per new token the memory model allows for a method that reads the source pieces (a word
# rarely takes more; a longer one only makes its block smaller).
PIECES_PER_TOKEN = 16


@dataclass(frozen=True)
class MixingInputs:
    """What a method may read to make one side's mixing: arrays in, no files.

    Positions index the overlap (0..overlap_count-1); a method that names other source rows puts
    them in its matrix's `extra_source_ids`. Helper vectors are None for a method that needs no
    helper, pieces None for one that needs no source tokenizer.
    """

    side: str  # "input" (the embedding) or "output" (an untied head, a vocab-sized bias)
    options: Any  # the transfer's options (pipeline.options.TransferOptions): top_k, weighting, ...
    neighbours: int  # helper neighbours (atoms) per new token: --top-k, at most the overlap's size
    overlap_target_ids: np.ndarray  # [overlap] the target id of each overlap position
    overlap_source_ids: np.ndarray  # [overlap] the source row each overlap position copies
    missing_ids: np.ndarray  # [missing] the target ids of the new tokens, in the matrix's row order
    pieces: list[list[int]] | None  # per new token, its source ids under the source tokenizer
    helper_rows: torch.Tensor | None  # [target ids, h] fp32 as stored in the helper (zero past its rows)
    overlap_vectors: torch.Tensor | None  # [overlap, h] the overlap's helper rows, L2-normalised
    missing_vectors: torch.Tensor | None  # [missing, h] the new tokens' helper rows, L2-normalised
    # (query vectors, k, on_chunk) -> each query's top-k overlap positions by cosine
    search: Callable[..., Neighbours] | None
    progress: Callable[[str, int], Any]  # (label, total) -> a context manager yielding advance(n)


def _no_notes(stats: WeightStats) -> str | None:
    return None


def _never(options: Any) -> bool:
    return False


def _no_extra_bytes(rows: int, width: int) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """One method of initialisation and what the rest of the code needs to know of it.

    `mix` makes one side's MixingMatrix from MixingInputs; None means the dense form (weights over
    the whole overlap, computed block by block while writing), which only a `dense_form` method
    with `--top-k all` returns. It may be given as "module:function", imported on first use.
    """

    name: str
    help: str  # one clause for --method's help
    mix: Callable[[MixingInputs], MixingMatrix | None] | str
    needs_helper: bool = True  # reads the helper's embedding
    needs_pieces: bool = False  # reads each new token's pieces under the source tokenizer
    uses_neighbours: bool = True  # its rows take up to --top-k helper neighbours' positions
    dense_form: bool = False  # takes --top-k all (the paper's dense form over the whole overlap)
    top_k_means: str = "mixes a few neighbours"  # said when it refuses --top-k all
    describe: Callable[[dict, str], str] = lambda options, side: ""  # (options as recorded, side) -> words
    notes: Callable[[WeightStats], str | None] = _no_notes  # after a run: rows worth a word
    differs_by_side: Callable[[Any], bool] = _never  # whether its output rows differ from its input rows
    extra_search_bytes: Callable[[int, int], int] = _no_extra_bytes  # (target rows, helper width) -> bytes

    def width(self, neighbours: int) -> int:
        """Source rows one new token mixes at most (the memory model's per-row cost)."""
        return (neighbours if self.uses_neighbours else 0) + (PIECES_PER_TOKEN if self.needs_pieces else 0)

    def make(self, inputs: MixingInputs) -> MixingMatrix | None:
        function = self.mix if callable(self.mix) else _load(self.mix)
        return function(inputs)


@functools.cache
def _load(path: str) -> Callable:
    """A function named "module:function", imported on first use (the built-ins load torch)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method available by its name (to --method, --head-method, inspect and apply)."""
    if not method.name or any(c.isspace() for c in method.name):
        raise ValueError(f"a method's name is one word, not {method.name!r}")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def helper_free_methods() -> tuple[str, ...]:
    """The methods that read no helper weights (a tokenizer-only helper will do)."""
    return tuple(name for name, method in _METHODS.items() if not method.needs_helper)


def find_method(name: str) -> Method | None:
    return _METHODS.get(name)


def get_method(name: str, option: str = "--method") -> Method:
    """The method of that name; one OptionError line naming the choices otherwise."""
    method = _METHODS.get(name)
    if method is None:
        raise OptionError(option, f"unknown method {name!r}; choose from {', '.join(_METHODS)}")
    return method


def describe(name: str, options: dict, side: str = "input") -> str:
    """How a run's method is told by inspect and the notes; a method this version does not know
    (an output of another version) is told by its name."""
    method = _METHODS.get(name)
    return method.describe(options, side) if method is not None else name


# --- the built-in methods -----------------------------------------------------------------------


def _pieces_words(options: dict, side: str) -> str:
    lean = "last" if side == "input" else "first"
    return {
        "mean": "the mean of its pieces",
        "first-last": f"its {lean} piece",
        "linear": f"its pieces weighted 1..n towards the {lean}",
    }[options.get("piece_weighting", "mean")]


def _top_k(options: dict) -> str:
    return "all" if options.get("top_k") in (None, "all") else str(options["top_k"])


def _clp_notes(stats: WeightStats) -> str | None:
    if not (stats.degenerate_rows or stats.uniform_rows):
        return None
    return (
        f"{stats.degenerate_rows} rows had a similarity sum that was zero, negative or tiny and were clipped; "
        f"{stats.uniform_rows} had no positive similarity and got uniform weights"
    )


def _omp_notes(stats: WeightStats) -> str | None:
    if not (stats.degenerate_rows or stats.uniform_rows):
        return None
    return (
        f"{stats.degenerate_rows} rows had nearly dependent atoms (solved with a small ridge); "
        f"{stats.uniform_rows} had a zero helper vector and got the mean of their nearest tokens"
    )


def _pieces_differ_by_side(options: Any) -> bool:
    return options.piece_weighting != "mean"


CLP = register(Method(
    name="clp",
    help="neighbours in the helper weighted by similarity (the paper)",
    mix="clpsurgery.mixing.clp:mix",
    dense_form=True,
    describe=lambda o, side: f"clp: {o['weighting']}, top-k {_top_k(o)}",
    notes=_clp_notes,
))
OMP = register(Method(
    name="omp",
    help="least-squares combinations of helper atoms (orthogonal matching pursuit)",
    mix="clpsurgery.mixing.omp:mix",
    top_k_means="picks a few atoms",
    describe=lambda o, side: f"omp: up to {_top_k(o)} atoms per new token, least-squares coefficients",
    notes=_omp_notes,
    # the raw fp32 helper vectors, and one block's candidate atoms and chosen atoms in fp64
    extra_search_bytes=lambda rows, width: rows * width * 4 + 2 * OMP_BLOCK_BYTES,
))
FVT = register(Method(
    name="fvt",
    help="the mean of the token's pieces under the source tokenizer, no helper model needed",
    mix="clpsurgery.mixing.fvt:mix",
    needs_helper=False,
    needs_pieces=True,
    uses_neighbours=False,
    describe=lambda o, side: f"fvt: each new token {_pieces_words(o, side)} under the source tokenizer",
    differs_by_side=_pieces_differ_by_side,
))
CLP_FVT = register(Method(
    name="clp+fvt",
    help="the two rows blended (--blend)",
    mix="clpsurgery.mixing.blend:mix",
    needs_pieces=True,
    top_k_means="blends a few neighbours",
    describe=lambda o, side: (
        f"clp+fvt: {o.get('blend', 0.5):g} of clp's row ({o['weighting']}, top-k {_top_k(o)}) "
        f"and {1 - o.get('blend', 0.5):g} of each new token {_pieces_words(o, side)} under the source tokenizer"
    ),
    differs_by_side=_pieces_differ_by_side,
))
