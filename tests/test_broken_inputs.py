"""Broken inputs through `clpsurgery init`: one table, case -> how to build it -> the phrase it must give.

Every case starts from the real fixtures (a GPT-2 source with the GPT-2 vocabulary, a German
helper), copied into tmp_path and then damaged. Each run must end with exit code 1 and exactly
one stderr line, `error: ...`, naming the file and the problem, with no traceback; the inputs must
be byte-identical afterwards (hashed before and after) and OUT absent, or exactly as it was.

The table runs init in this process (`cli.main`, the same code path as the command; importing
torch once instead of once per case); the cases that need a process of their own (unreadable
files, with privileges dropped; --debug) start one. The header-level cases are checked more
widely through `inspect` and the library in test_hostile_files.py; here they go through init.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clpsurgery.cli import main
from clpsurgery.formats.output_folder import PARTIAL_TAG
from clpsurgery.pipeline.options import DEFAULT_METHOD
from conftest import EMBEDDING, Env, copy_tokenizer_only, shard, shared_token_source_id, tree_hashes


# --- building damaged inputs ---------------------------------------------------------------------


@dataclass
class Case:
    source: Path
    helper: Path
    out: Path
    named: str  # what the error line must name (a path or a file name)
    phrase: str  # what it must say
    options: list[str] = field(default_factory=list)
    unsaid: str | None = None  # what it must not say (advice that cannot work there)

    @property
    def args(self) -> list[str]:
        return [str(self.source), str(self.helper), str(self.out), *self.options]


def split_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, doc: dict, data: bytes) -> None:
    header = json.dumps(doc, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> Path:
    doc, data = split_header(path)
    edit(doc)
    write_header(path, doc, data)
    return path


def in_data_order(doc: dict) -> list[str]:
    return sorted((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])


def shift(doc: dict, name: str, by: int) -> None:
    begin, end = doc[name]["data_offsets"]
    doc[name]["data_offsets"] = [begin + by, end + by]


def poison_row(path: Path, tensor: str, row: int, value: float) -> None:
    doc, data = split_header(path)
    entry = doc[tensor]
    assert entry["dtype"] == "F32"
    width = entry["shape"][1]
    start = entry["data_offsets"][0] + row * width * 4
    data = bytearray(data)
    data[start : start + 4] = struct.pack("<f", value)
    write_header(path, doc, bytes(data))


def previous_output(env: Env) -> Path:
    """A real clpsurgery output in tmp/out (for the --force cases)."""
    out = env.tmp / "out"
    run_main(["init", "--quiet", str(env.source), str(env.helper), str(out)], expect=0)
    return out


# --- the table -------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Env], Case]] = {}


def case(fn: Callable[[Env], Case]) -> Callable[[Env], Case]:
    CASES[fn.__name__] = fn
    return fn


@case
def truncated_file(env: Env) -> Case:
    src = env.src()
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "truncated")


@case
def truncated_shard(env: Env) -> Case:
    src = env.src()
    _, second = shard(src)
    second.write_bytes(second.read_bytes()[:-7])
    return Case(src, env.helper, env.tmp / "out", second.name, "truncated")


@case
def header_length_beyond_file(env: Env) -> Case:
    src = env.src()
    weights = src / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    weights.write_bytes(bytes(raw))
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "runs past the end of the file")


@case
def header_not_json(env: Env) -> Case:
    src = env.src()
    weights = src / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8] = ord("x")  # the opening brace
    weights.write_bytes(bytes(raw))
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "header is not valid JSON")


@case
def overlapping_offsets(env: Env) -> Case:
    src = env.src()
    edit_header(src / "model.safetensors", lambda doc: shift(doc, in_data_order(doc)[1], -4))
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "overlaps the previous tensor")


@case
def gapped_offsets(env: Env) -> Case:
    src = env.src()
    edit_header(src / "model.safetensors", lambda doc: shift(doc, in_data_order(doc)[1], 4))
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "gap of 4 bytes")


@case
def wrong_byte_count(env: Env) -> Case:
    src = env.src()

    def grow(doc: dict) -> None:
        doc[EMBEDDING]["shape"][0] += 1

    edit_header(src / "model.safetensors", grow)
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "needs")


@case
def unknown_dtype(env: Env) -> Case:
    src = env.src()

    def retype(doc: dict) -> None:
        doc[EMBEDDING]["dtype"] = "F33"

    edit_header(src / "model.safetensors", retype)
    return Case(src, env.helper, env.tmp / "out", "model.safetensors", "unknown dtype 'F33'")


@case
def index_names_missing_shard(env: Env) -> Case:
    src = env.src()
    _, second = shard(src)
    second.unlink()
    return Case(src, env.helper, env.tmp / "out", "model.safetensors.index.json", f"{second.name!r}, which is missing")


@case
def index_names_tensor_twice(env: Env) -> Case:
    src = env.src()
    first, second = shard(src)
    index = src / "model.safetensors.index.json"
    text = index.read_text()
    # The same key twice in weight_map: Python's json would keep the last one silently.
    duplicated = text.replace(f'"{EMBEDDING}": "{first.name}"', f'"{EMBEDDING}": "{second.name}",\n    "{EMBEDDING}": "{first.name}"')
    assert duplicated != text
    index.write_text(duplicated)
    return Case(src, env.helper, env.tmp / "out", index.name, f"names {EMBEDDING!r} twice")


@case
def tensor_in_two_shards(env: Env) -> Case:
    src = env.src()
    first, second = shard(src)

    def add_copy(doc: dict) -> None:  # shard 2 also holds the position embedding, at its end
        last = max(e["data_offsets"][1] for k, e in doc.items() if k != "__metadata__")
        doc["transformer.wpe.weight"] = {"dtype": "F32", "shape": [1, 1], "data_offsets": [last, last + 4]}

    doc, data = split_header(second)
    add_copy(doc)
    write_header(second, doc, data + bytes(4))
    return Case(src, env.helper, env.tmp / "out", second.name, "'transformer.wpe.weight' also in")


@case
def index_entry_outside_folder(env: Env) -> Case:
    src = env.src()
    first, second = shard(src)
    outside = env.tmp / second.name
    shutil.copyfile(second, outside)
    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = {k: (f"../{v}" if v == second.name else v) for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    return Case(src, env.helper, env.tmp / "out", index.name, "points outside the folder")


@case
def config_missing(env: Env) -> Case:
    src = env.src()
    (src / "config.json").unlink()
    return Case(src, env.helper, env.tmp / "out", "config.json", "not found")


@case
def config_not_json(env: Env) -> Case:
    src = env.src()
    (src / "config.json").write_text('{"model_type": "gpt2", ')
    return Case(src, env.helper, env.tmp / "out", str(src / "config.json"), "not valid JSON")


@case
def helper_config_not_json(env: Env) -> Case:
    hlp = env.hlp()
    (hlp / "config.json").write_bytes(b"\xff\xfe not json")
    return Case(env.source, hlp, env.tmp / "out", str(hlp / "config.json"), "not valid JSON")


@case
def source_tokenizer_missing(env: Env) -> Case:
    src = env.src()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model"):
        (src / name).unlink(missing_ok=True)
    return Case(src, env.helper, env.tmp / "out", "tokenizer.json", "not found")


@case
def helper_tokenizer_missing(env: Env) -> Case:
    hlp = env.hlp()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model"):
        (hlp / name).unlink(missing_ok=True)
    return Case(env.source, hlp, env.tmp / "out", str(hlp), "tokenizer not found")


@case
def helper_tokenizer_corrupt(env: Env) -> Case:
    hlp = env.hlp()
    path = hlp / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return Case(env.source, hlp, env.tmp / "out", str(path), "cannot read the tokenizer")


# The JSON files beside a tokenizer travel into OUT as they are: each must be a JSON object.


@case
def helper_special_tokens_map_not_json(env: Env) -> Case:
    hlp = env.hlp()
    (hlp / "special_tokens_map.json").write_text('{"eos_token": "</s>", ')
    return Case(env.source, hlp, env.tmp / "out", str(hlp / "special_tokens_map.json"), "not valid JSON")


@case
def helper_tokenizer_config_not_an_object(env: Env) -> Case:
    hlp = env.hlp()
    (hlp / "tokenizer_config.json").write_text('["</s>"]')
    return Case(env.source, hlp, env.tmp / "out", str(hlp / "tokenizer_config.json"), "not a JSON object")


@case
def helper_added_tokens_not_json(env: Env) -> Case:
    hlp = env.hlp()
    (hlp / "added_tokens.json").write_bytes(b"\xff not json")
    return Case(env.source, hlp, env.tmp / "out", str(hlp / "added_tokens.json"), "not valid JSON")


@case
def source_special_tokens_map_not_json(env: Env) -> Case:
    src = env.src()
    (src / "special_tokens_map.json").write_text("eos_token: <|endoftext|>\n")
    return Case(src, env.helper, env.tmp / "out", str(src / "special_tokens_map.json"), "not valid JSON")


@case
def helper_embedding_too_few_rows(env: Env) -> Case:
    hlp = env.hlp()

    def shrink(doc: dict) -> None:
        # Keep the bytes, relabel: 1000 rows of twice the width (then the width check would
        # fire first, so give the config the new width too).
        rows, width = doc[EMBEDDING]["shape"]
        doc[EMBEDDING]["shape"] = [1000, rows * width // 1000]

    doc, _ = split_header(hlp / "model.safetensors")
    rows, width = doc[EMBEDDING]["shape"]
    assert rows * width % 1000 == 0
    edit_header(hlp / "model.safetensors", shrink)
    config = json.loads((hlp / "config.json").read_text())
    config["n_embd"] = rows * width // 1000
    (hlp / "config.json").write_text(json.dumps(config))
    return Case(env.source, hlp, env.tmp / "out", str(hlp), "fewer than its tokenizer's")


@case
def helper_hidden_size_mismatch(env: Env) -> Case:
    hlp = env.hlp()
    config = json.loads((hlp / "config.json").read_text())
    config["n_embd"] = config["n_embd"] * 2
    (hlp / "config.json").write_text(json.dumps(config))
    return Case(env.source, hlp, env.tmp / "out", str(hlp), "does not match hidden size")


@case
def no_embedding_tensor(env: Env) -> Case:
    src = env.src()

    def rename(doc: dict) -> None:
        doc["transformer.something_else.weight"] = doc.pop(EMBEDDING)

    edit_header(src / "model.safetensors", rename)
    return Case(src, env.helper, env.tmp / "out", str(src), "embedding")


@case
def zero_overlap(env: Env) -> Case:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from clpsurgery.pipeline.demo import gpt2_config, gpt2_tensors, write_model_folder

    vocab = {f"§{i}§": i for i in range(64)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="§0§"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    hlp = env.tmp / "helper"
    config = gpt2_config(64, n_embd=8, n_layer=1, n_head=1, bos=0, eos=0)
    write_model_folder(hlp, config, gpt2_tensors(config, __import__("torch").float32, seed=0))
    tokenizer.save(str(hlp / "tokenizer.json"))
    return Case(env.source, hlp, env.tmp / "out", str(hlp), "shares no token")


@case
def nan_in_copied_source_row(env: Env) -> Case:
    src = env.src()
    row = shared_token_source_id(env.source, env.helper)
    poison_row(src / "model.safetensors", EMBEDDING, row, float("nan"))
    return Case(src, env.helper, env.tmp / "out", str(src), f"NaN or Inf in row {row}")


@case
def inf_in_helper_row(env: Env) -> Case:
    hlp = env.hlp()
    poison_row(hlp / "model.safetensors", EMBEDDING, 5, float("inf"))
    return Case(env.source, hlp, env.tmp / "out", str(hlp), "NaN or Inf in row 5")


@case
def helper_tokenizer_only_default_method(env: Env) -> Case:
    hlp = copy_tokenizer_only(env.helper, env.tmp / "helper-tokenizer")
    why = f"--method {DEFAULT_METHOD} needs the helper's weights, and this folder has no .safetensors file; --method fvt needs only its tokenizer"
    return Case(env.source, hlp, env.tmp / "out", str(hlp), why)


@case
def helper_tokenizer_only_head_method(env: Env) -> Case:
    # The input side is helper-free; the output head's method is the one that reads the weights.
    hlp = copy_tokenizer_only(env.helper, env.tmp / "helper-tokenizer")
    why = "--head-method clp needs the helper's weights, and this folder has no .safetensors file; --head-method fvt needs only its tokenizer"
    return Case(env.source, hlp, env.tmp / "out", str(hlp), why, ["--method", "fvt", "--untie-head", "--head-method", "clp"], unsaid="--method")


@case
def out_exists(env: Env) -> Case:
    out = env.tmp / "out"
    out.mkdir()
    (out / "weeks-of-training.safetensors").write_bytes(b"precious")
    return Case(env.source, env.helper, out, str(out), "already exists and is not a clpsurgery output", unsaid="--force")


@case
def out_is_a_file(env: Env) -> Case:
    out = env.tmp / "out"
    out.write_bytes(b"precious")
    return Case(env.source, env.helper, out, str(out), "is not a clpsurgery output", unsaid="--force")


@case
def out_is_a_previous_output(env: Env) -> Case:
    out = previous_output(env)
    return Case(env.source, env.helper, out, str(out), "a previous clpsurgery output; pass --force to replace it")


@case
def out_ours_but_holds_a_user_file(env: Env) -> Case:
    out = previous_output(env)
    (out / "notes-from-fine-tuning.txt").write_text("keep me")
    return Case(env.source, env.helper, out, str(out), "'notes-from-fine-tuning.txt', which its clpsurgery.json does not list", unsaid="pass --force")


@case
def out_exists_force_not_ours(env: Env) -> Case:
    out = env.tmp / "out"
    out.mkdir()
    (out / "weeks-of-training.safetensors").write_bytes(b"precious")
    return Case(env.source, env.helper, out, str(out), "is not a clpsurgery output", ["--force"])


@case
def out_is_a_file_force(env: Env) -> Case:
    out = env.tmp / "out"
    out.write_bytes(b"precious")
    return Case(env.source, env.helper, out, str(out), "is not a clpsurgery output", ["--force"])


@case
def out_ours_but_holds_a_user_file_force(env: Env) -> Case:
    out = previous_output(env)
    (out / "notes-from-fine-tuning.txt").write_text("keep me")
    return Case(env.source, env.helper, out, str(out), "'notes-from-fine-tuning.txt', which its clpsurgery.json does not list", ["--force"])


@case
def out_ours_with_user_folder_force(env: Env) -> Case:
    out = previous_output(env)
    (out / "checkpoint-1000").mkdir()
    (out / "checkpoint-1000" / "model.safetensors").write_bytes(b"precious")
    return Case(env.source, env.helper, out, str(out), "'checkpoint-1000'", ["--force"])


@case
def out_is_source(env: Env) -> Case:
    src = env.src()
    return Case(src, env.helper, src, str(src), "is SOURCE or inside it", ["--force"])


@case
def out_inside_source(env: Env) -> Case:
    src = env.src()
    return Case(src, env.helper, src / "de", str(src / "de"), "is SOURCE or inside it")


@case
def out_inside_helper(env: Env) -> Case:
    hlp = env.hlp()
    return Case(env.source, hlp, hlp / "sub" / "de", str(hlp / "sub" / "de"), "is HELPER or inside it")


@case
def source_inside_out_force(env: Env) -> Case:
    # A source file kept inside a previous output: replacing that output would delete it.
    out = previous_output(env)
    lone = out / "model.safetensors"
    return Case(lone, env.helper, out, str(out), "holds SOURCE", ["--force", "--source-tokenizer", str(env.source), "--source-config", str(env.source)])


# --- running and checking ---------------------------------------------------------------------------


def run_main(args: list[str], expect: int | None = None) -> int:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if expect is not None:
        assert code == expect, args
    return code


def snapshot(path: Path) -> object:
    """What a path is: absent, a file's bytes hash, or a folder's hashes."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    return tree_hashes(path)


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{PARTIAL_TAG}*"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_rejects(name, gpt2_source, german_helper, tmp_path, capsys):
    env = Env(tmp_path, gpt2_source, german_helper)
    c = CASES[name](env)
    capsys.readouterr()
    inputs_before = {str(p): tree_hashes(p if p.is_dir() else p.parent) for p in (c.source, c.helper)}
    out_before = snapshot(c.out)
    code = run_main(["init", "--quiet", *c.args])
    captured = capsys.readouterr()
    assert code == 1, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert c.named in lines[0], lines[0]
    assert c.phrase in lines[0], lines[0]
    assert c.unsaid is None or c.unsaid not in lines[0], lines[0]
    assert {str(p): tree_hashes(p if p.is_dir() else p.parent) for p in (c.source, c.helper)} == inputs_before
    assert snapshot(c.out) == out_before
    assert not partials(tmp_path)


