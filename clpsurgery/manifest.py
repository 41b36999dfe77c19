"""clpsurgery.json: what went in, every option, what came out, and how long each stage took."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .checkpoint import Checkpoint
from .safetensors_header import read_header

if TYPE_CHECKING:
    from .plan import TransferPlan
    from .transfer import TransferResult


def checkpoint_files(checkpoint: Checkpoint) -> list[dict]:
    """Each file of a checkpoint with its size and the SHA-256 of its header."""
    files = [
        {"file": h.path.name, "bytes": h.file_size, "header_sha256": hashlib.sha256(h.raw).hexdigest()}
        for h in checkpoint.headers
    ]
    if checkpoint.index_path is not None:
        files.append({"file": checkpoint.index_path.name, "bytes": checkpoint.index_path.stat().st_size, "sha256": file_sha256(checkpoint.index_path)})
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_files(folder: Path) -> list[dict]:
    """The files written, with sizes; header hashes for weights, full hashes for small side files."""
    entries = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        entry: dict = {"file": path.name, "bytes": path.stat().st_size}
        if path.suffix == ".safetensors":
            entry["header_sha256"] = hashlib.sha256(read_header(path).raw).hexdigest()
        else:
            entry["sha256"] = file_sha256(path)
        entries.append(entry)
    return entries


def build_manifest(plan: TransferPlan, staging: Path, result: TransferResult, command: list[str] | None) -> dict:
    """The manifest as plain data."""
    summary = plan.summary()
    return {
        "tool": {"name": "clpsurgery", "version": __version__},
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "inputs": {
            "source": {"path": str(plan.source_path), "files": checkpoint_files(plan.source)},
            "helper": {"path": str(plan.helper_path), "files": checkpoint_files(plan.helper)},
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
            "match": "exact",
        },
        "tensors": {
            "embedding": plan.source_tensors.embedding,
            "head": plan.source_tensors.head,
            "head_bias": plan.source_tensors.head_bias,
            "tied": plan.source_tensors.tied,
            "rebuilt": summary["rebuilt_tensors"],
            "helper_embedding": plan.helper_embedding,
        },
        "weights": {
            "neighbours_per_token": plan.k,
            **result.weight_stats.as_dict(),
            "zero_helper_vectors": result.zero_helper_rows,
        },
        "config_changes": result.config_changes,
        "bytes": {
            "copied": result.write_stats.copied_bytes,
            "computed": result.write_stats.computed_bytes,
            "kernel_copies": result.write_stats.kernel_copies,
            "buffered_copies": result.write_stats.buffered_copies,
        },
        "seconds": {stage: round(s, 3) for stage, s in result.stage_seconds.items()},
        "outputs": output_files(staging),
    }
