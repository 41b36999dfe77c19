"""Hostile and malformed inputs: each gives one SurgeryError line naming the file, never a traceback.

Every file here is built by hand (struct.pack + JSON bytes). The library is checked through
`Checkpoint.open`; the command line through `python -m clpsurgery inspect PATH`, which must exit 1
with exactly one `error: ...` line on stderr and leave the file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from clpsurgery.formats.checkpoint import INDEX_NAME, Checkpoint
from clpsurgery.errors import SurgeryError

# --- building files by hand --------------------------------------------------------------


def raw_file(path: Path, header: bytes, data: bytes = b"", n: int | None = None) -> Path:
    """8-byte LE length (n, or the real length), the header bytes, then data."""
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def st_file(path: Path, doc: object, data: bytes = b"") -> Path:
    """A file with `doc` as its JSON header, padded to 8 with spaces, then data."""
    header = json.dumps(doc, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return raw_file(path, header, data)


def f32(begin: int, count: int, shape: list | None = None) -> dict:
    return {"dtype": "F32", "shape": [count] if shape is None else shape, "data_offsets": [begin, begin + 4 * count]}


def good_shard(path: Path, names: list[str]) -> Path:
    doc: dict = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        doc[name] = f32(8 * i, 2)
    return st_file(path, doc, bytes(8 * len(names)))


def index(folder: Path, weight_map: dict, raw: bytes | None = None) -> Path:
    path = folder / INDEX_NAME
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps({"metadata": {"total_size": 8 * len(weight_map)}, "weight_map": weight_map}))
    return path


@dataclass(frozen=True)
class Case:
    open_path: Path  # what is passed to Checkpoint.open / the CLI
    named: Path  # the file the message must name
    phrase: str  # a phrase the message must contain


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# --- single-file cases ---------------------------------------------------------------------


@case
def shorter_than_8_bytes(d: Path) -> Case:
    p = d / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    return Case(p, p, "shorter than the 8-byte header length")


@case
def zero_byte_file(d: Path) -> Case:
    p = d / "zero.safetensors"
    p.write_bytes(b"")
    return Case(p, p, "shorter than the 8-byte header length")


@case
def header_length_beyond_file(d: Path) -> Case:
    p = raw_file(d / "beyond.safetensors", b"{}      ", n=4096)
    return Case(p, p, "runs past the end of the file")


@case
def header_length_over_limit(d: Path) -> Case:
    p = raw_file(d / "huge.safetensors", b"{}      ", n=100_000_000)
    return Case(p, p, "over the 100000000-byte limit")


@case
def header_length_max_u64(d: Path) -> Case:
    p = raw_file(d / "maxu64.safetensors", b"{}      ", n=2**64 - 1)
    return Case(p, p, "byte limit")


@case
def text_file_not_safetensors(d: Path) -> Case:
    # A README given as SOURCE: its first 8 bytes read as a length in the quintillions.
    p = d / "README.md"
    p.write_text("# clpsurgery\n\nCLP-Transfer as weight surgery on safetensors files.\n" * 20)
    return Case(p, p, "not a safetensors file")


@case
def text_length_past_end_not_safetensors(d: Path) -> Case:
    # A small length that still runs past the end, and no JSON object after it.
    p = raw_file(d / "notes.safetensors", b"plain text, not a header", n=4096)
    return Case(p, p, "not a safetensors file")


@case
def header_not_json(d: Path) -> Case:
    p = raw_file(d / "notjson.safetensors", b"this is not json at all!")
    return Case(p, p, "header is not valid JSON")


@case
def header_not_utf8(d: Path) -> Case:
    p = raw_file(d / "notutf8.safetensors", b'{"\xff\xfe":1}  ')
    return Case(p, p, "header is not valid JSON")


@case
def header_not_object(d: Path) -> Case:
    p = raw_file(d / "array.safetensors", b"[1,2,3]         ")
    return Case(p, p, "header is not a JSON object")


@case
def entry_not_object(d: Path) -> Case:
    p = st_file(d / "entry.safetensors", {"a": [1, 2]})
    return Case(p, p, "entry is not an object")


@case
def overlapping_offsets(d: Path) -> Case:
    p = st_file(d / "overlap.safetensors", {"a": f32(0, 2), "b": f32(4, 2)}, bytes(12))
    return Case(p, p, "overlaps the previous tensor")


@case
def gap_between_tensors(d: Path) -> Case:
    p = st_file(d / "gap.safetensors", {"a": f32(0, 1), "b": f32(8, 1)}, bytes(12))
    return Case(p, p, "gap of 4 bytes before tensor 'b'")


@case
def gap_before_first_tensor(d: Path) -> Case:
    p = st_file(d / "gap0.safetensors", {"a": f32(4, 1)}, bytes(8))
    return Case(p, p, "gap of 4 bytes")


@case
def wrong_byte_count(d: Path) -> Case:
    doc = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    p = st_file(d / "count.safetensors", doc, bytes(8))
    return Case(p, p, "needs 12")


@case
def end_before_begin(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}}
    p = st_file(d / "backwards.safetensors", doc, bytes(8))
    return Case(p, p, "is before begin")


@case
def bad_data_offsets(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 8]}}
    p = st_file(d / "offsets.safetensors", doc, bytes(4))
    return Case(p, p, "is not [begin, end]")


@case
def negative_offset(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}
    p = st_file(d / "negoff.safetensors", doc, bytes(4))
    return Case(p, p, "is not [begin, end]")


@case
def trailing_bytes(d: Path) -> Case:
    p = st_file(d / "trailing.safetensors", {"a": f32(0, 1)}, bytes(6))
    return Case(p, p, "2 trailing bytes after the last tensor")


@case
def data_truncated(d: Path) -> Case:
    p = st_file(d / "truncated.safetensors", {"a": f32(0, 4)}, bytes(10))
    return Case(p, p, "tensors need 16 data bytes but the file has 10")


@case
def unknown_dtype(d: Path) -> Case:
    doc = {"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}
    p = st_file(d / "dtype.safetensors", doc, bytes(4))
    return Case(p, p, "unknown dtype 'Q4_K'")


@case
def negative_shape(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}
    p = st_file(d / "negshape.safetensors", doc, bytes(4))
    return Case(p, p, "is not a list of non-negative integers")


@case
def float_shape(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": [2.0, 2], "data_offsets": [0, 4]}}
    p = st_file(d / "floatshape.safetensors", doc, bytes(4))
    return Case(p, p, "is not a list of non-negative integers")


@case
def string_shape(d: Path) -> Case:
    doc = {"a": {"dtype": "U8", "shape": ["4"], "data_offsets": [0, 4]}}
    p = st_file(d / "strshape.safetensors", doc, bytes(4))
    return Case(p, p, "is not a list of non-negative integers")


@case
def metadata_non_string_value(d: Path) -> Case:
    doc = {"__metadata__": {"format": "pt", "step": 3}, "a": f32(0, 1)}
    p = st_file(d / "meta.safetensors", doc, bytes(4))
    return Case(p, p, "__metadata__ must map strings to strings")


@case
def metadata_not_object(d: Path) -> Case:
    doc = {"__metadata__": ["format", "pt"], "a": f32(0, 1)}
    p = st_file(d / "meta2.safetensors", doc, bytes(4))
    return Case(p, p, "__metadata__ must map strings to strings")


@case
def message_with_newlines(d: Path) -> Case:
    # a tensor name full of line breaks must still give a one-line message
    doc = {"evil\nname\r\nhere": {"dtype": "NOPE\n", "shape": [1], "data_offsets": [0, 1]}}
    p = st_file(d / "newlines.safetensors", doc, bytes(1))
    return Case(p, p, "unknown dtype")


@case
def header_deeply_nested(d: Path) -> Case:
    # json.loads raises RecursionError (not JSONDecodeError) on deep nesting
    p = raw_file(d / "deep.safetensors", b"[" * 200_000)
    return Case(p, p, "JSON")


@case
def header_huge_integer(d: Path) -> Case:
    # json.loads raises ValueError (int max str digits) on a 5000-digit integer
    header = b'{"a":{"dtype":"U8","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,1]}}'
    p = raw_file(d / "bigint.safetensors", header, b"x")
    return Case(p, p, "JSON")


@case
def tensor_name_lone_surrogate(d: Path) -> Case:
    # Python's json accepts "\ud800", which cannot be encoded again (the reference loader refuses
    # it: "unexpected end of hex escape"); accepting it makes any later write of the name crash.
    header = b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    p = raw_file(d / "surrogate.safetensors", header + b" " * (-len(header) % 8), b"x")
    return Case(p, p, "")


# --- folder cases ----------------------------------------------------------------------------


@case
def index_parent_path(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(d / "x.safetensors", ["a"])  # exists, but outside the folder
    good_shard(folder / "model-00001-of-00001.safetensors", ["b"])
    ip = index(folder, {"a": "../x.safetensors", "b": "model-00001-of-00001.safetensors"})
    return Case(folder, ip, "points outside the folder")


@case
def index_absolute_path(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00001.safetensors", ["b"])
    ip = index(folder, {"a": "/etc/passwd", "b": "model-00001-of-00001.safetensors"})
    return Case(folder, ip, "points outside the folder")


@case
def index_subfolder_path(d: Path) -> Case:
    folder = d / "model"
    (folder / "sub").mkdir(parents=True)
    good_shard(folder / "sub" / "x.safetensors", ["a"])
    ip = index(folder, {"a": "sub/x.safetensors"})
    return Case(folder, ip, "points outside the folder")


@case
def index_dotdot(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {"a": ".."})
    return Case(folder, ip, "points outside the folder")


@case
def index_symlink_outside(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(d / "outside.safetensors", ["a"])
    os.symlink(d / "outside.safetensors", folder / "model-00001-of-00001.safetensors")
    ip = index(folder, {"a": "model-00001-of-00001.safetensors"})
    return Case(folder, ip, "points outside the folder")


@case
def index_non_string_entry(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {"a": 7})
    return Case(folder, ip, "is not a file name")


@case
def index_lone_surrogate_entry(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00001.safetensors", ["a"])
    ip = index(folder, {}, raw=b'{"weight_map": {"a": "\\ud800.safetensors"}}')
    return Case(folder, ip, "")


@case
def index_deeply_nested(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {}, raw=b'{"weight_map": ' + b"[" * 200_000)
    return Case(folder, ip, "JSON")


@case
def index_huge_integer(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {}, raw=b'{"metadata": {"total_size": ' + b"9" * 5000 + b'}, "weight_map": {"a": "x"}}')
    return Case(folder, ip, "JSON")


@case
def index_missing_shard(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00002.safetensors", ["a"])
    ip = index(folder, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    return Case(folder, ip, "'model-00002-of-00002.safetensors', which is missing")


@case
def index_not_json(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00001.safetensors", ["a"])
    ip = index(folder, {}, raw=b'{"weight_map": {"a": "model-00001-of-00001.safetensors"')
    return Case(folder, ip, "not valid JSON")


@case
def index_not_utf8(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {}, raw=b'{"weight_map": {"\xff": "x"}}')
    return Case(folder, ip, "not valid JSON")


@case
def index_without_weight_map(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00001.safetensors", ["a"])
    ip = index(folder, {}, raw=b'{"metadata": {"total_size": 8}}')
    return Case(folder, ip, "has no weight_map object")


@case
def index_is_a_list(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    ip = index(folder, {}, raw=b'["model-00001-of-00001.safetensors"]')
    return Case(folder, ip, "has no weight_map object")


@case
def index_wrong_shard(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00002.safetensors", ["a", "b"])
    good_shard(folder / "model-00002-of-00002.safetensors", ["c"])
    ip = index(
        folder,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",  # b lives in shard 1
            "c": "model-00002-of-00002.safetensors",
        },
    )
    return Case(folder, ip, "maps tensor 'b' to model-00002-of-00002.safetensors, which does not hold it")


@case
def index_misses_a_tensor(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00001.safetensors", ["a", "b"])
    ip = index(folder, {"a": "model-00001-of-00001.safetensors"})
    return Case(folder, ip, "does not list tensor 'b'")


@case
def same_tensor_in_two_shards(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00002.safetensors", ["a", "b"])
    second = good_shard(folder / "model-00002-of-00002.safetensors", ["b", "c"])
    index(
        folder,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    )
    return Case(folder, second, "tensor 'b' also in model-00001-of-00002.safetensors")


@case
def hostile_shard_in_sharded_folder(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00002.safetensors", ["a"])
    bad = st_file(folder / "model-00002-of-00002.safetensors", {"b": f32(0, 4)}, bytes(3))
    index(folder, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    return Case(folder, bad, "truncated")


@case
def two_files_no_index(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    good_shard(folder / "model-00001-of-00002.safetensors", ["a"])
    good_shard(folder / "model-00002-of-00002.safetensors", ["b"])
    return Case(folder, folder, "2 .safetensors files but no model.safetensors.index.json")


@case
def empty_folder(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return Case(folder, folder, "no .safetensors file in this folder")


@case
def path_does_not_exist(d: Path) -> Case:
    p = d / "nowhere" / "model.safetensors"
    return Case(p, p, "does not exist")


@case
def hostile_model_safetensors_in_folder(d: Path) -> Case:
    folder = d / "model"
    folder.mkdir()
    p = raw_file(folder / "model.safetensors", b"{", n=1)
    return Case(folder, p, "header is not valid JSON")


# The cases the command line is run on, one process each (each run imports torch, ~1.7 CPU
# seconds, so the extra cases above are checked through the library only: the CLI's error path
# is the same for all of them).
CLI_CASES = sorted(
    [
        "shorter_than_8_bytes",
        "text_file_not_safetensors",
        "header_length_beyond_file",
        "header_length_over_limit",
        "header_not_json",
        "header_not_object",
        "overlapping_offsets",
        "gap_between_tensors",
        "wrong_byte_count",
        "trailing_bytes",
        "data_truncated",
        "unknown_dtype",
        "negative_shape",
        "float_shape",
        "metadata_non_string_value",
        "message_with_newlines",
        "header_deeply_nested",
        "header_huge_integer",
        "index_deeply_nested",
        "index_parent_path",
        "index_absolute_path",
        "index_subfolder_path",
        "index_missing_shard",
        "index_not_json",
        "index_wrong_shard",
        "same_tensor_in_two_shards",
        "two_files_no_index",
        "empty_folder",
        "path_does_not_exist",
    ]
)
assert set(CLI_CASES) <= set(CASES)


# --- the checks ------------------------------------------------------------------------------


def tree_hash(root: Path) -> dict[str, str]:
    """Hash of every file (and link target) under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_rejects(tmp_path, name):
    c = CASES[name](tmp_path)
    before = tree_hash(tmp_path)
    with pytest.raises(SurgeryError) as info:
        Checkpoint.open(c.open_path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message == f"{info.value.place}: {info.value.problem}"
    assert str(c.named) in message, message
    assert c.phrase in message, message
    assert tree_hash(tmp_path) == before


@dataclass(frozen=True)
class CliResult:
    case: Case
    returncode: int
    stdout: str
    stderr: str
    before: dict
    after: dict


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, CliResult]:
    """Build every case and run the CLI on each, several at a time (each run imports torch)."""
    base = tmp_path_factory.mktemp("cli")
    built = {}
    for name in CLI_CASES:
        build = CASES[name]
        d = base / name
        d.mkdir()
        built[name] = (d, build(d))

    def run(name: str) -> CliResult:
        d, c = built[name]
        before = tree_hash(d)
        proc = subprocess.run(
            [sys.executable, "-m", "clpsurgery", "inspect", str(c.open_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=d,
            stdin=subprocess.DEVNULL,
        )
        return CliResult(c, proc.returncode, proc.stdout, proc.stderr, before, tree_hash(d))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(CLI_CASES, pool.map(run, CLI_CASES)))


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_rejects(request, name):
    pytest.importorskip("clpsurgery.cli")
    r: CliResult = request.getfixturevalue("cli_results")[name]
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), r.stderr
    assert lines[0].startswith("error: "), r.stderr
    assert r.case.named.name in lines[0], r.stderr
    assert r.case.phrase in lines[0], r.stderr
    assert r.after == r.before
