"""pipeline.memory: the bytes each stage holds, hand-computed for checkpoints of known shapes;
how the estimates grow with the shapes; the row blocks and search chunks --max-memory allows; and
the --max-memory a real plan's check_memory accepts and the one byte less it refuses.

The layouts are real safetensors files of the stated shapes, their data a sparse hole (no bytes
on disk), so that shapes of any size cost nothing.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import GATHER_WINDOW_BYTES, CheckpointLayout
from clpsurgery.formats.safetensors_header import DTYPE_SIZES
from clpsurgery.formats.writer import COPY_BUFFER_BYTES
from clpsurgery.mixing.choices import OMP_BLOCK_BYTES
from clpsurgery.mixing.registry import CLP, FVT, OMP, PIECES_PER_TOKEN
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.inputs import resolve_inputs
from clpsurgery.pipeline.memory import block_rows, memory_estimate, search_budget
from clpsurgery.pipeline.options import TransferOptions
from clpsurgery.pipeline.plan import make_plan

MiB = 2**20


def sparse_checkpoint(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> CheckpointLayout:
    """A safetensors file holding tensors of these dtypes and shapes, all zeros, as a sparse file."""
    doc, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(doc).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + offset)
    return CheckpointLayout.open(path)


@pytest.fixture
def layouts(tmp_path):
    """A source (an fp32 embedding of 1000 x 64, a bf16 head, one fp32 layer) and an fp16 helper of 800 x 32."""
    source = sparse_checkpoint(tmp_path / "source.safetensors", {
        "wte": ("F32", (1000, 64)), "head": ("BF16", (1000, 64)), "layer": ("F32", (64, 256)),
    })
    helper = sparse_checkpoint(tmp_path / "helper.safetensors", {"emb": ("F16", (800, 32))})
    return source, helper


def estimate(source, helper, *, target=800, overlap=300, held=300, missing=500, sides=((CLP, 8, False),), rebuilt=("wte", "head")):
    return memory_estimate(source, rebuilt, None if helper is None else helper, None if helper is None else "emb", target, overlap, held, missing, sides)


def test_the_estimate_for_known_shapes(layouts):
    source, helper = layouts
    got = estimate(source, helper)
    neighbour_lists = 500 * 8 * (8 + 4 + 4 + 8)  # 96,000
    # helper rows as stored (fp16), in fp32, normalised; the overlap's normalised vectors
    assert got["search"] == 800 * 32 * (2 + 4 + 4) + 300 * 32 * 4 + neighbour_lists == 390_400
    # held rows of the widest rebuilt row (fp32 wte: 256 bytes), a gather window and a copy buffer
    # (each the largest tensor's 256,000 bytes, under their 64 MiB caps), the neighbour lists
    assert got["write"] == 300 * 256 + 256_000 + 256_000 + neighbour_lists == 684_800


def test_the_estimate_grows_with_the_shapes(layouts):
    source, helper = layouts
    base = estimate(source, helper)
    more_target = estimate(source, helper, target=1600)
    assert more_target["search"] - base["search"] == 800 * 32 * 10 and more_target["write"] == base["write"]
    more_overlap = estimate(source, helper, overlap=600)
    assert more_overlap["search"] - base["search"] == 300 * 32 * 4 and more_overlap["write"] == base["write"]
    more_held = estimate(source, helper, held=600)
    assert more_held["write"] - base["write"] == 300 * 256 and more_held["search"] == base["search"]
    # the neighbour lists are held by both stages
    more_missing, more_k = estimate(source, helper, missing=1000), estimate(source, helper, sides=((CLP, 16, False),))
    for grown in (more_missing, more_k):
        assert grown["search"] - base["search"] == grown["write"] - base["write"] == 500 * 8 * 24
    # the input's and the output's lists are both alive
    two = estimate(source, helper, sides=((CLP, 8, False), (FVT, PIECES_PER_TOKEN, False)))
    assert two["write"] - base["write"] == 500 * PIECES_PER_TOKEN * 24
    # omp keeps the raw fp32 helper vectors and one block's atoms in fp64
    omp = estimate(source, helper, sides=((OMP, 8, False),))
    assert omp["search"] - base["search"] == 800 * 32 * 4 + 2 * OMP_BLOCK_BYTES and omp["write"] == base["write"]
    # dense: no neighbour lists, the whole target's fp32 vectors while writing
    dense = estimate(source, helper, sides=((CLP, 300, True),))
    assert dense["search"] == base["search"] - 96_000 and dense["write"] == base["write"] - 96_000 + 800 * 32 * 4


def test_a_helper_free_run_reads_no_helper_vectors(layouts):
    source, _ = layouts
    got = estimate(source, None, sides=((FVT, PIECES_PER_TOKEN, False),))
    pieces = 500 * PIECES_PER_TOKEN * 24
    assert got == {"search": pieces, "write": 300 * 256 + 256_000 + 256_000 + pieces}


def test_the_gather_window_and_copy_buffer_are_capped(tmp_path):
    """A 100 MiB embedding: its gather window and the copy buffer stop at their 64 MiB."""
    source = sparse_checkpoint(tmp_path / "big.safetensors", {"wte": ("F32", (100 * MiB // 256, 64))})
    assert source.info("wte").nbytes == 100 * MiB
    got = memory_estimate(source, ("wte",), None, None, 1000, 10, 10, 990, ((FVT, 1, False),))
    assert got["write"] == 10 * 256 + GATHER_WINDOW_BYTES + COPY_BUFFER_BYTES + 990 * 24
    assert GATHER_WINDOW_BYTES == COPY_BUFFER_BYTES == 64 * MiB


def test_block_rows():
    # top-k: per row the block in and out (2 x 64 fp32) and per neighbour a row and its position/weight
    per_row = 4 * (64 * 2 + 8 * (64 + 4))  # 2,688
    assert block_rows(per_row * 100, 10_000, 64, 8, 300, dense=False) == 100
    assert block_rows(per_row * 100 + per_row - 1, 10_000, 64, 8, 300, dense=False) == 100
    assert block_rows(per_row * 100, 50, 64, 8, 300, dense=False) == 50  # never more than the target
    assert block_rows(per_row - 1, 10_000, 64, 8, 300, dense=False) == 1  # never fewer than one
    # dense: the block, its similarities and weights against the overlap, one fp32 chunk of rows
    fixed, per_row = 4 * memory.DENSE_CHUNK_ROWS * 64, 4 * (64 * 2 + 300 * 3)
    assert block_rows(fixed + per_row * 7, 10_000, 64, 8, 300, dense=True) == 7
    assert block_rows(fixed, 10_000, 64, 8, 300, dense=True) == 1


def test_search_budget_is_a_quarter_of_max_memory():
    assert memory.SEARCH_SHARE == 4
    assert search_budget(1024 * MiB) == 256 * MiB
    assert search_budget(4 * MiB + 3) == MiB


def test_check_memory_at_the_boundary(gpt2_source, german_helper):
    """A real plan: --max-memory of exactly what it needs (the larger of the search and the write
    stage plus the smallest block budget) is accepted, a byte less refused, both by make_plan."""
    plan = make_plan(resolve_inputs(gpt2_source, german_helper), TransferOptions(top_k=8))
    estimate = plan.memory_estimate()
    need = max(estimate["search"], estimate["write"] + memory.MIN_BLOCK_BYTES)
    assert need == estimate["write"] + memory.MIN_BLOCK_BYTES  # the small fixtures: the write stage decides
    make_plan(resolve_inputs(gpt2_source, german_helper), TransferOptions(top_k=8, max_memory=need))
    with pytest.raises(SurgeryError) as e:
        make_plan(resolve_inputs(gpt2_source, german_helper), TransferOptions(top_k=8, max_memory=need - 1))
    assert e.value.place == "--max-memory"
    assert e.value.problem == (
        f"{(need - 1) / MiB:.0f} MiB cannot hold this transfer: it needs about {need / MiB:.0f} MiB "
        f"(search {estimate['search'] / MiB:.0f} MiB, write {estimate['write'] / MiB:.0f} MiB plus row blocks)"
    )
    at_need = replace(plan, options=replace(plan.options, max_memory=need))
    at_need.check_memory()
    assert at_need.block_budget == memory.MIN_BLOCK_BYTES  # what the smallest run has for its row blocks
    assert plan.block_budget == plan.options.max_memory - estimate["write"]
