"""`clpsurgery score`: bits per UTF-8 byte on a text, checked against a hand computation with the
model library, against itself (gap 0), split by new and shared tokens for a clpsurgery output, and
one clear line for every input it cannot score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GERMAN_LINES, run_cli

transformers = pytest.importorskip("transformers")


def score_json(capsys, *args) -> dict:
    code, out, err = run_cli(["score", "--quiet", "--json", "--device", "cpu", *args], capsys)
    assert code == 0, err
    return json.loads(out)


def hand_nll(folder: Path, segments: list[str], context: int) -> tuple[float, int]:
    """The summed NLL (nats) of every token of each segment after the BOS token, in windows of
    `context` tokens, from the library's own loss (labels shifted inside the model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token_id
    nll, count = 0.0, 0
    with torch.no_grad():
        for segment in segments:
            ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
            for begin in range(0, len(ids), context - 1):
                window = torch.tensor([[bos, *ids[begin : begin + context - 1]]])
                loss = model(input_ids=window, labels=window).loss
                nll += float(loss) * (window.shape[1] - 1)
                count += window.shape[1] - 1
    return nll, count


def test_bits_per_byte_is_the_hand_computation(gpt2_source, tmp_path, capsys):
    short = tmp_path / "kurz.txt"
    short.write_text(GERMAN_LINES[0] + "\n", encoding="utf-8")
    report = score_json(capsys, gpt2_source, "--text", short)
    nll, tokens = hand_nll(gpt2_source, [GERMAN_LINES[0] + "\n"], 64)
    scored = report["model"]
    assert scored["tokens"] == tokens and scored["bytes"] == len((GERMAN_LINES[0] + "\n").encode())
    assert scored["bpb"] == pytest.approx(nll / math.log(2) / scored["bytes"], rel=1e-5)
    assert scored["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert "by_target" not in scored  # not a clpsurgery output

    # Two segments (cut after the line that passes 1500 bytes), each longer than the 64 positions
    # of the model: windows of 63 tokens after BOS each.
    long = tmp_path / "lang.txt"
    lines = [line + "\n" for line in GERMAN_LINES[:24]]
    long.write_text("".join(lines), encoding="utf-8")
    report = score_json(capsys, gpt2_source, "--text", long, "--batch", "3")
    cut = next(i for i in range(len(lines)) if len("".join(lines[: i + 1]).encode()) > 1500)
    nll, tokens = hand_nll(gpt2_source, ["".join(lines[:cut]), "".join(lines[cut:])], 64)
    scored = report["model"]
    assert scored["segments"] == 2 and report["text"]["scored_bytes"] == long.stat().st_size
    assert scored["tokens"] == tokens
    assert scored["bpb"] == pytest.approx(nll / math.log(2) / long.stat().st_size, rel=1e-5)


def test_against_itself_the_gap_is_zero(llama_source, german_text, capsys):
    report = score_json(capsys, llama_source, "--text", german_text, "--against", llama_source, "--max-bytes", "2000")
    assert report["gap_bpb"] == 0.0
    assert report["model"]["nll_nats"] == report["against"]["nll_nats"] and report["model"]["tokens"] == report["against"]["tokens"]
    assert report["model"]["bpb"] > 0 and report["text"]["segments"] == 2


def test_output_against_its_source_splits_new_and_shared_tokens(gpt2_output, gpt2_source, german_text, capsys):
    report = score_json(capsys, gpt2_output, "--text", german_text, "--against", gpt2_source, "--max-bytes", "3000")
    model, source = report["model"], report["against"]
    assert model["bytes"] == source["bytes"] == report["text"]["scored_bytes"] and 3000 <= model["bytes"] < 3000 + 1500
    assert report["gap_bpb"] == pytest.approx(model["bpb"] - source["bpb"])
    assert model["bytes_per_token"] != source["bytes_per_token"]  # two tokenizers, one text

    manifest = json.loads((gpt2_output / "clpsurgery.json").read_text())
    split = model["by_target"]
    assert split["new_tokens"] > 0 and split["new_share"] == pytest.approx(split["new_tokens"] / model["tokens"])
    assert split["new_nll_nats"] + split["shared_nll_nats"] == pytest.approx(model["nll_nats"])
    assert 0 < split["mass_on_new"] < 1
    # the new tokens are the rows init combined: count them in the text by hand
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_output)
    from clpsurgery.learning.new_rows import new_token_ids
    from clpsurgery.learning.text import read_text

    new = set(new_token_ids(manifest).tolist())
    assert len(new) == manifest["vocabulary"]["missing"]
    segments = read_text(german_text, 3000).segments(3000)
    ids = [t for s in segments for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    assert split["new_tokens"] == sum(t in new for t in ids) and model["tokens"] == len(ids)
    assert "by_target" not in source

    code, out, err = run_cli(["score", "--quiet", "--device", "cpu", gpt2_output, "--text", german_text, "--max-bytes", "3000"], capsys)
    assert code == 0 and "bits/byte" in out and "new tokens" in out


def test_the_quality_benchmark_scores_through_score():
    source = (Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "run.py").read_text()
    assert "from clpsurgery.learning.score import score_segments" in source
    assert "log_softmax" not in source  # no second implementation of the scoring


def test_segments_are_whole_lines_up_to_the_size():
    from clpsurgery.learning.text import cut_segments

    lines = [f"{i:04d} " + "x" * 94 + "\n" for i in range(40)]  # 100 bytes each
    segments = cut_segments(["".join(lines)], segment_bytes=1000)
    assert "".join(segments) == "".join(lines) and [len(s) for s in segments] == [1000] * 4
    assert cut_segments(["".join(lines)], max_bytes=1500, segment_bytes=1000) == segments[:2]
    assert cut_segments(["a\nb", "c\n\n  \n", " \n\n"]) == ["a\nb", "c\n\n  \n"]  # a segment of white space only is none


def non_causal_model(folder: Path) -> Path:
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["empty", "blank", "binary", "latin-1", "missing", "folder", "not causal", "no config", "no weights"])
def test_what_cannot_be_scored_is_one_line(case, gpt2_source, gpt2_tokenizer_folder, german_text, tmp_path, capsys):
    text, model = tmp_path / "text.txt", gpt2_source
    text.write_text("Ein Satz.\n", encoding="utf-8")
    expected = {
        "empty": "is empty", "blank": "is empty", "binary": "is binary", "latin-1": "is not UTF-8 text", "missing": "cannot be read",
        "folder": "is a folder", "not causal": "is a BertModel, not a causal language model", "no config": "has no config.json",
        "no weights": "lacks",
    }[case]
    if case == "empty":
        text.write_bytes(b"")
    elif case == "blank":
        text.write_bytes(b" \n\n\t\n")
    elif case == "binary":
        text.write_bytes((gpt2_source / "model.safetensors").read_bytes()[:4096])
    elif case == "latin-1":
        text.write_bytes("Grüße aus München\n".encode("latin-1"))
    elif case == "missing":
        text = tmp_path / "nowhere.txt"
    elif case == "folder":
        text = tmp_path
    elif case == "not causal":
        model = non_causal_model(tmp_path / "bert")
    elif case == "no config":
        model = gpt2_tokenizer_folder
    elif case == "no weights":  # config and tokenizer, but the weights of another model
        model = tmp_path / "other"
        model.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model / name).write_bytes((gpt2_source / name).read_bytes())
        non_causal_model(tmp_path / "bert")
        (model / "model.safetensors").write_bytes((tmp_path / "bert" / "model.safetensors").read_bytes())
    code, out, err = run_cli(["score", "--quiet", "--device", "cpu", model, "--text", text], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in err[0] and out == ""


def test_a_model_without_a_gpu_refuses_cuda(gpt2_source, german_text, capsys):
    if torch.cuda.is_available():
        pytest.skip("environment: this machine has a GPU")
    code, _, err = run_cli(["score", "--quiet", "--device", "cuda", gpt2_source, "--text", german_text], capsys)
    assert code == 1 and len(err) == 1 and "--device" in err[0]


def test_windows_start_each_from_the_start_token():
    from clpsurgery.learning.score import windows

    assert windows([[1, 2, 3, 4, 5], [6]], 0, 3) == [[0, 1, 2], [0, 3, 4], [0, 5], [0, 6]]
    assert np.array_equal(np.concatenate(windows([list(range(10))], 99, 4))[np.concatenate(windows([list(range(10))], 99, 4)) != 99], np.arange(10))
