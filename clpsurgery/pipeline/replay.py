"""A transfer's decisions, saved beside its output and replayed on a sibling checkpoint.

`init` writes `clpsurgery.transfer` (a safetensors file) into its output: the overlap pairs and, for each
side's mixing, every new row's source rows and weights, with what they were computed against (the
source vocabulary's hash, the rebuilt tensors and their shapes). `clpsurgery apply TRANSFER
SIBLING OUT` rebuilds the same rows from another checkpoint with the same vocabulary and shapes
(an instruct or fine-tuned sibling, a base with a merged LoRA), with no helper and no search: the
same rows and weights through the same combine give the same bytes, so applying a transfer to its
own source reproduces init's output.

A record is input like any file. It carries a checksum of its own content (`content_sha256`: the
metadata and every array, see record_checksum), so a damaged or edited record is refused even
where it travels alone; beside its init's manifest (`clpsurgery.json`) its bytes must also match
the SHA-256 the manifest gives. A record from before the checksum is accepted only where that
manifest vouches for its bytes, and refused alone in one line (nothing else could tell a damaged one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import CheckpointLayout
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.formats.output_folder import MANIFEST_NAME, write_output_file
from clpsurgery.pipeline.manifest import file_sha256
from clpsurgery.pipeline.options import TransferOptions
from clpsurgery.pipeline.plan import TransferPlan, check_rebuildable_dtypes, with_recorded_mixing
from clpsurgery.vocab.architecture import find_vocab_tensors, read_config
from clpsurgery.vocab.vocabulary import MATCH_KINDS, Overlap, Vocabulary, load_vocabulary

if TYPE_CHECKING:  # the mixing layer loads torch: imported where a record is read
    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.pipeline.inputs import Inputs

# safetensors bytes, under a name no weights loader globs for (vLLM and llama.cpp read *.safetensors)
TRANSFER_NAME = "clpsurgery.transfer"
FORMAT = "clpsurgery-transfer/1"
# The record's metadata lives in one safetensors metadata entry; its checksum is a key inside it.
METADATA_ENTRY = "clpsurgery_transfer"
CHECKSUM_KEY = "content_sha256"
# Options a replay takes from the command line, not from the record: where and how it runs.
RUN_OPTIONS = ("max_memory", "device")


def vocabulary_sha256(vocab: Vocabulary) -> str:
    """A fingerprint of a tokenizer's id -> token map (special tokens marked)."""
    specials = set(vocab.special_tokens)
    items = sorted((i, t, t in specials) for t, i in vocab.token_to_id.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def transfer_record(plan: TransferPlan, matrices: dict[str, MixingMatrix]) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of the record (`matrices`: each side's mixing, plan.sides)."""
    overlap = plan.overlap
    arrays = {
        "overlap.target_ids": overlap.target_ids.astype(np.int64),
        "overlap.source_ids": overlap.source_ids.astype(np.int64),
        "overlap.kinds": (overlap.kinds if overlap.kinds is not None else np.ones(overlap.count)).astype(np.int64),
        "missing_ids": overlap.missing_ids.astype(np.int64),
    }
    for side, matrix in matrices.items():
        arrays[f"{side}.positions"] = np.ascontiguousarray(matrix.positions, dtype=np.int64)
        arrays[f"{side}.weights"] = np.ascontiguousarray(matrix.weights, dtype=np.float32)
        arrays[f"{side}.extra_source_ids"] = np.ascontiguousarray(matrix.extra_source_ids, dtype=np.int64)
    metadata = {
        "format": FORMAT,
        "sides": list(matrices),
        "stats": {side: m.stats.as_dict() for side, m in matrices.items()},
        "options": {k: v for k, v in plan.options.as_dict().items() if k not in RUN_OPTIONS},
        "match": overlap.match,
        "target_size": plan.target_size,
        "source_vocab_sha256": vocabulary_sha256(plan.source_vocab),
        "target_vocab_sha256": vocabulary_sha256(plan.target_vocab),
        "source_tensors": {name: list(plan.source.info(name).shape) for name in plan.source_tensors.names},
        "helper_config": plan.helper_config,
    }
    return arrays, metadata


def record_checksum(arrays: dict[str, np.ndarray], metadata: dict) -> str:
    """SHA-256 of a record's content in a canonical order, whatever the file's layout: the
    metadata (without the checksum) as sorted-key JSON, then each array in name order as its
    name, dtype and shape (JSON) and its little-endian bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode("utf-8"))
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode("utf-8"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_record(path: Path, plan: TransferPlan, matrices: dict[str, MixingMatrix]) -> None:
    from safetensors.numpy import save

    arrays, metadata = transfer_record(plan, matrices)
    metadata = json.loads(json.dumps(metadata))  # as a reader sees it (tuples as lists, keys as strings)
    metadata[CHECKSUM_KEY] = record_checksum(arrays, metadata)
    # One metadata entry: safetensors keeps the entries in a hash map, whose order (and so the
    # file's bytes) would change from run to run. Serialised here and written by Python, so that
    # a full disk is an OSError (ENOSPC) like the other files'.
    write_output_file(path, save(arrays, metadata={METADATA_ENTRY: json.dumps(metadata, sort_keys=True)}))


@dataclass(frozen=True)
class RecordedTransfer:
    """What a record holds, checked for consistency."""

    path: Path
    overlap: Overlap
    matrices: dict[str, MixingMatrix]
    options: TransferOptions
    source_vocab_sha256: str
    target_vocab_sha256: str
    source_tensors: dict[str, list[int]]
    helper_config: dict | None


def read_record(folder: Path, max_memory: int, device: str) -> RecordedTransfer:
    """The record in an init output folder; one SurgeryError line for anything missing, damaged
    or malformed (its checksums first, then its consistency)."""
    path = folder / TRANSFER_NAME
    from clpsurgery.mixing.matrix import MixingMatrix
    from clpsurgery.mixing.weights import WeightStats

    if not folder.is_dir():
        raise SurgeryError(folder, "is not a clpsurgery init output folder")
    if not path.is_file():
        raise SurgeryError(path, "not found: TRANSFER must be the output folder of a clpsurgery init that saved its decisions")
    vouched = _check_manifest_hash(folder, path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            metadata = json.loads((f.metadata() or {}).get(METADATA_ENTRY, "{}"))
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # the library's own parse errors
        raise SurgeryError(path, f"is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from e
    if not isinstance(metadata, dict):
        raise SurgeryError(path, "holds no transfer record")
    if metadata.get("format") != FORMAT:
        raise SurgeryError(path, f"format {metadata.get('format')!r} is not {FORMAT!r}")
    _check_own_checksum(path, arrays, metadata, vouched)
    try:
        sides, stats, recorded = list(metadata["sides"]), dict(metadata["stats"]), dict(metadata["options"])
        target_size = int(metadata["target_size"])
        source_tensors, helper_config = dict(metadata["source_tensors"]), metadata["helper_config"]
        if helper_config is not None and not isinstance(helper_config, dict):
            raise TypeError("helper_config is not an object")
        known = set(TransferOptions.specs())
        unknown = sorted(set(recorded) - known)
        if unknown:
            raise ValueError(f"options this version does not know: {', '.join(unknown)}")
        options = TransferOptions(**{
            **{k: v for k, v in recorded.items() if k not in RUN_OPTIONS},
            "top_k": None if recorded["top_k"] == "all" else recorded["top_k"],
            "max_memory": max_memory, "device": device,
        })
        overlap = Overlap(
            arrays["overlap.target_ids"], arrays["overlap.source_ids"], arrays["missing_ids"], target_size,
            arrays["overlap.kinds"].astype(np.int8), metadata["match"],
        )
        matrices = {
            side: MixingMatrix(arrays[f"{side}.positions"], arrays[f"{side}.weights"], WeightStats(**stats[side]), arrays[f"{side}.extra_source_ids"])
            for side in sides
        }
    except SurgeryError as e:
        raise SurgeryError(path, f"records options that do not hold: {e.problem}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(path, f"is not a complete transfer record ({type(e).__name__}: {e})") from e
    _check_record(path, overlap, matrices, sides)
    return RecordedTransfer(
        path, overlap, matrices, options, str(metadata["source_vocab_sha256"]), str(metadata["target_vocab_sha256"]), source_tensors, helper_config
    )


def _check_manifest_hash(folder: Path, path: Path) -> bool:
    """Whether the manifest beside the record gives its SHA-256 (refused where the bytes differ)."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    manifest = read_json_file(manifest_path, "manifest")
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    entry = next((e for e in outputs or () if isinstance(e, dict) and e.get("file") == TRANSFER_NAME), None)
    if entry is None or not isinstance(entry.get("sha256"), str):
        return False
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise SurgeryError(path, f"SHA-256 {digest[:16]}..., the {MANIFEST_NAME} beside it says {entry['sha256'][:16]}...: the record is damaged or was edited")
    return True


def _check_own_checksum(path: Path, arrays: dict[str, np.ndarray], metadata: dict, vouched: bool) -> None:
    """The record's content against the checksum it carries (taken out of METADATA); a record
    without one (written before records carried it) only where the manifest vouched for it."""
    recorded = metadata.pop(CHECKSUM_KEY, None)
    if recorded is None:
        if not vouched:
            raise SurgeryError(path, f"has no checksum of its own (an older record) and no {MANIFEST_NAME} beside it gives its SHA-256: apply it from its init output folder")
        return
    actual = record_checksum(arrays, metadata)
    if actual != recorded:
        raise SurgeryError(path, f"its content does not match its checksum ({CHECKSUM_KEY} {str(recorded)[:16]}..., the content gives {actual[:16]}...): the record is damaged or was edited")


def _check_record(path: Path, overlap: Overlap, matrices: dict[str, MixingMatrix], sides: list) -> None:
    """Ids and positions inside their ranges, shapes that agree: a record is input like any file."""
    problems = []
    n = overlap.target_ids.size
    if sides[:1] != ["input"] or not set(sides) <= {"input", "output"}:
        problems.append(f"sides {sides}")
    if overlap.source_ids.shape != (n,) or overlap.kinds.shape != (n,) or overlap.missing_ids.ndim != 1:
        problems.append("overlap arrays of different lengths")
    covered = np.concatenate([overlap.target_ids, overlap.missing_ids])
    if covered.size != overlap.target_size or not np.array_equal(np.sort(covered), np.arange(overlap.target_size)):
        problems.append(f"overlap and missing ids do not cover 0..{overlap.target_size - 1} once each")
    if n and (overlap.source_ids.min() < 0 or overlap.kinds.min() < 0 or overlap.kinds.max() >= len(MATCH_KINDS)):
        problems.append("negative source ids or unknown match kinds")
    for side, m in matrices.items():
        rows = overlap.missing_ids.size
        if m.positions.ndim != 2 or m.positions.shape != m.weights.shape or m.positions.shape[0] != rows:
            problems.append(f"{side} mixing of shape {list(m.positions.shape)} for {rows} new tokens")
        elif m.positions.size and (m.positions.min() < 0 or m.positions.max() >= n + m.extra_source_ids.size):
            problems.append(f"{side} mixing names rows outside the overlap and its extra rows")
        elif not np.isfinite(m.weights).all():
            problems.append(f"{side} weights are not finite")
        if m.extra_source_ids.size and m.extra_source_ids.min() < 0:
            problems.append(f"{side} extra source ids are negative")
    if problems:
        raise SurgeryError(path, f"is not a consistent transfer record: {problems[0]}")


def _check_source_rows(record: RecordedTransfer, rows: int, embedding: str) -> None:
    """The source rows the record copies (overlap) and mixes (extra rows) must lie in the
    sibling's rows, or the write stage would fail half way through."""
    named = {"overlap": record.overlap.source_ids, **{f"{side} mixing's extra": m.extra_source_ids for side, m in record.matrices.items()}}
    for what, ids in named.items():
        if ids.size and int(ids.max()) >= rows:
            raise SurgeryError(record.path, f"its {what} source row {int(ids.max())} is beyond the sibling's {rows} rows of {embedding!r} (0..{rows - 1})")


def make_replay_plan(record: RecordedTransfer, inputs: Inputs) -> TransferPlan:
    """The plan of `apply TRANSFER SIBLING` (inputs: the sibling as source, TRANSFER as helper):
    the recorded overlap and mixing on the sibling's tensors, refused in one line where the
    sibling's vocabulary or shapes differ from the source's; checked against --max-memory."""
    sibling, transfer = inputs.source, inputs.helper
    layout = CheckpointLayout.open(sibling)
    config_path = inputs.source_config
    config = read_config(config_path)
    options = record.options
    tensors = find_vocab_tensors(
        {n: r.info.shape for n, r in layout.tensors.items()}, str(sibling), options.embedding_tensor, options.head_tensor, options.head_bias_tensor, config
    )
    shapes = {name: list(layout.info(name).shape) for name in tensors.names}
    if shapes != record.source_tensors:
        differ = sorted(set(shapes) ^ set(record.source_tensors)) or [n for n in shapes if shapes[n] != record.source_tensors[n]]
        name = differ[0]
        raise SurgeryError(
            sibling, f"its vocabulary tensors differ from the source's: {name!r} is {shapes.get(name, 'absent')}, the transfer was made on {record.source_tensors.get(name, 'absent')}"
        )
    check_rebuildable_dtypes(layout, tensors, sibling)
    _check_source_rows(record, layout.info(tensors.embedding).rows, tensors.embedding)
    source_vocab = load_vocabulary(inputs.source_tokenizer, config)
    if vocabulary_sha256(source_vocab) != record.source_vocab_sha256:
        raise SurgeryError(source_vocab.path, "its vocabulary is not the one the transfer was made from (token ids or strings differ)")
    target_vocab = load_vocabulary(transfer, record.helper_config)
    if target_vocab.size > record.overlap.target_size or vocabulary_sha256(target_vocab) != record.target_vocab_sha256:
        raise SurgeryError(transfer, f"its tokenizer is not the one {TRANSFER_NAME} was made for")
    generation = config_path.parent / "generation_config.json"
    plan = TransferPlan(
        source_path=sibling,
        helper_path=transfer,
        source=layout,
        helper=None,
        source_tensors=tensors,
        helper_embedding=None,
        source_vocab=source_vocab,
        target_vocab=target_vocab,
        overlap=record.overlap,
        source_config=config,
        source_config_path=config_path,
        generation_config_path=generation if generation.is_file() else None,
        helper_config=record.helper_config,
        options=options,
        mixed_source_rows=0,  # a recorded mixing: counted by with_recorded_mixing below
    )
    if set(plan.sides) != set(record.matrices):
        raise SurgeryError(record.path, f"records mixings for {sorted(record.matrices)}, this transfer needs {sorted(plan.sides)}")
    return with_recorded_mixing(plan, record.matrices)

