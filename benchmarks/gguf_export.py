"""Export check: llama.cpp's own converter on clpsurgery outputs, read back with the gguf package.

For each model family llama.cpp converts (LLaMA, GPT-2, BLOOM, Qwen2, Gemma) this builds a tiny
source with transformers (random weights, hidden 64, 2 layers, the real GPT-2 tokenizer) and a
small German helper (a GPT-2-architecture model with a 2,000-token byte-level BPE trained on
wordfreq's German list, as tests/conftest.py's german_helper), runs

    python -m clpsurgery init --quiet SOURCE HELPER OUT

and then llama.cpp's `convert_hf_to_gguf.py FOLDER --outfile FOLDER.gguf --outtype f32` on every
output AND on every source (the control: does llama.cpp take the source itself?). Extra cases:

  gpt2+untie     init --untie-head on the tied GPT-2 source (a separate output head)
  llama+extend   clpsurgery extend (the source's vocabulary with the helper's tokens appended)
  qwen2+pad64    init --pad-vocab-to-multiple 64 (vocab_size past the tokenizer, as Qwen2 ships)
  llama-sp       LLaMA with SentencePiece tokenizers (tokenizer.model): an English source, a
                 German helper, both trained here with the sentencepiece package
  gemma-sp       the same for Gemma (llama.cpp converts Gemma from tokenizer.model only)
  helper-de      the German helper itself (control for its tokenizer)

A conversion refused with "BPE pre-tokenizer was not recognized" (llama.cpp hashes the tokens of
a fixed text, `get_vocab_base_pre`, and knows only the tokenizers listed there) is run a second
time with that hash registered as "gpt-2", which is what a user does for a byte-level BPE with
GPT-2's pre-tokenizer regex (this script checks the folder's tokenizer.json has exactly that):
the line `if chkhsh == "<hash>": res = "gpt-2"` in get_vocab_base_pre (conversion/base.py), the
line convert_hf_to_gguf_update.py generates from an entry in its models lists. Here it is a
wrapper that patches the method at run time; the llama.cpp files are not edited.

Every GGUF written is read back with the installed `gguf` package (GGUFReader) and compared with
its folder: the vocabulary (tokenizer.ggml.tokens: length against config.json's vocab_size,
every token against the folder's tokenizer), the special-token ids (tokenizer.ggml.*_token_id
against config.json and tokenizer_config.json), and token_embd / output (shape and values against
the safetensors tensors).

llama.cpp's converter comes from the package registry, reproducibly: the sdist of
llama-cpp-python==0.3.36 (`pip download --no-deps --no-binary :all:`), which vendors
llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/; it is downloaded into --cache once
and unpacked there. The converter puts its own gguf-py first on sys.path; the script also records
whether it runs with the installed gguf package instead (NO_LOCAL_GGUF=1).

    python benchmarks/gguf_export.py --families llama,gpt2,bloom,qwen2,gemma

The result, with its provenance (commit, machine, date, command), goes to
benchmarks/results/gguf_export/current.json (the previous one moves to archive/);
--json-out PATH writes it to PATH instead (a trial run).
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, provenance, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
FAMILIES = ("llama", "gpt2", "bloom", "qwen2", "gemma")
EXTRAS = ("untie", "extend", "pad", "sp", "helper")
GERMAN_VOCAB = 2000
SP_VOCAB = 1200
HIDDEN = 64
GPT2_EOS_ID = 50256
REFUSED_PRE = "BPE pre-tokenizer was not recognized"
GGUF_SPECIALS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                 "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.word_embeddings.weight")
HEAD_NAME = "lm_head.weight"
SPM_RUNTIME_DEFAULTS = {"bos": 1, "eos": 2, "unk": 0, "pad": None}  # llama-vocab.cpp, tokenizer model "llama"
TOKEN_TYPE_NAMES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}

NOTES = [
    "convert: convert_hf_to_gguf.py FOLDER --outtype f32, as it is; convert_registered: the same after a refusal"
    " 'BPE pre-tokenizer was not recognized', with the refused chkhsh registered as 'gpt-2' in get_vocab_base_pre"
    " (only where the folder's tokenizer.json pre-tokenizer is GPT-2's byte-level regex); what a user does by adding"
    " `if chkhsh == \"<hash>\": res = \"gpt-2\"` to conversion/base.py.",
    "readback: the GGUF read with the installed gguf package against the folder it came from: tokens (count against"
    " config.json vocab_size, each against tokenizer.json, or tokenizer.model where llama.cpp reads that), special ids"
    " (tokenizer.ggml.*_token_id against config.json and tokenizer_config.json), token_embd/output (shape and values"
    " against the safetensors tensors; f32, so equal exactly).",
    "attribution: an output's refusal or failed check is llama.cpp's when its controls (the source it came from, the"
    " helper whose tokenizer it took, each converted as it is) are refused or fail alike.",
    "transformers_tokenizer: how transformers' AutoTokenizer (which the converter hashes) loads the folder, and whether"
    " it tokenizes get_vocab_base_pre's text as tokenizer.json itself does.",
]

# Run inside the converter's process: register extra pre-tokenizer hashes (JSON {hash: name} in
# $GGUF_EXPORT_EXTRA_PRE) in TextModel.get_vocab_base_pre, then run convert_hf_to_gguf.py as
# __main__. The hash is computed as get_vocab_base_pre computes it, on the text it defines
# ($GGUF_EXPORT_CHKTXT, read from it by read_chktxt).
WRAPPER = r'''
import hashlib, json, os, runpy, sys
from pathlib import Path

llama = Path(sys.argv[1])
sys.argv = [str(llama / "convert_hf_to_gguf.py"), *sys.argv[2:]]
sys.path.insert(0, str(llama))
sys.path.insert(1, str(llama / "gguf-py"))
extra = json.loads(os.environ.get("GGUF_EXPORT_EXTRA_PRE", "{}"))

from conversion import base

CHKTXT = os.environ["GGUF_EXPORT_CHKTXT"]  # read_chktxt(llama), computed by the parent
original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in extra:
        base.logger.warning(f"gguf_export: chkhsh {chkhsh} registered as {extra[chkhsh]!r}")
        return extra[chkhsh]
    return original(self, tokenizer)

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# --------------------------------------------------------------------------------------------
# llama.cpp's converter, from the llama-cpp-python sdist
# --------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_converter(cache: Path) -> tuple[Path, dict]:
    """The unpacked vendor/llama.cpp folder of the sdist (downloaded with pip when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / SDIST
    downloaded = False
    if not tar.is_file():
        print(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} (sdist) into {cache} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
        downloaded = True
    root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    llama = cache / root
    if not (llama / "convert_hf_to_gguf.py").is_file():
        wanted = (root + "convert_hf_to_gguf.py", root + "convert_hf_to_gguf_update.py", root + "conversion/", root + "gguf-py/")
        with tarfile.open(tar) as t:
            members = [m for m in t.getmembers() if m.name.startswith(wanted) or m.name in wanted]
            t.extractall(cache, members=members, filter="data")
    gguf_py_version = re.search(r'^version\s*=\s*"([^"]+)"', (llama / "gguf-py" / "pyproject.toml").read_text(), re.M)
    facts = {
        "package": f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "sdist": SDIST,
        "sdist_sha256": sha256_file(tar),
        "downloaded_this_run": downloaded,
        "converter": "vendor/llama.cpp/convert_hf_to_gguf.py",
        "convert_hf_to_gguf_sha256": sha256_file(llama / "convert_hf_to_gguf.py"),
        "conversion_base_sha256": sha256_file(llama / "conversion" / "base.py"),
        "vendored_gguf_py_version": gguf_py_version.group(1) if gguf_py_version else None,
    }
    (cache / "run_converter.py").write_text(WRAPPER, encoding="utf-8")
    return llama, facts


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def tail(text: str, n: int = 8) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"*"}]
    return lines[-n:]