def test_nan_in_a_row_not_used_is_fine(gpt2_source, german_helper, tmp_path):
    """Only the rows the target copies must be finite: a NaN elsewhere in the source is not read."""
    from tokenizers import Tokenizer

    env = Env(tmp_path, gpt2_source, german_helper)
    src = env.src()
    source_vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab()
    target_vocab = Tokenizer.from_file(str(german_helper / "tokenizer.json")).get_vocab()
    unused = next(i for t, i in sorted(source_vocab.items(), key=lambda ti: ti[1]) if t.isalpha() and len(t) > 6 and t not in target_vocab)
    poison_row(src / "model.safetensors", EMBEDDING, unused, float("nan"))
    run_main(["init", "--quiet", str(src), str(german_helper), str(tmp_path / "out")], expect=0)


def test_debug_shows_the_traceback(gpt2_source, german_helper, tmp_path):
    env = Env(tmp_path, gpt2_source, german_helper)
    c = header_not_json(env)
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", "init", "--debug", *c.args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "SurgeryError" in proc.stderr and "header is not valid JSON" in proc.stderr
    assert not c.out.exists()


# --- wrong options -------------------------------------------------------------------------------------

# Every option error, click's own and those TransferOptions finds, is one `error:` line and exit
# code 2 (the command line is wrong); a file's or a model's problem is exit code 1.
WRONG_OPTIONS = [
    (["--blend", "1.5"], "error: --blend: is a share between 0 and 1, not 1.5"),
    (["--temperature", "0"], "error: --temperature: must be positive, not 0.0"),
    (["--top-k", "0"], "error: --top-k: 0 is not a positive integer"),
    (["--method", "nope"], "error: --method: 'nope' is not one of 'clp', 'omp', 'fvt', 'clp+fvt'."),
    (["--max-memory", "3"], "error: --max-memory: '3' is below 1 MiB"),
    (["--nope"], "error: clpsurgery init: No such option '--nope'."),
    (["--method", "omp", "--top-k", "all"], "error: --top-k: omp picks a few atoms per token"),
]


