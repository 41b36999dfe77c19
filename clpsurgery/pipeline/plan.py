"""The plan of a transfer: inputs resolved and checked, vocabularies, overlap, tensors to rebuild.

A plan is a plain value built from headers, configs and tokenizers only: it holds no open file
and no tensor data, so `inspect` can print it before anything is written.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import INDEX_NAME, CheckpointLayout
from clpsurgery.formats.safetensors_header import DTYPE_SIZES, FLOAT_DTYPES
from clpsurgery.mixing.registry import Method, get_method, helper_free_methods
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.options import TransferOptions
from clpsurgery.vocab.architecture import (
    FAMILY_BY_MODEL_TYPE,
    VocabTensors,
    config_model_type,
    find_vocab_tensors,
    head_name_for,
    read_config,
)
from clpsurgery.vocab.chat_template import missing_specials, read_chat_template, tokenizer_files_with_specials
from clpsurgery.vocab.token_map import TokenMap, mapped_overlap, read_map_lines, resolve_maps
from clpsurgery.vocab.vocabulary import (
    Overlap,
    Vocabulary,
    load_vocabulary,
    match_overlap,
)

if TYPE_CHECKING:
    from clpsurgery.pipeline.inputs import Inputs


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class RebuiltTensor:
    """One tensor of the output whose rows are rebuilt: shared tokens' rows copied from
    `source_name`, new tokens' rows mixed from it by the mixing of its side."""

    name: str
    source_name: str
    side: str  # "input" (the embedding and its copies) or "output" (an untied head, a vocab-sized bias)


