"""Replaying a transfer (issue 17): init saves its decisions beside the output, and `apply TRANSFER
SIBLING OUT` rebuilds the same rows from a sibling checkpoint, with no helper."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.replay import TRANSFER_NAME
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output

from conftest import tree_hashes


def tensors_of(folder) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as ckpt:
        return {name: as_tensor(ckpt.read_tensor(name)).clone() for name in ckpt.tensors}


def one_line_error(args) -> str:
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", *args], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    ("source_fixture", "options"),
    [
        ("llama_source", []),
        ("gpt2_source", ["--untie-head", "--head-method", "fvt", "--piece-weighting", "first-last"]),
        ("llama_source", ["--method", "omp", "--top-k", "3"]),
    ],
)
def test_apply_on_the_source_reproduces_init(request, source_fixture, options, german_helper, tmp_path):
    """Every file apply writes is init's byte for byte, the record included; only the manifest
    (its command, time and inputs) differs."""
    source = request.getfixturevalue(source_fixture)
    first, again = tmp_path / "init", tmp_path / "apply"
    main(["init", "--quiet", *options, str(source), str(german_helper), str(first)])
    assert (first / TRANSFER_NAME).is_file()
    main(["apply", "--quiet", "--max-memory", "64MiB", str(first), str(source), str(again)])
    ours, theirs = tree_hashes(first), tree_hashes(again)
    ours.pop("clpsurgery.json")
    theirs.pop("clpsurgery.json")
    assert ours == theirs
    manifest = json.loads((again / "clpsurgery.json").read_text())
    assert manifest["inputs"]["helper"] == {"path": str(first), "files": []}
    assert all(c.ok is not False for c in verify_output(again, source))


def test_apply_on_a_fine_tuned_sibling(llama_source, german_helper, tmp_path):
    """A sibling with every weight changed: its shared rows are copied, its new rows are the
    recorded weights times its own rows (float64 reference), every other tensor is its own."""
    from safetensors.numpy import safe_open

    sibling = tmp_path / "sibling"
    shutil.copytree(llama_source, sibling)
    tensors = tensors_of(llama_source)
    g = torch.Generator().manual_seed(7)
    tuned = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in tensors.items()}
    from safetensors.torch import save_file

    save_file(tuned, str(sibling / "model.safetensors"), metadata={"format": "pt"})
    first, out = tmp_path / "init", tmp_path / "out"
    main(["init", "--quiet", str(llama_source), str(german_helper), str(first)])
    main(["apply", "--quiet", str(first), str(sibling), str(out)])
    written = tensors_of(out)
    with safe_open(str(first / TRANSFER_NAME), "np") as f:
        record = {n: f.get_tensor(n) for n in f.keys()}
    target_ids, source_ids = record["overlap.target_ids"], record["overlap.source_ids"]
    rows = np.concatenate([source_ids, record["input.extra_source_ids"]])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        mine, theirs = written[name], tuned[name]
        assert torch.equal(mine[torch.from_numpy(target_ids)], theirs[torch.from_numpy(source_ids)])
        expected = np.einsum("mk,mkd->md", record["input.weights"].astype(np.float64), theirs.double().numpy()[rows][record["input.positions"]])
        got = mine[torch.from_numpy(record["missing_ids"])].double().numpy()
        assert np.allclose(got, expected, rtol=2**-7, atol=1e-6)  # bf16 rows
    for name in tuned:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(written[name], tuned[name]), name
    assert all(c.ok is not False for c in verify_output(out, sibling))


def test_apply_refuses_another_vocabulary(gpt2_source, llama_source, german_helper, tmp_path):
    """The LLaMA source and the GPT-2 source share the GPT-2 vocabulary but not their shapes; a
    sibling with two tokens' ids swapped has the shapes but not the vocabulary: one line each."""
    first = tmp_path / "init"
    main(["init", "--quiet", str(llama_source), str(german_helper), str(first)])
    err = one_line_error(["apply", "--quiet", str(first), str(gpt2_source), str(tmp_path / "a")])
    assert "differ from the source's" in err
    sibling = tmp_path / "sibling"
    shutil.copytree(llama_source, sibling)
    data = json.loads((sibling / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids
    (sibling / "tokenizer.json").write_text(json.dumps(data))
    err = one_line_error(["apply", "--quiet", str(first), str(sibling), str(tmp_path / "b")])
    assert "not the one the transfer was made from" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_apply_needs_a_record(llama_source, german_helper, tmp_path):
    """The dense form keeps no mixing matrix, so it saves no record; a damaged record is one line."""
    dense = tmp_path / "dense"
    main(["init", "--quiet", "--method", "clp", "--top-k", "all", str(llama_source), str(german_helper), str(dense)])
    assert not (dense / TRANSFER_NAME).exists()
    err = one_line_error(["apply", "--quiet", str(dense), str(llama_source), str(tmp_path / "a")])
    assert TRANSFER_NAME in err and "not found" in err
    first = tmp_path / "init"
    main(["init", "--quiet", str(llama_source), str(german_helper), str(first)])
    damaged = tmp_path / "damaged"
    shutil.copytree(first, damaged)
    data = (damaged / TRANSFER_NAME).read_bytes()
    (damaged / TRANSFER_NAME).write_bytes(data[: len(data) // 2])
    err = one_line_error(["apply", "--quiet", str(damaged), str(llama_source), str(tmp_path / "b")])
    assert TRANSFER_NAME in err
    # positions that point past the rows, the checksums fixed up: refused before anything is read
    shutil.rmtree(damaged)
    shutil.copytree(first, damaged)

    def past_the_rows(arrays):
        arrays["input.positions"][0, 0] = 10**9

    rewrite_record(damaged, past_the_rows, fix_checksums=True)
    err = one_line_error(["apply", "--quiet", str(damaged), str(llama_source), str(tmp_path / "c")])
    assert "outside the overlap" in err
    assert not any((tmp_path / n).exists() for n in "abc")


# A record is input like any file (issue 26): a damaged or edited record, or a sibling of the
# wrong kind, is refused in one line before anything is written.


@pytest.fixture(scope="module")
def recorded_init(tmp_path_factory, llama_source, german_helper):
    """An init output with its record (top-k clp on the untied bf16 LLaMA source)."""
    first = tmp_path_factory.mktemp("recorded") / "init"
    main(["init", "--quiet", str(llama_source), str(german_helper), str(first)])
    return first


def refused(capsys, args, *named: str) -> str:
    """Run the CLI in-process: exit code 1 and exactly one `error: ` line naming each of NAMED."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for name in named:
        assert name in err, err
    return err


def nothing_written(out) -> bool:
    """Neither OUT nor a partial folder beside it."""
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


RECORD_ENTRY, CHECKSUM_KEY = "clpsurgery_transfer", "content_sha256"  # the record's metadata entry, its checksum


def rewrite_record(folder, change, fix_checksums: bool, drop_checksum: bool = False) -> None:
    """Rewrite FOLDER's record with `change(arrays)` applied; with FIX_CHECKSUMS, as an editor who
    knows the format would: the record's own checksum and the manifest's SHA-256 recomputed."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = folder / TRANSFER_NAME
    with safe_open(str(path), "np") as f:
        metadata = json.loads(f.metadata()[RECORD_ENTRY])
    arrays = load_file(str(path))
    change(arrays)
    if drop_checksum:
        metadata.pop(CHECKSUM_KEY)
    elif fix_checksums:
        from clpsurgery.pipeline.replay import record_checksum

        metadata[CHECKSUM_KEY] = record_checksum(arrays, {k: v for k, v in metadata.items() if k != CHECKSUM_KEY})
    save_file(arrays, str(path), metadata={RECORD_ENTRY: json.dumps(metadata, sort_keys=True)})
    if fix_checksums:
        manifest = json.loads((folder / "clpsurgery.json").read_text())
        for entry in manifest["outputs"]:
            if entry["file"] == TRANSFER_NAME:
                entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        (folder / "clpsurgery.json").write_text(json.dumps(manifest))


def flip_bit(path, tensor: str) -> None:
    """Flip one bit in the middle of TENSOR's bytes, the header untouched."""
    from clpsurgery.formats.safetensors_header import read_header

    begin, end = read_header(path).absolute_range(tensor)
    data = bytearray(path.read_bytes())
    data[(begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tensor", ["input.weights", "input.positions"])
def test_apply_refuses_a_flipped_bit(capsys, recorded_init, llama_source, tensor, tmp_path):
    """One flipped bit in the weights or positions: beside its manifest the record's SHA-256 no
    longer matches the manifest's; travelling alone, it no longer matches its own checksum."""
    damaged = tmp_path / "damaged"
    shutil.copytree(recorded_init, damaged)
    flip_bit(damaged / TRANSFER_NAME, tensor)
    before, source_before = tree_hashes(damaged), tree_hashes(llama_source)
    out = tmp_path / "out"
    err = refused(capsys, ["apply", "--quiet", str(damaged), str(llama_source), str(out)], str(damaged / TRANSFER_NAME), "SHA-256")
    assert "clpsurgery.json" in err
    (damaged / "clpsurgery.json").unlink()  # the record travels alone, with the tokenizer it was made for
    before.pop("clpsurgery.json")
    err = refused(capsys, ["apply", "--quiet", str(damaged), str(llama_source), str(out)], str(damaged / TRANSFER_NAME), "checksum")
    assert nothing_written(out) and tree_hashes(damaged) == before and tree_hashes(llama_source) == source_before


def test_apply_on_an_untouched_record_alone(recorded_init, llama_source, tmp_path):
    """Without the manifest beside it the record's own checksum vouches for it: apply still
    reproduces init's files byte for byte."""
    alone = tmp_path / "alone"
    shutil.copytree(recorded_init, alone)
    (alone / "clpsurgery.json").unlink()
    again = tmp_path / "again"
    main(["apply", "--quiet", str(alone), str(llama_source), str(again)])
    ours, theirs = tree_hashes(recorded_init), tree_hashes(again)
    ours.pop("clpsurgery.json")
    theirs.pop("clpsurgery.json")
    assert ours == theirs


def test_apply_refuses_an_old_record_alone(capsys, recorded_init, llama_source, tmp_path):
    """A record written before records carried a checksum is accepted where the manifest beside
    it vouches for its bytes, and refused alone: nothing else could tell a damaged one."""
    old = tmp_path / "old"
    shutil.copytree(recorded_init, old)
    rewrite_record(old, lambda arrays: None, fix_checksums=True, drop_checksum=True)
    main(["apply", "--quiet", str(old), str(llama_source), str(tmp_path / "beside")])
    ours, theirs = tree_hashes(recorded_init), tree_hashes(tmp_path / "beside")
    ours.pop("clpsurgery.json")
    theirs.pop("clpsurgery.json")
    assert ours == theirs  # the record it writes carries the checksum again
    (old / "clpsurgery.json").unlink()
    out = tmp_path / "out"
    refused(capsys, ["apply", "--quiet", str(old), str(llama_source), str(out)], str(old / TRANSFER_NAME), "no checksum")
    assert nothing_written(out)


def _overlap_beyond(arrays) -> None:
    arrays["overlap.source_ids"][3] = 50257 + 5


def _extra_beyond(arrays) -> None:
    arrays["input.extra_source_ids"] = np.concatenate([arrays["input.extra_source_ids"], np.array([50257 + 5], dtype=np.int64)])


@pytest.mark.parametrize("change", [_overlap_beyond, _extra_beyond], ids=["overlap", "extra rows"])
@pytest.mark.parametrize("fix_checksums", [False, True], ids=["as damaged", "checksums fixed"])
def test_apply_refuses_source_rows_beyond_the_sibling(capsys, recorded_init, llama_source, change, fix_checksums, tmp_path):
    """A source row id past the sibling's 50257 rows, in the overlap or the extra rows: with the
    checksums left as they were it is a damaged record; with them fixed up, the bound is named."""
    edited = tmp_path / "edited"
    shutil.copytree(recorded_init, edited)
    rewrite_record(edited, change, fix_checksums)
    before, source_before = tree_hashes(edited), tree_hashes(llama_source)
    out = tmp_path / "out"
    err = refused(capsys, ["apply", "--quiet", str(edited), str(llama_source), str(out)], str(edited / TRANSFER_NAME))
    assert ("50257 rows" in err and str(50257 + 5) in err) if fix_checksums else "SHA-256" in err, err
    assert nothing_written(out) and tree_hashes(edited) == before and tree_hashes(llama_source) == source_before


def test_apply_refuses_an_integer_embedding(capsys, recorded_init, llama_source, german_helper, tmp_path):
    """A sibling whose embedding is int32 (the shapes agree): init refuses such a source, and
    apply refuses it in the same line, naming the sibling and the dtype."""
    from safetensors.torch import save_file

    sibling = tmp_path / "sibling"
    shutil.copytree(llama_source, sibling)
    tensors = tensors_of(llama_source)
    tensors["model.embed_tokens.weight"] = (tensors["model.embed_tokens.weight"].float() * 1000).to(torch.int32)
    save_file(tensors, str(sibling / "model.safetensors"), metadata={"format": "pt"})
    before, record_before = tree_hashes(sibling), tree_hashes(recorded_init)
    out = tmp_path / "out"
    by_init = refused(capsys, ["init", "--quiet", str(sibling), str(german_helper), str(out)], str(sibling), "'model.embed_tokens.weight' is I32")
    assert refused(capsys, ["apply", "--quiet", str(recorded_init), str(sibling), str(out)]) == by_init
    assert nothing_written(out) and tree_hashes(sibling) == before and tree_hashes(recorded_init) == record_before
