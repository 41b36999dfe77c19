"""The embedded demo: a small GPT-2-architecture source with the real GPT-2 vocabulary, a helper
with a real German vocabulary (a byte-level BPE trained on German word frequencies), and the
conversion between them. Weights are random: the demo shows the surgery, not the quality.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.output_folder import MANIFEST_NAME
from clpsurgery.formats.writer import write_file
from clpsurgery.pipeline.commands import init
from clpsurgery.pipeline.result import no_progress
from clpsurgery.pipeline.tensor_io import planned_from_tensor

DEMO_MARKER = "clpsurgery-demo.json"


def gpt2_config(vocab_size: int, n_embd: int, n_layer: int, n_head: int, bos: int, eos: int, n_positions: int = 256) -> dict:
    """A config.json for a GPT-2 language model (the model library's own field names)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_positions": n_positions,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def gpt2_tensors(config: dict, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes GPT2LMHeadModel saves (tied head, not stored)."""
    g = torch.Generator().manual_seed(seed)
    d, v, p = config["n_embd"], config["vocab_size"], config["n_positions"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    tensors = {"transformer.wte.weight": normal(v, d), "transformer.wpe.weight": normal(p, d)}
    for i in range(config["n_layer"]):
        prefix = f"transformer.h.{i}."
        tensors.update(
            {
                prefix + "ln_1.weight": torch.ones(d, dtype=dtype),
                prefix + "ln_1.bias": torch.zeros(d, dtype=dtype),
                prefix + "attn.c_attn.weight": normal(d, 3 * d),
                prefix + "attn.c_attn.bias": torch.zeros(3 * d, dtype=dtype),
                prefix + "attn.c_proj.weight": normal(d, d),
                prefix + "attn.c_proj.bias": torch.zeros(d, dtype=dtype),
                prefix + "ln_2.weight": torch.ones(d, dtype=dtype),
                prefix + "ln_2.bias": torch.zeros(d, dtype=dtype),
                prefix + "mlp.c_fc.weight": normal(d, 4 * d),
                prefix + "mlp.c_fc.bias": torch.zeros(4 * d, dtype=dtype),
                prefix + "mlp.c_proj.weight": normal(4 * d, d),
                prefix + "mlp.c_proj.bias": torch.zeros(d, dtype=dtype),
            }
        )
    tensors["transformer.ln_f.weight"] = torch.ones(d, dtype=dtype)
    tensors["transformer.ln_f.bias"] = torch.zeros(d, dtype=dtype)
    return tensors


def write_model_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A model folder: model.safetensors and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / "model.safetensors", [planned_from_tensor(n, t) for n, t in tensors.items()])
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_demo_inputs(workdir: Path) -> tuple[Path, Path]:
    """Source (GPT-2 vocabulary, bf16) and helper (German BPE, fp32) folders under workdir."""
    from clpsurgery.vocab.vocab_assets import (
        GPT2_EOS,
        gpt2_tokenizer,
        save_tokenizer_folder,
        train_german_bpe,
    )

    source, helper = workdir / "source-en", workdir / "helper-de"
    english = gpt2_tokenizer()
    eos = english.token_to_id(GPT2_EOS)
    source_config = gpt2_config(english.get_vocab_size(), n_embd=256, n_layer=4, n_head=4, bos=eos, eos=eos)
    write_model_folder(source, source_config, gpt2_tensors(source_config, torch.bfloat16, seed=1))
    save_tokenizer_folder(english, source, bos=GPT2_EOS, eos=GPT2_EOS, unk=GPT2_EOS)

    german = train_german_bpe(vocab_size=8000)
    helper_config = gpt2_config(german.get_vocab_size(), n_embd=128, n_layer=2, n_head=2, bos=german.token_to_id("<s>"), eos=german.token_to_id("</s>"))
    helper_config["pad_token_id"] = german.token_to_id("<pad>")
    helper_config["torch_dtype"] = "float32"
    write_model_folder(helper, helper_config, gpt2_tensors(helper_config, torch.float32, seed=2))
    save_tokenizer_folder(german, helper, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    return source, helper


def run_demo(workdir: Path, force: bool = False, progress=no_progress, echo: Callable[[str], None] = lambda s: None) -> Path:
    """Build the demo inputs in workdir and convert; return the output folder."""
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():  # --force would not replace it either: not suggested
            raise SurgeryError(workdir, f"is not empty and is not a previous demo folder (no {DEMO_MARKER}); choose another folder")
        if not force:
            raise SurgeryError(workdir, "already exists, a previous demo folder; pass --force to rebuild the demo there")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text(json.dumps({"what": "clpsurgery demo inputs and output"}) + "\n")
    echo(f"building the demo source (GPT-2 vocabulary) and helper (German BPE) in {workdir}")
    source, helper = build_demo_inputs(workdir)
    out = workdir / "target-de"
    init(source / "model.safetensors", helper, out, progress=progress, echo=echo, command=["clpsurgery", "demo", str(workdir)])
    assert (out / MANIFEST_NAME).is_file()
    echo(f"$ clpsurgery inspect {out}")
    return out
