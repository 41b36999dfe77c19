"""clpsurgery.json: what went in, every option, what came out, and how long each stage took."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clpsurgery import __version__
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.safetensors_header import read_header

if TYPE_CHECKING:
    from clpsurgery.pipeline.plan import TransferPlan
    from clpsurgery.pipeline.result import TransferResult


def checkpoint_files(checkpoint: Checkpoint) -> list[dict]:
    """Each file of a checkpoint with its size and the SHA-256 of its header."""
    files = [
        {"file": h.path.name, "bytes": h.file_size, "header_sha256": hashlib.sha256(h.raw).hexdigest()}
        for h in checkpoint.headers
    ]
    if checkpoint.index_path is not None:
        files.append({"file": checkpoint.index_path.name, "bytes": checkpoint.index_path.stat().st_size, "sha256": file_sha256(checkpoint.index_path)})
    return files


def file_sha256(path: Path, advance: Callable[[int], None] | None = None, begin: int = 0, end: int | None = None) -> str:
    """SHA-256 of a file, or of its bytes [begin, end), read in 1 MiB chunks; `advance(n)` after
    each, for a progress bar."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        left = (os.fstat(f.fileno()).st_size if end is None else end) - begin
        while left > 0 and (n := f.readinto(view[: min(len(buffer), left)])):
            digest.update(view[:n])
            left -= n
            if advance is not None:
                advance(n)
    return digest.hexdigest()


def output_files(
    folder: Path,
    copied_whole: dict[str, str] | None = None,
    rebuilt: dict[str, dict[str, str]] | None = None,
    sources: dict[str, str] | None = None,
    carried: list[str] | None = None,
) -> list[dict]:
    """The files written: size, SHA-256, and of the header for weights; `carried`: the source's
    side files copied into the output, some in folders of their own (1_Pooling/config.json).

    Weights files hold the bytes init computed (the rebuilt tensors) and bytes it copied from
    the source, and are hashed accordingly. A rebuilt file (`rebuilt`: output name -> its
    rebuilt tensors' SHA-256, taken as they were written) records those tensor hashes, its
    header's and the source file its other tensors were copied from; a file copied whole
    (`copied_whole`: output name -> source file name) its header's and its source file. Copied
    bytes never pass through this process (the kernel copies them), and reading them back only
    to hash them would cost about as much as the copy itself (docs/design.md, pipelining); `verify` checks sizes
    and header hashes, the rebuilt tensors' hashes, and with `--source` compares every copied
    tensor with the source byte for byte. Every other file (config, tokenizer, index) gets the
    SHA-256 of its bytes.
    """
    copied_whole = copied_whole or {}
    rebuilt = rebuilt or {}
    sources = sources or {}
    names = [p.name for p in sorted(folder.iterdir()) if p.is_file()]
    names += [name for name in carried or [] if "/" in name]
    to_hash = [name for name in names if name not in copied_whole and name not in rebuilt]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(to_hash)))) as pool:
        hashes = dict(zip(to_hash, pool.map(file_sha256, [folder / name for name in to_hash])))
    entries = []
    for name in names:
        path = folder / name
        entry: dict = {"file": name, "bytes": path.stat().st_size}
        if name in hashes:
            entry["sha256"] = hashes[name]
        if path.suffix == ".safetensors":
            entry["header_sha256"] = hashlib.sha256(read_header(path).raw).hexdigest()
        if name in rebuilt:
            entry["tensor_sha256"] = dict(sorted(rebuilt[name].items()))
            entry["other_tensors_from"] = sources.get(name)
        if name in copied_whole:
            entry["copied_from"] = copied_whole[name]
        entries.append(entry)
    return entries


def source_file_names(plan: TransferPlan) -> dict[str, str]:
    """Output weights file name -> the source file it is made from."""
    return {plan.output_file_name(h.path): h.path.name for h in plan.source.headers}


def files_copied_whole(plan: TransferPlan) -> dict[str, str]:
    """Output file name -> source file name, for source files without a rebuilt tensor."""
    return {plan.output_file_name(h.path): h.path.name for h in plan.source.headers if plan.copied_whole(h)}


PAIRS_ENCODING = "zlib(int64 little-endian), base64"


def encode_pairs(target_ids: np.ndarray, source_ids: np.ndarray) -> dict:
    """The overlap pairs (target id -> source row it copies), compact, for `verify --source`."""

    def pack(ids: np.ndarray) -> str:
        return base64.b64encode(zlib.compress(np.asarray(ids, dtype="<i8").tobytes(), 6)).decode("ascii")

    return {"count": int(len(target_ids)), "encoding": PAIRS_ENCODING, "target_ids": pack(target_ids), "source_ids": pack(source_ids)}


