"""`clpsurgery refine`: only the new rows change (every other tensor and row hashed before and
after), the loss goes down on a German text, a seed gives the same bytes, the manifest records the
refine and `verify` checks it, and what cannot be refined is one clear line. The outputs are real
init outputs of the fixture models (a tied GPT-2 in fp32, an untied LLaMA in bf16)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.output_folder import PARTIAL_TAG
from clpsurgery.pipeline.verify import verify_output
from conftest import PAUSE_LINE, read_until_paused, run_cli, sha256_of, tree_hashes

pytest.importorskip("transformers")

QUICK = ["--quiet", "--device", "cpu", "--steps", "12", "--batch", "4", "--seq", "48", "--lr", "1e-2"]


def refine(capsys, out: Path, text: Path, *options) -> tuple[int, str, list[str]]:
    return run_cli(["refine", out, "--text", text, *QUICK, *options], capsys)


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    with Checkpoint.open(folder) as checkpoint:
        return {name: bytes(checkpoint.raw_bytes(name)) for name in checkpoint.tensors}


def new_ids(folder: Path) -> np.ndarray:
    from clpsurgery.learning.new_rows import new_token_ids

    return new_token_ids(json.loads((folder / "clpsurgery.json").read_text()))


@pytest.fixture(scope="module")
def refined_llama(llama_output, german_text, tmp_path_factory) -> Path:
    from clpsurgery.cli import main

    before = tree_hashes(llama_output)
    destination = tmp_path_factory.mktemp("refined-llama") / "refined"
    main([str(a) for a in ["refine", llama_output, "--text", german_text, *QUICK, "--output", destination]])
    assert tree_hashes(llama_output) == before  # OUT itself is only read
    return destination


def test_only_the_new_rows_of_the_embedding_and_the_untied_head_change(llama_output, refined_llama, llama_source):
    before, after = tensor_bytes(llama_output), tensor_bytes(refined_llama)
    trained = {"model.embed_tokens.weight", "lm_head.weight"}
    assert before.keys() == after.keys()
    assert {n for n in before if before[n] != after[n]} == trained  # every other tensor byte for byte
    ids = new_ids(llama_output)
    with Checkpoint.open(llama_output) as old, Checkpoint.open(refined_llama) as new:
        for name in trained:
            assert old.info(name).dtype == new.info(name).dtype == "BF16"  # bf16 stays bf16
            rows_before, rows_after = old.read_tensor(name).data, new.read_tensor(name).data
            changed = np.flatnonzero((rows_before != rows_after).any(axis=1))
            assert set(changed.tolist()) <= set(ids.tolist())  # no shared row moved
            # every head row takes part in the softmax; an input row only where its token is read
            assert len(changed) > (0.9 * len(ids) if name == "lm_head.weight" else 20)
    for name in os.listdir(llama_output):  # every file but the weights and the manifest copied as it was
        if name not in ("model.safetensors", "clpsurgery.json"):
            assert sha256_of(llama_output / name) == sha256_of(refined_llama / name), name
    checks = verify_output(refined_llama, llama_source)
    assert all(c.ok is not False for c in checks), [c.line() for c in checks if c.ok is False]
    assert any(c.what == "refined" and c.ok for c in checks)


def test_the_loss_goes_down_and_the_manifest_says_how(refined_llama, german_text, capsys):
    manifest = json.loads((refined_llama / "clpsurgery.json").read_text())
    (record,) = manifest["refine"]
    curve = [loss for _, loss in record["loss_curve"]]
    assert len(curve) == record["steps"] == 12 and np.mean(curve[-3:]) < np.mean(curve[:3])
    held = record["held_out"]
    assert held["after"]["bpb"] < held["before"]["bpb"]
    assert held["after"]["by_target"]["new_nll_per_token"] < held["before"]["by_target"]["new_nll_per_token"]
    assert record["objective"] == "lm" and record["settings"]["seed"] == 0 and record["settings"]["learning_rate"] == 1e-2
    assert record["text"]["sha256"] == sha256_of(german_text) and record["text"]["bytes"] == german_text.stat().st_size
    assert record["text"]["trained_bytes"] + record["text"]["held_out_bytes"] == german_text.stat().st_size
    assert record["tokens"] == 12 * 4 * record["settings"]["seq"] and record["dtype"] == "BF16"
    assert record["new_rows"] == manifest["vocabulary"]["missing"]
    (weights,) = [e for e in manifest["outputs"] if e["file"] == "model.safetensors"]
    with Checkpoint.open(refined_llama) as checkpoint:
        for name, entry in record["tensors"].items():
            stored = hashlib.sha256(checkpoint.raw_bytes(name)).hexdigest()
            assert entry["sha256_after"] == weights["tensor_sha256"][name] == stored != entry["sha256_before"]
    for key in ("vocabulary", "tensors", "weights", "options", "overlap_pairs", "inputs"):  # init's record kept
        assert key in manifest
    code, out, _ = run_cli(["inspect", refined_llama], capsys)
    assert code == 0 and "refined    lm on deutsch.txt" in out and "held-out" in out


def test_verify_fails_a_refine_record_that_does_not_match(refined_llama, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(refined_llama, tampered)
    manifest = json.loads((tampered / "clpsurgery.json").read_text())
    manifest["refine"][-1]["tensors"]["lm_head.weight"]["sha256_after"] = "0" * 64
    (tampered / "clpsurgery.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(["verify", tampered], capsys)
    assert code == 1 and "FAIL  refined: 'lm_head.weight'" in out


def test_a_seed_gives_the_same_bytes_and_a_tied_model_trains_its_one_tensor(gpt2_output, gpt2_source, german_text, tmp_path, capsys):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        code, _, err = refine(capsys, gpt2_output, german_text, "--steps", "4", "--seed", seed, "--output", tmp_path / name)
        assert code == 0, err
        runs[name] = sha256_of(tmp_path / name / "model.safetensors")
    assert runs["a"] == runs["b"] != runs["c"]
    before, after = tensor_bytes(gpt2_output), tensor_bytes(tmp_path / "a")
    assert {n for n in before if before[n] != after[n]} == {"transformer.wte.weight"}  # tied: no head stored
    assert verify_output(tmp_path / "a", gpt2_source)[-1].ok


def test_in_place_and_again(gpt2_output, gpt2_source, german_text, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(gpt2_output, out)
    for run in (1, 2):
        code, stdout, err = refine(capsys, out, german_text, "--steps", "2", "--in-place")
        assert code == 0, err
        manifest = json.loads((out / "clpsurgery.json").read_text())
        assert len(manifest["refine"]) == run and f"wrote {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left beside it
    assert all(c.ok is not False for c in verify_output(out, gpt2_source))


def test_tokens_and_minutes_bound_the_training(gpt2_output, german_text, tmp_path, capsys):
    code, _, err = run_cli(["refine", gpt2_output, "--text", german_text, "--quiet", "--device", "cpu", "--batch", "2", "--seq", "32",
                            "--tokens", "200", "--output", tmp_path / "tokens"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "tokens" / "clpsurgery.json").read_text())["refine"][0]
    assert record["steps"] == 4 and record["tokens"] == 4 * 2 * 32  # ceil(200 / 64) steps
    code, _, err = run_cli(["refine", gpt2_output, "--text", german_text, "--quiet", "--device", "cpu", "--batch", "2", "--seq", "32",
                            "--minutes", "0.01", "--output", tmp_path / "minutes"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "minutes" / "clpsurgery.json").read_text())["refine"][0]
    assert record["steps"] >= 1 and record["schedule"] == "constant after warmup"


@pytest.mark.parametrize("case", ["not an output", "missing", "empty text", "binary text", "latin-1 text", "short text", "memory",
                                  "no destination", "both destinations", "two budgets", "destination exists", "destination inside"])
def test_what_cannot_be_refined_is_one_line(case, gpt2_output, gpt2_source, german_text, tmp_path, capsys):
    out, text, destination = gpt2_output, german_text, ["--output", tmp_path / "refined"]
    extra: list = []
    expected = {
        "not an output": "is not a clpsurgery output", "missing": "does not exist", "empty text": "is empty", "binary text": "is binary",
        "latin-1 text": "is not UTF-8 text", "short text": "is too short", "memory": "--max-memory: refine needs about",
        "no destination": "--output DIR) or --in-place", "both destinations": "--output DIR) or --in-place", "two budgets": "one of --steps, --tokens",
        "destination exists": "already exists", "destination inside": "lies inside OUT",
    }[case]
    if case == "not an output":
        out = gpt2_source
    elif case == "missing":
        out = tmp_path / "nothing"
    elif case in ("empty text", "binary text", "latin-1 text", "short text"):
        text = tmp_path / "text.txt"
        text.write_bytes({"empty text": b"", "binary text": b"\x00\x01\x02 Text", "latin-1 text": "Grüße\n".encode("latin-1"),
                          "short text": "Ein kurzer Satz.\nUnd noch einer.\n".encode()}[case])
    elif case == "memory":
        extra = ["--max-memory", "1MiB"]
    elif case == "no destination":
        destination = []
    elif case == "both destinations":
        extra = ["--in-place"]
    elif case == "two budgets":
        extra = ["--tokens", "100"]
    elif case == "destination exists":
        (tmp_path / "refined").mkdir()
    elif case == "destination inside":
        destination = ["--output", gpt2_output / "refined"]
    before = tree_hashes(gpt2_output)
    code, stdout, err = refine(capsys, out, text, *destination, *extra)
    # the command line's own mistakes exit 2, as every option error does; the inputs' exit 1
    assert code == (2 if case in ("no destination", "both destinations", "two budgets") else 1), (code, err)
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert tree_hashes(gpt2_output) == before
    assert case == "destination exists" or not (tmp_path / "refined").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_refine_leaves_no_output_that_looks_complete(sig, gpt2_output, german_text, tmp_path):
    """Stopped while it writes (the test hook pauses at the first byte copy): --in-place leaves OUT
    as it was; SIGINT removes the partial folder, SIGKILL cannot, and the next run does."""
    out = tmp_path / "out"
    shutil.copytree(gpt2_output, out)
    before = tree_hashes(out)
    env = dict(os.environ, CLPSURGERY_PAUSE_AT="copy", CLPSURGERY_PAUSE_SECONDS="120")
    args = [sys.executable, "-m", "clpsurgery", "refine", str(out), "--text", str(german_text), *QUICK[1:], "--steps", "2", "--in-place"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        paused = read_until_paused(proc.stderr)
        if not paused or not paused[-1].startswith(PAUSE_LINE + "copy"):
            pytest.fail("the run never paused at its first copy")
        assert any(PARTIAL_TAG in p.name for p in tmp_path.iterdir())
        proc.send_signal(sig)
        after = proc.stderr.read().splitlines()
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert tree_hashes(out) == before
    left = [p.name for p in tmp_path.iterdir() if PARTIAL_TAG in p.name]
    if sig == signal.SIGINT:
        assert code == 130 and after == ["error: interrupted; the output was not written (its partial folder was removed)"]
        assert left == []
    else:
        assert code == -signal.SIGKILL and len(left) == 1
        from clpsurgery.formats.output_folder import remove_stale_partials

        assert [p.name for p in remove_stale_partials(out)] == left  # what the next run removes first
