"""The options of a transfer and their defaults (kept free of heavy imports for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from clpsurgery.errors import OptionError
from clpsurgery.mixing.choices import DEFAULT_BLEND, DEFAULT_TEMPERATURE, DEVICES, PIECE_WEIGHTINGS, SCHEMES
from clpsurgery.mixing.registry import Method, get_method, method_names

MATCH_RULES = ("exact", "canonical")
DEFAULT_DEVICE = "auto"
DEFAULT_MATCH = "exact"
# Chosen by benchmarks/quality (SmolLM2-135M to German and to Italian, bits per byte of held-out
# text): clp+fvt, 0.3 of clp's row (softmax over 5 neighbours at WECHSEL's temperature) and 0.7 of
# fvt's (the mean of the token's source pieces), won zero-shot in both languages (0.11 bits/byte
# better than clp alone) and after continued training. Within clp, softmax over few neighbours won;
# k = 5 tied k = 3 after training. See benchmarks/README.md.
DEFAULT_METHOD = "clp+fvt"
DEFAULT_TOP_K = 5
DEFAULT_WEIGHTING = "softmax"
# Peak memory of a run, tensors and buffers (the Python runtime, torch and FAISS come on top, about
# 0.25 GiB): a 7B conversion fits a laptop-class machine with room to spare.
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024


@dataclass(frozen=True)
class OptionSpec:
    """How one option is spelled on the command line: every command that takes it builds it from
    this (cli.transfer_options), so `inspect --against` can never drift from `init`."""

    flag: str
    help: str
    kind: str = "text"  # text, float, top_k (an integer or 'all'), size (256MiB), positive_int, choice, method (a registered method), flag, or multiple (repeatable text)
    choices: tuple[str, ...] = ()
    shown_default: str | None = None  # the default as typed on the command line, where its value reads worse (1GiB)


def _option(default, flag: str, help: str, **spec) -> Any:
    return field(default=default, metadata={"cli": OptionSpec(flag, help, **spec)})


@dataclass(frozen=True)
class TransferOptions:
    """Every option of a transfer; `top_k=None` is the paper's dense form over the whole overlap."""

    method: str = _option(DEFAULT_METHOD, "--method", "; ".join(f"{name}: {get_method(name).help}" for name in method_names()) + ".", kind="method")
    top_k: int | None = _option(DEFAULT_TOP_K, "--top-k", "Neighbours per new token (atoms, for omp), or 'all' for the paper's dense form.", kind="top_k")
    head_method: str | None = _option(None, "--head-method", "How the new rows of an untied output head (and its bias) are made, when not as the embedding's (default: --method). A tied source needs --untie-head.", kind="method")
    untie_head: bool = _option(False, "--untie-head", "A tied source: write a separate output head (the embedding's copied rows, new rows from --head-method) and tie_word_embeddings false.", kind="flag")
    blend: float = _option(DEFAULT_BLEND, "--blend", "clp+fvt: the share of clp's row in each new row (the rest is fvt's).", kind="float")
    piece_weighting: str = _option("mean", "--piece-weighting", "fvt: how a token's pieces are weighted. mean: alike; first-last: input rows from the last piece, output rows from the first; linear: the same lean, weights 1..n.", kind="choice", choices=PIECE_WEIGHTINGS)
    weighting: str = _option(DEFAULT_WEIGHTING, "--weighting", "How similarities become mixing weights.", kind="choice", choices=SCHEMES)
    temperature: float = _option(DEFAULT_TEMPERATURE, "--temperature", "Softmax temperature (softmax weighting only).", kind="float")
    max_memory: int = _option(DEFAULT_MAX_MEMORY, "--max-memory", "Budget for tensors and buffers: row blocks, search chunks, copy buffers.", kind="size", shown_default="1GiB")
    embedding_tensor: str | None = _option(None, "--embedding-tensor", "Name of the source's input-embedding tensor, if not found by itself.")
    head_tensor: str | None = _option(None, "--head-tensor", "Name of the source's untied output-head tensor, if not found by itself.")
    head_bias_tensor: str | None = _option(None, "--head-bias-tensor", "Name of the source's vocab-sized head bias, if not found by itself.")
    match: str = _option(DEFAULT_MATCH, "--match", "Token overlap: identical strings (the paper), or identical meaning across tokenizer families.", kind="choice", choices=MATCH_RULES)
    maps: tuple[str, ...] = _option((), "--map", "TARGET=SOURCE: the target token's row copied from a source token, or TARGET=text:TEXT: the mean of TEXT's source pieces (repeatable).", kind="multiple")
    map_file: str | None = _option(None, "--map-file", "A file of TARGET=SOURCE lines, as --map.")
    keep_source_specials: str = _option("auto", "--keep-source-specials", "Source special tokens the target lacks, added to the output with the source's rows: auto: those the source's chat template names; yes: every one; no: none (the template is not carried over either).", kind="choice", choices=("auto", "yes", "no"))
    pad_vocab_to_multiple: int | None = _option(None, "--pad-vocab-to-multiple", "Pad the written vocab_size up to a multiple of N (extra rows: the mean of the combined rows).", kind="positive_int")
    device: str = _option(DEFAULT_DEVICE, "--device", "Where search and combine run: auto takes the GPU when there is one.", kind="choice", choices=DEVICES)

    def __post_init__(self) -> None:
        chosen = {get_method(self.method, "--method")}
        if self.head_method is not None:
            chosen.add(get_method(self.head_method, "--head-method"))
        for method in sorted(chosen, key=lambda m: m.name):
            if self.top_k is None and not method.dense_form:
                dense = " or ".join(f"--method {name}" for name in method_names() if get_method(name).dense_form)
                raise OptionError("--top-k", f"{method.name} {method.top_k_means} per token: give a number, not 'all' (the dense form is {dense}'s)")
        if not 0.0 <= self.blend <= 1.0:
            raise OptionError("--blend", f"is a share between 0 and 1, not {self.blend}")
        if self.piece_weighting not in PIECE_WEIGHTINGS:
            raise OptionError("--piece-weighting", f"unknown weighting {self.piece_weighting!r}; choose from {', '.join(PIECE_WEIGHTINGS)}")
        if self.weighting not in SCHEMES:
            raise OptionError("--weighting", f"unknown scheme {self.weighting!r}; choose from {', '.join(SCHEMES)}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionError("--top-k", f"must be a positive integer or 'all', not {self.top_k}")
        if not self.temperature > 0:
            raise OptionError("--temperature", f"must be positive, not {self.temperature}")
        if self.match not in MATCH_RULES:
            raise OptionError("--match", f"unknown rule {self.match!r}; choose from {', '.join(MATCH_RULES)}")
        if self.pad_vocab_to_multiple is not None and self.pad_vocab_to_multiple < 1:
            raise OptionError("--pad-vocab-to-multiple", f"must be a positive integer, not {self.pad_vocab_to_multiple}")
        if self.device not in DEVICES:
            raise OptionError("--device", f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")

    def method_for(self, side: str) -> str:
        """The method that makes the new rows of one side ("input" or "output")."""
        return self.head_method if side == "output" and self.head_method is not None else self.method

    def method_of(self, side: str) -> Method:
        """The registered method that makes the new rows of one side."""
        return get_method(self.method_for(side))

    @property
    def needs_helper(self) -> bool:
        return any(self.method_of(side).needs_helper for side in ("input", "output"))

    def helper_method_flags(self) -> dict[str, str]:
        """The method options in effect whose method reads the helper's weights, as flag -> method
        (--head-method only when given: otherwise the head's method is --method's), for errors."""
        specs = self.specs()
        given = {"method": self.method} if self.head_method is None else {"method": self.method, "head_method": self.head_method}
        return {specs[name].flag: method for name, method in given.items() if get_method(method).needs_helper}

    def as_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "top_k": "all" if self.top_k is None else self.top_k, "maps": list(self.maps)}

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        """Each option's name and how the command line spells it, in declaration order."""
        return {f.name: f.metadata["cli"] for f in fields(cls)}
