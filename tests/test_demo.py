"""The README's demo: real GPT-2 vocabulary to a real German BPE, loadable by the model library."""

from __future__ import annotations

import json

import pytest
import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.pipeline.demo import run_demo

transformers = pytest.importorskip("transformers")


def test_demo_output_is_a_working_gpt2(tmp_path):
    out = run_demo(tmp_path / "demo")
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["vocabulary"]["source_size"] == 50257
    assert manifest["vocabulary"]["target_size"] == 8000
    assert manifest["vocabulary"]["overlap"] > 1000
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = tokenizer("und dann sagte er nicht mehr viel", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 8000 and torch.isfinite(logits).all()
    with pytest.raises(Exception, match="already exists"):
        run_demo(tmp_path / "demo")
    assert run_demo(tmp_path / "demo", force=True) == out


def test_demo_suggests_force_only_for_a_previous_demo_folder(tmp_path):
    """A folder that is not a demo folder is refused with or without --force: never told to pass it."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "thesis.tex").write_text("keep me")
    for force in (False, True):
        with pytest.raises(SurgeryError) as info:
            run_demo(workdir, force=force)
        assert "is not a previous demo folder" in info.value.problem and "--force" not in info.value.problem
    assert sorted(p.name for p in workdir.iterdir()) == ["thesis.tex"]
