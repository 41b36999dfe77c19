"""GGUF metadata: a small vocabulary written with ggml's own `gguf` package, read back exactly, and
the same file damaged in every way a reader can meet (cut short at every byte, counts and lengths of
2**62, unknown value types, wrong types for the keys the reader uses, wrong magic or version).

Each damaged file must give one SurgeryError naming the file, with no other exception and no
allocation the file's size does not pay for; through the command line (`inspect --against
--source-tokenizer FILE.gguf`) it is one `error: FILE: ...` line and exit code 1.

The built-in parser is the one reader: ggml's GGUFReader serves here as the reference on valid
files only. On hostile ones it loops for as long as a declared count says (2**62 elements past the
end of the file: no error, ever), fails with ValueError, IndexError or KeyError elsewhere, and it
takes seconds where the parser takes tens of milliseconds (a 50257-token vocabulary).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.tokenizer_files import GGUF_ROLE_KEYS, read_gguf_metadata, read_gguf_vocabulary
from clpsurgery.vocab.vocabulary import load_vocabulary
from conftest import sha256_of

gguf = pytest.importorskip("gguf")
Keys, TokenType, ValueType = gguf.Keys.Tokenizer, gguf.TokenType, gguf.GGUFValueType

TOKENS = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "▁the", "ing", "▁Über", "<|user|>"]
TYPES = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE, TokenType.BYTE, TokenType.NORMAL, TokenType.NORMAL, TokenType.NORMAL, TokenType.USER_DEFINED]
SCORES = [0.0, 0.0, 0.0, 0.0, 0.0, -1.5, -2.25, -7.0, 0.0]
ROLE_IDS = {Keys.UNK_ID: 0, Keys.BOS_ID: 1, Keys.EOS_ID: 2}


def write_gguf(path: Path, edit: dict | None = None) -> Path:
    """A vocab-only GGUF file of the small vocabulary above, as llama.cpp lays one out; `edit` maps
    a key to (value, type[, element type]) to write instead, or to None to leave the key out."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores(SCORES)
    writer.add_token_types(TYPES)
    for key, token_id in ROLE_IDS.items():
        writer.add_uint32(key, token_id)
    writer.add_add_bos_token(True)
    for key, change in (edit or {}).items():
        writer.kv_data[0].pop(key, None)
        if change is not None:
            writer.add_key_value(key, change[0], *change[1:])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def valid(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def key_end(data: bytes, key: str) -> int:
    """Where the value type of `key` starts (just past the key's bytes)."""
    at = data.index(struct.pack("<Q", len(key.encode())) + key.encode())
    return at + 8 + len(key.encode())


def patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    raw = struct.pack(fmt, value)
    return data[:at] + raw + data[at + len(raw):]


def raw_gguf(*kvs: bytes, version: int = 3, count: int | None = None) -> bytes:
    """A GGUF file from hand-packed key-value pairs (for what GGUFWriter will not write)."""
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs) if count is None else count) + b"".join(kvs)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key.encode())) + key.encode() + struct.pack("<I", vtype) + payload


def tokens_kv() -> bytes:
    return kv(Keys.LIST, ValueType.ARRAY, struct.pack("<IQ", ValueType.STRING, 2) + b"".join(struct.pack("<Q", len(t)) + t for t in (b"a", b"b")))


# --- the valid file, read back -----------------------------------------------------------------