@pytest.mark.parametrize("options,line", WRONG_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_wrong_option_exits_2_in_one_line(options, line, gpt2_source, german_helper, tmp_path, capsys):
    code = run_main(["init", "--quiet", *options, str(gpt2_source), str(german_helper), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(line) and captured.out == "", captured.err
    assert not (tmp_path / "out").exists()


def test_a_missing_argument_exits_2_in_one_line(gpt2_source, capsys):
    assert run_main(["init", "--quiet", str(gpt2_source)]) == 2
    err = capsys.readouterr().err
    assert err == "error: clpsurgery init: Missing argument 'HELPER'. (see 'clpsurgery init --help')\n", err


# --- unreadable files --------------------------------------------------------------------------------

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def without_root_read_override() -> None:
    """In the child, before exec: drop the two capabilities that let root read any file, so
    that a file's permission bits apply to it as to any user (it stays uid 0 and can still run
    the interpreter under /root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("which", ["source weights", "source config", "helper tokenizer"])
def test_unreadable_file(which, gpt2_source, german_helper, tmp_path):
    """A file with mode 000. Tests run as root here, and root reads anything: the run then drops
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (prctl in the child) so the mode applies."""
    env = Env(tmp_path, gpt2_source, german_helper)
    src, hlp = env.src(), env.hlp()
    target = {"source weights": src / "model.safetensors", "source config": src / "config.json", "helper tokenizer": hlp / "tokenizer.json"}[which]
    before = tree_hashes(src), tree_hashes(hlp)
    os.chmod(target, 0)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "clpsurgery", "init", "--quiet", str(src), str(hlp), str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=without_root_read_override if os.geteuid() == 0 else None,
        )
    except subprocess.SubprocessError as e:
        pytest.skip(f"environment: cannot drop root's read override here: {e}")
    finally:
        os.chmod(target, 0o644)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert str(target) in lines[0] and "Permission denied" in lines[0], lines[0]
    assert (tree_hashes(src), tree_hashes(hlp)) == before
    assert not (tmp_path / "out").exists() and not partials(tmp_path)


# --- the disk filling up --------------------------------------------------------------------------------


def mounted_tmpfs(tmp_path: Path, size: str):
    """A tmpfs of SIZE under tmp_path, unmounted afterwards; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"environment: cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the RLIMIT_FSIZE test covers the error path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (the output needs about 400 KiB)."""
    yield from mounted_tmpfs(tmp_path, "128k")


@pytest.fixture
def roomy_disk(tmp_path):
    """An 8 MiB tmpfs: room for the whole output, until a test fills it."""
    yield from mounted_tmpfs(tmp_path, "8m")


def fill_disk(folder: Path, room: int = 0) -> None:
    """Write a file in FOLDER until its disk is full, then give back ROOM bytes: a write there past
    them fails with ENOSPC."""
    with open(folder / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        filler.truncate(filler.tell() - room)


def test_disk_full(small_disk, gpt2_source, german_helper, capsys):
    out = small_disk / "out"
    before = tree_hashes(gpt2_source), tree_hashes(german_helper)
    code = run_main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(out) in lines[0] and "the disk is full" in lines[0] and "No space left on device" in lines[0], lines[0]
    assert os.listdir(small_disk) == [], "the partial output must be removed"
    assert (tree_hashes(gpt2_source), tree_hashes(german_helper)) == before


# the room left on the disk as the stage starts: two pages hold config.json and
# generation_config.json, not the tokenizer.json copied from HELPER after them
@pytest.mark.parametrize("stage,room", [("_write_side_files", 8192), ("write_record", 0)])
def test_disk_full_after_the_weights(stage, room, roomy_disk, gpt2_source, german_helper, capsys, monkeypatch):
    """The disk filling once the weights are written, as the side files (a tokenizer.json copied
    from HELPER) or the transfer record are written: the disk of OUT is full, not the input's."""
    from clpsurgery.pipeline import transfer

    writes = getattr(transfer, stage)

    def on_a_full_disk(*args, **kwargs):
        fill_disk(roomy_disk, room)
        return writes(*args, **kwargs)

    monkeypatch.setattr(transfer, stage, on_a_full_disk)
    out = roomy_disk / "out"
    code = run_main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}") and "Traceback" not in err, err
    assert "the disk is full (No space left on device)" in lines[0] and "partial output was removed" in lines[0], lines[0]
    assert os.listdir(roomy_disk) == ["filler"], "the partial output must be removed"


def test_file_size_limit(gpt2_source, german_helper, tmp_path, capsys):
    """The same error path without a small disk: RLIMIT_FSIZE makes the kernel refuse writes past
    64 KiB with EFBIG (Python ignores SIGXFSZ), as an unprivileged stand-in for a full disk."""
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        code = run_main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(out) in lines[0] and "cannot write the output (File too large)" in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == []


# --- interrupted --force runs ---------------------------------------------------------------------------


def test_previous_output_set_aside_by_a_killed_force_run_is_put_back(gpt2_source, german_helper, tmp_path):
    """A --force run killed between renaming OUT aside and renaming the new one in: the next run
    puts the previous output back, and then refuses to replace it without --force."""
    out = tmp_path / "out"
    run_main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)], expect=0)
    before = tree_hashes(out)
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    out.rename(tmp_path / f".out.clpsurgery-old-{dead_pid}")
    (tmp_path / f".out{PARTIAL_TAG}{dead_pid}").mkdir()
    assert run_main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)]) == 1
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
