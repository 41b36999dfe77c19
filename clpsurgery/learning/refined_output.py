"""Write a refined output: OUT's files with the trained tensors' new rows replaced, nothing else.

Built beside its final place and renamed in only when complete (formats.output_folder), as init
writes: a failed, interrupted or killed refine leaves no folder that looks complete, and with
--in-place OUT stays as it was. In a weights file that holds a trained tensor, every other
tensor is a byte copy and the trained one is OUT's bytes with the new rows put in, row block by
row block; every other file is copied whole. The manifest keeps every key it had, its outputs
updated for the rewritten files, and gains one entry in its `refine` list.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.output_folder import MANIFEST_NAME, staged_output
from clpsurgery.formats.safetensors_header import TensorSpec, read_header
from clpsurgery.formats.writer import (
    ComputedTensor,
    CopiedTensor,
    WriteStats,
    copy_tensors,
    copy_whole_file,
    finish_file,
    lay_out,
    row_blocks,
    start_file,
    write_computed,
)

BLOCK_BYTES = 64 * 1024 * 1024


def check_destination(out: Path, destination: Path, in_place: bool) -> None:
    """The refined output goes to a folder of its own beside OUT, or (--in-place) to OUT itself."""
    if in_place:
        return
    resolved, source = destination.resolve(), out.resolve()
    if resolved == source:
        raise SurgeryError(destination, "is OUT itself; pass --in-place to refine OUT where it is")
    if source in resolved.parents:
        raise SurgeryError(destination, "lies inside OUT; choose a folder elsewhere")
    if resolved in source.parents:
        raise SurgeryError(destination, "holds OUT; choose a folder elsewhere")


def _patched_blocks(checkpoint: Checkpoint, name: str, ids: np.ndarray, rows: bytes) -> Iterator[memoryview]:
    """The tensor's stored bytes, block by block, with rows `ids` (sorted) replaced by `rows`."""
    info = checkpoint.info(name)
    new = np.frombuffer(rows, dtype=np.uint8).reshape(len(ids), info.row_bytes)
    for start, stop in row_blocks(info.rows, max(1, BLOCK_BYTES // max(1, info.row_bytes))):
        block = np.frombuffer(checkpoint.raw_bytes(name, start, stop), dtype=np.uint8).reshape(stop - start, info.row_bytes).copy()
        inside = slice(np.searchsorted(ids, start), np.searchsorted(ids, stop))
        block[ids[inside] - start] = new[inside]
        yield memoryview(block).cast("B")


def write_refined(out: Path, destination: Path, manifest: dict, ids: np.ndarray, rows: dict[str, bytes], record: dict, force: bool) -> dict:
    """Write OUT refined to `destination` (OUT itself with --in-place): `rows` are the new rows of
    each trained tensor, as stored bytes in the order of `ids`. Returns the manifest written."""
    refined = dict(manifest)
    outputs = [dict(entry) for entry in manifest["outputs"]]
    with Checkpoint.open(out) as checkpoint, staged_output(destination, force=force) as staging:
        files_of = {checkpoint.tensors[name].path.name: [] for name in rows}
        for name in rows:
            files_of[checkpoint.tensors[name].path.name].append(name)
        stats = WriteStats()
        for entry in outputs:
            name = entry["file"]
            source, target = out / name, staging / name
            if name not in files_of:
                if source.suffix == ".safetensors":
                    copy_whole_file(source, target, stats)
                else:
                    shutil.copyfile(source, target)
                continue
            header = next(h for h in checkpoint.headers if h.path.name == name)
            planned = []
            for tensor, info in header.tensors.items():
                spec = TensorSpec(tensor, info.dtype, info.shape)
                if tensor in files_of[name]:
                    planned.append(ComputedTensor(spec, lambda t=tensor: _patched_blocks(checkpoint, t, ids, rows[t])))
                else:
                    planned.append(CopiedTensor(spec, source, header.absolute_range(tensor)[0]))
            layout = lay_out(target, planned, header.metadata)
            start_file(layout)
            copy_tensors(layout, stats)
            digests = write_computed(layout, stats)
            finish_file(layout, stats)
            entry["bytes"] = target.stat().st_size
            entry["header_sha256"] = hashlib.sha256(read_header(target).raw).hexdigest()
            entry["tensor_sha256"] = dict(sorted({**entry.get("tensor_sha256", {}), **digests}.items()))
            for tensor, digest in digests.items():
                record["tensors"][tensor]["sha256_after"] = digest
        refined["outputs"] = outputs
        refined["refine"] = [*(manifest.get("refine") or []), record]
        (staging / MANIFEST_NAME).write_text(json.dumps(refined, indent=2) + "\n", encoding="utf-8")
    return refined
