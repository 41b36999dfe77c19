"""Carry out a plan: neighbours and weights, then the target tensors written row block by row block.

Stages, in order: search (neighbours in the helper space and their weights), read (the source
rows of the overlap), write (rebuilt tensors streamed, every other tensor copied byte for byte),
then the side files and the manifest. Time is recorded per stage.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .architecture import read_config
from .combine import ColumnBlocks, combine_dense, combine_top_k
from .device import Engine, make_engine
from .errors import SurgeryError
from .manifest import build_manifest
from .model_config import target_config, target_generation_config
from .neighbours import Neighbours, dense_similarities, normalise_rows, search_top_k
from .output_folder import MANIFEST_NAME, staged_output
from .plan import TransferPlan
from .safetensors_header import TensorSpec
from .stage_hooks import reached
from .vocabulary import TOKENIZER_FILES
from .weights import WeightStats, mixing_weights
from .writer import (
    BackgroundCopier,
    ComputedTensor,
    CopiedTensor,
    PlannedTensor,
    WriteStats,
    copy_tensors,
    copy_whole_file,
    finish_file,
    lay_out,
    row_blocks,
    start_file,
    write_computed,
    write_index,
)

ProgressFactory = Callable[[str, int], "contextmanager"]
DENSE_CHUNK_ROWS = 4096  # overlap rows converted to fp32 at a time in the dense combine


@contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class TransferResult:
    """What a transfer did, for the report and the manifest."""

    stage_seconds: dict[str, float] = field(default_factory=dict)
    weight_stats: WeightStats = field(default_factory=WeightStats)
    write_stats: WriteStats = field(default_factory=WriteStats)
    zero_helper_rows: int = 0
    config_changes: dict = field(default_factory=dict)
    tensor_hashes: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> rebuilt tensor -> SHA-256
    files: list[str] = field(default_factory=list)
    paths: dict = field(default_factory=dict)  # device, and which search and combine paths ran


class Mixing:
    """Neighbour positions and weights for the missing tokens, by position in the missing list."""

    def __init__(self, plan: TransferPlan, overlap_vectors: torch.Tensor, missing_vectors: torch.Tensor, neighbours: Neighbours | None) -> None:
        self.plan = plan
        self.overlap_vectors = overlap_vectors
        self.missing_vectors = missing_vectors
        self.neighbours = neighbours
        self.stats = WeightStats()
        self._weights: torch.Tensor | None = None
        if neighbours is not None:
            weights, stats = mixing_weights(torch.from_numpy(neighbours.similarities), plan.options.weighting, plan.options.temperature)
            self._weights = weights
            self._positions = torch.from_numpy(neighbours.positions)
            self.stats = stats

    @property
    def dense(self) -> bool:
        return self.neighbours is None

    def rows(self, start: int, stop: int, record: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(positions or None for dense, fp32 weights) of missing tokens [start, stop)."""
        if self._weights is not None:
            return self._positions[start:stop], self._weights[start:stop]
        sims = dense_similarities(self.overlap_vectors, self.missing_vectors[start:stop])
        weights, stats = mixing_weights(sims, self.plan.options.weighting, self.plan.options.temperature)
        if record:
            self.stats.add(stats)
        return None, weights


def find_mixing(plan: TransferPlan, progress: ProgressFactory, result: TransferResult, engine: Engine | None = None) -> Mixing:
    """Helper vectors of every target token, normalised; FAISS top-k unless dense."""
    overlap = plan.overlap
    helper_rows = plan.helper.read_rows(plan.helper_embedding, 0, plan.target_size)
    if not torch.isfinite(helper_rows.to(torch.float32)).all():
        bad = int((~torch.isfinite(helper_rows.to(torch.float32))).any(dim=1).nonzero()[0])
        raise SurgeryError(plan.helper_path, f"helper embedding {plan.helper_embedding!r} has NaN or Inf in row {bad}")
    vectors, result.zero_helper_rows = normalise_rows(helper_rows)
    overlap_vectors = vectors[torch.from_numpy(overlap.target_ids)]
    missing_vectors = vectors[torch.from_numpy(overlap.missing_ids)]
    neighbours = None
    reached("search")  # test hook (stage_hooks.py): a no-op unless CLPSURGERY_PAUSE_AT names it
    if plan.options.top_k is not None and overlap.missing_ids.size:
        with progress("neighbour search", int(overlap.missing_ids.size)) as advance:
            if engine is None:
                neighbours = search_top_k(overlap_vectors, missing_vectors, plan.k, on_chunk=advance)
            else:
                neighbours = engine.search_top_k(overlap_vectors, missing_vectors, plan.k, on_chunk=advance)
    return Mixing(plan, overlap_vectors, missing_vectors, neighbours)


