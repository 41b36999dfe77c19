"""`clpsurgery score MODEL --text FILE [--against SOURCE]`: bits per UTF-8 byte of a causal LM on a
text, the figure that compares models with different tokenizers.

Each segment (whole lines, text.cut_segments) is tokenised by the model's own tokenizer, preceded
by its BOS token (EOS where it has none) and every one of its tokens is scored: the summed negative
log-likelihood, in bits, over the segments' UTF-8 bytes. A segment longer than the context is
scored in consecutive windows, each starting again from BOS. For a clpsurgery output the loss is
also split by whether the token to predict is one of the rows init or extend made (new) or a
copied one (shared), with the probability the model puts on new tokens: where a zero-shot model
loses its bits. The quality benchmark (benchmarks/quality/run.py) scores through this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.learning.model import LoadedModel, load_causal_lm, torch_device
from clpsurgery.learning.new_rows import new_token_ids_of
from clpsurgery.learning.text import read_text

DEFAULT_CONTEXT = 1024
DEFAULT_BATCH = 4

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


def no_progress(label: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


def windows(token_ids: Sequence[Sequence[int]], start_token_id: int, context: int) -> list[list[int]]:
    """Each segment's tokens after the start token, in windows of at most `context` tokens."""
    if context < 2:
        raise SurgeryError("--context", f"{context} leaves no token to score after the start token")
    sequences = []
    for ids in token_ids:
        for begin in range(0, len(ids), context - 1):
            sequences.append([start_token_id, *ids[begin : begin + context - 1]])
    return sequences


def score_segments(
    model, tokenizer, segments: Sequence[str], context: int = DEFAULT_CONTEXT, batch: int = DEFAULT_BATCH,
    new_ids: np.ndarray | None = None, start_token_id: int | None = None, progress: Progress = no_progress,
) -> dict:
    """The summed NLL (nats) of every token of every segment, perplexity per token and bits per
    UTF-8 byte; with `new_ids`, `by_target`: the split by new and shared target token and the
    probability put on new tokens against their share of the text."""
    if start_token_id is None:
        start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    token_ids = tokenizer(list(segments), add_special_tokens=False)["input_ids"] if segments else []
    sequences = sorted(windows(token_ids, start_token_id, context), key=len)
    nbytes = sum(len(s.encode("utf-8")) for s in segments)
    nll, scored = 0.0, 0
    is_new = None
    split = {"new_tokens": 0, "new_nll_nats": 0.0, "shared_nll_nats": 0.0, "summed_probability_on_new": 0.0}
    if new_ids is not None:
        is_new = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool, device=device)
        is_new[torch.as_tensor(np.asarray(new_ids), dtype=torch.long, device=device)] = True
    was_training = model.training
    model.eval()
    with torch.no_grad(), progress("scoring", len(sequences)) as advance:
        for first in range(0, len(sequences), batch):
            chunk = sequences[first : first + batch]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sequence in enumerate(chunk):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:]
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            real = mask[:, 1:].bool()
            nll -= float(token_logp[real].sum())
            scored += int(real.sum())
            if is_new is not None:
                new = is_new[targets] & real
                split["new_tokens"] += int(new.sum())
                split["new_nll_nats"] -= float(token_logp[new].sum())
                split["shared_nll_nats"] -= float(token_logp[real & ~new].sum())
                split["summed_probability_on_new"] += float(logp[real].exp()[:, is_new].sum())
            advance(len(chunk))
    if was_training:
        model.train()
    if scored == 0:
        raise SurgeryError("text", "holds no token to score")
    result = {
        "nll_nats": nll,
        "tokens": scored,
        "bytes": nbytes,
        "segments": len(segments),
        "ppl": math.exp(nll / scored),
        "bpb": nll / math.log(2) / nbytes,
        "bytes_per_token": nbytes / scored,
    }
    if is_new is not None:
        n_new = split["new_tokens"]
        result["by_target"] = {
            "new_share": n_new / scored,
            "mass_on_new": split["summed_probability_on_new"] / scored,
            "new_nll_per_token": split["new_nll_nats"] / max(1, n_new),
            "shared_nll_per_token": split["shared_nll_nats"] / max(1, scored - n_new),
            **split,
        }
    return result


def score_loaded(loaded: LoadedModel, segments: Sequence[str], context: int, batch: int, new_ids: np.ndarray | None = None, progress: Progress = no_progress) -> dict:
    """score_segments for a loaded model, its context capped at what its positions allow."""
    context = min(context, loaded.context or context)
    return score_segments(loaded.model, loaded.tokenizer, segments, context, batch, new_ids, loaded.start_token_id, progress)


def score_command(
    model: str | Path, text: str | Path, against: str | Path | None = None, max_bytes: int | None = None,
    device: str = "auto", context: int = DEFAULT_CONTEXT, batch: int = DEFAULT_BATCH, progress: Progress = no_progress,
) -> dict:
    """Score MODEL (and SOURCE) on the same segments of the text: the report `score` prints."""
    model, against = Path(model), None if against is None else Path(against)
    read = read_text(text, max_bytes)
    segments = read.segments(max_bytes)
    if not segments:
        raise SurgeryError(text, "holds no line of text to score")
    new_ids = new_token_ids_of(model)
    where = torch_device(device)
    report: dict = {
        "text": {"path": str(read.path), "sha256": read.sha256, "file_bytes": read.file_bytes, "scored_bytes": sum(len(s.encode("utf-8")) for s in segments), "segments": len(segments)},
        "device": where,
        "context": context,
    }
    for role, path, ids in (("model", model, new_ids), ("against", against, None)):
        if path is None:
            continue
        loaded = load_causal_lm(path, "MODEL" if role == "model" else "SOURCE", where)
        try:
            report[role] = {"path": str(path), **score_loaded(loaded, segments, context, batch, ids, progress)}
        finally:
            del loaded
    if against is not None:
        report["gap_bpb"] = report["model"]["bpb"] - report["against"]["bpb"]
    return report


def format_score(report: dict) -> str:
    """The report as a few lines: bits per byte first, the rest after."""
    lines = [f"text         {report['text']['path']}: {report['text']['scored_bytes']} bytes in {report['text']['segments']} segments"]
    for role in ("model", "against"):
        if role not in report:
            continue
        r = report[role]
        lines.append(f"{'model' if role == 'model' else 'against':<12} {r['path']}: {r['bpb']:.4f} bits/byte"
                     f" ({r['tokens']} tokens, {r['bytes_per_token']:.2f} bytes/token, perplexity {r['ppl']:.2f} per token)")
        b = r.get("by_target")
        if b:
            lines.append(f"  new tokens {b['new_share']:.1%} of the tokens, {b['mass_on_new']:.1%} of the probability;"
                         f" NLL per token new {b['new_nll_per_token']:.2f}, shared {b['shared_nll_per_token']:.2f} nats")
    if "gap_bpb" in report:
        lines.append(f"gap          {report['gap_bpb']:+.4f} bits/byte (model minus against)")
    return "\n".join(lines)