@dataclass(frozen=True)
class TransferPlan:
    """Everything init will do, decided before any tensor data is read."""

    source_path: Path
    helper_path: Path
    source: CheckpointLayout
    helper: CheckpointLayout | None  # None: a helper-free method (only the target tokenizer is read)
    source_tensors: VocabTensors
    helper_embedding: str | None
    source_vocab: Vocabulary
    target_vocab: Vocabulary
    overlap: Overlap
    source_config: dict
    source_config_path: Path
    generation_config_path: Path | None
    helper_config: dict | None
    options: TransferOptions
    # The output's tokenizer files when they are not the helper's (extend: the extended source tokenizer).
    tokenizer_files: tuple[tuple[str, bytes], ...] | None = None
    maps: tuple[TokenMap, ...] = ()  # --map: rows set by hand (copy maps are in the overlap already)
    kept_specials: tuple[str, ...] = ()  # source special tokens added to the output (a chat template's)
    # A mixing given, not searched for (apply's record, extend's base mixing): the distinct source
    # rows it combines (0 until known: with_recorded_mixing). None: the search finds the mixing.
    mixed_source_rows: int | None = None

    @property
    def replay(self) -> bool:
        """Whether the mixing is given (a record, or extend's): no helper, no search on this plan."""
        return self.mixed_source_rows is not None

    @property
    def source_rows(self) -> int:
        """Rows of the source's input embedding (its tokenizer's ids, and any vocab padding)."""
        return self.source.info(self.source_tensors.embedding).shape[0]

    @property
    def head_untied(self) -> bool:
        """Whether the output has an output head of its own (the source's, or one --untie-head adds)."""
        return head_untied(self.source_tensors, self.options)

    @property
    def unties_head(self) -> bool:
        """Whether the output's config unties a head the source ties (tie_word_embeddings false)."""
        return self.options.untie_head and (self.source_tensors.head is None or self.source_tensors.tied_in_config is True)

    @property
    def added_head(self) -> str | None:
        """The output head --untie-head adds to a tied source (None when it adds none)."""
        if not self.options.untie_head or self.source_tensors.head is not None:
            return None
        return head_name_for(self.source_tensors.family)

    @property
    def rebuilt(self) -> tuple[RebuiltTensor, ...]:
        """Every tensor of the output rebuilt row by row, the embedding first."""
        tensors = self.source_tensors
        out = [
            RebuiltTensor(name, name, "output" if tensors.is_output_side(name, self.source.info(name).shape, self.head_untied) else "input")
            for name in tensors.names
        ]
        if self.added_head is not None:
            out.insert(1, RebuiltTensor(self.added_head, tensors.embedding, "output"))
        return tuple(out)

    @property
    def rebuilt_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.rebuilt)

    @property
    def rebuilt_source_names(self) -> frozenset[str]:
        """The source tensors the rebuilt tensors are made from."""
        return frozenset(t.source_name for t in self.rebuilt)

    def copied_whole(self, header) -> bool:
        """Whether a source file (its header) holds no rebuilt tensor: its output is a byte copy."""
        return not self.rebuilt_source_names & header.tensors.keys()

    @property
    def two_mixings(self) -> bool:
        """Whether the output rows' mixing differs from the input rows' (another method, or fvt's
        pieces weighted by position) and some rebuilt tensor is on the output side."""
        if not any(t.side == "output" for t in self.rebuilt):
            return False
        options = self.options
        return options.method_for("output") != options.method or options.method_of("input").differs_by_side(options)

    def side_method(self, side: str) -> str:
        """The method that makes the new rows of one side: the output side follows --head-method
        only where the output rows are mixed apart."""
        return self.options.method_for(side) if side == "input" or self.two_mixings else self.options.method

    def method_for(self, side: str) -> Method:
        """The registered method behind side_method."""
        return get_method(self.side_method(side))

    @property
    def hidden_size(self) -> int:
        return self.source.info(self.source_tensors.embedding).shape[1]

    @property
    def dense(self) -> bool:
        """The paper's dense form: clp over the whole overlap (on the input side)."""
        return self.dense_for("input")

    def dense_for(self, side: str) -> bool:
        return self.method_for(side).dense_form and self.options.top_k is None

    @property
    def target_size(self) -> int:
        """The target tokenizer's id space: rows with a token behind them."""
        return self.overlap.target_size

    @property
    def output_rows(self) -> int:
        """Rows written: the id space, padded up to --pad-vocab-to-multiple (the written vocab_size)."""
        multiple = self.options.pad_vocab_to_multiple or 1
        return -(-self.target_size // multiple) * multiple

    def output_file_name(self, source_file: Path) -> str:
        """The output weights file made from a source file: a sharded source keeps its shard
        names, a single file becomes model.safetensors."""
        return source_file.name if self.source.is_sharded else "model.safetensors"

    @property
    def k(self) -> int:
        """Neighbours per missing token on the input side."""
        return self.k_for("input")

    def k_for(self, side: str) -> int:
        """Source rows mixed per missing token at most: the method's width for `neighbours` (the
        memory model's per-row cost)."""
        return self.method_for(side).width(self.neighbours)

    @property
    def neighbours(self) -> int:
        """Helper neighbours (or atoms) per missing token: --top-k, or the whole overlap in the dense form."""
        return self.overlap.count if self.options.top_k is None else min(self.options.top_k, self.overlap.count)

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides with a mixing of their own."""
        return ("input", "output") if self.two_mixings else ("input",)

    def memory_estimate(self) -> dict[str, int]:
        """Bytes held at once by the search and by the write stage, besides the row blocks."""
        return memory.memory_estimate(
            self.source, tuple(t.source_name for t in self.rebuilt), self.helper, self.helper_embedding, self.target_size,
            self.overlap.count, self.held_rows, int(self.overlap.missing_ids.size),
            tuple((None if self.replay else self.method_for(side), self.k_for(side), self.dense_for(side)) for side in self.sides),
        )

    @property
    def held_rows(self) -> int:
        """Source rows the write stage holds for one rebuilt tensor (rebuild.HeldRows): the
        overlap's at most. Pairs copied to their own id are read block by block instead, so an
        extension holds only the rows its mixing combines."""
        if self.mixed_source_rows is None or any(self.dense_for(side) for side in self.sides):
            return self.overlap.count
        moved = int(np.count_nonzero(self.overlap.target_ids != self.overlap.source_ids))
        return moved + self.mixed_source_rows

    @property
    def block_budget(self) -> int:
        """What --max-memory leaves for a block of rebuilt rows once the write stage's fixed costs are paid."""
        return self.options.max_memory - self.memory_estimate()["write"]

    def check_memory(self) -> None:
        """Refuse a run that cannot fit --max-memory, before anything is written."""
        estimate = self.memory_estimate()
        need = max(estimate["search"], estimate["write"] + memory.MIN_BLOCK_BYTES)
        if need > self.options.max_memory:
            raise SurgeryError(
                "--max-memory",
                f"{_mib(self.options.max_memory)} cannot hold this transfer: it needs about {_mib(need)} "
                f"(search {_mib(estimate['search'])}, write {_mib(estimate['write'])} plus row blocks)",
            )

    def summary(self) -> dict:
        """The plan as plain data, for `inspect` and the manifest."""
        emb = self.source.info(self.source_tensors.embedding)
        rebuilt = {t.name: [self.output_rows, *self.source.info(t.source_name).shape[1:]] for t in self.rebuilt}
        rebuilt_bytes = sum(
            math.prod([self.output_rows, *self.source.info(t.source_name).shape[1:]]) * DTYPE_SIZES[self.source.info(t.source_name).dtype]
            for t in self.rebuilt
        )
        untouched = sum(
            ref.info.nbytes for name, ref in self.source.tensors.items() if name not in self.source_tensors.names
        )
        return {
            "source": str(self.source_path),
            "helper": str(self.helper_path),
            "source_vocab_size": self.source_vocab.size,
            "target_vocab_size": self.target_size,
            "overlap": self.overlap.count,
            "missing": int(self.overlap.missing_ids.size),
            "embedding": {"name": self.source_tensors.embedding, "shape": list(emb.shape), "dtype": emb.dtype},
            "head": self.source_tensors.head,
            "head_bias": self.source_tensors.head_bias,
            "tied": self.source_tensors.tied,
            "added_head": self.added_head,
            "head_untied": self.head_untied,
            "output_side": [t.name for t in self.rebuilt if t.side == "output"],
            "helper_embedding": None if self.helper is None else {"name": self.helper_embedding, "shape": list(self.helper.info(self.helper_embedding).shape)},
            "rebuilt_tensors": rebuilt,
            "bytes_to_compute": rebuilt_bytes,
            "bytes_to_copy": untouched,
            "neighbours_per_token": self.k,
            "methods": {side: self.side_method(side) for side in self.sides},
            "memory_estimate": self.memory_estimate(),
        }


def find_helper_embedding(shapes: dict[str, tuple[int, ...]], place: str, config: dict | None) -> VocabTensors:
    """The helper's input embedding: only that is read, so an unknown model type is searched by name."""
    try:
        return find_vocab_tensors(shapes, place, config=config)
    except SurgeryError:
        if config is None or config_model_type(config) in FAMILY_BY_MODEL_TYPE:
            raise
        return find_vocab_tensors(shapes, place, config=None)


def head_untied(tensors: VocabTensors, options: TransferOptions) -> bool:
    """Whether the output has an output head of its own: one --untie-head adds, or a stored head
    the model does not tie to the embedding at load time."""
    return options.untie_head or (tensors.head is not None and tensors.tied_in_config is not True)


def _check_head_options(tensors: VocabTensors, shapes: dict[str, tuple[int, ...]], options: TransferOptions, place: Path) -> None:
    """--untie-head needs a model with a head to untie; --head-method needs an untied head."""
    if options.untie_head and tensors.head is None:
        name = head_name_for(tensors.family)
        if name is None:
            raise SurgeryError("--untie-head", f"{tensors.family} models tie the output head to the embedding in their code; it cannot be untied")
        if name in shapes:
            raise SurgeryError(place, f"--untie-head would add {name!r}, which is already a tensor of another shape")
    if options.untie_head and tensors.family == "t5" and tensors.tied_in_config is not False:
        raise SurgeryError("--untie-head", "T5 scales a tied head's input by d_model**-0.5 and an untied one's not: untying would change the model")
    if options.head_method is not None and options.head_method != options.method and not head_untied(tensors, options):
        raise SurgeryError("--head-method", "the source's output head is its embedding (tied): add --untie-head to give it rows of its own")


def _keep_source_specials(source_vocab: Vocabulary, target_vocab: Vocabulary, helper_path: Path, helper_config: dict | None, mode: str):
    """The source's chat template, and the source special tokens the target lacks (those the
    template names, or with `yes` every one), added to the output's tokenizer: the target
    vocabulary with them, the helper config with the source's end-of-turn eos where it is one of
    them, and the tokenizer files to write (None where nothing changes)."""
    template = read_chat_template(source_vocab.path, source_vocab)
    wanted = tuple(source_vocab.special_tokens) if mode == "yes" else (template.tokens if template else ())
    kept = missing_specials(tuple(dict.fromkeys(wanted)), target_vocab)
    if template is None and not kept:
        return target_vocab, helper_config, None, ()
    source_eos = source_vocab.id_to_token().get(source_vocab.roles["eos"]) if "eos" in source_vocab.roles else None
    eos = source_eos if source_eos is not None and template is not None and source_eos in template.tokens else None
    files = tokenizer_files_with_specials(helper_path, target_vocab, kept, template, eos)
    with tempfile.TemporaryDirectory(prefix="clpsurgery-specials-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        extended = load_vocabulary(folder, helper_config)
    extended = replace(extended, path=target_vocab.path)
    if eos is not None:
        helper_config = dict(helper_config or {})
        eos_id = extended.token_to_id[eos]
        helper_config["eos_token_id"] = eos_id
        if isinstance(helper_config.get("text_config"), dict):
            helper_config["text_config"] = {**helper_config["text_config"], "eos_token_id": eos_id}
    return extended, helper_config, tuple(sorted(files.items())), kept


def check_rebuildable_dtypes(source: CheckpointLayout, tensors: VocabTensors, place: Path) -> None:
    """The vocabulary tensors a transfer rebuilds are F16, BF16, F32 or F64: init's source and
    apply's sibling are refused in the same line otherwise."""
    for name in tensors.names:
        dtype = source.info(name).dtype
        if dtype not in FLOAT_DTYPES or dtype.startswith("F8"):
            raise SurgeryError(place, f"tensor {name!r} is {dtype}; clpsurgery rebuilds F16, BF16, F32 and F64 embeddings")


def _open_helper(helper_path: Path, options: TransferOptions) -> CheckpointLayout:
    """The helper's weights; a folder with none (a tokenizer-only helper) is told which method
    option reads them and that a helper-free method needs only the tokenizer."""
    if not (helper_path / INDEX_NAME).is_file() and not any(p.is_file() for p in helper_path.glob("*.safetensors")):
        needing = options.helper_method_flags()
        verb = "needs" if len(needing) == 1 else "need"
        free = " ".join(f"{flag} {helper_free_methods()[0]}" for flag in needing)
        raise SurgeryError(
            helper_path,
            f"{' and '.join(f'{flag} {m}' for flag, m in needing.items())} {verb} the helper's weights, and this folder has "
            f"no .safetensors file; {free} needs only its tokenizer",
        )
    return CheckpointLayout.open(helper_path)


def make_plan(inputs: Inputs, options: TransferOptions) -> TransferPlan:
    """Open and check both models, read both vocabularies and compute the overlap."""
    source_path, helper_path = inputs.source, inputs.helper
    source = CheckpointLayout.open(source_path)
    helper_free = not options.needs_helper
    if not helper_path.is_dir():
        what = "the target tokenizer" if helper_free else "weights, tokenizer.json, config.json"
        raise SurgeryError(helper_path, f"the helper must be a model folder ({what})")
    helper = None if helper_free else _open_helper(helper_path, options)
    config_path = inputs.source_config
    config = read_config(config_path)
    generation_config_path = config_path.parent / "generation_config.json"
    helper_config_path = helper_path / "config.json"
    helper_config = read_config(helper_config_path) if helper_config_path.is_file() else None
    source_shapes = {n: r.info.shape for n, r in source.tensors.items()}
    source_tensors = find_vocab_tensors(
        source_shapes, str(source_path), options.embedding_tensor, options.head_tensor, options.head_bias_tensor, config
    )
    helper_tensors = None if helper is None else find_helper_embedding({n: r.info.shape for n, r in helper.tensors.items()}, str(helper_path), helper_config)
    _check_head_options(source_tensors, source_shapes, options, source_path)
    check_rebuildable_dtypes(source, source_tensors, source_path)
    if helper is not None and helper.info(helper_tensors.embedding).dtype not in FLOAT_DTYPES:
        raise SurgeryError(helper_path, f"helper embedding {helper_tensors.embedding!r} is {helper.info(helper_tensors.embedding).dtype}, not a float")

    source_vocab = load_vocabulary(inputs.source_tokenizer, config)
    target_vocab = load_vocabulary(helper_path, helper_config)

    source_rows = source.info(source_tensors.embedding).shape[0]
    if source_vocab.size > source_rows:
        raise SurgeryError(
            source_vocab.path,
            f"tokenizer has ids up to {source_vocab.size - 1} but the embedding {source_tensors.embedding!r} has {source_rows} rows",
        )
    if helper is not None:
        helper_rows, helper_hidden = helper.info(helper_tensors.embedding).shape
        if helper_rows < target_vocab.size:
            raise SurgeryError(
                helper_path,
                f"helper embedding {helper_tensors.embedding!r} has {helper_rows} rows, fewer than its tokenizer's {target_vocab.size} ids",
            )
        if helper_config is not None:
            configured_hidden = helper_config.get("hidden_size", helper_config.get("n_embd", helper_config.get("d_model")))
            tied_proj = helper_config.get("word_embed_proj_dim")  # OPT embeds at a smaller width
            if isinstance(configured_hidden, int) and helper_hidden not in (configured_hidden, tied_proj):
                raise SurgeryError(
                    helper_path,
                    f"helper embedding width {helper_hidden} does not match hidden size {configured_hidden} in its config.json",
                )
    tokenizer_files, kept_specials = None, ()
    if options.keep_source_specials != "no":
        # after the helper's checks: the kept tokens have no helper row, they copy the source's
        target_vocab, helper_config, tokenizer_files, kept_specials = _keep_source_specials(
            source_vocab, target_vocab, helper_path, helper_config, options.keep_source_specials
        )
    overlap = match_overlap(source_vocab, target_vocab, source_rows, options.match)
    maps = ()
    if options.maps or options.map_file:
        from clpsurgery.vocab.pieces import text_pieces

        maps = resolve_maps(read_map_lines(options.maps, options.map_file), source_vocab, target_vocab, source_rows, lambda texts: text_pieces(source_vocab, texts))
        if any(m.text is not None for m in maps) and options.method_of("input").dense_form and options.top_k is None:
            raise SurgeryError("--map", "text maps set rows of a mixing matrix, which the dense form (--top-k all) does not keep: give --top-k K")
        overlap = mapped_overlap(overlap, maps)
    if overlap.count == overlap.counts().get("role", 0) and not helper_free:
        raise SurgeryError(
            helper_path,
            f"its tokenizer shares no token with the source's under --match {options.match} "
            f"(special tokens aside): nothing to transfer from",
        )
    plan = TransferPlan(
        source_path=source_path,
        helper_path=helper_path,
        source=source,
        helper=helper,
        source_tensors=source_tensors,
        helper_embedding=None if helper_tensors is None else helper_tensors.embedding,
        source_vocab=source_vocab,
        target_vocab=target_vocab,
        overlap=overlap,
        source_config=config,
        source_config_path=config_path,
        generation_config_path=generation_config_path if generation_config_path.is_file() else None,
        helper_config=helper_config,
        options=options,
        maps=maps,
        tokenizer_files=tokenizer_files,
        kept_specials=kept_specials,
    )
    plan.check_memory()
    return plan


def with_recorded_mixing(plan: TransferPlan, matrices: dict) -> TransferPlan:
    """The plan of a mixing known before writing (`apply`'s record, `extend`'s): it counts the
    source rows the mixing combines (the write stage holds only those and the rows copied to
    another id), and is checked against --max-memory before anything is written."""
    combined = max((int(np.unique(m.positions).size) for m in matrices.values() if m is not None and m.positions.size), default=0)
    plan = replace(plan, mixed_source_rows=combined)
    plan.check_memory()
    return plan