def block_rows_for(plan: TransferPlan, row_width: int, budget: int) -> int:
    """Target rows per block so that one block's fp32 working set stays within `budget` bytes.

    Top-k: the block, plus up to k distinct source rows per mixed row in fp32. Dense: the block,
    its similarities and weights against the whole overlap, and one fp32 chunk of source rows.
    """
    if plan.options.top_k is None:
        per_row = 4 * (row_width * 2 + plan.overlap.count * 3)
        fixed = 4 * DENSE_CHUNK_ROWS * row_width
    else:
        per_row = 4 * (row_width * 2 + plan.k * (row_width + 4))
        fixed = 0
    return max(1, min(plan.target_size, (budget - fixed) // per_row))


class StageClock:
    """Seconds per stage, where stages may be timed in pieces (reads and combines inside writing)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def rebuilt_rows(plan: TransferPlan, mixing: Mixing, name: str, record: bool, clock: StageClock, engine: Engine | None = None) -> Iterator[torch.Tensor]:
    """Row blocks of one rebuilt tensor: overlap rows copied, the others mixed, in row order.

    The source rows of the overlap are read when the first block is asked for and dropped after
    the last, so only one rebuilt tensor's rows are held at a time.
    """
    overlap = plan.overlap
    with clock.stage("read"):
        source_overlap_rows = plan.source.gather_rows(name, overlap.source_ids)
        _check_finite(plan, name, source_overlap_rows)
    dtype = source_overlap_rows.dtype
    row_shape = tuple(source_overlap_rows.shape[1:])
    source_2d = source_overlap_rows.reshape(source_overlap_rows.shape[0], -1)
    width = source_2d.shape[1]
    budget = plan.block_budget
    # The overlap rows in fp32 once (in column blocks for the top-k combine), when that takes at
    # most half the block budget: converting them per block costs more than the combine itself.
    if engine is not None and engine.gpu:
        mixing_rows = engine.rows_for_combine(source_2d)  # on the GPU, in the source dtype
    elif source_2d.numel() * 4 <= budget // 2:
        if plan.options.top_k is not None:
            mixing_rows = ColumnBlocks.of(source_2d)
            budget -= mixing_rows.nbytes
        else:
            mixing_rows = source_2d.to(torch.float32)
            budget -= mixing_rows.numel() * 4 if mixing_rows.dtype != source_2d.dtype else 0
    else:
        mixing_rows = source_2d
    overlap_position = np.full(plan.target_size, -1, dtype=np.int64)
    overlap_position[overlap.target_ids] = np.arange(overlap.count)
    missing_position = np.full(plan.target_size, -1, dtype=np.int64)
    missing_position[overlap.missing_ids] = np.arange(overlap.missing_ids.size)
    mixed_sum = torch.zeros(width, dtype=torch.float64)
    for start, stop in row_blocks(plan.target_size, block_rows_for(plan, width, budget)):
        block = torch.empty((stop - start, width), dtype=dtype)
        copied = overlap_position[start:stop]
        is_copied = torch.from_numpy(copied >= 0)
        block[is_copied] = source_2d[torch.from_numpy(copied[copied >= 0])]
        mixed = missing_position[start:stop]
        if (mixed >= 0).any():
            first, last = int(mixed[mixed >= 0][0]), int(mixed[mixed >= 0][-1]) + 1
            with clock.stage("combine"):
                positions, weights = mixing.rows(first, last, record)
                if engine is not None:
                    rows = engine.combine_dense(mixing_rows, weights, dtype, DENSE_CHUNK_ROWS) if positions is None else engine.combine_top_k(mixing_rows, positions, weights, dtype)
                elif positions is None:
                    rows = combine_dense(mixing_rows, weights, dtype, DENSE_CHUNK_ROWS)
                else:
                    rows = combine_top_k(mixing_rows, positions, weights, dtype)
            block[~is_copied] = rows
            mixed_sum += rows.to(torch.float64).sum(dim=0)
        yield block.reshape(stop - start, *row_shape)
        reached("combine")  # test hook
    padding = plan.output_rows - plan.target_size
    if padding:
        # Rows past the tokenizer's ids (vocab padded for speed) are never looked up as inputs,
        # but a head scores them: the mean of the combined rows keeps them unremarkable.
        fill = mixed_sum / max(1, overlap.missing_ids.size) if overlap.missing_ids.size else source_2d.to(torch.float64).mean(dim=0)
        yield fill.to(dtype).expand(padding, width).reshape(padding, *row_shape).contiguous()


def _check_finite(plan: TransferPlan, name: str, rows: torch.Tensor) -> None:
    finite = torch.isfinite(rows.to(torch.float32).reshape(rows.shape[0], -1)).all(dim=1)
    if not finite.all():
        position = int((~finite).nonzero()[0])
        source_id = int(plan.overlap.source_ids[position])
        raise SurgeryError(plan.source_path, f"tensor {name!r} has NaN or Inf in row {source_id}, which the target copies")


def planned_shards(
    plan: TransferPlan,
    make_producer: Callable[[str], Callable[[], Iterator[torch.Tensor]]],
) -> list[tuple[str, list[PlannedTensor] | None, object]]:
    """For each source file: its output name, the tensors to write (None: copy the file whole), its header."""
    shards = []
    rebuilt = set(plan.source_tensors.names)
    for header in plan.source.headers:
        out_name = header.path.name if plan.source.is_sharded else "model.safetensors"
        if not rebuilt & set(header.tensors):
            shards.append((out_name, None, header))
            continue
        planned: list[PlannedTensor] = []
        for name, info in header.tensors.items():
            if name in rebuilt:
                spec = TensorSpec(name, info.dtype, (plan.output_rows, *info.shape[1:]))
                planned.append(ComputedTensor(spec, make_producer(name)))
            else:
                planned.append(CopiedTensor(TensorSpec(name, info.dtype, info.shape), header.path, header.absolute_range(name)[0]))
        shards.append((out_name, planned, header))
    return shards


def _tensor_bytes(plan: TransferPlan) -> int:
    """Bytes of all tensors of the target (the index's total_size)."""
    total = 0
    for name, ref in plan.source.tensors.items():
        rows = plan.output_rows if name in plan.source_tensors.names else ref.info.rows
        total += rows * ref.info.row_bytes if ref.info.shape else ref.info.nbytes
    return total


def _output_bytes(plan: TransferPlan) -> int:
    """Bytes the write stage moves: tensors, plus the headers of files copied whole."""
    rebuilt = set(plan.source_tensors.names)
    whole_file_headers = sum(h.data_start for h in plan.source.headers if not rebuilt & set(h.tensors))
    return _tensor_bytes(plan) + whole_file_headers


@contextmanager
def leave_a_core_for_copies() -> Iterator[None]:
    """Compute on one core fewer while the background copy runs.

    The kernel's copy keeps a core busy; OpenMP threads (torch, FAISS) that spin on every core
    beside it slow both down (measured on 2 cores: the search took 19 s instead of 4 s).
    """
    cores = os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    try:
        import faiss
    except ImportError:
        faiss = None
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else None
    compute = max(1, min(torch_threads, cores - 1))
    torch.set_num_threads(compute)
    if faiss is not None:
        faiss.omp_set_num_threads(max(1, min(faiss_threads, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)


def run_transfer(plan: TransferPlan, out: Path, force: bool = False, progress: ProgressFactory = no_progress, command: list[str] | None = None) -> TransferResult:
    """Write the target model into OUT (built beside it and renamed in when complete)."""
    result = TransferResult()
    engine = make_engine(plan.options.device, plan.options.max_memory)  # --device cuda without a GPU fails here
    clock = StageClock()
    mixing: Mixing | None = None

    def make_producer(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        record = name == plan.source_tensors.embedding
        return lambda: rebuilt_rows(plan, mixing, name, record, clock, engine)

    with staged_output(out, force) as staging:
        # Lay out every output file first, so the byte copies can start at once, in the
        # background, while the neighbour search and the combine run here.
        layouts, copy_jobs, weight_map = [], [], {}
        for out_name, planned, header in planned_shards(plan, make_producer):
            target = staging / out_name
            if planned is None:
                copy_jobs.append(functools.partial(copy_whole_file, header.path, target))
            else:
                layout = lay_out(target, planned, header.metadata)
                start_file(layout)
                layouts.append(layout)
                copy_jobs.append(functools.partial(copy_tensors, layout))
            weight_map.update({name: out_name for name in header.tensors})
            result.files.append(out_name)
        copier = BackgroundCopier(copy_jobs)
        copy_started = time.perf_counter()
        copier.start()
        # The overlap rows of every rebuilt tensor are read into the page cache by the kernel
        # while the search runs, so that the read stage finds them there.
        for name in plan.source_tensors.names:
            plan.source.prefetch_rows(name, plan.overlap.source_ids)
        try:
            with leave_a_core_for_copies(), clock.stage("search"):
                mixing = find_mixing(plan, progress, result, engine)
            with progress("combine, copy and write", _output_bytes(plan)) as advance:
                result.write_stats.on_bytes = lambda n: advance(n + copier.take_bytes())
                write_started = time.perf_counter()
                with leave_a_core_for_copies():
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
        result.weight_stats = mixing.stats
        result.paths = engine.describe()
        if plan.source.is_sharded:
            total = _tensor_bytes(plan)
            extra = {k: v for k, v in (plan.source.index or {}).get("metadata", {}).items()}
            write_index(staging, weight_map, total, extra)
            result.files.append("model.safetensors.index.json")
        with clock.stage("side files"):
            _write_side_files(plan, staging, result)
        result.stage_seconds = clock.seconds
        _write_manifest(plan, staging, result, command)
    return result


def _write_side_files(plan: TransferPlan, staging: Path, result: TransferResult) -> None:
    config, changes = target_config(plan.source_config, plan.helper_config, plan.source_vocab, plan.target_vocab, plan.output_rows)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    result.config_changes = {"config.json": changes}
    if plan.generation_config_path is not None:
        generation, generation_changes = target_generation_config(
            read_config(plan.generation_config_path), plan.helper_config, plan.source_vocab, plan.target_vocab
        )
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        result.config_changes["generation_config.json"] = generation_changes
    for name in TOKENIZER_FILES:
        helper_file = plan.helper_path / name
        if helper_file.is_file():
            shutil.copyfile(helper_file, staging / name)
            result.files.append(name)


def _write_manifest(plan: TransferPlan, staging: Path, result: TransferResult, command: list[str] | None) -> None:
    manifest = build_manifest(plan, staging, result, command)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