def convert(llama: Path, cache: Path, folder: Path, outfile: Path, extra_pre: dict | None = None,
            installed_gguf: bool = False) -> dict:
    """Run convert_hf_to_gguf.py on a folder; with extra_pre, through the wrapper that registers
    those pre-tokenizer hashes."""
    if outfile.exists():
        outfile.unlink()
    env = child_env(PYTHONPATH=str(llama / "gguf-py"))
    if installed_gguf:
        env["NO_LOCAL_GGUF"] = "1"
        env.pop("PYTHONPATH")
    args = [str(folder), "--outfile", str(outfile), "--outtype", "f32"]
    if extra_pre:
        argv = [sys.executable, str(cache / "run_converter.py"), str(llama), *args]
        env["GGUF_EXPORT_EXTRA_PRE"] = json.dumps(extra_pre)
        env["GGUF_EXPORT_CHKTXT"] = read_chktxt(llama)
    else:
        argv = [sys.executable, str(llama / "convert_hf_to_gguf.py"), *args]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(folder.parent), timeout=600)
    # The run folder and the checkout in the messages, as WORK/ and REPO/ (they differ every run).
    p.stderr = p.stderr.replace(str(folder.parent), "WORK").replace(str(REPO), "REPO")
    p.stdout = p.stdout.replace(str(folder.parent), "WORK").replace(str(REPO), "REPO")
    result = {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 2), "accepted": p.returncode == 0 and outfile.is_file()}
    if extra_pre:
        result["registered_pre"] = extra_pre
    if not result["accepted"]:
        result["refusal"] = tail(p.stderr + p.stdout)
        result["error"] = result["refusal"][-1] if result["refusal"] else f"rc {p.returncode}, no output"
        m = re.search(r"chkhsh:\s+([0-9a-f]{64})", p.stderr)
        if m:
            result["chkhsh"] = m.group(1)
    else:
        warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("WARNING") and "****" not in ln and ln.strip() != "WARNING:hf-to-gguf:"]
        if warnings:
            result["warnings"] = warnings[:10]
    return result


