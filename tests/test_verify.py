"""`clpsurgery verify`: passes on real outputs, and names what is wrong where when something is."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from clpsurgery.cli import main
from clpsurgery.pipeline.verify import verify_output
from conftest import EMBEDDING, Env, shard, shared_token_source_id


def run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def sharded_source(gpt2_source, tmp_path_factory) -> Path:
    """The GPT-2 source in two shards: embeddings in the first, every layer in the second."""
    env = Env(tmp_path_factory.mktemp("sharded"), gpt2_source, gpt2_source)
    folder = env.src()
    shard(folder)
    return folder


@pytest.fixture(scope="module")
def outputs(gpt2_source, sharded_source, german_helper, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("verify")
    made = {}
    for name, source in (("single", gpt2_source), ("sharded", sharded_source)):
        made[name] = base / name
        assert run(["init", "--quiet", str(source), str(german_helper), str(made[name])]) == 0
    return made


@pytest.fixture
def copy_of(outputs, tmp_path):
    def make(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(outputs[name], target)
        return target

    return make


def failures(out: Path, source: Path | None = None) -> list[str]:
    return [c.line() for c in verify_output(out, source) if c.ok is False]


def tensor_sha256(path: Path, tensor: str) -> str:
    header, start = data_start(path)
    begin, end = header[tensor]["data_offsets"]
    return hashlib.sha256(path.read_bytes()[start + begin : start + end]).hexdigest()


def rehash(out: Path, name: str) -> None:
    """Record a file's new hashes in the manifest: a consistent folder whose content is wrong."""
    manifest = json.loads((out / "clpsurgery.json").read_text())
    for entry in manifest["outputs"]:
        if entry["file"] == name:
            if "tensor_sha256" in entry:
                entry["tensor_sha256"] = {t: tensor_sha256(out / name, t) for t in entry["tensor_sha256"]}
            else:
                entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
            entry["bytes"] = (out / name).stat().st_size
    (out / "clpsurgery.json").write_text(json.dumps(manifest))


