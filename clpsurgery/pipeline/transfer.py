"""Carry out a plan: neighbours and weights, then the target tensors written row block by row block.

Stages, in order: search (neighbours in the helper space and their weights), read (the source
rows of the overlap), write (rebuilt tensors streamed, every other tensor copied byte for byte),
then the side files and the manifest. Time is recorded per stage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.output_folder import MANIFEST_NAME, staged_output, write_output_file
from clpsurgery.formats.safetensors_header import TensorSpec
from clpsurgery.formats.writer import (
    BackgroundCopier,
    ComputedTensor,
    CopiedTensor,
    PlannedTensor,
    copy_tensors,
    copy_whole_file,
    finish_file,
    lay_out,
    start_file,
    write_computed,
    write_index,
)
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.manifest import build_manifest
from clpsurgery.pipeline.plan import PendingPlan, RebuiltTensor, TransferPlan, with_recorded_mixing
from clpsurgery.pipeline.replay import TRANSFER_NAME, write_record
from clpsurgery.pipeline.result import (
    ProgressFactory,
    StageClock,
    TransferResult,
    no_progress,
)
from clpsurgery.vocab.architecture import read_config
from clpsurgery.vocab.model_config import target_config, target_generation_config
from clpsurgery.vocab.output_tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from clpsurgery.vocab.output_tokenizer import output_tokenizer_config_file
from clpsurgery.vocab.pieces import source_pieces
from clpsurgery.vocab.source_side_files import carried_side_files
from clpsurgery.vocab.vocabulary import TOKENIZER_FILE, TOKENIZER_FILES

if TYPE_CHECKING:
    from clpsurgery.mixing.backend import ComputeBackend
    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.pipeline.rebuild import Mixing


def planned_shards(
    plan: TransferPlan,
    make_producer: Callable[[TensorSpec, RebuiltTensor], Callable[[], Iterator[memoryview]]],
) -> list[tuple[str, list[PlannedTensor] | None, object]]:
    """For each source file: its output name, the tensors to write (None: copy the file whole), its
    header. A head that --untie-head adds is written right after the embedding, in its file."""
    shards = []
    rebuilt = {t.source_name: [] for t in plan.rebuilt}
    for tensor in plan.rebuilt:
        rebuilt[tensor.source_name].append(tensor)
    for header in plan.source.headers:
        out_name = plan.output_file_name(header.path)
        if plan.copied_whole(header):
            shards.append((out_name, None, header))
            continue
        planned: list[PlannedTensor] = []
        for name, info in header.tensors.items():
            if name not in rebuilt:
                planned.append(CopiedTensor(TensorSpec(name, info.dtype, info.shape), header.path, header.absolute_range(name)[0]))
                continue
            for tensor in rebuilt[name]:
                spec = TensorSpec(tensor.name, info.dtype, (plan.output_rows, *info.shape[1:]))
                planned.append(ComputedTensor(spec, make_producer(spec, tensor)))
        shards.append((out_name, planned, header))
    return shards


def whole_file_copies(plan: TransferPlan, staging: Path) -> list[Callable]:
    """The copies of the source files that hold no rebuilt tensor (a pending plan's `files` names
    them before the plan is complete)."""
    return [functools.partial(copy_whole_file, h.path, staging / plan.output_file_name(h.path)) for h in plan.source.headers if plan.copied_whole(h)]


def _tensor_bytes(plan: TransferPlan) -> int:
    """Bytes of all tensors of the target (the index's total_size)."""
    rebuilt = plan.rebuilt_source_names
    total = 0
    for name, ref in plan.source.tensors.items():
        rows = plan.output_rows if name in rebuilt else ref.info.rows
        total += rows * ref.info.row_bytes if ref.info.shape else ref.info.nbytes
    if plan.added_head is not None:
        total += plan.output_rows * plan.source.info(plan.source_tensors.embedding).row_bytes
    return total


def _output_bytes(plan: TransferPlan) -> int:
    """Bytes the write stage moves: tensors, plus the headers of files copied whole."""
    whole_file_headers = sum(h.data_start for h in plan.source.headers if plan.copied_whole(h))
    return _tensor_bytes(plan) + whole_file_headers


def run_transfer(
    plan: TransferPlan | PendingPlan, out: Path, force: bool = False, progress: ProgressFactory = no_progress, command: list[str] | None = None,
    recorded: dict[str, MixingMatrix] | Callable[[ProgressFactory, ComputeBackend], dict[str, MixingMatrix]] | None = None,
) -> TransferResult:
    """Write the target model into OUT (built beside it and renamed in when complete).

    `plan` may be pending (`extend`): the files copied whole start copying first, and the plan is
    completed while they run.
    `recorded`: each side's mixing as a transfer record holds it (`apply`): no helper, no search;
    or a function that finds it (`extend`: init's search on the base plan), called once the byte
    copies are running.
    The decisions are saved beside the output (replay.TRANSFER_NAME) wherever they are a top-k
    mixing matrix (the dense form's weights are computed block by block and not kept).
    """
    result = TransferResult()
    clock = StageClock()
    mixings: dict[str, Mixing] = {}
    backend = None

    def make_producer(spec: TensorSpec, tensor: RebuiltTensor) -> Callable[[], Iterator[memoryview]]:
        # a side's weight statistics are recorded once, from its first tensor
        record = tensor == next(t for t in plan.rebuilt if t.side == tensor.side)
        return lambda: tensor_io.checked_blocks(spec, rebuild.rebuilt_rows(plan, source, mixings[tensor.side], tensor, record, clock, backend))

    # The plan holds layouts; the files are opened for reading here, at the edge.
    known = plan.files if isinstance(plan, PendingPlan) else plan
    with Checkpoint(known.source) as source, staged_output(out, force) as staging, contextlib.ExitStack() as readers:
        # The files copied whole start at once, in the background, while the plan is completed
        # and the neighbour search and the combine run here.
        copier = BackgroundCopier(whole_file_copies(known, staging), more=True)
        copy_started = time.perf_counter()
        copier.start()
        try:
            if isinstance(plan, PendingPlan):
                with clock.stage("plan"):
                    plan = plan.check(plan.complete())
            helper = readers.enter_context(Checkpoint(plan.helper)) if plan.helper is not None else None
            # Lay out every other output file, so that its byte copies follow in the background.
            layouts, copy_jobs, weight_map = [], [], {}
            for out_name, planned, header in planned_shards(plan, make_producer):
                if planned is not None:
                    layout = lay_out(staging / out_name, planned, header.metadata)
                    start_file(layout)
                    layouts.append(layout)
                    copy_jobs.append(functools.partial(copy_tensors, layout))
                weight_map.update({name: out_name for name in header.tensors})
                if plan.added_head is not None and plan.source_tensors.embedding in header.tensors:
                    weight_map[plan.added_head] = out_name
                result.files.append(out_name)
            copier.add(copy_jobs)
            copier.close()
            # The overlap rows of every rebuilt tensor are read into the page cache by the kernel
            # while the search runs, so that the read stage finds them there.
            for name in dict.fromkeys(t.source_name for t in plan.rebuilt):
                source.prefetch_rows(name, plan.overlap.source_ids)
            # torch and the compute are imported only now, so the copies need not wait for the import.
            with clock.stage("imports"):
                from clpsurgery.mixing.backend import make_backend

                from . import rebuild, tensor_io

                backend = make_backend(plan.options.device, memory.search_budget(plan.options.max_memory))  # --device cuda without a GPU fails here
            with rebuild.leave_a_core_for_copies(), clock.stage("search"):
                source_rows = plan.source.info(plan.source_tensors.embedding).shape[0]

                def pieces(ids):
                    return source_pieces(plan.source_vocab, plan.target_vocab, ids, source_rows)

                if recorded is None:
                    mixings.update(rebuild.find_mixings(plan, pieces, helper, progress, result, backend))
                else:
                    matrices = recorded
                    if callable(recorded):  # extend: the mixing is found now, while the copies run
                        matrices = recorded(progress, backend)
                        # The rows it combines are known now, and checked against --max-memory
                        # before a rebuilt row is written; the producers read `plan` when called.
                        plan = with_recorded_mixing(plan, matrices)
                    mixings.update({side: rebuild.Mixing(plan, matrix) for side, matrix in matrices.items()})
                    mixings.setdefault("output", mixings["input"])
            with progress("combine, copy and write", _output_bytes(plan)) as advance:
                result.write_stats.on_bytes = lambda n: advance(n + copier.take_bytes())
                write_started = time.perf_counter()
                with rebuild.leave_a_core_for_copies():
                    for layout in layouts:
                        result.tensor_hashes[layout.path.name] = write_computed(layout, result.write_stats)
                inside = clock.seconds.get("read", 0.0) + clock.seconds.get("combine", 0.0)
                clock.seconds["write"] = time.perf_counter() - write_started - inside
                with clock.stage("wait for copies"):
                    copier.finish(advance)
        except BaseException:
            copier.stop()
            raise
        clock.seconds["copy (background)"] = copier.seconds or time.perf_counter() - copy_started
        with clock.stage("fsync"):
            for layout in layouts:
                finish_file(layout, result.write_stats)
        result.write_stats.add(copier.stats)
        result.weight_stats = mixings["input"].stats
        if mixings["output"] is not mixings["input"]:
            result.head_weight_stats = mixings["output"].stats
        result.paths = backend.describe()
        if plan.source.is_sharded:
            total = _tensor_bytes(plan)
            extra = {k: v for k, v in (plan.source.index or {}).get("metadata", {}).items()}
            write_index(staging, weight_map, total, extra)
            result.files.append("model.safetensors.index.json")
        with clock.stage("side files"):
            _write_side_files(plan, staging, result)
            if not any(mixings[side].dense for side in plan.sides):
                write_record(staging / TRANSFER_NAME, plan, {side: mixings[side].matrix for side in plan.sides})
                result.files.append(TRANSFER_NAME)
        result.stage_seconds = clock.seconds
        _write_manifest(plan, staging, result, command)
    return result


def _write_side_files(plan: TransferPlan, staging: Path, result: TransferResult) -> None:
    config, changes = target_config(plan.source_config, plan.helper_config, plan.source_vocab, plan.target_vocab, plan.output_rows, untie=plan.unties_head)
    write_output_file(staging / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    result.config_changes = {"config.json": changes}
    if plan.generation_config_path is not None:
        generation, generation_changes = target_generation_config(
            read_config(plan.generation_config_path), plan.helper_config, plan.source_vocab, plan.target_vocab
        )
        write_output_file(staging / "generation_config.json", (json.dumps(generation, indent=2) + "\n").encode())
        result.config_changes["generation_config.json"] = generation_changes
    if plan.tokenizer_files is not None:
        tokenizer_files = dict(plan.tokenizer_files)
    else:
        tokenizer_files = {name: (plan.helper_path / name).read_bytes() for name in TOKENIZER_FILES if (plan.helper_path / name).is_file()}
    if TOKENIZER_FILE not in tokenizer_files:
        from clpsurgery.vocab.generated_tokenizer import generated_tokenizer_json

        document, generated = generated_tokenizer_json(plan.target_vocab)
        if document is not None:
            tokenizer_files[TOKENIZER_FILE] = document  # beside the files it was written from
        if generated:
            result.config_changes[TOKENIZER_FILE] = generated
    if TOKENIZER_FILE in tokenizer_files:
        config, changes = output_tokenizer_config_file(tokenizer_files.get(TOKENIZER_CONFIG_FILE), plan.target_vocab)
        if config is not None:
            tokenizer_files[TOKENIZER_CONFIG_FILE] = config
            result.config_changes[TOKENIZER_CONFIG_FILE] = changes
    for name, data in tokenizer_files.items():
        write_output_file(staging / name, data)  # a full disk is OUT's, not HELPER's
        result.files.append(name)
    source_folder = plan.source_config_path.parent
    for relative in carried_side_files(source_folder):
        if "/" in relative and (staging / relative.split("/")[0]).is_file():
            continue  # a module folder named as a file the output writes
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        write_output_file(staging / relative, (source_folder / relative).read_bytes())
        result.carried_from_source.append(relative)
        result.files.append(relative)


def _write_manifest(plan: TransferPlan, staging: Path, result: TransferResult, command: list[str] | None) -> None:
    manifest = build_manifest(plan, staging, result, command)
    write_output_file(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