# --------------------------------------------------------------------------------------------
# Tiny models and tokenizers
# --------------------------------------------------------------------------------------------

def save_model(model, folder: Path, tokenizer, **special) -> Path:
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer_folder(tokenizer, folder, **special)
    return folder


def family_config(family: str, vocab: int, bos: int, eos: int, pad: int | None = None):
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)
    if family == "bloom":
        return transformers.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **common)
    if family == "gemma":
        return transformers.GemmaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True, **common)
    raise ValueError(family)


def model_for(config):
    import transformers

    return transformers.AutoModelForCausalLM.from_config(config).eval()


def build_source(family: str, folder: Path, gpt2_tokenizer, seed: int) -> Path:
    """A tiny random source of a family with the real GPT-2 tokenizer (LLaMA in bf16, untied)."""
    import torch

    torch.manual_seed(seed)
    model = model_for(family_config(family, 50257, GPT2_EOS_ID, GPT2_EOS_ID))
    if family == "llama":
        model = model.to(torch.bfloat16)
    return save_model(model, folder, gpt2_tokenizer, bos="<|endoftext|>", eos="<|endoftext|>")


def add_n_ctx(folder: Path) -> None:
    """GPT-2 configs on the hub carry n_ctx (openai-community/gpt2: 1024, = n_positions);
    transformers 5's GPT2Config no longer writes it, and llama.cpp's GPT2Model reads
    hparams["n_ctx"]. Put it back, as a real GPT-2 checkpoint has it."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("n_ctx", config["n_positions"])
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_german_helper(folder: Path, german_tokenizer) -> Path:
    """tests/conftest.py's german_helper: GPT-2 architecture, n_embd 16, the German BPE."""
    import torch
    import transformers

    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=german_tokenizer.get_vocab_size(), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        model.transformer.wte.weight.copy_(torch.randn(config.vocab_size, 16, generator=g) + 1.5 * torch.randn(1, 16, generator=g))
    save_model(model, folder, german_tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    add_n_ctx(folder)
    return folder


def train_sentencepiece(language: str, path: Path, ids: dict[str, int]) -> None:
    """A deterministic SentencePiece BPE with byte fallback (as LLaMA's and Gemma's) on a
    frequency-weighted wordfreq corpus; `ids` places unk/bos/eos/pad."""
    import io

    import sentencepiece as spm

    from clpsurgery.vocab.vocab_assets import frequent_words

    words = frequent_words(language, 6000)
    mass = sum(f for _, f in words) or 1.0
    lines = []
    for w, f in words:
        count = 1 + int(f * 60_000 / mass)
        while count > 0:
            k = min(count, 20)
            lines.append(" ".join([w] * k))
            count -= k
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
        num_threads=1, minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False,
    )
    path.write_bytes(model.getvalue())


