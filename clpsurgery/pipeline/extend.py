"""`extend`: keep the source's whole vocabulary and append the target tokenizer's tokens it lacks.

Two plans make one extension:

- the **base** plan is init's for SOURCE and HELPER: the helper's tokens shared with the source,
  and a mixing (the method `--method` names) for the helper's other tokens;
- the **extension** plan writes the output: every source row copied as it is (the overlap is the
  identity on the source's rows, so every source token keeps its id and its bytes), and each new
  token's row mixed from the source rows its helper token's mixing names.

The base plan names the source files and the rebuilt tensors, so the command starts copying the
files that hold no vocab-sized tensor before the tokenizer is extended; the mixing is found once,
on the base plan, and turned into rows of the extension (`extension_matrices`), so the write stage
is init's (and `apply` replays an extension like any other transfer).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clpsurgery.errors import OptionError, SurgeryError
from clpsurgery.pipeline.options import TransferOptions
from clpsurgery.pipeline.plan import TransferPlan, make_plan
from clpsurgery.vocab.extension import TokenizerExtension, extend_tokenizer
from clpsurgery.vocab.vocabulary import MATCH_KINDS, Overlap, load_vocabulary

if TYPE_CHECKING:
    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.pipeline.inputs import Inputs


def make_base_plan(inputs: Inputs, options: TransferOptions) -> TransferPlan:
    """init's plan for SOURCE and HELPER, whose mixing the new tokens take."""
    if options.untie_head:
        raise OptionError("--untie-head", "extend keeps the source's head as it is: tied stays tied")
    if options.top_k is None and any(options.method_of(side).dense_form for side in ("input", "output")):
        raise OptionError("--top-k", "extend mixes a few source rows per new token: give a number, not 'all'")
    # the extended tokenizer holds every source token: nothing to keep apart
    return make_plan(inputs, replace(options, keep_source_specials="no"))


def extend_source_tokenizer(inputs: Inputs, options: TransferOptions, max_new_tokens: int | None = None, rank_texts: list[str] | None = None) -> TokenizerExtension:
    """The source's tokenizer with the helper's tokens it lacks appended (at most `max_new_tokens`,
    ranked by how much they shorten `rank_texts`)."""
    return extend_tokenizer(inputs.source_tokenizer, inputs.helper, options.match, max_new_tokens, rank_texts)


def make_extension_plan(base: TransferPlan, extension: TokenizerExtension) -> TransferPlan:
    """The plan that writes the output: every source row kept, the extension's tokens appended."""
    source_rows = base.source_rows
    if source_rows < extension.source_size:
        raise SurgeryError(base.source_path, f"its embedding has {source_rows} rows and its tokenizer {extension.source_size} ids: the tokenizer's last ids have no row to keep")
    with tempfile.TemporaryDirectory(prefix="clpsurgery-extend-") as folder:
        for name, data in extension.files.items():
            (Path(folder) / name).write_bytes(data)
        target_vocab = load_vocabulary(folder, base.source_config)
        target_vocab = replace(target_vocab, path=base.helper_path / "(extended source tokenizer)")
    plan = replace(
        base,
        target_vocab=target_vocab,
        overlap=extension_overlap(extension, source_rows, base.options.match),
        helper=None,
        helper_embedding=None,
        helper_config=base.source_config,  # the output's tokenizer is the source's: so are its token ids
        tokenizer_files=tuple(sorted(extension.files.items())),
        mixed_source_rows=0,  # the base mixing, turned into rows of this plan once the search has run (with_recorded_mixing)
    )
    plan.check_memory()
    return plan


def make_extend_plans(
    inputs: Inputs, options: TransferOptions, max_new_tokens: int | None = None, rank_texts: list[str] | None = None,
) -> tuple[TransferPlan, TransferPlan, TokenizerExtension]:
    """(base plan, extension plan, the extended tokenizer), made one after the other."""
    base = make_base_plan(inputs, options)
    extension = extend_source_tokenizer(inputs, options, max_new_tokens, rank_texts)
    return base, make_extension_plan(base, extension), extension


def extension_overlap(extension: TokenizerExtension, source_rows: int, match: str) -> Overlap:
    """Every source id copied to itself; the new tokens after them. A source whose embedding has
    rows past its tokenizer's ids (vocab padding: BLOOM, Qwen, Pythia) puts its first new tokens
    in those rows, as a tokenizer numbers them; padding rows left over are kept as they are, so
    the embedding never shrinks."""
    kept_padding = np.arange(extension.size, source_rows, dtype=np.int64)
    copied = np.concatenate([np.arange(extension.source_size, dtype=np.int64), kept_padding])
    kinds = np.full(copied.size, MATCH_KINDS.index("string"), dtype=np.int8)
    kinds[extension.source_size :] = MATCH_KINDS.index("padding")
    return Overlap(
        target_ids=copied,
        source_ids=copied,
        missing_ids=np.arange(extension.source_size, extension.size, dtype=np.int64),
        target_size=max(source_rows, extension.size),
        kinds=kinds,
        match=match,
    )


def extension_summary(extension: TokenizerExtension, source_rows: int) -> dict:
    """What the manifest says about the extension: the new ids (contiguous), the source's vocab
    padding rows they took and those kept, and what was left out."""
    return {
        "source_size": extension.source_size,
        "new_tokens": len(extension.new_tokens),
        "new_token_ids": {"start": extension.source_size, "stop": extension.size},
        "source_padding_rows": {"taken": min(extension.size, source_rows) - extension.source_size, "kept": max(0, source_rows - extension.size)},
        "new_merges": extension.new_merges,
        "skipped": extension.skipped,
        "notes": list(extension.notes),
    }


def extension_matrices(base: TransferPlan, plan: TransferPlan, extension: TokenizerExtension, mixings: dict) -> dict[str, MixingMatrix]:
    """Each side's mixing for the new tokens: the base mixing's row of the helper token each comes
    from, with its positions turned into source ids (the extension's overlap is the identity, so a
    position is a source id). A helper token the base overlap copies has that one source row."""
    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.mixing.weights import WeightStats

    helper_ids = np.asarray(extension.target_ids, dtype=np.int64)
    copied_at = np.full(base.target_size, -1, dtype=np.int64)
    copied_at[base.overlap.target_ids] = np.arange(base.overlap.count)
    mixed_at = np.full(base.target_size, -1, dtype=np.int64)
    mixed_at[base.overlap.missing_ids] = np.arange(base.overlap.missing_ids.size)
    out = {}
    for side in plan.sides:
        matrix = mixings[side].matrix
        rows = np.concatenate([base.overlap.source_ids, matrix.extra_source_ids])
        positions = np.zeros((helper_ids.size, matrix.width), dtype=np.int64)
        weights = np.zeros((helper_ids.size, matrix.width), dtype=np.float32)
        mixed = mixed_at[helper_ids]
        has_mix = mixed >= 0
        positions[has_mix] = rows[matrix.positions[mixed[has_mix]]]
        weights[has_mix] = matrix.weights[mixed[has_mix]]
        copied = ~has_mix & (copied_at[helper_ids] >= 0)
        positions[copied] = base.overlap.source_ids[copied_at[helper_ids[copied]]][:, None]
        weights[copied, 0] = 1.0
        # the base mixing's counts (degenerate, clipped rows) are over every helper token; these
        # are the new tokens' own
        stats = WeightStats(rows=int(helper_ids.size), empty_rows=int((weights == 0).all(axis=1).sum()), max_abs_weight=float(np.abs(weights).max(initial=0.0)))
        out[side] = MixingMatrix(positions, weights, stats)
    return out