def data_start(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_manifest_hashes_every_file(outputs):
    """Every output file but the weights has the SHA-256 of its bytes; a weights file its header's,
    the SHA-256 of each tensor init rebuilt (the bytes it computed) and the source file the rest
    came from; a weights file copied whole its header's and its source file."""
    for name, out in outputs.items():
        manifest = json.loads((out / "clpsurgery.json").read_text())
        listed = {e["file"]: e for e in manifest["outputs"]}
        assert set(listed) | {"clpsurgery.json"} == {p.name for p in out.iterdir()}
        rebuilt = set(manifest["tensors"]["rebuilt"])
        for file, entry in listed.items():
            data = (out / file).read_bytes()
            assert entry["bytes"] == len(data)
            if file.endswith(".safetensors"):
                header, start = data_start(out / file)
                assert entry["header_sha256"] == hashlib.sha256(data[8:start]).hexdigest()
                assert "sha256" not in entry
            if "copied_from" in entry:
                assert name == "sharded" and file == "model-00002-of-00002.safetensors"
                assert entry["copied_from"] == file and "tensor_sha256" not in entry
            elif "tensor_sha256" in entry:
                assert set(entry["tensor_sha256"]) == rebuilt & set(header)
                assert entry["tensor_sha256"] == {t: tensor_sha256(out / file, t) for t in entry["tensor_sha256"]}
                assert entry["other_tensors_from"] == (file if name == "sharded" else "model.safetensors")
            else:
                assert entry["sha256"] == hashlib.sha256(data).hexdigest(), file


@pytest.mark.parametrize("name", ["single", "sharded"])
def test_real_outputs_pass(outputs, name, gpt2_source, sharded_source, capsys):
    out, source = outputs[name], {"single": gpt2_source, "sharded": sharded_source}[name]
    capsys.readouterr()
    assert run(["verify", str(out), "--source", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("PASS") for line in lines), lines
    checks = " ".join(lines)
    for what in ("files", "headers", "rebuilt tensors", "shapes", "finite", "source", "unchanged tensors", "overlap rows"):
        assert what in checks, what
    assert run(["verify", str(out)]) == 0
    assert "SKIP  against SOURCE" in capsys.readouterr().out


def test_a_flipped_byte_in_a_rebuilt_tensor(copy_of, capsys):
    out = copy_of("single")
    header, start = data_start(out / "model.safetensors")
    begin, _ = header[EMBEDDING]["data_offsets"]
    poke(out / "model.safetensors", start + begin + 5, b"\x7f")
    assert failures(out) == [f"FAIL  file model.safetensors: tensor {EMBEDDING!r}: SHA-256 " + failures(out)[0].split(": SHA-256 ")[1]]
    capsys.readouterr()
    assert run(["verify", str(out)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL")


def test_a_flipped_byte_in_a_copied_tensor_is_found_against_the_source(copy_of, gpt2_source):
    """Copied bytes are not hashed (manifest.output_files): without --source a change passes the
    size and header checks; with --source it is caught, in a rebuilt file as in one copied whole."""
    out = copy_of("single")
    header, start = data_start(out / "model.safetensors")
    begin, _ = header["transformer.h.0.mlp.c_fc.weight"]["data_offsets"]
    poke(out / "model.safetensors", start + begin + 5, b"\x7f")
    assert failures(out) == []
    assert failures(out, gpt2_source) == ["FAIL  unchanged tensors: 'transformer.h.0.mlp.c_fc.weight' differs from SOURCE"]


def test_wrong_overlap_row_and_nan_row_with_consistent_hashes(copy_of, gpt2_source, german_helper):
    out = copy_of("single")
    weights = out / "model.safetensors"
    header, start = data_start(weights)
    width = header[EMBEDDING]["shape"][1]
    begin = start + header[EMBEDDING]["data_offsets"][0]
    # The target row of a shared token: find it through the target tokenizer.
    from tokenizers import Tokenizer

    source_id = shared_token_source_id(gpt2_source, german_helper)
    token = Tokenizer.from_file(str(gpt2_source / "tokenizer.json")).id_to_token(source_id)
    target_id = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(token)
    poke(weights, begin + target_id * width * 4, struct.pack("<f", 123.0))
    rehash(out, weights.name)
    assert failures(out) == []  # consistent with its manifest...
    assert failures(out, gpt2_source) == [f"FAIL  overlap rows {EMBEDDING}: row {target_id} differs from SOURCE row {source_id}"]
    poke(weights, begin + 7 * width * 4 + 8, struct.pack("<f", float("nan")))
    rehash(out, weights.name)
    assert failures(out) == [f"FAIL  finite {EMBEDDING}: row 7 has NaN or Inf"]


def test_config_that_disagrees_with_the_weights(copy_of):
    out = copy_of("single")
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] += 64
    config["eos_token_id"] = config["vocab_size"] + 5
    (out / "config.json").write_text(json.dumps(config))
    rehash(out, "config.json")
    found = failures(out)
    assert any("config.json vocab_size" in line for line in found), found
    assert any("eos_token_id" in line and "has no row" in line for line in found), found


def test_missing_extra_and_truncated_files(copy_of):
    out = copy_of("single")
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "config.json").unlink()
    (out / "stray.bin").write_bytes(b"x")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    found = failures(out)
    assert "FAIL  file config.json: missing" in found
    assert "FAIL  file stray.bin: not written by clpsurgery (not in the manifest)" in found
    assert any(line.startswith("FAIL  file model.safetensors:") and "bytes, the manifest says" in line for line in found)
    assert any(line.startswith("FAIL  headers:") and "truncated" in line for line in found), found


def test_whole_copied_shard_is_checked_against_the_source(copy_of, sharded_source):
    """A shard copied whole has no full hash (see manifest.output_files): without --source a change
    in its data passes the size and header checks; with --source it is caught."""
    out = copy_of("sharded")
    shard2 = out / "model-00002-of-00002.safetensors"
    _, start = data_start(shard2)
    poke(shard2, start + 3, b"\x11")
    assert failures(out) == []
    assert any("differs from SOURCE" in line for line in failures(out, sharded_source))


def test_another_source_is_named(outputs, llama_source):
    found = failures(outputs["single"], llama_source)
    assert any(line.startswith("FAIL  source: SOURCE is not the checkpoint") for line in found), found


def test_not_an_output_is_one_error_line(gpt2_source, tmp_path, capsys):
    capsys.readouterr()
    assert run(["verify", str(gpt2_source)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {gpt2_source}: has no clpsurgery.json")
    assert run(["verify", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "clpsurgery.json").write_text("{")
    assert run(["verify", str(tmp_path / "bad")]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# --- checkpoints that store copies of vocab-sized tensors (issue 13) ------------------------------
#
# Older T5/mT5 exports store encoder.embed_tokens.weight and decoder.embed_tokens.weight beside
# shared.weight; older BERT masked-LM files store cls.predictions.decoder.weight and
# cls.predictions.decoder.bias beside cls.predictions.bias. init rebuilds every one of them
# (clpsurgery/architecture.py), so verify must take them as rebuilt too: from the manifest.

# kind: (the copies the source file stores: name -> the tensor it copies, the tensors init rebuilds)
STORED_COPIES = {
    "t5": (
        {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"},
        {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"},
    ),
    "bert": (
        {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.bias": "cls.predictions.bias"},
        {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias", "cls.predictions.decoder.bias"},
    ),
}


def source_with_copies(kind: str, folder: Path, tokenizer) -> Path:
    """A small model of the family built from the model library's own config class (real GPT-2
    vocabulary), saved with safetensors, then re-saved with the copies older savers wrote."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import save_model

    transformers = pytest.importorskip("transformers")
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(11)
    if kind == "t5":
        config = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config).eval()
    else:
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
        model = transformers.BertForMaskedLM(config).eval()
        with torch.no_grad():  # the library zeroes the bias: give it values, so its rows can be told apart
            model.cls.predictions.bias.copy_(torch.randn(vocab, generator=torch.Generator().manual_seed(12)))
    save_model(model, folder, tokenizer, bos="<|endoftext|>", eos="<|endoftext|>")
    tensors = load_file(folder / "model.safetensors")
    copies, _ = STORED_COPIES[kind]
    for new, existing in copies.items():
        assert new not in tensors, new
        tensors[new] = tensors[existing].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def with_copies(gpt2_tokenizer, german_helper, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (source, output of init with the German helper)."""
    made = {}
    for kind in STORED_COPIES:
        base = tmp_path_factory.mktemp(f"copies-{kind}")
        source = source_with_copies(kind, base / "source", gpt2_tokenizer)
        assert run(["init", "--quiet", "--top-k", "4", str(source), str(german_helper), str(base / "out")]) == 0
        made[kind] = (source, base / "out")
    return made


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("kind", list(STORED_COPIES))
def test_stored_copies_pass_against_the_source(with_copies, kind, capsys):
    source, out = with_copies[kind]
    _, rebuilt = STORED_COPIES[kind]
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert set(manifest["tensors"]["rebuilt"]) == rebuilt
    capsys.readouterr()
    assert run(["verify", str(out), "--source", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("PASS") for line in lines), lines
    listed = next(line for line in lines if line.startswith("PASS  rebuilt tensors:"))
    assert all(name in listed for name in rebuilt), listed
    for name in rebuilt:
        assert any(line.startswith(f"PASS  finite {name}:") for line in lines), name
        assert any(line.startswith(f"PASS  overlap rows {name}:") for line in lines), name
    shapes = next(line for line in lines if line.startswith("PASS  shapes:"))
    assert all(name in shapes for name in rebuilt), shapes
    assert any(line.startswith("PASS  unchanged tensors:") for line in lines), lines


def overlap_row_offset(out: Path, tensor: str) -> tuple[int, int, int]:
    """(byte offset in model.safetensors of an overlap row of `tensor`, its target id, its source id)."""
    from clpsurgery.pipeline.manifest import decode_pairs

    target_ids, source_ids = decode_pairs(json.loads((out / "clpsurgery.json").read_text())["overlap_pairs"])
    i = len(target_ids) // 2
    header, start = data_start(out / "model.safetensors")
    entry = header[tensor]
    row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
    return start + entry["data_offsets"][0] + int(target_ids[i]) * row_bytes, int(target_ids[i]), int(source_ids[i])


@pytest.mark.parametrize("kind, tensor", [("t5", "decoder.embed_tokens.weight"), ("t5", "encoder.embed_tokens.weight"), ("bert", "cls.predictions.decoder.bias")])
def test_a_flipped_byte_in_an_overlap_row_of_a_copy(with_copies, kind, tensor, tmp_path):
    """A copy is hashed as rebuilt (files) and its overlap rows compared with the SOURCE's own copy."""
    source, original = with_copies[kind]
    out = copy_folder(original, tmp_path)
    offset, target_id, source_id = overlap_row_offset(out, tensor)
    byte = (out / "model.safetensors").read_bytes()[offset]
    poke(out / "model.safetensors", offset, bytes([byte ^ 0xFF]))  # the lowest mantissa byte: still finite
    found = failures(out)
    assert len(found) == 1 and found[0].startswith(f"FAIL  file model.safetensors: tensor {tensor!r}: SHA-256 "), found
    overlap = f"FAIL  overlap rows {tensor}: row {target_id} differs from SOURCE row {source_id}"
    assert failures(out, source) == [found[0], overlap]
    rehash(out, "model.safetensors")  # consistent with its manifest: only the comparison with SOURCE finds it
    assert failures(out) == []
    assert failures(out, source) == [overlap]


def test_the_rebuilt_list_and_the_tensor_hashes_must_agree(with_copies, tmp_path):
    source, original = with_copies["t5"]
    out = copy_folder(original, tmp_path)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    del manifest["tensors"]["rebuilt"]["decoder.embed_tokens.weight"]
    (out / "clpsurgery.json").write_text(json.dumps(manifest))
    found = failures(out)
    assert "FAIL  rebuilt tensors: the manifest hashes 'decoder.embed_tokens.weight' as rebuilt, its list of rebuilt tensors does not name it" in found, found


def test_a_copy_of_another_shape_than_the_manifest_records(with_copies, tmp_path):
    source, original = with_copies["bert"]
    out = copy_folder(original, tmp_path)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    rows = manifest["tensors"]["rebuilt"]["cls.predictions.decoder.bias"][0]
    manifest["tensors"]["rebuilt"]["cls.predictions.decoder.bias"] = [rows, 1]
    (out / "clpsurgery.json").write_text(json.dumps(manifest))
    assert failures(out) == [f"FAIL  shapes: 'cls.predictions.decoder.bias' has shape [{rows}], the manifest says [{rows}, 1]"]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_a_manifest_without_the_rebuilt_list_still_verifies(kind, outputs, gpt2_source, with_copies, tmp_path):
    """Without tensors.rebuilt verify falls back to the embedding, head and bias the manifest
    names, and every tensor whose bytes it hashes as rebuilt (the copies among them)."""
    source, original = (gpt2_source, outputs["single"]) if kind == "gpt2" else with_copies["t5"]
    out = copy_folder(original, tmp_path)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    del manifest["tensors"]["rebuilt"]
    (out / "clpsurgery.json").write_text(json.dumps(manifest))
    checks = verify_output(out, source)
    assert all(c.ok for c in checks), [c.line() for c in checks]
    if kind == "t5":
        assert {c.what for c in checks} >= {f"overlap rows {n}" for n in STORED_COPIES["t5"][1]}
