"""`clpsurgery inspect`: what is in a checkpoint (headers only), and what init did to it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .architecture import config_vocab_size, find_vocab_tensors, read_config
from .checkpoint import Checkpoint
from .errors import SurgeryError
from .model_config import TOKEN_ID_KEYS
from .output_folder import MANIFEST_NAME
from .vocabulary import load_vocabulary, tokenizer_path


def inspect_checkpoint(path: str | Path) -> dict:
    """A report of a checkpoint built from headers, config.json and the tokenizer only."""
    path = Path(path)
    with Checkpoint.open(path) as checkpoint:
        folder = path if path.is_dir() else path.parent
        report: dict = {
            "path": str(path),
            "files": [{"file": h.path.name, "bytes": h.file_size, "tensors": len(h.tensors)} for h in checkpoint.headers],
            "total_bytes": checkpoint.total_bytes,
            "sharded": checkpoint.is_sharded,
            "tensor_count": len(checkpoint.tensors),
            "dtypes": dict(sorted(Counter(r.info.dtype for r in checkpoint.tensors.values()).items())),
            "parameters": checkpoint.parameter_count,
            "metadata": checkpoint.headers[0].metadata,
        }
        shapes = {n: r.info.shape for n, r in checkpoint.tensors.items()}
        try:
            vocab_tensors = find_vocab_tensors(shapes, str(path))
        except SurgeryError as e:
            report["embedding"] = None
            report["embedding_problem"] = e.problem
            vocab_tensors = None
        if vocab_tensors is not None:
            emb = checkpoint.info(vocab_tensors.embedding)
            report["embedding"] = {"name": emb.name, "shape": list(emb.shape), "dtype": emb.dtype}
            report["head"] = None
            if vocab_tensors.head:
                head = checkpoint.info(vocab_tensors.head)
                report["head"] = {"name": head.name, "shape": list(head.shape), "dtype": head.dtype}
            report["head_bias"] = vocab_tensors.head_bias
            report["tied"] = vocab_tensors.tied
    config_path = folder / "config.json"
    if config_path.is_file():
        config = read_config(config_path)
        report["config"] = {
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            "vocab_size": config_vocab_size(config),
            "tie_word_embeddings": config.get("tie_word_embeddings"),
            "token_ids": {k: config[k] for k in TOKEN_ID_KEYS if k in config},
        }
    if tokenizer_path(folder).is_file():
        vocabulary = load_vocabulary(folder)
        report["tokenizer"] = {
            "tokens": len(vocabulary.token_to_id),
            "id_space": vocabulary.size,
            "special_tokens": {t: vocabulary.token_to_id[t] for t in vocabulary.special_tokens},
        }
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            report["clpsurgery"] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SurgeryError(manifest_path, f"not valid JSON ({e})") from e
    return report


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(report: dict) -> str:
    """The report as an aligned, readable table."""
    lines = [f"checkpoint   {report['path']}"]
    for f in report["files"]:
        lines.append(f"  file       {f['file']}  {format_bytes(f['bytes'])}  {f['tensors']} tensors")
    lines.append(f"size         {format_bytes(report['total_bytes'])} in {len(report['files'])} file(s){' (sharded)' if report['sharded'] else ''}")
    lines.append(f"tensors      {report['tensor_count']}  ({', '.join(f'{k} x{v}' for k, v in report['dtypes'].items())})")
    lines.append(f"parameters   {report['parameters']:,}")
    if report.get("embedding"):
        e = report["embedding"]
        lines.append(f"embedding    {e['name']}  {e['shape']}  {e['dtype']}")
        if report["head"]:
            h = report["head"]
            lines.append(f"head         {h['name']}  {h['shape']}  {h['dtype']}  (untied)")
        else:
            lines.append("head         none stored (tied to the embedding, or no LM head)")
        if report.get("head_bias"):
            lines.append(f"head bias    {report['head_bias']}")
    else:
        lines.append(f"embedding    not found: {report.get('embedding_problem')}")
    config = report.get("config")
    tokenizer = report.get("tokenizer")
    if config:
        lines.append(f"model type   {config['model_type']}  {config['architectures'] or ''}".rstrip())
        rows = report["embedding"]["shape"][0] if report.get("embedding") else None
        vocab_line = f"vocab_size   {config['vocab_size']} in config.json"
        if rows is not None:
            vocab_line += f", {rows} embedding rows"
        if tokenizer:
            vocab_line += f", tokenizer ids 0..{tokenizer['id_space'] - 1} ({tokenizer['tokens']} tokens)"
            if config["vocab_size"] is not None and tokenizer["id_space"] > config["vocab_size"]:
                vocab_line += "  WARNING: tokenizer ids past vocab_size"
        lines.append(vocab_line)
        if config["token_ids"]:
            lines.append("token ids    " + ", ".join(f"{k}={v}" for k, v in config["token_ids"].items()))
    if tokenizer:
        specials = ", ".join(f"{t}={i}" for t, i in tokenizer["special_tokens"].items()) or "none"
        lines.append(f"special      {specials}")
    manifest = report.get("clpsurgery")
    if manifest:
        v = manifest["vocabulary"]
        w = manifest["weights"]
        o = manifest["options"]
        lines.append("clpsurgery init")
        lines.append(f"  from       {manifest['inputs']['source']['path']}  (helper {manifest['inputs']['helper']['path']})")
        lines.append(f"  vocabulary {v['source_size']} -> {v['target_size']}: {v['overlap']} copied, {v['missing']} combined ({v['match']} match)")
        lines.append(f"  weighting  {o['weighting']}, top-k {o['top_k']}; degenerate rows {w['degenerate_rows']}, signed rows {w['signed_rows']}, clipped rows {w['clipped_rows']}, uniform rows {w['uniform_rows']}")
        lines.append(f"  rebuilt    {', '.join(manifest['tensors']['rebuilt'])}")
        lines.append("  seconds    " + ", ".join(f"{k} {s:.2f}" for k, s in manifest["seconds"].items()))
    return "\n".join(lines)
