"""`clpsurgery inspect`: what is in a checkpoint (headers only), and what init did to it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.formats.output_folder import MANIFEST_NAME
from clpsurgery.mixing.registry import describe
from clpsurgery.vocab.architecture import (
    config_vocab_size,
    find_vocab_tensors,
    read_config,
)
from clpsurgery.vocab.model_config import TOKEN_ID_KEYS
from clpsurgery.vocab.vocabulary import load_vocabulary, tokenizer_path


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
        manifest = read_json_file(manifest_path, "manifest")
        if not isinstance(manifest, dict):
            raise SurgeryError(manifest_path, "manifest is not a JSON object")
        manifest.pop("overlap_pairs", None)  # for `verify --source`; a long blob
        report["clpsurgery"] = manifest
    return report


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _assignments(values: dict) -> str:
    """`name=value, ...` for people: a null (JSON) id as `none`, a list of ids as `1 or 2`."""
    def shown(v: object) -> str:
        if v is None:
            return "none"
        if isinstance(v, list):
            return " or ".join(map(shown, v)) or "none"
        return str(v)

    return ", ".join(f"{k}={shown(v)}" for k, v in values.items())


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
        architectures = config["architectures"]
        if isinstance(architectures, list):
            architectures = ", ".join(map(str, architectures))
        lines.append(f"model type   {config['model_type'] or 'not set'}  {architectures or ''}".rstrip())
        rows = report["embedding"]["shape"][0] if report.get("embedding") else None
        vocab_line = f"vocab_size   {'not set' if config['vocab_size'] is None else config['vocab_size']} in config.json"
        if rows is not None:
            vocab_line += f", {rows} embedding rows"
        if tokenizer:
            vocab_line += f", tokenizer ids 0..{tokenizer['id_space'] - 1} ({tokenizer['tokens']} tokens)"
            if config["vocab_size"] is not None and tokenizer["id_space"] > config["vocab_size"]:
                vocab_line += "  WARNING: tokenizer ids past vocab_size"
        lines.append(vocab_line)
        if config["token_ids"]:
            lines.append("token ids    " + _assignments(config["token_ids"]))
    if tokenizer:
        specials = ", ".join(f"{t}={i}" for t, i in tokenizer["special_tokens"].items()) or "none"
        lines.append(f"special      {specials}")
    manifest = report.get("clpsurgery")
    if manifest:
        v = manifest["vocabulary"]
        w = manifest["weights"]
        o = manifest["options"]
        command = manifest.get("command") or []
        verb = command[1] if len(command) > 1 and command[1] in ("init", "extend", "apply") else "init"
        lines.append(f"clpsurgery {verb}")
        if manifest.get("extension"):
            e = manifest["extension"]
            lines.append(f"  extended   {e['source_size']} source ids kept, {e['new_tokens']} appended (ids {e['new_token_ids']['start']}..{e['new_token_ids']['stop'] - 1})")
        if manifest.get("kept_source_specials"):
            lines.append(f"  kept       {', '.join(manifest['kept_source_specials'])} (the source's chat-template tokens, with its rows)")
        lines.append(f"  from       {manifest['inputs']['source']['path']}  (helper {manifest['inputs']['helper']['path']})")
        lines.append(f"  vocabulary {v['source_size']} -> {v['target_size']}: {v['overlap']} copied, {v['missing']} combined ({v['match']} match)")
        how = describe(o.get("method", "clp"), o, "input")  # manifests before --method are clp
        counts = f"degenerate rows {w['degenerate_rows']}, signed rows {w['signed_rows']}, clipped rows {w['clipped_rows']}, uniform rows {w['uniform_rows']}"
        lines.append(f"  method     {how}; {counts}" + (f", empty rows {w['empty_rows']}" if w.get("empty_rows") else ""))
        head = manifest.get("head_weights")
        if head:
            lines.append(f"  output     {', '.join(manifest['tensors'].get('output_side', []))}: {describe(head['method'], o, 'output')}")
        lines.append(f"  rebuilt    {', '.join(manifest['tensors']['rebuilt'])}")
        lines.append("  seconds    " + ", ".join(f"{k} {s:.2f}" for k, s in manifest["seconds"].items()))
        for run in manifest.get("refine") or []:  # `clpsurgery refine`: the new rows trained afterwards
            held, settings = run["held_out"], run["settings"]
            lines.append(f"  refined    {run['objective']} on {Path(run['text']['path']).name} (SHA-256 {run['text']['sha256'][:12]}, {run['text']['trained_bytes']} bytes):"
                         f" {run['steps']} steps, {run['tokens']} tokens, learning rate {settings['learning_rate']:g}, seed {settings['seed']};"
                         f" held-out {held['before']['bpb']:.4f} -> {held['after']['bpb']:.4f} bits/byte; {', '.join(run['tensors'])}")
    return "\n".join(lines)


# --- inspect SOURCE --against HELPER: the plan of an init, before anything is written ------------

EXAMPLES = 5


def _overlap_section(plan, match: str) -> dict:
    from clpsurgery.vocab.vocabulary import MATCH_KINDS, match_overlap

    source_rows = plan.source_rows
    overlap = plan.overlap if plan.overlap.match == match else match_overlap(plan.source_vocab, plan.target_vocab, source_rows, match)
    source_tokens, target_tokens = plan.source_vocab.id_to_token(), plan.target_vocab.id_to_token()
    def spread(items: list) -> list:
        """A few evenly spaced items (the first ids are mostly bytes and specials)."""
        step = max(1, len(items) // EXAMPLES)
        return items[step // 2 :: step][:EXAMPLES]

    examples: dict[str, list] = {"string": [], "canonical": []}
    for t, s, kind in zip(overlap.target_ids.tolist(), overlap.source_ids.tolist(), overlap.kinds.tolist()):
        key = MATCH_KINDS[kind]
        if key in examples and t not in plan.target_vocab.byte_ids:
            examples[key].append([target_tokens[t], source_tokens[s]])
    examples = {k: spread(v) for k, v in examples.items()}
    missing = spread([target_tokens[i] for i in overlap.missing_ids.tolist() if i in target_tokens])
    return {
        "pairs": overlap.count,
        "by_kind": overlap.counts(),
        "missing": int(overlap.missing_ids.size),
        "examples": {**examples, "missing": missing},
    }


def inspect_transfer(plan) -> dict:
    """What an init with this plan would do: overlap under each match rule, the special-token
    mapping, and the tensors, bytes and memory it would write and use."""
    from clpsurgery.vocab.vocabulary import special_mapping

    options = plan.options
    summary = plan.summary()
    report = {
        "source": str(plan.source_path),
        "helper": str(plan.helper_path),
        "source_tensors": {
            "family": plan.source_tensors.family,
            "embedding": plan.source_tensors.embedding,
            "head": plan.source_tensors.head,
            "head_bias": plan.source_tensors.head_bias,
            "copies": list(plan.source_tensors.copies),
            "tied": plan.source_tensors.tied,
        },
        "helper_embedding": summary["helper_embedding"],
        "tokenizers": {
            role: {"path": str(v.path), "format": v.format, "style": v.style, "tokens": len(v.token_to_id), "id_space": v.size, "roles": v.roles}
            for role, v in (("source", plan.source_vocab), ("target", plan.target_vocab))
        },
        "options": options.as_dict(),
        "match": options.match,
        "overlap": {rule: _overlap_section(plan, rule) for rule in ("exact", "canonical")},
        "special_tokens": special_mapping(plan.source_vocab, plan.target_vocab, plan.overlap),
        "maps": [m.as_dict() for m in plan.maps],
        "would_write": {
            "rebuilt_tensors": summary["rebuilt_tensors"],
            "bytes_to_compute": summary["bytes_to_compute"],
            "bytes_to_copy": summary["bytes_to_copy"],
            "neighbours_per_token": summary["neighbours_per_token"],
            "weighting": options.weighting,
            "vocab_size": plan.output_rows,
            "methods": summary["methods"],
            "output_side": summary["output_side"],
            "added_head": summary["added_head"],
        },
    }
    if "memory_estimate" in summary:
        estimate = summary["memory_estimate"]
        report["would_write"]["memory_estimate"] = estimate
        report["would_write"]["peak_memory_estimate"] = max(estimate.values()) if estimate else None
    return report


def format_transfer_report(report: dict) -> str:
    t = report["source_tensors"]
    lines = [f"source       {report['source']}  ({t['family'] or 'family by tensor names'})"]
    embedding = report["helper_embedding"]
    lines.append(f"helper       {report['helper']}  " + (f"(embedding {embedding['name']} {embedding['shape']})" if embedding else "(tokenizer only: a helper-free method)"))
    head = f"{t['head']} (untied)" if t["head"] else "tied to the embedding"
    lines.append(f"tensors      embedding {t['embedding']}, head {head}" + (f", bias {t['head_bias']}" if t["head_bias"] else "") + (f", copies {', '.join(t['copies'])}" if t["copies"] else ""))
    for role, v in report["tokenizers"].items():
        lines.append(f"{role:<12} {v['format']} {v['style']}, {v['tokens']} tokens, ids 0..{v['id_space'] - 1}  " + (f"roles {_assignments(v['roles'])}" if v["roles"] else "no special-token roles"))
    for rule, o in report["overlap"].items():
        chosen = "  <- --match" if rule == report["match"] else ""
        kinds = ", ".join(f"{k} {n}" for k, n in o["by_kind"].items())
        lines.append(f"overlap      {rule:<9} {o['pairs']} pairs ({kinds}), {o['missing']} to combine{chosen}")
        for kind in ("string", "canonical"):
            if o["examples"][kind]:
                lines.append(f"  {kind:<10} " + ", ".join(f"{a!r}<-{b!r}" for a, b in o["examples"][kind]))
        if o["examples"]["missing"]:
            lines.append("  missing    " + ", ".join(repr(m) for m in o["examples"]["missing"]))
    specials = ", ".join(
        f"{row['target']}({row['role'] or '-'})<-{row['source'] if row['source'] is not None else 'combined'}" for row in report["special_tokens"]
    )
    lines.append(f"special      {specials or 'none'}")
    for m in report.get("maps", []):
        how = f"copies source {m['source']!r} ({m['source_id']})" if "source_id" in m else f"the mean of {m['text']!r}'s {len(m['pieces'])} source pieces {m['pieces']}"
        lines.append(f"map          {m['target']!r} ({m['target_id']}) {how}")
    w = report["would_write"]
    for name, shape in w["rebuilt_tensors"].items():
        lines.append(f"rebuild      {name}  {shape}")
    lines.append(f"bytes        {format_bytes(w['bytes_to_compute'])} to compute, {format_bytes(w['bytes_to_copy'])} to copy; vocab_size {w['vocab_size']}")
    if w.get("added_head"):
        lines.append(f"untie        {w['added_head']} added (tie_word_embeddings false): the embedding's shared rows copied, its new rows mixed apart")
    if "output" in w.get("methods", {}):
        lines.append(f"output side  {', '.join(w['output_side'])}: new rows by {describe(w['methods']['output'], report['options'], 'output')}")
    lines.append(f"method       {describe(report['options']['method'], report['options'], 'input')}; up to {w['neighbours_per_token']} source rows per new token")
    if w.get("peak_memory_estimate") is not None:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in w["memory_estimate"].items())
        lines.append(f"memory       about {format_bytes(w['peak_memory_estimate'])} at peak ({parts}) plus row blocks")
    return "\n".join(lines)
