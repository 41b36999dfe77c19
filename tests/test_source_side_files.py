"""A sentence-transformers source keeps its pooling: modules.json, its configs and the module
folders it names are carried into the output byte for byte, the manifest lists them, verify and
--force know them, and `SentenceTransformer(OUT)` pools and normalises as the source does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clpsurgery.cli import main
from clpsurgery.pipeline.verify import verify_output
from conftest import SENTENCE_TRANSFORMERS_FILES, copy_tokenizer_only

CARRIED = [*SENTENCE_TRANSFORMERS_FILES, "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"]
TEXTS = ["Der Hund läuft über die Straße.", "Schöne Grüße aus Köln."]


def run(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as e:  # pragma: no cover
        pytest.fail(f"clpsurgery exited with {e.code}")


def add_dense_module(folder: Path) -> None:
    """A projection module (2_Dense/, its weights in a model.safetensors of its own) before
    MiniLM's Normalize, as sentence-transformers saves one."""
    from safetensors.torch import save_file

    modules = json.loads((folder / "modules.json").read_text())
    normalize = {**modules[2], "idx": 3, "name": "3"}
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps([*modules[:2], dense, normalize], indent=2))
    (folder / "2_Dense").mkdir()
    config = {"in_features": 32, "out_features": 16, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}
    (folder / "2_Dense" / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(5)
    save_file({"linear.weight": torch.randn(16, 32, generator=g), "linear.bias": torch.randn(16, generator=g)}, str(folder / "2_Dense" / "model.safetensors"))


@pytest.fixture(scope="module")
def carried_output(tmp_path_factory, bert_source, german_helper):
    """init from the sentence-transformers source (with a Dense module, and a card and training
    notes beside it) with a tokenizer-only German helper."""
    base = tmp_path_factory.mktemp("side-files")
    source = base / "source"
    shutil.copytree(bert_source, source)
    add_dense_module(source)
    (source / "README.md").write_text("# all-MiniLM-L6-v2 (small)\n")
    (source / "data_config.json").write_text("[]\n")
    helper = copy_tokenizer_only(german_helper, base / "helper")
    out = base / "out"
    run("init", "--quiet", "--method", "fvt", source, helper, out)
    return source, out


def test_carried_byte_for_byte_and_listed(carried_output):
    source, out = carried_output
    for name in CARRIED:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "README.md").exists() and not (out / "data_config.json").exists()
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["carried_from_source"] == CARRIED
    listed = {entry["file"]: entry for entry in manifest["outputs"]}
    assert all(name in listed and "sha256" in listed[name] for name in CARRIED)
    assert not [c.line() for c in verify_output(out, source) if c.ok is False]


def test_sentence_transformer_pools_and_normalises_as_the_source(carried_output):
    """The carried modules: mean pooling over the attention mask, the projection, then L2
    normalisation (without them sentence-transformers would only mean-pool)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    _, out = carried_output
    model = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoder = transformers.AutoModel.from_pretrained(out).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    from safetensors.torch import load_file

    dense = load_file(str(out / "2_Dense" / "model.safetensors"))
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.normalize(torch.tanh(pooled @ dense["linear.weight"].T + dense["linear.bias"]), dim=-1)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_verify_and_force_know_the_module_folders(carried_output, tmp_path):
    """A stray file in a carried folder is not clpsurgery's: verify flags it and --force refuses
    to replace the folder; without it, --force replaces the output."""
    source, out = carried_output
    again = tmp_path / "out"
    shutil.copytree(out, again)
    (again / "1_Pooling" / "notes.txt").write_text("mine")
    found = [c.line() for c in verify_output(again, source) if c.ok is False]
    assert found == ["FAIL  file 1_Pooling/notes.txt: not written by clpsurgery (not in the manifest)"]
    helper = Path(json.loads((out / "clpsurgery.json").read_text())["inputs"]["helper"]["path"])
    with pytest.raises(SystemExit):
        main(["init", "--quiet", "--method", "fvt", "--force", str(source), str(helper), str(again)])
    assert (again / "1_Pooling" / "notes.txt").read_text() == "mine"
    (again / "1_Pooling" / "notes.txt").unlink()
    run("init", "--quiet", "--method", "fvt", "--force", source, helper, again)
    assert json.loads((again / "clpsurgery.json").read_text())["carried_from_source"] == CARRIED


def test_which_side_files_are_carried(tmp_path):
    """Only with a modules.json; module folders it names inside the folder, never one that holds
    a tokenizer (a module with its own vocabulary), a path out of the folder, or a symlink."""
    from clpsurgery.vocab.source_side_files import carried_side_files

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sentence_bert_config.json").write_text("{}")
    assert carried_side_files(folder) == []
    modules = [{"path": p} for p in ("", "1_Pooling", "2_Dense", "0_Own", "../outside", "3_Link", "/etc")]
    (folder / "modules.json").write_text(json.dumps(modules))
    for name, files in {"1_Pooling": ["config.json"], "2_Dense": ["config.json", "model.safetensors"], "0_Own": ["tokenizer.json"]}.items():
        (folder / name).mkdir()
        for file in files:
            (folder / name / file).write_text("x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("x")
    (folder / "3_Link").symlink_to(tmp_path / "outside")
    assert carried_side_files(folder) == ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"]
