"""`clpsurgery verify OUT [--source SOURCE]`: is an init output whole, and what init says it is?

Checks, each reported as one PASS, FAIL or SKIP line:

- files: every file the manifest lists is there with its size and SHA-256; for weights files,
  their header's SHA-256 and that of every tensor init rebuilt (the bytes it copied are compared
  with --source, see manifest.output_files); and nothing else is in the folder;
- headers: every safetensors header and the index are valid (the checks `init` makes on input);
- rebuilt tensors: the tensors init rebuilt are those the manifest lists (`tensors.rebuilt`: the
  embedding, an untied head, a vocab-sized bias and the copies some checkpoints store beside
  them, such as T5's `encoder.embed_tokens.weight` or BERT's `cls.predictions.decoder.bias`), the
  same its weights files hash as rebuilt, all in the output;
- shapes: the embedding agrees with config.json (vocab_size, hidden size, token ids) and the
  tokenizer (every id has a row); every other rebuilt tensor has the embedding's rows (a 2-D one
  its width too: a head, a copy of the embedding; a 1-D bias [vocab]) and the shape the manifest
  records for it;
- finite: every row of every rebuilt tensor is finite;
- refined (a `clpsurgery refine` output): the tensors the last refine wrote are rebuilt tensors,
  and the hashes it recorded for them are those the weights files list (and the files hold);

and with `--source`:

- source: SOURCE's headers are those the manifest recorded (it is the checkpoint init read);
- unchanged tensors: every tensor init did not rebuild is byte-identical to SOURCE's;
- overlap rows: in every rebuilt tensor, copies included, every target row of a shared token
  equals the SOURCE row it copies, in SOURCE's tensor of the same name.

Unreadable or missing input (no OUT, no manifest, a SOURCE that does not open) is an error, one
line, as everywhere else; a check that fails is a FAIL line and exit code 1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.formats.output_folder import MANIFEST_NAME, is_inside_path, unlisted_entries
from clpsurgery.formats.safetensors_header import FLOAT_DTYPES
from clpsurgery.formats.writer import row_blocks
from clpsurgery.pipeline.manifest import decode_pairs, file_sha256

CHUNK_BYTES = 16 * 1024 * 1024
BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Check:
    """One verdict: ok True (PASS), False (FAIL) or None (SKIP), on what, and why."""

    ok: bool | None
    what: str
    detail: str

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{status}  {self.what}: {self.detail}"


@contextmanager
def _no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


QUIET_BELOW_BYTES = 256 * 1024 * 1024  # no progress bar for work this small


def _bar(progress, label: str, total: int):
    return progress(label, total) if total >= QUIET_BELOW_BYTES else _no_progress(label, total)


def verify_output(
    out: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    progress=_no_progress,
    echo: Callable[[str], None] = lambda line: None,
) -> list[Check]:
    """Run every check on OUT (and against SOURCE); each result is also passed to `echo` as a line."""
    out = Path(out)
    checks: list[Check] = []

    def report(check: Check) -> None:
        checks.append(check)
        echo(check.line())

    manifest = _read_manifest(out)
    copied_whole = _check_files(out, manifest, progress, report)
    try:
        target = Checkpoint.open(out)
    except SurgeryError as e:
        report(Check(False, "headers", str(e)))
        return checks
    with target:
        report(Check(True, "headers", f"{len(target.headers)} safetensors file(s), {len(target.tensors)} tensors, index consistent" if target.is_sharded else f"{len(target.tensors)} tensors"))
        rebuilt = _rebuilt_tensors(manifest, target, report)
        if manifest.get("refine"):
            _check_refine(manifest, rebuilt, report)
        _check_shapes(out, target, rebuilt, report)
        _check_finite(target, rebuilt, progress, report)
        if source is not None:
            with Checkpoint.open(Path(source)) as original:
                _check_source_identity(manifest, original, report)
                _check_unchanged(target, original, rebuilt, copied_whole, progress, report)
                _check_overlap_rows(manifest, target, original, rebuilt, report)
        else:
            report(Check(None, "against SOURCE", "no --source given: unchanged tensors and overlap rows not compared"))
    return checks


# --- the manifest and the files ---------------------------------------------------------------


def _read_manifest(out: Path) -> dict:
    if not out.exists():
        raise SurgeryError(out, "does not exist")
    if not out.is_dir():
        raise SurgeryError(out, "is not a folder; verify checks the output folder of clpsurgery init")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise SurgeryError(out, f"has no {MANIFEST_NAME}: not an output of clpsurgery init")
    manifest = read_json_file(path, "manifest")
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if not isinstance(outputs, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in outputs):
        raise SurgeryError(path, "is not a clpsurgery manifest (no list of output files)")
    return manifest


def _header_sha256(path: Path) -> str | None:
    from clpsurgery.formats.safetensors_header import read_header

    try:
        return hashlib.sha256(read_header(path).raw).hexdigest()
    except SurgeryError:
        return None


def _check_files(out: Path, manifest: dict, progress, report: Callable[[Check], None]) -> dict[str, str]:
    """Sizes and hashes against the manifest: whole files, or the rebuilt tensors of a weights
    file (the bytes init computed; its copied tensors are compared with SOURCE by
    _check_unchanged). Returns the files copied whole (name -> source file)."""
    from clpsurgery.formats.safetensors_header import read_header

    entries = manifest["outputs"]
    listed = {MANIFEST_NAME}
    problems: dict[str, str] = {}
    to_hash: list[tuple[str, Path, str | None, int, int | None, str]] = []  # file, path, tensor, begin, end, expected
    copied_whole: dict[str, str] = {}
    partly = 0
    for entry in entries:
        name = entry["file"]
        listed.add(name)
        path = out / name
        if not is_inside_path(name):
            problems[name] = "the manifest names a path outside the folder"
            continue
        if not path.is_file():
            problems[name] = "missing"
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems[name] = f"{size} bytes, the manifest says {entry.get('bytes')}"
            continue
        if "header_sha256" in entry and _header_sha256(path) != entry["header_sha256"]:
            problems[name] = "header differs from the one written (SHA-256)"
            continue
        tensor_hashes = entry.get("tensor_sha256")
        if isinstance(entry.get("sha256"), str):
            to_hash.append((name, path, None, 0, None, entry["sha256"]))
        elif isinstance(tensor_hashes, dict) and tensor_hashes and "header_sha256" in entry and all(isinstance(v, str) for v in tensor_hashes.values()):
            header = read_header(path)
            absent = [t for t in tensor_hashes if t not in header.tensors]
            if absent:
                problems[name] = f"the manifest hashes tensor {absent[0]!r}, which the file does not hold"
                continue
            partly += 1
            for tensor, expected in tensor_hashes.items():
                to_hash.append((name, path, tensor, *header.absolute_range(tensor), expected))
        elif isinstance(entry.get("copied_from"), str) and "header_sha256" in entry:
            copied_whole[name] = entry["copied_from"]
        else:
            problems[name] = "the manifest gives no hash for it"
    total = sum((end if end is not None else path.stat().st_size) - begin for _, path, _, begin, end, _ in to_hash)
    with _bar(progress, "hashing", total) as advance, ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda item: file_sha256(item[1], advance, item[3], item[4]), to_hash))
    for (name, _, tensor, _, _, expected), digest in zip(to_hash, digests):
        if digest != expected and name not in problems:
            what = f"tensor {tensor!r}: " if tensor else ""
            problems[name] = f"{what}SHA-256 {digest[:16]}..., the manifest says {expected[:16]}..."
    for name in unlisted_entries(out, listed):
        problems.setdefault(name, "not written by clpsurgery (not in the manifest)")
    for name, problem in sorted(problems.items()):
        report(Check(False, f"file {name}", problem))
    whole_files = {name for name, _, tensor, _, _, _ in to_hash if tensor is None}
    detail = f"{len(whole_files - set(problems))} file(s) match their SHA-256"
    if partly:
        detail += f", the rebuilt tensors of {partly} weights file(s) theirs"
    detail += f" ({total / 2**20:.1f} MiB read)"
    whole = sum(1 for n in copied_whole if n not in problems)
    if whole or partly:
        detail += "; copied tensors match in size and header"
        detail += f" ({whole} file(s) copied whole)" if whole else ""
        detail += ", their bytes are compared with --source"
    if not problems:
        report(Check(True, "files", detail))
    return {n: s for n, s in copied_whole.items() if n not in problems}


# --- what init rebuilt --------------------------------------------------------------------------


def _rebuilt_tensors(manifest: dict, target: Checkpoint, report: Callable[[Check], None]) -> dict[str, tuple[int, ...] | None]:
    """Every tensor init rebuilt, the embedding first, with the shape the manifest records for it
    (None where it records none). One the output lacks is a FAIL here and skipped by the checks.

    The list is the manifest's `tensors.rebuilt` (name -> shape): the embedding, an untied head, a
    vocab-sized bias and the copies some checkpoints store beside them (T5's
    `encoder.embed_tokens.weight`, BERT's `cls.predictions.decoder.bias`: architecture.VocabTensors).
    The weights files' entries hash the same tensors as rebuilt (`tensor_sha256`), and the two
    records must agree. A manifest without `tensors.rebuilt` falls back to the embedding, head and
    head bias it names, then every tensor it hashes as rebuilt.
    """
    tensors = manifest.get("tensors") if isinstance(manifest.get("tensors"), dict) else {}
    embedding = tensors.get("embedding")
    if not isinstance(embedding, str):
        report(Check(False, "rebuilt tensors", "the manifest does not name the embedding"))
        return {}
    hashed = list(dict.fromkeys(
        t for entry in manifest["outputs"] if isinstance(entry.get("tensor_sha256"), dict) for t in entry["tensor_sha256"]
    ))
    listed = tensors.get("rebuilt")
    problems = []
    if isinstance(listed, dict) and listed and all(isinstance(n, str) for n in listed):
        shapes = {
            name: tuple(shape) if isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape) else None
            for name, shape in listed.items()
        }
        if embedding not in shapes:
            problems.append(f"the manifest names the embedding {embedding!r}, its list of rebuilt tensors does not")
        problems += [f"the manifest hashes {n!r} as rebuilt, its list of rebuilt tensors does not name it" for n in hashed if n not in shapes]
        if hashed:
            problems += [f"the manifest lists {n!r} as rebuilt, but hashes no such rebuilt tensor" for n in shapes if n not in hashed]
    else:
        fields = [tensors.get(k) for k in ("embedding", "head", "head_bias")]
        shapes = dict.fromkeys(n for n in [*fields, *hashed] if isinstance(n, str))
    rebuilt = {embedding: shapes.get(embedding), **{n: s for n, s in shapes.items() if n != embedding}}
    problems += [f"{n!r} is not in the output" for n in rebuilt if n not in target]
    for problem in problems:
        report(Check(False, "rebuilt tensors", problem))
    if not problems:
        source = "listed and hashed" if isinstance(listed, dict) else "named and hashed (no list of rebuilt tensors)"
        report(Check(True, "rebuilt tensors", f"{len(rebuilt)} tensor(s) {source} by the manifest, all in the output: {', '.join(rebuilt)}"))
    return rebuilt


def _check_refine(manifest: dict, rebuilt: dict[str, tuple[int, ...] | None], report: Callable[[Check], None]) -> None:
    """The last refine's record against the files: only rebuilt tensors refined, and their
    recorded hashes those the manifest's weights files list (which _check_files compared)."""
    runs = manifest["refine"]
    last = runs[-1] if isinstance(runs, list) and runs and isinstance(runs[-1], dict) else None
    tensors = last.get("tensors") if last is not None else None
    if not isinstance(tensors, dict) or not tensors:
        report(Check(False, "refined", "the manifest's refine record names no tensors"))
        return
    listed = {n: h for entry in manifest["outputs"] if isinstance(entry.get("tensor_sha256"), dict) for n, h in entry["tensor_sha256"].items()}
    problems = []
    for name, entry in tensors.items():
        after = entry.get("sha256_after") if isinstance(entry, dict) else None
        if name not in rebuilt:
            problems.append(f"refine wrote {name!r}, which is not a rebuilt tensor")
        elif not isinstance(after, str) or listed.get(name) != after:
            problems.append(f"{name!r}: the refine record's SHA-256 is not the one its weights file lists")
    for problem in problems:
        report(Check(False, "refined", problem))
    if not problems:
        report(Check(True, "refined", f"{', '.join(tensors)}: new rows refined ({last.get('objective')}, {last.get('steps')} steps), hashes as recorded"))


def _check_shapes(out: Path, target: Checkpoint, rebuilt: dict[str, tuple[int, ...] | None], report: Callable[[Check], None]) -> None:
    """The embedding [vocab, hidden] against config.json and the tokenizer; every other rebuilt
    tensor (head, bias, copies) with the embedding's rows, a 2-D one with its width too, and each
    of the shape the manifest records for it."""
    from clpsurgery.vocab.architecture import (
        config_vocab_size,
        read_config,
        text_config,
    )
    from clpsurgery.vocab.model_config import TOKEN_ID_KEYS
    from clpsurgery.vocab.vocabulary import load_vocabulary

    names = [n for n in rebuilt if n in target]
    if not names or names[0] != next(iter(rebuilt)):
        return  # no embedding: reported by _rebuilt_tensors
    embedding = target.info(names[0])
    problems = []
    if len(embedding.shape) != 2:
        report(Check(False, "shapes", f"embedding {embedding.name!r} has shape {list(embedding.shape)}, not [vocab, hidden]"))
        return
    rows, width = embedding.shape
    for name in names:
        shape = target.info(name).shape
        recorded = rebuilt[name]
        if name != names[0] and (shape[:1] != (rows,) or len(shape) > 2 or (len(shape) == 2 and shape[1] != width)):
            problems.append(f"{name!r} has shape {list(shape)}, the embedding {[rows, width]}")
        elif recorded is not None and shape != recorded:
            problems.append(f"{name!r} has shape {list(shape)}, the manifest says {list(recorded)}")
    try:
        config = read_config(out / "config.json")
        section = text_config(config)
        vocab_size = config_vocab_size(config)
        if vocab_size != rows:
            problems.append(f"config.json vocab_size {vocab_size}, embedding rows {rows}")
        hidden = section.get("hidden_size", section.get("n_embd", section.get("d_model")))
        if isinstance(hidden, int) and width not in (hidden, section.get("word_embed_proj_dim")):
            problems.append(f"config.json hidden size {hidden}, embedding width {width}")
        for key in TOKEN_ID_KEYS:
            for holder in {id(config): config, id(section): section}.values():
                value = holder.get(key)
                for token_id in value if isinstance(value, list) else [value]:
                    if isinstance(token_id, int) and not 0 <= token_id < rows:
                        problems.append(f"config.json {key} {token_id} has no row (vocab {rows})")
    except SurgeryError as e:
        problems.append(str(e))
    try:
        vocabulary = load_vocabulary(out)
        if vocabulary.size > rows:
            problems.append(f"tokenizer ids go up to {vocabulary.size - 1}, the embedding has {rows} rows")
    except SurgeryError as e:
        problems.append(str(e))
    if problems:
        for problem in problems:
            report(Check(False, "shapes", problem))
    else:
        report(Check(True, "shapes", f"embedding {names[0]} [{rows}, {width}] agrees with config.json and the tokenizer" + (f"; {', '.join(names[1:])} too" if names[1:] else "")))


def _first_failing_row(blocks: Iterable[tuple[int, np.ndarray]]) -> int | None:
    """The first row whose check is False, from (first row, per-row verdicts) blocks; reading stops there."""
    for start, ok in blocks:
        if not ok.all():
            return start + int(np.flatnonzero(~ok)[0])
    return None


def _check_finite(target: Checkpoint, rebuilt: dict[str, tuple[int, ...] | None], progress, report: Callable[[Check], None]) -> None:
    for name in (n for n in rebuilt if n in target):
        info = target.info(name)
        if info.dtype not in FLOAT_DTYPES:
            report(Check(False, f"finite {name}", f"dtype {info.dtype} is not a float"))
            continue
        with _bar(progress, f"finite {name}", info.nbytes) as advance:

            def finite_blocks() -> Iterator[tuple[int, np.ndarray]]:
                for start, stop in row_blocks(info.rows, max(1, BLOCK_BYTES // max(1, info.row_bytes))):
                    yield start, target.read_rows(name, start, stop).finite_rows()
                    advance((stop - start) * info.row_bytes)

            bad = _first_failing_row(finite_blocks())
        if bad is None:
            report(Check(True, f"finite {name}", f"all {info.rows} rows finite"))
        else:
            report(Check(False, f"finite {name}", f"row {bad} has NaN or Inf"))


# --- against the source ---------------------------------------------------------------------------


def _check_source_identity(manifest: dict, source: Checkpoint, report: Callable[[Check], None]) -> None:
    try:
        recorded = {f["file"]: f.get("header_sha256") for f in manifest["inputs"]["source"]["files"] if "header_sha256" in f}
    except (KeyError, TypeError):
        report(Check(None, "source", "the manifest records no source headers"))
        return
    actual = {h.path.name: hashlib.sha256(h.raw).hexdigest() for h in source.headers}
    if actual == recorded:
        report(Check(True, "source", f"SOURCE's {len(actual)} header(s) are those init read"))
        return
    differing = sorted(set(actual) ^ set(recorded)) or sorted(n for n in actual if actual[n] != recorded[n])
    report(Check(False, "source", f"SOURCE is not the checkpoint this output was made from ({differing[0]} differs)"))


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    if a.nbytes != b.nbytes:
        return False
    for start in range(0, a.nbytes, CHUNK_BYTES):
        if a[start : start + CHUNK_BYTES] != b[start : start + CHUNK_BYTES]:
            return False
    return True


def _check_unchanged(target: Checkpoint, source: Checkpoint, rebuilt: dict[str, tuple[int, ...] | None], copied_whole: dict[str, str], progress, report: Callable[[Check], None]) -> None:
    names = [n for n in target.tensors if n not in rebuilt]
    problems = []
    total = sum(target.info(n).nbytes for n in names if n in source)
    with _bar(progress, "comparing with SOURCE", total) as advance:
        for name in names:
            if name not in source:
                problems.append(f"{name!r} is not in SOURCE")
                continue
            a, b = target.info(name), source.info(name)
            if (a.dtype, a.shape) != (b.dtype, b.shape):
                problems.append(f"{name!r} is {a.dtype} {list(a.shape)}, in SOURCE {b.dtype} {list(b.shape)}")
                continue
            mine, theirs = target.raw_bytes(name), source.raw_bytes(name)
            try:
                same = _same_bytes(mine, theirs)
            finally:
                mine.release()
                theirs.release()
            advance(a.nbytes)
            if not same:
                problems.append(f"{name!r} differs from SOURCE")
    for name in source.tensors:
        if name not in target and name not in rebuilt:
            problems.append(f"SOURCE's {name!r} is not in the output")
    source_headers = {h.path.name: h for h in source.headers}
    for name, source_file in copied_whole.items():
        mine = next((h for h in target.headers if h.path.name == name), None)
        theirs = source_headers.get(source_file)
        if mine is None or theirs is None or mine.raw != theirs.raw or mine.file_size != theirs.file_size:
            problems.append(f"{name}, copied whole, is not SOURCE's {source_file}")
    for problem in problems[:20]:
        report(Check(False, "unchanged tensors", problem))
    if len(problems) > 20:
        report(Check(False, "unchanged tensors", f"and {len(problems) - 20} more"))
    if not problems:
        report(Check(True, "unchanged tensors", f"{len(names)} tensors ({total / 2**20:.1f} MiB) byte-identical to SOURCE"))


def _check_overlap_rows(manifest: dict, target: Checkpoint, source: Checkpoint, rebuilt: dict[str, tuple[int, ...] | None], report: Callable[[Check], None]) -> None:
    try:
        target_ids, source_ids = decode_pairs(manifest["overlap_pairs"])
    except (KeyError, TypeError, ValueError) as e:
        report(Check(None, "overlap rows", f"the manifest holds no readable overlap pairs ({type(e).__name__})"))
        return
    # a head --untie-head added copies the embedding's rows
    rebuilt_from = manifest.get("tensors", {}).get("rebuilt_from") or {}
    for name in (n for n in rebuilt if n in target):
        source_name = rebuilt_from.get(name, name) if isinstance(rebuilt_from, dict) else name
        if not isinstance(source_name, str) or source_name not in source:
            report(Check(False, f"overlap rows {name}", f"{source_name!r} is not in SOURCE"))
            continue
        rows, source_rows = target.info(name).rows, source.info(source_name).rows
        if target_ids.size and (target_ids.min() < 0 or target_ids.max() >= rows or source_ids.min() < 0 or source_ids.max() >= source_rows):
            report(Check(False, f"overlap rows {name}", "the manifest's pairs name rows outside the tensors"))
            continue
        def equal_blocks() -> Iterator[tuple[int, np.ndarray]]:
            for start, stop in row_blocks(target_ids.size, max(1, BLOCK_BYTES // max(1, target.info(name).row_bytes))):
                mine = target.gather_rows(name, target_ids[start:stop])
                theirs = source.gather_rows(source_name, source_ids[start:stop])
                same_layout = mine.dtype == theirs.dtype and mine.data.shape == theirs.data.shape
                yield start, (mine.data == theirs.data).all(axis=1) if same_layout else np.zeros(len(mine.data), dtype=bool)

        bad = _first_failing_row(equal_blocks())
        if bad is None:
            report(Check(True, f"overlap rows {name}", f"{target_ids.size} rows equal to the SOURCE rows they copy"))
        else:
            report(Check(False, f"overlap rows {name}", f"row {int(target_ids[bad])} differs from SOURCE row {int(source_ids[bad])}" + (f" of {source_name!r}" if source_name != name else "")))