def test_the_small_vocabulary_reads_back(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    data = read_gguf_vocabulary(path)
    assert data.format == "gguf (llama)" and data.style == "metaspace"
    assert data.token_to_id == {t: i for i, t in enumerate(TOKENS)}
    assert (data.special_ids, data.byte_ids, data.added_ids) == ({0, 1, 2}, {3, 4}, {8})
    assert data.roles == {"unk": 0, "bos": 1, "eos": 2}
    vocab = load_vocabulary(path)
    meanings = [vocab.meaning(t, i) for i, t in enumerate(TOKENS)]
    assert meanings[3:] == [b"\n", b"\xc3", b" the", b"ing", " Über".encode(), b"<|user|>"]


def test_role_keys_are_ggml_keys():
    """The reader's role keys are gguf's own names (sic: "seperator"), cls_token_id apart, which
    only older converters wrote."""
    keys = {k for k in vars(Keys).values() if isinstance(k, str)}
    assert {role: key for role, key in GGUF_ROLE_KEYS.items() if role != "cls"} == {
        "eos": Keys.EOS_ID, "bos": Keys.BOS_ID, "unk": Keys.UNK_ID, "pad": Keys.PAD_ID, "sep": Keys.SEP_ID, "mask": Keys.MASK_ID
    }
    assert set(GGUF_ROLE_KEYS.values()) - keys == {"tokenizer.ggml.cls_token_id"}


@pytest.mark.parametrize("role", sorted(GGUF_ROLE_KEYS))
def test_every_role_key_is_read(tmp_path, role):
    path = write_gguf(tmp_path / "role.gguf", {**dict.fromkeys(ROLE_IDS), GGUF_ROLE_KEYS[role]: (7, ValueType.UINT32)})
    assert read_gguf_vocabulary(path).roles == {role: 7}


EVERY_TYPE = {
    "test.u8": (200, ValueType.UINT8), "test.i8": (-100, ValueType.INT8), "test.u16": (60000, ValueType.UINT16),
    "test.i16": (-30000, ValueType.INT16), "test.u32": (2**32 - 1, ValueType.UINT32), "test.i32": (-(2**31), ValueType.INT32),
    "test.f32": (0.1, ValueType.FLOAT32), "test.bool": (True, ValueType.BOOL), "test.string": ("naïve 🦙", ValueType.STRING),
    "test.u64": (2**64 - 1, ValueType.UINT64), "test.i64": (-(2**63), ValueType.INT64), "test.f64": (1e300, ValueType.FLOAT64),
    "test.array.u8": ([0, 255], ValueType.ARRAY, ValueType.UINT8), "test.array.i64": ([-1, 2**62], ValueType.ARRAY, ValueType.INT64),
    "test.array.f64": ([0.5, -2.0], ValueType.ARRAY, ValueType.FLOAT64), "test.array.bool": ([True, False], ValueType.ARRAY, ValueType.BOOL),
    "test.array.string": (["", "x", "▁y"], ValueType.ARRAY, ValueType.STRING),
}


def test_every_value_type_as_ggml_reads_it(tmp_path):
    """Each GGUF value type, scalar and array, reads as ggml's own GGUFReader reads it."""
    path = write_gguf(tmp_path / "types.gguf", EVERY_TYPE)
    reader = gguf.GGUFReader(path)
    expected = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(EVERY_TYPE) < set(expected)
    assert read_gguf_metadata(path, "") == expected
    assert read_gguf_metadata(path, "test.array.") == {k: v for k, v in expected.items() if k.startswith("test.array.")}
    assert read_gguf_metadata(path, {"test.u8", "test.nothing"}) == {"test.u8": 200}


def test_nested_arrays_within_the_limit(tmp_path):
    path = write_gguf(tmp_path / "nested.gguf", {"tokenizer.test.nested": ([[[1, 2], [3]], [[4]]], ValueType.ARRAY)})
    assert read_gguf_metadata(path)["tokenizer.test.nested"] == [[[1, 2], [3]], [[4]]]
    assert read_gguf_vocabulary(path).token_to_id == {t: i for i, t in enumerate(TOKENS)}


def test_out_of_range_role_ids_are_ignored(tmp_path):
    """As llama.cpp does (a warning, then its default): an id past the vocabulary names no token."""
    path = write_gguf(tmp_path / "range.gguf", {Keys.BOS_ID: (len(TOKENS), ValueType.UINT32), Keys.EOS_ID: (-1, ValueType.INT32)})
    assert read_gguf_vocabulary(path).roles == {"unk": 0}


def test_bad_utf8_in_a_token_is_replaced(tmp_path):
    path = write_gguf(tmp_path / "utf8.gguf", {Keys.LIST: ([b"<unk>", b"\xff\xfe", *[t.encode() for t in TOKENS[2:]]], ValueType.ARRAY, ValueType.STRING)})
    assert read_gguf_vocabulary(path).token_to_id["\ufffd\ufffd"] == 1


# --- damaged and hostile files -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[bytes], bytes]  # valid file bytes -> damaged bytes
    phrase: str
    cli: bool = True  # starts with the GGUF magic, so the command line reads it as GGUF


def rewritten(edit: dict) -> Callable[[bytes], bytes]:
    def build(_valid: bytes, edit=edit) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return write_gguf(Path(d) / "x.gguf", edit).read_bytes()

    return build


HUGE = 2**62
CASES = {
    "wrong magic": Case(lambda v: b"GGML" + v[4:], "is not a GGUF file", cli=False),
    "empty file": Case(lambda v: b"", "is not a GGUF file", cli=False),
    "header cut short": Case(lambda v: v[:10], "truncated GGUF header (10 bytes of 24)"),
    "version 1": Case(lambda v: patch(v, 4, "<I", 1), "GGUF version 1 is not supported"),
    "version 4": Case(lambda v: patch(v, 4, "<I", 4), "GGUF version 4 is not supported"),
    "big-endian": Case(lambda v: patch(v, 4, ">I", 3), "big-endian"),
    "key count 2**62": Case(lambda v: patch(v, 16, "<Q", HUGE), f"declares {HUGE} metadata keys"),
    "one key more than written": Case(lambda v: patch(v, 16, "<Q", struct.unpack_from("<Q", v, 16)[0] + 1), "truncated GGUF metadata"),
    "key length 2**64-1": Case(lambda v: patch(v, 24, "<Q", 2**64 - 1), "truncated GGUF metadata: metadata key 0"),
    "token count 2**62": Case(lambda v: patch(v, key_end(v, Keys.LIST) + 8, "<Q", HUGE), f"'tokenizer.ggml.tokens' declares {HUGE} elements"),
    "token length 2**62": Case(lambda v: patch(v, key_end(v, Keys.LIST) + 16, "<Q", HUGE), "truncated GGUF metadata: the value of 'tokenizer.ggml.tokens'"),
    "score count 2**62 (a key not used)": Case(lambda v: patch(v, key_end(v, Keys.SCORES) + 8, "<Q", HUGE), f"'tokenizer.ggml.scores' declares {HUGE} elements"),
    "name length 2**62 (a key not used)": Case(lambda v: patch(v, key_end(v, gguf.Keys.General.NAME) + 4, "<Q", HUGE), "the value of 'general.name'"),
    "unknown value type": Case(lambda v: patch(v, key_end(v, gguf.Keys.General.NAME), "<I", 13), "'general.name' has unknown value type 13"),
    "value type 2**32-1": Case(lambda v: patch(v, key_end(v, Keys.LIST), "<I", 2**32 - 1), "unknown value type 4294967295"),
    "unknown array element type": Case(lambda v: patch(v, key_end(v, Keys.LIST) + 4, "<I", 13), "is an array of unknown value type 13"),
    "arrays nested 9 deep": Case(rewritten({"tokenizer.test.deep": ([[[[[[[[[1]]]]]]]]], ValueType.ARRAY)}), "nests arrays more than 8 deep"),
    "a key twice": Case(lambda v: v.replace(Keys.EOS_ID.encode(), Keys.BOS_ID.encode()), f"GGUF key {Keys.BOS_ID!r} appears twice"),
    "no tokens": Case(rewritten({Keys.LIST: None}), "GGUF file holds no tokenizer"),
    "empty token array": Case(lambda v: raw_gguf(kv(Keys.LIST, ValueType.ARRAY, struct.pack("<IQ", ValueType.STRING, 0))), "GGUF file holds no tokenizer"),
    "tokens of ints": Case(rewritten({Keys.LIST: (list(range(9)), ValueType.ARRAY, ValueType.INT32)}), "'tokenizer.ggml.tokens' is an array of integers, not an array of strings"),
    "tokens a string": Case(rewritten({Keys.LIST: ("<unk>", ValueType.STRING)}), "'tokenizer.ggml.tokens' is a string, not an array of strings"),
    "tokens of arrays": Case(rewritten({Keys.LIST: ([["a"], ["b"]], ValueType.ARRAY)}), "is an array of arrays, not an array of strings"),
    "token types of strings": Case(rewritten({Keys.TOKEN_TYPE: (["1"] * 9, ValueType.ARRAY, ValueType.STRING)}), "'tokenizer.ggml.token_type' is an array of strings, not an array of integers"),
    "token types of bools": Case(rewritten({Keys.TOKEN_TYPE: ([True] * 9, ValueType.ARRAY, ValueType.BOOL)}), "is an array of bools, not an array of integers"),
    "token types a number": Case(rewritten({Keys.TOKEN_TYPE: (1, ValueType.INT32)}), "'tokenizer.ggml.token_type' is an integer, not an array of integers"),
    "token types too few": Case(rewritten({Keys.TOKEN_TYPE: ([1, 1, 3], ValueType.ARRAY, ValueType.INT32)}), "'tokenizer.ggml.token_type' has 3 entries for 9 tokens"),
    "bos id a string": Case(rewritten({Keys.BOS_ID: ("1", ValueType.STRING)}), "'tokenizer.ggml.bos_token_id' is a string, not a token id"),
    "eos id a float": Case(rewritten({Keys.EOS_ID: (2.0, ValueType.FLOAT32)}), "'tokenizer.ggml.eos_token_id' is a float, not a token id"),
    "unk id a bool": Case(rewritten({Keys.UNK_ID: (False, ValueType.BOOL)}), "'tokenizer.ggml.unknown_token_id' is a bool, not a token id"),
    "pad id an array": Case(rewritten({Keys.PAD_ID: ([0], ValueType.ARRAY, ValueType.UINT32)}), "'tokenizer.ggml.padding_token_id' is an array of integers, not a token id"),
    "model a number": Case(rewritten({Keys.MODEL: (1, ValueType.UINT32)}), "'tokenizer.ggml.model' is an integer, not a string"),
    "tokens after a 2**62 count in raw bytes": Case(
        lambda v: raw_gguf(kv("tokenizer.x", ValueType.ARRAY, struct.pack("<IQ", ValueType.UINT8, HUGE)), tokens_kv()), f"declares {HUGE} elements"
    ),
}


def read_under_watch(path: Path) -> SurgeryError:
    """read_gguf_vocabulary's SurgeryError, with the memory Python allocated on the way measured."""
    tracemalloc.start()
    try:
        with pytest.raises(SurgeryError) as caught:
            read_gguf_vocabulary(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated reading a {path.stat().st_size}-byte file"
    return caught.value


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_rejects(name, valid, tmp_path):
    c = CASES[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(c.build(valid))
    error = read_under_watch(path)
    assert error.place == str(path), error
    assert c.phrase in error.problem, error.problem
    if c.cli:  # read by content, as a tokenizer file of any name
        with pytest.raises(SurgeryError, match="GGUF"):
            load_vocabulary(path)


def test_cut_short_at_every_byte(valid, tmp_path):
    """Every proper prefix of the file is an error that says where the metadata ends early."""
    path = tmp_path / "cut.gguf"
    problems = set()
    for n in range(len(valid)):
        path.write_bytes(valid[:n])
        with pytest.raises(SurgeryError) as caught:
            read_gguf_vocabulary(path)
        assert caught.value.place == str(path)
        problem = caught.value.problem
        if n < 24:
            assert problem.startswith("is not a GGUF file" if n < 4 else "truncated GGUF header"), (n, problem)
        else:  # a cut field, or a count the bytes left cannot hold
            assert problem.startswith("truncated GGUF metadata: ") or "more than the" in problem, (n, problem)
        problems.add(problem.split(" at byte")[0].split(" more than")[0])
    # The cuts fall in every kind of field: keys, value types, strings, array headers, elements.
    assert {
        "GGUF header declares 10 metadata keys,",
        f"GGUF key {Keys.LIST!r} declares 9 elements,",
        "truncated GGUF metadata: metadata key 3",
        f"truncated GGUF metadata: the value type of {Keys.LIST!r}",
        f"truncated GGUF metadata: the array header of {Keys.LIST!r}",
        f"truncated GGUF metadata: the value of {Keys.LIST!r}",
        f"truncated GGUF metadata: the value of {Keys.BOS_ID!r}",
    } <= problems
    path.write_bytes(valid)
    assert len(read_gguf_vocabulary(path).token_to_id) == len(TOKENS)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(SurgeryError, match="cannot read the GGUF file: No such file"):
        read_gguf_metadata(tmp_path / "nowhere.gguf")
    with pytest.raises(SurgeryError, match="cannot read the GGUF file"):
        read_gguf_metadata(tmp_path)  # a folder


# --- through the command line --------------------------------------------------------------------

CLI_CASES = sorted(name for name, c in CASES.items() if c.cli)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_rejects(name, valid, gpt2_source, german_helper, tmp_path, capsys):
    """`inspect SOURCE --against HELPER --source-tokenizer bad.gguf`, in this process (cli.main,
    the command's own code path): exit 1, one `error: bad.gguf: ...` line, the file untouched."""
    from clpsurgery.cli import main

    path = tmp_path / "bad.gguf"
    path.write_bytes(CASES[name].build(valid))
    before = sha256_of(path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["inspect", str(gpt2_source), "--against", str(german_helper), "--source-tokenizer", str(path)])
    captured = capsys.readouterr()
    assert exited.value.code == 1, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n") and captured.out == "", captured
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert CASES[name].phrase in lines[0] and "internal error" not in lines[0], lines[0]
    assert sha256_of(path) == before


def test_cli_process_rejects_a_huge_count(valid, gpt2_source, german_helper, tmp_path):
    """The same through `python -m clpsurgery init` in a process of its own: exit code 1, one
    stderr line, no traceback, no output folder."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(CASES["token count 2**62"].build(valid))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "clpsurgery", "init", "--quiet", "--source-tokenizer", str(path), str(gpt2_source), str(german_helper), str(out)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"error: {path}: GGUF key 'tokenizer.ggml.tokens' declares {HUGE} elements, more than the {len(valid) - key_end(valid, Keys.LIST) - 16} bytes left can hold\n"
    assert not out.exists()
