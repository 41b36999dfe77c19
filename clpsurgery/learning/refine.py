"""`clpsurgery refine OUT --text FILE`: train only the rows init or extend made, the body frozen.

The order: read OUT's manifest and the text, estimate the memory and refuse before loading what
cannot fit, load the model (in its stored dtype), score the held-out slice, train the new rows of
the input embedding and of an untied head (a tied model's one tensor) with every other parameter
frozen, score the slice again, and write the refined output (refined_output.py) with its record.

Objective `lm`: next-token loss on the text, read through OUT's tokenizer as one stream of
segments, each after the start token (as score reads them), cut into rows of --seq + 1 tokens
and drawn in a seeded order. The last tenth of the text (at least one segment) is held out: it
is scored before and after, never trained on. Dropout is off (the body is frozen, only the rows
learn), so on the CPU a fixed seed gives the same bytes.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clpsurgery import __version__
from clpsurgery.errors import OptionError, SurgeryError
from clpsurgery.formats.checkpoint import CheckpointLayout
from clpsurgery.formats.output_folder import check_out_path
from clpsurgery.formats.safetensors_header import DTYPE_SIZES
from clpsurgery.learning.memory import check_fits, estimate
from clpsurgery.learning.model import LoadedModel, check_causal_lm_folder, load_causal_lm, torch_device
from clpsurgery.learning.new_rows import new_token_ids, read_manifest
from clpsurgery.learning.refined_output import check_destination, write_refined
from clpsurgery.learning.rows import TrainedRows, stop_training_rows, train_new_rows
from clpsurgery.learning.score import Progress, no_progress, score_loaded
from clpsurgery.learning.text import cut_segments, read_text
from clpsurgery.pipeline.tensor_io import TORCH_DTYPES

OBJECTIVES = ("lm",)
DEFAULT_STEPS = 200
HELD_OUT_SHARE = 0.1
LOSS_CURVE_POINTS = 100  # the manifest's loss curve: at most this many means of consecutive steps


@dataclass(frozen=True)
class RefineSettings:
    """How refine trains: what the manifest records of it, beside the text and the results."""

    objective: str = "lm"
    steps: int | None = None
    tokens: int | None = None
    minutes: float | None = None
    batch: int = 8
    seq: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0
    device: str = "auto"
    max_memory: int | None = None
    max_bytes: int | None = None

    def step_budget(self, batch_tokens: int) -> int | None:
        """Steps to run: --steps, --tokens over the tokens a step reads, or (--minutes) None."""
        if self.minutes is not None:
            return None
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / batch_tokens))
        return self.steps if self.steps is not None else DEFAULT_STEPS


def trained_tensors(manifest: dict, place: Path) -> dict[str, str]:
    """Side -> tensor name of what refine trains: the embedding, and the head where untied."""
    tensors = manifest["tensors"]
    embedding, head = tensors.get("embedding"), tensors.get("head")
    if not isinstance(embedding, str):
        raise SurgeryError(place, "names no embedding tensor")
    sides = {"embedding": embedding}
    if isinstance(head, str) and not tensors.get("tied"):
        sides["head"] = head
    others = [n for n in (tensors.get("rebuilt") or {}) if n not in sides.values() and n != tensors.get("head_bias")]
    if others:
        raise SurgeryError(place, f"also rebuilt {others[0]!r}, a copy of the embedding refine would leave behind; refine trains the embedding and the head only")
    return sides


def split_held_out(segments: list[str], share: float = HELD_OUT_SHARE) -> tuple[list[str], list[str]]:
    """(training segments, held-out segments): the held-out slice is the last `share` of the
    bytes, at least one segment, and at least one segment is left to train on."""
    if len(segments) < 2:
        raise SurgeryError("--text", "is too short: refine needs at least two segments (about 3 kB of lines), one to train on and one held out to score")
    sizes = [len(s.encode("utf-8")) for s in segments]
    held, cut = 0, len(segments)
    while cut > 1 and (held < share * sum(sizes) or cut == len(segments)):
        cut -= 1
        held += sizes[cut]
    return segments[:cut], segments[cut:]


def token_rows(loaded: LoadedModel, segments: list[str], seq: int) -> torch.Tensor:
    """The training segments as one token stream (each after the start token) cut into rows of
    seq + 1 tokens; a stream shorter than one row is one shorter row."""
    ids = loaded.tokenizer(segments, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for segment in ids for t in (loaded.start_token_id, *segment)], dtype=torch.long)
    if len(stream) < 2:
        raise SurgeryError("--text", "gives fewer than two tokens to train on")
    width = min(seq + 1, len(stream))
    count = (len(stream) - 1) // (width - 1)  # consecutive rows share one token: each row's last is the next one's first
    return torch.stack([stream[i * (width - 1) : i * (width - 1) + width] for i in range(count)])


def learning_rate_at(step: int, settings: RefineSettings, steps: int | None) -> float:
    """Linear warmup, then cosine decay to a tenth (constant after warmup under --minutes)."""
    warmup = min(settings.warmup_steps, max(1, (steps or settings.warmup_steps) // 10))
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    if steps is None:
        return settings.learning_rate
    progress = (step - warmup) / max(1, steps - warmup)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(loaded: LoadedModel, trained: TrainedRows, rows: torch.Tensor, settings: RefineSettings, progress: Progress) -> dict:
    """Next-token loss on the rows, AdamW on the new rows only; returns steps, tokens, the loss
    curve and the seconds taken."""
    steps = settings.step_budget(settings.batch * (rows.shape[1] - 1))
    generator = torch.Generator().manual_seed(settings.seed)
    order, position = torch.randperm(len(rows), generator=generator), 0
    optimiser = torch.optim.AdamW(trained.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    deadline = None if settings.minutes is None else time.monotonic() + 60 * settings.minutes
    losses, tokens, step = [], 0, 0
    started = time.perf_counter()
    total = steps if steps is not None else max(1, int(60 * settings.minutes))
    with progress("refining", total) as advance:
        while (steps is None or step < steps) and (deadline is None or time.monotonic() < deadline):
            picked = []
            for _ in range(settings.batch):
                if position == len(order):
                    order, position = torch.randperm(len(rows), generator=generator), 0
                picked.append(order[position])
                position += 1
            batch = rows[torch.stack(picked)].to(loaded.device)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate_at(step, settings, steps)
            logits = loaded.model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimiser.step()
            losses.append(float(loss.detach()))
            tokens += batch[:, :-1].numel()
            step += 1
            advance(1 if steps is not None else 0)
    return {"steps": step, "tokens": tokens, "seconds": round(time.perf_counter() - started, 3), "loss_curve": loss_curve(losses), "schedule": "constant after warmup" if steps is None else "warmup, cosine to 0.1"}


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> list[list[float]]:
    """[last step, mean loss] over consecutive windows of steps, at most `points` of them."""
    width = max(1, math.ceil(len(losses) / points))
    return [[min(len(losses), start + width), round(float(np.mean(losses[start : start + width])), 5)] for start in range(0, len(losses), width)]


def _score_summary(score: dict) -> dict:
    keys = ("bpb", "ppl", "tokens", "bytes", "segments")
    summary = {k: score[k] for k in keys}
    if "by_target" in score:
        summary["by_target"] = {k: score["by_target"][k] for k in ("new_share", "mass_on_new", "new_nll_per_token", "shared_nll_per_token")}
    return summary


def refine_output(
    out: str | Path, text: str | Path, destination: str | Path | None, settings: RefineSettings, *, in_place: bool = False,
    force: bool = False, command: list[str] | None = None, progress: Progress = no_progress, echo: Callable[[str], None] = lambda line: None,
) -> dict:
    """Refine OUT's new rows on the text and write the result (to `destination`, or OUT with
    `in_place`); returns the manifest's new refine record."""
    out = Path(out)
    if settings.objective not in OBJECTIVES:
        raise OptionError("--objective", f"{settings.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if (destination is None) == (not in_place):
        raise OptionError("refine", "give the refined output's folder (--output DIR) or --in-place, one of them")
    destination = out if in_place else Path(destination)
    manifest = read_manifest(out)
    check_causal_lm_folder(out, "OUT")
    check_destination(out, destination, in_place)
    check_out_path(destination, force or in_place)  # before the slow work; staged_output checks again
    sides = trained_tensors(manifest, out)
    new_ids = new_token_ids(manifest, out)
    if new_ids.size == 0:
        raise SurgeryError(out, "has no new rows to refine (every row copies a source row)")
    read = read_text(text, settings.max_bytes)
    train_segments, held_out = split_held_out(cut_segments([read.content], settings.max_bytes))
    where = torch_device(settings.device)
    layout = CheckpointLayout.open(out)
    stored = {side: layout.info(name) for side, name in sides.items()}
    dtype = TORCH_DTYPES[stored["embedding"].dtype]
    config = _text_config(out)
    parts = estimate(layout.total_bytes, DTYPE_SIZES[stored["embedding"].dtype], config, settings.batch, settings.seq,
                     [(info.rows, info.shape[1]) for info in stored.values()], int(new_ids.size))
    gpu_free = torch.cuda.mem_get_info()[0] if where == "cuda" else None
    check_fits(parts, settings.max_memory, gpu_free)

    torch.manual_seed(settings.seed)
    loaded = load_causal_lm(out, "OUT", where, dtype)
    _check_model_matches(loaded, stored, manifest, out)
    seq = min(settings.seq, (loaded.context or settings.seq + 1) - 1)
    rows = token_rows(loaded, train_segments, seq)
    echo(f"refining {new_ids.size} new rows of {', '.join(sides.values())} on {sum(len(s.encode()) for s in train_segments)} bytes "
         f"({rows.numel()} tokens), scoring {sum(len(s.encode()) for s in held_out)} held-out bytes")
    before = score_loaded(loaded, held_out, seq + 1, settings.batch, new_ids)
    trained = train_new_rows(loaded.model, new_ids)
    training = train_lm(loaded, trained, rows, settings, progress)
    after = score_loaded(loaded, held_out, seq + 1, settings.batch, new_ids)
    stored_rows = {name: _as_bytes(trained.rows(side, dtype)) for side, name in sides.items()}
    stop_training_rows(loaded.model)
    del loaded

    hashes = {name: tensor_hash for entry in manifest["outputs"] for name, tensor_hash in (entry.get("tensor_sha256") or {}).items()}
    record = {
        "tool": {"name": "clpsurgery", "version": __version__},
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "objective": settings.objective,
        "text": {"path": str(read.path), "sha256": read.sha256, "bytes": read.file_bytes, "max_bytes": settings.max_bytes,
                 "trained_bytes": sum(len(s.encode("utf-8")) for s in train_segments), "held_out_bytes": sum(len(s.encode("utf-8")) for s in held_out)},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("max_memory", "max_bytes")} | {"seq": seq},
        "device": where,
        "dtype": stored["embedding"].dtype,
        "new_rows": int(new_ids.size),
        "trained_parameters": trained.parameter_count(),
        "tensors": {name: {"side": side, "rows": int(new_ids.size), "sha256_before": hashes.get(name)} for side, name in sides.items()},
        "steps": training["steps"],
        "tokens": training["tokens"],
        "schedule": training["schedule"],
        "seconds": training["seconds"],
        "loss_curve": training["loss_curve"],
        "held_out": {"before": _score_summary(before), "after": _score_summary(after)},
        "memory_estimate": parts,
    }
    write_refined(out, destination, manifest, new_ids, stored_rows, record, force or in_place)
    return record


def _text_config(out: Path) -> dict:
    from clpsurgery.vocab.architecture import read_config, text_config

    return text_config(read_config(out / "config.json"))


def _check_model_matches(loaded: LoadedModel, stored: dict, manifest: dict, out: Path) -> None:
    """The loaded model's embedding (and head) are the stored tensors the manifest names."""
    from clpsurgery.learning.rows import is_tied

    model = loaded.model
    weights = {"embedding": model.get_input_embeddings().weight}
    if "head" in stored:
        if is_tied(model):
            raise SurgeryError(out, "stores an untied head, but the model library ties it to the embedding (config.json tie_word_embeddings)")
        weights["head"] = model.get_output_embeddings().weight
    for side, info in stored.items():
        if tuple(weights[side].shape) != info.shape:
            raise SurgeryError(out, f"{info.name} is {list(info.shape)}, the loaded model's {side} {list(weights[side].shape)}")


def _as_bytes(rows: torch.Tensor) -> bytes:
    return rows.contiguous().view(torch.uint8).numpy().tobytes()
