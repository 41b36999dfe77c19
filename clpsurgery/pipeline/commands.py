"""The commands, as the Python API: `init`, `extend`, `apply`, `inspect`, `verify`. The command line
is a thin layer over these (cli.py); each reads top to bottom as its steps:

resolve the inputs -> make the plan -> start the copies -> find the mixings -> write the rebuilt
tensors -> finish (side files, record, manifest).

Each returns what it did (a TransferResult, a report, the checks); errors are one SurgeryError
line, and OUT appears only complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clpsurgery.formats.hub import resolve_model
from clpsurgery.pipeline.extend import extend_source_tokenizer, extension_matrices, extension_summary, make_base_plan, make_extension_plan
from clpsurgery.pipeline.inputs import resolve_inputs
from clpsurgery.pipeline.options import DEFAULT_DEVICE, DEFAULT_MAX_MEMORY, TransferOptions
from clpsurgery.pipeline.plan import TransferPlan, make_plan, with_recorded_mixing
from clpsurgery.pipeline.replay import make_replay_plan, read_record
from clpsurgery.pipeline.result import ProgressFactory, TransferResult, no_progress
from clpsurgery.pipeline.transfer import StagedOutput

if TYPE_CHECKING:
    from clpsurgery.pipeline.verify import Check
    from clpsurgery.vocab.extension import TokenizerExtension

Echo = Callable[[str], None]


def _silent(line: str) -> None:
    pass


def init(
    source: str | Path, helper: str | Path, out: str | Path, options: TransferOptions | None = None, *,
    source_tokenizer: str | Path | None = None, source_config: str | Path | None = None, force: bool = False,
    progress: ProgressFactory = no_progress, echo: Echo = _silent, command: list[str] | None = None, show_downloads: bool = False,
) -> TransferResult:
    """Write OUT: SOURCE's weights with the vocabulary-sized tensors rebuilt for HELPER's tokenizer
    (shared tokens copy their rows, the others get their method's mixing of source rows)."""
    options, out = options or TransferOptions(), Path(out)
    inputs = resolve_inputs(
        source, helper, out, helper_weights=options.needs_helper, source_tokenizer=source_tokenizer, source_config=source_config,
        force=force, device=options.device, quiet=not show_downloads,
    )
    plan = make_plan(inputs, options)
    echo(describe_plan(plan))
    with StagedOutput(out, force, plan.source) as output:
        output.copy_whole_files(plan)
        output.lay_out(plan)
        backend = output.load_compute(options.device, options.max_memory)
        from clpsurgery.pipeline.rebuild import search_mixings

        with output.stage("search"):
            mixings = search_mixings(plan, progress, output.result, backend)
        output.write(plan, mixings, backend, progress)
        result = output.finish(plan, mixings, command or ["clpsurgery", "init", str(source), str(helper), str(out)])
    stats = result.weight_stats
    result.notes[:0] = [note for note in (options.method_of("input").notes(stats), _empty_rows_note(stats.empty_rows)) if note]
    return result


def extend(
    source: str | Path, helper: str | Path, out: str | Path, options: TransferOptions | None = None, *,
    max_new_tokens: int | None = None, rank_texts: list[str] | None = None,
    source_tokenizer: str | Path | None = None, source_config: str | Path | None = None, force: bool = False,
    progress: ProgressFactory = no_progress, echo: Echo = _silent, command: list[str] | None = None, show_downloads: bool = False,
) -> TransferResult:
    """Write OUT: SOURCE with its whole vocabulary kept (every token keeps its id and rows, byte for
    byte) and HELPER's tokens it lacks appended to its tokenizer, their rows made as init makes them."""
    options, out = options or TransferOptions(), Path(out)
    inputs = resolve_inputs(
        source, helper, out, helper_weights=options.needs_helper, source_tokenizer=source_tokenizer, source_config=source_config,
        force=force, device=options.device, quiet=not show_downloads,
    )
    base = make_base_plan(inputs, options)  # names the files and the rebuilt tensors already
    with StagedOutput(out, force, base.source) as output:
        output.copy_whole_files(base)  # before the tokenizer is extended
        with output.stage("plan"):
            extension = extend_source_tokenizer(inputs, options, max_new_tokens, rank_texts)
            plan = make_extension_plan(base, extension)
        output.result.extension = extension_summary(extension, plan.source_rows)
        echo(describe_extension(extension))
        output.lay_out(plan)
        backend = output.load_compute(options.device, options.max_memory)
        from clpsurgery.pipeline.rebuild import recorded_mixings, search_mixings

        with output.stage("search"):
            matrices = extension_matrices(base, plan, extension, search_mixings(base, progress, output.result, backend))
            plan = with_recorded_mixing(plan, matrices)  # the rows it combines are known: checked against --max-memory
        mixings = recorded_mixings(plan, matrices)
        output.write(plan, mixings, backend, progress)
        return output.finish(plan, mixings, command or ["clpsurgery", "extend", str(source), str(helper), str(out)])


def apply(
    transfer: str | Path, sibling: str | Path, out: str | Path, *, max_memory: int = DEFAULT_MAX_MEMORY, device: str = DEFAULT_DEVICE,
    source_tokenizer: str | Path | None = None, source_config: str | Path | None = None, force: bool = False,
    progress: ProgressFactory = no_progress, command: list[str] | None = None, show_downloads: bool = False,
) -> TransferResult:
    """Replay the transfer recorded in TRANSFER (an init or extend output) on SIBLING, a checkpoint
    with the vocabulary and shapes of that transfer's source: the same rows copied, the same new
    rows mixed with the same weights, with no helper and no search."""
    out = Path(out)
    inputs = resolve_inputs(
        sibling, transfer, out, helper_role="transfer", source_tokenizer=source_tokenizer, source_config=source_config,
        force=force, device=device, quiet=not show_downloads,
    )
    record = read_record(inputs.helper, max_memory, device)
    plan = make_replay_plan(record, inputs)
    with StagedOutput(out, force, plan.source) as output:
        output.copy_whole_files(plan)
        output.lay_out(plan)
        backend = output.load_compute(device, max_memory)
        from clpsurgery.pipeline.rebuild import recorded_mixings

        mixings = recorded_mixings(plan, record.matrices)
        output.write(plan, mixings, backend, progress)
        return output.finish(plan, mixings, command or ["clpsurgery", "apply", str(transfer), str(sibling), str(out)])


def inspect(path: str | Path, against: str | Path | None = None, options: TransferOptions | None = None, *,
            source_tokenizer: str | Path | None = None, source_config: str | Path | None = None, show_downloads: bool = False) -> dict:
    """What is in a checkpoint (headers only) and what init did to it; with `against` (a helper),
    what `init PATH AGAINST` would do with these options, before anything is written."""
    from clpsurgery.pipeline.inspection import inspect_checkpoint, inspect_transfer

    options = options or TransferOptions()
    if against is None:
        return inspect_checkpoint(resolve_model(path, role="checkpoint", quiet=not show_downloads))
    inputs = resolve_inputs(
        path, against, helper_weights=options.needs_helper, source_tokenizer=source_tokenizer, source_config=source_config, quiet=not show_downloads,
    )
    return inspect_transfer(make_plan(inputs, options))


def verify(out: str | Path, source: str | Path | None = None, *, progress: ProgressFactory = no_progress, echo: Echo = _silent, show_downloads: bool = False) -> list[Check]:
    """Check an output: file hashes, shapes, finite rows; with SOURCE, the copies too. Returns
    every check (ok True, False, or None for skipped)."""
    from clpsurgery.pipeline.verify import verify_output

    source_path = None if source is None else resolve_model(source, role="source", quiet=not show_downloads)
    return verify_output(Path(out), source_path, progress=progress, echo=echo)


def _empty_rows_note(empty_rows: int) -> str | None:
    if not empty_rows:
        return None
    return f"{empty_rows} target tokens have no piece the source tokenizer can encode (or no token at their id): their rows are zero"


def describe_plan(plan: TransferPlan) -> str:
    """init's first line: the vocabularies, the overlap, the method and the tensors rebuilt."""
    from clpsurgery.mixing.registry import describe

    summary, options = plan.summary(), plan.options
    return (
        f"vocabulary {summary['source_vocab_size']} -> {summary['target_vocab_size']}: "
        f"{summary['overlap']} tokens shared, {summary['missing']} to combine "
        f"({describe(options.method, options.as_dict(), 'input')})"
        + (f" (the output head's from {plan.side_method('output')})" if plan.two_mixings else "")
        + f"; rebuilding {', '.join(plan.rebuilt_names)}"
    )


def describe_extension(extension: TokenizerExtension) -> str:
    skipped = ", ".join(f"{why} {n}" for why, n in extension.skipped.items()) or "none"
    return f"vocabulary {extension.source_size} kept, {len(extension.new_tokens)} appended ({extension.new_merges} merges); skipped: {skipped}"