def write_sp_tokenizer_folder(folder: Path, model_file: Path, tokenizer_class: str) -> dict[str, int]:
    """tokenizer.model plus tokenizer_config.json / special_tokens_map.json naming its specials."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    specials = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v >= 0}
    config = {"tokenizer_class": tokenizer_class, **specials, "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 1024, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return ids


def build_sp_model(family: str, folder: Path, model_file: Path, seed: int, hidden: int = HIDDEN) -> Path:
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    torch.manual_seed(seed)
    config = family_config(family, sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.pad_id() if sp.pad_id() >= 0 else None)
    if hidden != HIDDEN:
        config.hidden_size, config.intermediate_size = hidden, 2 * hidden
        config.num_attention_heads, config.num_key_value_heads = 2, 1
        config.head_dim = hidden // 2
    model = model_for(config)
    model.save_pretrained(folder, safe_serialization=True)
    write_sp_tokenizer_folder(folder, model_file, "GemmaTokenizer" if family == "gemma" else "LlamaTokenizer")
    return folder


def run_clpsurgery(command: str, source: Path, helper: Path, out: Path, options: list[str]) -> dict:
    argv = [sys.executable, "-m", "clpsurgery", command, "--quiet", "--device", "cpu", *options, str(source), str(helper), str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO), env=child_env(), timeout=600)
    result = {"command": ["clpsurgery", command, *options, "SOURCE", "HELPER", "OUT"], "rc": p.returncode,
              "ok": p.returncode == 0, "seconds": round(time.perf_counter() - t0, 2)}
    if p.returncode != 0:
        result["error"] = tail(p.stderr + p.stdout)
    return result


# --------------------------------------------------------------------------------------------
# What a folder says, and what its GGUF says
# --------------------------------------------------------------------------------------------

def folder_tokens(folder: Path, sentencepiece_first: bool = False) -> tuple[dict[int, str], str]:
    """id -> token string as llama.cpp writes it (byte-level/normalized form), and the file read:
    tokenizer.json, or tokenizer.model (first where llama.cpp reads that, its tokenizer model "llama")."""
    if (folder / "tokenizer.json").is_file() and not (sentencepiece_first and (folder / "tokenizer.model").is_file()):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}, "tokenizer.json"
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        tokens = {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}
        added = folder / "added_tokens.json"
        if added.is_file():
            tokens.update({i: t for t, i in json.loads(added.read_text(encoding="utf-8")).items()})
        return tokens, "tokenizer.model"
    raise FileNotFoundError(f"no tokenizer in {folder}")


def is_gpt2_pretokenizer(folder: Path) -> bool:
    """tokenizer.json's pre-tokenizer is byte-level with GPT-2's own regex (ByteLevel use_regex)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def folder_tensors(folder: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors import safe_open

    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name in EMBEDDING_NAMES or name == HEAD_NAME:
                    found["embedding" if name != HEAD_NAME else "head"] = f.get_tensor(name).to(torch.float32).numpy()
    return found


def special_expectations(folder: Path, tokens: dict[int, str]) -> dict[str, dict]:
    """Per role: the id config.json gives and the id tokenizer_config.json's token string has."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    ids = {t: i for i, t in tokens.items()}
    out = {}
    for role in GGUF_SPECIALS:
        entry = {}
        cid = config.get(f"{role}_token_id")
        if isinstance(cid, list):
            cid = cid[0] if cid else None
        if cid is not None:
            entry["config"] = cid
        tok = tcfg.get(f"{role}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is not None:
            entry["tokenizer_config"] = ids.get(tok, f"{tok!r} not in the tokenizer")
        out[role] = entry
    return out


def field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def readback(gguf_path: Path, folder: Path) -> dict:
    """Compare a GGUF with the folder it was converted from."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer_model = field_value(reader, "tokenizer.ggml.model")
    tokens, kind = folder_tokens(folder, sentencepiece_first=tokenizer_model == "llama")
    vocab_size = config.get("vocab_size")
    gguf_tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    checks: dict[str, dict] = {}

    checks["n_tokens"] = {"ok": len(gguf_tokens) == vocab_size, "gguf": len(gguf_tokens), "config_vocab_size": vocab_size,
                          "tokenizer_size": max(tokens) + 1}
    mismatches = []
    for i in range(min(len(gguf_tokens), vocab_size or 0)):
        want = tokens.get(i, f"[PAD{i}]")
        if gguf_tokens[i] != want:
            mismatches.append(i)
    checks["tokens"] = {"ok": not mismatches and bool(gguf_tokens), "compared": min(len(gguf_tokens), vocab_size or 0),
                        "mismatches": len(mismatches),
                        "first_mismatches": [{"id": i, "gguf": gguf_tokens[i], "folder": tokens.get(i)} for i in mismatches[:5]]}

    if kind == "tokenizer.model" and (folder / "tokenizer.json").is_file():
        other, _ = folder_tokens(folder)  # the folder's tokenizer.json, which transformers reads
        checks["tokens"]["tokenizer_json_disagrees_at"] = sum(1 for i, t in tokens.items() if other.get(i) != t)
    expected = special_expectations(folder, tokens)
    token_types = field_value(reader, "tokenizer.ggml.token_type") or []
    for role, key in GGUF_SPECIALS.items():
        got = field_value(reader, key)
        want = expected[role]
        values = {v for v in want.values()}
        ok = (got is None and not want) or (got is not None and values == {got})
        entry = {"ok": ok, "gguf": got, **want}
        if len(values) > 1:
            entry["folder_disagrees_with_itself"] = True
        if got is None:
            # What llama.cpp uses at run time when the key is absent (llama-vocab.cpp's defaults).
            effective = SPM_RUNTIME_DEFAULTS.get(role) if tokenizer_model == "llama" else None
            entry["llama_cpp_runtime_id"] = effective
            entry["runtime_ok"] = values <= {effective} if values else True
            if effective is not None and effective in tokens:
                entry["runtime_token"] = tokens[effective]
        checks[f"{role}_id"] = entry
    role_ids = sorted({v for e in expected.values() for v in e.values() if isinstance(v, int)})
    types = {i: int(token_types[i]) for i in role_ids if i < len(token_types)}
    checks["special_token_types"] = {"ok": all(t in (2, 3) for t in types.values()),  # UNKNOWN, CONTROL
                                     "types": {str(i): TOKEN_TYPE_NAMES.get(t, t) for i, t in types.items()}}

    tensors = {t.name: t for t in reader.tensors}
    ours = folder_tensors(folder)
    emb = ours.get("embedding")
    t = tensors.get("token_embd.weight")
    entry = {"gguf_shape": list(np.asarray(t.data).shape) if t is not None else None,
             "safetensors_shape": list(emb.shape) if emb is not None else None}
    entry["ok"] = t is not None and emb is not None and entry["gguf_shape"] == entry["safetensors_shape"]
    if entry["ok"]:
        entry["max_abs_diff"] = float(np.max(np.abs(np.asarray(t.data, dtype=np.float32) - emb)))
        entry["ok"] = entry["max_abs_diff"] == 0.0
    entry["rows_equal_vocab_size"] = bool(emb is not None and emb.shape[0] == vocab_size)
    entry["ok"] = entry["ok"] and entry["rows_equal_vocab_size"]
    checks["token_embd"] = entry

    head = ours.get("head")
    t = tensors.get("output.weight")
    entry = {"folder_head": head is not None, "tie_word_embeddings": config.get("tie_word_embeddings"),
             "gguf_shape": list(np.asarray(t.data).shape) if t is not None else None,
             "safetensors_shape": list(head.shape) if head is not None else None}
    if head is None:
        entry["ok"] = t is None or np.array_equal(np.asarray(t.data, dtype=np.float32), ours.get("embedding"))
    else:
        entry["ok"] = t is not None and entry["gguf_shape"] == entry["safetensors_shape"]
        if entry["ok"]:
            entry["max_abs_diff"] = float(np.max(np.abs(np.asarray(t.data, dtype=np.float32) - head)))
            entry["ok"] = entry["max_abs_diff"] == 0.0
    checks["output"] = entry

    info = {
        "architecture": field_value(reader, "general.architecture"),
        "tokenizer_model": field_value(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": field_value(reader, "tokenizer.ggml.pre"),
        "folder_tokenizer": kind,
        "other_special_ids": {k.removeprefix("tokenizer.ggml."): field_value(reader, k) for k in reader.fields
                              if k.startswith("tokenizer.ggml.") and k.endswith("_token_id") and k not in GGUF_SPECIALS.values()},
        "n_merges": len(field_value(reader, "tokenizer.ggml.merges") or []),
        "n_tensors": len(reader.tensors),
    }
    return {"pass": all(c["ok"] for c in checks.values()), "failed": [k for k, c in checks.items() if not c["ok"]],
            "checks": checks, "info": info}


def read_chktxt(llama: Path) -> str:
    """The text get_vocab_base_pre hashes the tokens of."""
    tree = ast.parse((llama / "conversion" / "base.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "chktxt":
                    return ast.literal_eval(stmt.value)
    raise RuntimeError("chktxt not found in get_vocab_base_pre")


def transformers_view(folder: Path, chktxt: str) -> dict | None:
    """How transformers' AutoTokenizer (which the converter hashes) loads the folder's tokenizer.json,
    and whether it tokenizes get_vocab_base_pre's text as tokenizer.json itself does."""
    if not (folder / "tokenizer.json").is_file():
        return None
    import logging

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    auto = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(chktxt).ids
    via_auto = auto.encode(chktxt)
    view = {"class": type(auto).__name__, "same_ids_as_tokenizer_json": via_auto == raw,
            "chkhsh_tokenizer_json": hashlib.sha256(str(raw).encode()).hexdigest(),
            "chkhsh_transformers": hashlib.sha256(str(via_auto).encode()).hexdigest()}
    if not view["same_ids_as_tokenizer_json"]:
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is not None:
            view["transformers_pre_tokenizer"] = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else None
            view["transformers_normalizer"] = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None
        view["tokenizer_json_pre_tokenizer"] = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer")
    return view


def check_folder(name: str, folder: Path, llama: Path, cache: Path, ggufs: Path) -> dict:
    """Convert a folder as it is; if llama.cpp does not know its BPE pre-tokenizer and the folder's
    is GPT-2's, again with the hash registered as gpt-2. Read back whatever was written."""
    outfile = ggufs / f"{name.replace('/', '_')}.gguf"
    as_is = convert(llama, cache, folder, outfile)
    entry: dict = {"convert": as_is}
    view = transformers_view(folder, read_chktxt(llama))
    if view is not None:
        entry["transformers_tokenizer"] = view
    if as_is["accepted"]:
        entry["readback"] = readback(outfile, folder)
    elif REFUSED_PRE in "\n".join(as_is.get("refusal", [])) and as_is.get("chkhsh"):
        entry["gpt2_pretokenizer"] = is_gpt2_pretokenizer(folder)
        if entry["gpt2_pretokenizer"]:
            registered = convert(llama, cache, folder, outfile, extra_pre={as_is["chkhsh"]: "gpt-2"})
            entry["convert_registered"] = registered
            if registered["accepted"]:
                entry["readback"] = readback(outfile, folder)
    if outfile.exists():
        entry["gguf_bytes"] = outfile.stat().st_size
        outfile.unlink()
    return entry


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def status_word(entry: dict) -> str:
    if entry["convert"]["accepted"]:
        return "accepted"
    if entry.get("convert_registered", {}).get("accepted"):
        return "refused: pre-tokenizer hash (accepted once registered as gpt-2)"
    return "refused: " + entry["convert"].get("error", "?")[:100]


def print_table(cases: dict) -> None:
    print()
    print(f"{'case':22s} {'init':5s} {'source':30s} {'output':30s}")
    for name, case in cases.items():
        init = "-" if "init" not in case else ("ok" if case["init"]["ok"] else "FAIL")
        cols = []
        for side in ("source", "output"):
            e = case.get(side)
            if e is None:
                cols.append(f"(as {case['source_case']})" if side == "source" and "source_case" in case else "-")
                continue
            word = "accepted" if e["convert"]["accepted"] else ("refused(pre)+reg" if e.get("convert_registered", {}).get("accepted") else "REFUSED")
            rb = e.get("readback")
            word += "" if rb is None else (", readback ok" if rb["pass"] else f", readback FAIL {','.join(rb['failed'])}")
            cols.append(word)
        print(f"{name:22s} {init:5s} {cols[0]:30s} {cols[1]:30s}")
    print()
    for name, case in cases.items():
        for side in ("source", "output"):
            e = case.get(side)
            if e and not e["convert"]["accepted"]:
                print(f"{name} {side}: {status_word(e)}")
                if not e.get("convert_registered", {}).get("accepted"):
                    for ln in e["convert"].get("refusal", [])[-3:]:
                        print(f"    {ln}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {','.join(FAMILIES)}")
    parser.add_argument("--extras", default=",".join(EXTRAS), help=f"comma-separated, of {','.join(EXTRAS)} (or 'none')")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "tmp-gguf" / "cache",
                        help="where the llama-cpp-python sdist is downloaded and unpacked (kept between runs)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "tmp-gguf")
    parser.add_argument("--keep", action="store_true", help="keep the models built (under --workdir)")
    parser.add_argument("--json-out", type=Path, help="write the result here instead of benchmarks/results/gguf_export/current.json (a trial run)")
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    extras = [] if args.extras == "none" else [e for e in args.extras.split(",") if e]
    for f in families:
        if f not in FAMILIES:
            parser.error(f"unknown family {f!r}")
    for e in extras:
        if e not in EXTRAS:
            parser.error(f"unknown extra {e!r}")

    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    machine = machine_info(work)
    prov = provenance(machine=machine)
    llama, converter = fetch_converter(args.cache)
    import gguf
    import transformers

    from clpsurgery.vocab.vocab_assets import gpt2_tokenizer, train_german_bpe

    report: dict = {"benchmark": "gguf_export", "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
                    "families": families, "extras": extras, "converter": converter,
                    "installed": {"gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                                  "transformers": transformers.__version__, "sentencepiece": _dist_version("sentencepiece")},
                    "notes": NOTES, "cases": {}}
    cases = report["cases"]
    ggufs = work / "gguf"
    ggufs.mkdir()
    try:
        print("building tokenizers and the German helper ...", flush=True)
        gpt2_tok = gpt2_tokenizer()
        german = train_german_bpe(vocab_size=GERMAN_VOCAB, n_words=8000)
        helper = build_german_helper(work / "helper-de", german)

        def one(name: str, source: Path, out: Path, command: str = "init", options: tuple[str, ...] = (),
                source_case: str | None = None) -> None:
            case: dict = {}
            if source_case is None:
                case["source"] = check_folder(f"{name}/source", source, llama, args.cache, ggufs)
            else:
                case["source_case"] = source_case  # the same source, converted there
            case["init"] = run_clpsurgery(command, source, current_helper[0], out, list(options))
            if case["init"]["ok"]:
                case["output"] = check_folder(f"{name}/output", out, llama, args.cache, ggufs)
            cases[name] = case
            print_case(name, case)

        current_helper = [helper]
        for i, family in enumerate(families):
            source = build_source(family, work / f"{family}-source", gpt2_tok, seed=10 + i)
            as_saved = None
            if family == "gpt2":
                as_saved = convert(llama, args.cache, source, ggufs / "as-saved.gguf")
                (ggufs / "as-saved.gguf").unlink(missing_ok=True)
                add_n_ctx(source)
            one(family, source, work / f"{family}-out")
            cases[family]["helper_case"] = "helper-de"
            if as_saved is not None:
                cases[family]["source_as_saved_by_transformers"] = {
                    "note": "config.json as transformers' save_pretrained writes it, without n_ctx; the source above has n_ctx added",
                    "convert": as_saved}
            if family == "gpt2" and "untie" in extras:
                one("gpt2+untie", source, work / "gpt2-untie-out", options=("--untie-head",), source_case="gpt2")
            if family == "llama" and "extend" in extras:
                one("llama+extend", source, work / "llama-extend-out", command="extend", source_case="llama")
            if family == "qwen2" and "pad" in extras:
                one("qwen2+pad64", source, work / "qwen2-pad-out", options=("--pad-vocab-to-multiple", "64"), source_case="qwen2")
        sp_families = [f for f in families if f in ("llama", "gemma")] if "sp" in extras else []
        if sp_families:
            print("training SentencePiece tokenizers ...", flush=True)
            en_sp, de_sp = work / "en.model", work / "de.model"
            train_sentencepiece("en", en_sp, {"unk": 0, "bos": 1, "eos": 2, "pad": 3})  # LLaMA's order, with a pad
            train_sentencepiece("de", de_sp, {"pad": 0, "eos": 1, "bos": 2, "unk": 3})  # Gemma's order
            current_helper[0] = build_sp_model("llama", work / "helper-de-sp", de_sp, seed=4, hidden=16)
            for family in sp_families:
                source = build_sp_model(family, work / f"{family}-sp-source", en_sp, seed=20)
                one(f"{family}-sp", source, work / f"{family}-sp-out")
                cases[f"{family}-sp"]["helper_case"] = "helper-de-sp"
                if family == "gemma" and "extend" in extras:
                    one("gemma-sp+extend", source, work / "gemma-sp-extend-out", command="extend", source_case="gemma-sp")
        if "helper" in extras:
            cases["helper-de"] = {"source": check_folder("helper-de", helper, llama, args.cache, ggufs)}
            print_case("helper-de", cases["helper-de"])
            if sp_families:
                cases["helper-de-sp"] = {"source": check_folder("helper-de-sp", current_helper[0], llama, args.cache, ggufs)}
                print_case("helper-de-sp", cases["helper-de-sp"])
        if families:
            probe_src = work / f"{families[0]}-source"
            probe = convert(llama, args.cache, probe_src, ggufs / "probe.gguf", installed_gguf=True)
            report["converter"]["with_installed_gguf"] = {"case": f"{families[0]}/source", **probe}
            (ggufs / "probe.gguf").unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - t_start, 1)
    attribute(cases)
    report["summary"] = summarize(cases)
    print_table(cases)
    print(f"{report['seconds']:.0f} s")
    print(f"wrote {write_result('gguf_export', report, prov=prov, json_out=args.json_out)}", flush=True)
    return 0


def refusal_kind(entry: dict) -> str | None:
    """A refusal without the folder paths in it, to compare an output's with its controls'."""
    if entry["convert"]["accepted"]:
        return None
    err = entry["convert"].get("error", "")
    return "pre-tokenizer hash not recognized" if REFUSED_PRE in err else re.sub(r"(/[^/\s]+)+/", "", err)


def attribute(cases: dict) -> None:
    """Per output: is a refusal or a failed readback check also there in its controls (the source it
    came from, the helper whose tokenizer it took)? Then it is llama.cpp's, whoever made the model."""
    for name, case in cases.items():
        out = case.get("output")
        if out is None:
            continue
        controls = {}
        source_name = case.get("source_case", name)
        if cases.get(source_name, {}).get("source") is not None:
            controls["source (" + source_name + ")"] = cases[source_name]["source"]
        helper_name = case.get("helper_case") or cases.get(source_name, {}).get("helper_case")
        if helper_name and cases.get(helper_name, {}).get("source") is not None:
            controls["helper (" + helper_name + ")"] = cases[helper_name]["source"]
        att: dict = {"controls": list(controls)}
        kind = refusal_kind(out)
        if kind is not None:
            att["refusal"] = kind
            att["refused_alike"] = [c for c, e in controls.items() if refusal_kind(e) == kind]
        rb = out.get("readback")
        if rb is not None:
            att["failed_checks"] = {}
            for check in rb["failed"]:
                also = [c for c, e in controls.items() if e.get("readback") and check in e["readback"]["failed"]]
                att["failed_checks"][check] = {"also_fails_in": also}
        if kind is None and rb is not None and rb["pass"]:
            verdict = "accepted as it is; readback matches the output folder"
        elif kind is not None and att["refused_alike"] and (rb is None or rb["pass"]):
            verdict = f"refused as its control(s) {', '.join(att['refused_alike'])} are: llama.cpp's limit, not the output's"
            if rb is not None:
                verdict += "; with the hash registered it converts and the readback matches"
        elif kind is not None and not att["refused_alike"]:
            verdict = "refused where its controls are not: look at the output"
        else:
            ours = [c for c, v in att.get("failed_checks", {}).items() if not v["also_fails_in"]]
            theirs = [c for c, v in att.get("failed_checks", {}).items() if v["also_fails_in"]]
            parts = []
            if theirs:
                parts.append(f"checks failing in the controls too (llama.cpp's): {', '.join(theirs)}")
            if ours:
                parts.append(f"checks failing only in the output: {', '.join(ours)}")
            verdict = "; ".join(parts) or "see the entries"
        att["verdict"] = verdict
        case["attribution"] = att


def summarize(cases: dict) -> dict:
    out = {}
    for name, case in cases.items():
        row = {"init_ok": case.get("init", {}).get("ok")}
        for side in ("source", "output"):
            e = case.get(side)
            if e is None:
                continue
            row[side] = status_word(e)
            if "readback" in e:
                row[f"{side}_readback"] = "pass" if e["readback"]["pass"] else "FAIL: " + ",".join(e["readback"]["failed"])
        if "source_as_saved_by_transformers" in case:
            e = case["source_as_saved_by_transformers"]["convert"]
            row["source_as_saved_by_transformers"] = "accepted" if e["accepted"] else "refused: " + e.get("error", "?")
        if "attribution" in case:
            row["verdict"] = case["attribution"]["verdict"]
        out[name] = row
    return out


def print_case(name: str, case: dict) -> None:
    parts = []
    if "init" in case:
        parts.append(f"init {'ok' if case['init']['ok'] else 'FAILED'} {case['init']['seconds']:.1f}s")
    for side in ("source", "output"):
        e = case.get(side)
        if e is not None:
            rb = e.get("readback")
            parts.append(f"{side}: {status_word(e)}" + ("" if rb is None else (" readback pass" if rb["pass"] else f" readback FAIL {rb['failed']}")))
    print(f"  {name}: " + "; ".join(parts), flush=True)
    if "init" in case and not case["init"]["ok"]:
        for ln in case["init"].get("error", []):
            print(f"      {ln}", flush=True)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
