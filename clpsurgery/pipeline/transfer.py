"""The output as a command builds it: a staging folder beside OUT and a background copier, as one
object (`StagedOutput`) that the command holds while it runs its stages.

The stages, in the order a command calls them: the source files that hold no rebuilt tensor
start copying at once (`copy_whole_files`), before torch is imported and before `extend` extends
the tokenizer; the other files are laid out and their unchanged tensors queued for copying
(`lay_out`); the compute is imported (`load_compute`) while the copies run; the command finds
its mixings; the rebuilt tensors are written row block by row block (`write`); the side files,
the transfer record and the manifest finish the folder (`finish`), which is renamed to OUT when
the `with` block ends, and removed if anything fails. Time is recorded per stage.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from clpsurgery.formats.checkpoint import Checkpoint, CheckpointLayout
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
from clpsurgery.pipeline.plan import TransferPlan
from clpsurgery.pipeline.replay import TRANSFER_NAME, write_record
from clpsurgery.pipeline.result import (
    ProgressFactory,
    StageClock,
    TransferResult,
    no_progress,
)
from clpsurgery.vocab.architecture import read_config
from clpsurgery.vocab.generated_tokenizer import generated_tokenizer_json
from clpsurgery.vocab.model_config import target_config, target_generation_config
from clpsurgery.vocab.output_tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from clpsurgery.vocab.output_tokenizer import output_tokenizer_config_file
from clpsurgery.vocab.source_side_files import carried_side_files
from clpsurgery.vocab.vocabulary import TOKENIZER_FILE, TOKENIZER_FILES

if TYPE_CHECKING:
    from clpsurgery.mixing.backend import ComputeBackend
    from clpsurgery.pipeline.rebuild import Mixing


def planned_shards(plan: TransferPlan) -> list[tuple[str, list[PlannedTensor] | None, object]]:
    """For each source file: its output name, the tensors to write (None: copy the file whole), its
    header. A rebuilt tensor's rows are given when it is written (`StagedOutput.write`); a head that
    --untie-head adds is written right after the embedding, in its file."""
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
                planned.append(ComputedTensor(spec))
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


class StagedOutput:
    """OUT while a command builds it: the staging folder beside OUT (renamed to OUT when the `with`
    block ends, removed when anything fails), the source opened for reading, the background copier
    of the source's unchanged bytes, and what the run did so far (`result`, `clock`)."""

    def __init__(self, out: Path, force: bool, source: CheckpointLayout) -> None:
        self.out, self.force, self.source_layout = Path(out), force, source
        self.result = TransferResult()
        self.clock = StageClock()
        self._files: TransferPlan | None = None  # the plan whose files copy_whole_files chose
        self._layouts: list = []
        self._weight_map: dict[str, str] = {}
        self._copier: BackgroundCopier | None = None
        self._copy_started = 0.0

    def __enter__(self) -> StagedOutput:
        with ExitStack() as stack:
            self.source = stack.enter_context(Checkpoint(self.source_layout))
            self.staging = stack.enter_context(staged_output(self.out, self.force))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool | None:
        if exc_type is not None and self._copier is not None:
            self._copier.stop()
        return self._stack.__exit__(exc_type, exc, traceback)

    def stage(self, name: str):
        """Time a stage of the command (seconds per stage go to the manifest)."""
        return self.clock.stage(name)

    def copy_whole_files(self, plan: TransferPlan) -> None:
        """Start copying, in the background, the source files that hold none of the plan's rebuilt
        tensors (a plan whose row count is not known yet names them already: extend's base plan)."""
        self._files = plan
        self._copier = BackgroundCopier(whole_file_copies(plan, self.staging), more=True)
        self._copy_started = time.perf_counter()
        self._copier.start()

    def lay_out(self, plan: TransferPlan) -> None:
        """Write the header of every other output file and queue its unchanged tensors' byte copies
        behind the whole files; the source rows the write stage reads are prefetched meanwhile."""
        if self._files is None or plan.source is not self._files.source or plan.rebuilt_source_names != self._files.rebuilt_source_names:
            raise AssertionError("lay_out: the files copied whole were chosen for other rebuilt tensors")
        copy_jobs = []
        for out_name, planned, header in planned_shards(plan):
            if planned is not None:
                layout = lay_out(self.staging / out_name, planned, header.metadata)
                start_file(layout)
                self._layouts.append(layout)
                copy_jobs.append(functools.partial(copy_tensors, layout))
            self._weight_map.update({name: out_name for name in header.tensors})
            if plan.added_head is not None and plan.source_tensors.embedding in header.tensors:
                self._weight_map[plan.added_head] = out_name
            self.result.files.append(out_name)
        self._copier.add(copy_jobs)
        self._copier.close()
        # The overlap rows of every rebuilt tensor are read into the page cache by the kernel
        # while the search runs, so that the read stage finds them there.
        for name in dict.fromkeys(t.source_name for t in plan.rebuilt):
            self.source.prefetch_rows(name, plan.overlap.source_ids)

    def load_compute(self, device: str, max_memory: int) -> ComputeBackend:
        """torch, FAISS and the kernels, imported now that the copies run (a second or two)."""
        with self.clock.stage("imports"):
            from clpsurgery.mixing.backend import make_backend

            return make_backend(device, memory.search_budget(max_memory))  # --device cuda without a GPU fails here

    def write(self, plan: TransferPlan, mixings: dict[str, Mixing], backend: ComputeBackend, progress: ProgressFactory = no_progress) -> None:
        """Write every rebuilt tensor row block by row block, then wait for the byte copies."""
        from . import rebuild, tensor_io

        by_name = {t.name: t for t in plan.rebuilt}
        rows = rebuild.RebuiltRows(plan, self.source, backend, self.clock)

        def blocks_of(spec: TensorSpec) -> Iterator[memoryview]:
            tensor = by_name[spec.name]
            return tensor_io.checked_blocks(spec, rows.blocks(tensor, mixings[tensor.side]))

        copier, stats = self._copier, self.result.write_stats
        with progress("combine, copy and write", _output_bytes(plan)) as advance:
            stats.on_bytes = lambda n: advance(n + copier.take_bytes())
            write_started = time.perf_counter()
            with rebuild.leave_a_core_for_copies():
                for layout in self._layouts:
                    self.result.tensor_hashes[layout.path.name] = write_computed(layout, stats, blocks_of)
            inside = self.clock.seconds.get("read", 0.0) + self.clock.seconds.get("combine", 0.0)
            self.clock.seconds["write"] = time.perf_counter() - write_started - inside
            with self.clock.stage("wait for copies"):
                copier.finish(advance)
        self.clock.seconds["copy (background)"] = copier.seconds or time.perf_counter() - self._copy_started
        self.result.weight_stats = mixings["input"].stats
        if mixings["output"] is not mixings["input"]:
            self.result.head_weight_stats = mixings["output"].stats
        self.result.paths = backend.describe()
        if not plan.overlap.missing_ids.size:  # a legitimate transfer: a copy, said once
            self.result.notes.append("no new tokens: every target token is in the source, so every row is copied from it")

    def finish(self, plan: TransferPlan, mixings: dict[str, Mixing], command: list[str] | None = None) -> TransferResult:
        """Flush the weights files; write the index, the side files, the transfer record and the
        manifest. OUT appears when the `with` block ends."""
        result = self.result
        with self.clock.stage("fsync"):
            for layout in self._layouts:
                finish_file(layout, result.write_stats)
        result.write_stats.add(self._copier.stats)
        if plan.source.is_sharded:
            extra = {k: v for k, v in (plan.source.index or {}).get("metadata", {}).items()}
            write_index(self.staging, self._weight_map, _tensor_bytes(plan), extra)
            result.files.append("model.safetensors.index.json")
        with self.clock.stage("side files"):
            _write_side_files(plan, self.staging, result)
            if not any(mixings[side].dense for side in plan.sides):
                write_record(self.staging / TRANSFER_NAME, plan, {side: mixings[side].matrix for side in plan.sides})
                result.files.append(TRANSFER_NAME)
        result.stage_seconds = self.clock.seconds
        _write_manifest(plan, self.staging, result, command)
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