def decode_pairs(doc: dict) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of encode_pairs; ValueError (or KeyError, TypeError) on anything malformed."""
    if doc.get("encoding") != PAIRS_ENCODING:
        raise ValueError(f"unknown encoding {doc.get('encoding')!r}")

    count = doc["count"]
    if not isinstance(count, int) or not 0 <= count <= 1 << 32:
        raise ValueError(f"bad pair count {count!r}")

    def unpack(text: str) -> np.ndarray:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.b64decode(text.encode("ascii"), validate=True), max(1, 8 * count))
        if len(raw) != 8 * count or inflate.unconsumed_tail or not inflate.eof:
            raise ValueError("pair list does not hold the stated count")
        return np.frombuffer(raw, dtype="<i8").astype(np.int64)

    return unpack(doc["target_ids"]), unpack(doc["source_ids"])


def build_manifest(plan: TransferPlan, staging: Path, result: TransferResult, command: list[str] | None) -> dict:
    """The manifest as plain data."""
    summary = plan.summary()
    started = time.perf_counter()
    outputs = output_files(staging, files_copied_whole(plan), result.tensor_hashes, source_file_names(plan), result.carried_from_source)
    result.stage_seconds["hash"] = result.stage_seconds.get("hash", 0.0) + time.perf_counter() - started
    return {
        "tool": {"name": "clpsurgery", "version": __version__},
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "inputs": {
            "source": {"path": str(plan.source_path), "files": checkpoint_files(plan.source)},
            "helper": {"path": str(plan.helper_path), "files": [] if plan.helper is None else checkpoint_files(plan.helper)},
            "source_tokenizer": str(plan.source_vocab.path),
            "target_tokenizer": str(plan.target_vocab.path),
            "source_config": str(plan.source_config_path),
        },
        "options": plan.options.as_dict(),
        "vocabulary": {
            "source_size": summary["source_vocab_size"],
            "target_size": summary["target_vocab_size"],
            "overlap": summary["overlap"],
            "missing": summary["missing"],
            "match": plan.overlap.match,
            "pairs_by_kind": plan.overlap.counts(),
            "source_tokenizer_style": plan.source_vocab.style,
            "target_tokenizer_style": plan.target_vocab.style,
            "written_vocab_size": plan.output_rows,
            "padding_rows": plan.output_rows - plan.target_size,
            "padding_filled_with": "the mean of the combined rows" if plan.output_rows > plan.target_size else None,
        },
        "tensors": {
            "embedding": plan.source_tensors.embedding,
            "head": plan.source_tensors.head,
            "head_bias": plan.source_tensors.head_bias,
            "tied": plan.source_tensors.tied,
            "rebuilt": summary["rebuilt_tensors"],
            # a rebuilt tensor made from another source tensor's rows (a head --untie-head adds)
            "rebuilt_from": {t.name: t.source_name for t in plan.rebuilt if t.name != t.source_name},
            "output_side": summary["output_side"],
            "untied_head": plan.unties_head,
            "helper_embedding": plan.helper_embedding,
        },
        "weights": {
            "neighbours_per_token": plan.k,
            **result.weight_stats.as_dict(),
            "zero_helper_vectors": result.zero_helper_rows,
        },
        "head_weights": None if result.head_weight_stats is None else {
            "method": plan.side_method("output"),
            "neighbours_per_token": plan.k_for("output"),
            **result.head_weight_stats.as_dict(),
        },
        "extension": result.extension,
        "maps": [m.as_dict() for m in plan.maps],
        "kept_source_specials": list(plan.kept_specials),
        # the source's side files that do not depend on its vocabulary, copied byte for byte
        "carried_from_source": result.carried_from_source,
        "config_changes": result.config_changes,
        "bytes": {
            "copied": result.write_stats.copied_bytes,
            "computed": result.write_stats.computed_bytes,
            "kernel_copies": result.write_stats.kernel_copies,
            "buffered_copies": result.write_stats.buffered_copies,
            "direct_copies": result.write_stats.direct_copies,
        },
        "seconds": {stage: round(s, 3) for stage, s in result.stage_seconds.items()},
        "paths": result.paths,  # device, and which search and combine paths ran (clpsurgery/mixing/backend.py)
        "overlap_pairs": encode_pairs(plan.overlap.target_ids, plan.overlap.source_ids),
        "outputs": outputs,
    }
