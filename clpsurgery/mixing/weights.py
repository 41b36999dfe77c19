"""Weighting schemes: from similarities to a missing token's neighbours, to mixing weights.

Every scheme takes a [rows, k] block of cosine similarities (k may be the whole overlap) and
returns fp32 weights of the same shape whose rows sum to one, plus flags for the rows that the
raw formula could not serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from clpsurgery.mixing.choices import DEFAULT_TEMPERATURE, SCHEMES

# A row whose similarity sum is at most this fraction of its absolute sum is degenerate: the
# paper's cos / sum(cos) would divide by (nearly) zero or flip every sign.
TINY_SUM_FRACTION = 1e-3


@dataclass
class WeightStats:
    """What the weighting did, summed over all rows."""

    rows: int = 0
    degenerate_rows: int = 0  # sum of similarities zero, negative or tiny (clp: clipped instead)
    signed_rows: int = 0  # rows written with a negative weight (only faithful clp keeps these)
    clipped_rows: int = 0  # rows where negative similarities were clipped to zero
    uniform_rows: int = 0  # no positive similarity at all: uniform weights over the neighbours
    empty_rows: int = 0  # nothing to mix (fvt: no piece the source can encode): a zero row
    max_abs_weight: float = 0.0

    def add(self, other: WeightStats) -> None:
        self.rows += other.rows
        self.degenerate_rows += other.degenerate_rows
        self.signed_rows += other.signed_rows
        self.clipped_rows += other.clipped_rows
        self.uniform_rows += other.uniform_rows
        self.empty_rows += other.empty_rows
        self.max_abs_weight = max(self.max_abs_weight, other.max_abs_weight)

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def mixing_weights(similarities: torch.Tensor, scheme: str, temperature: float = DEFAULT_TEMPERATURE) -> tuple[torch.Tensor, WeightStats]:
    """Weights for one block of rows of similarities, in fp32, and what happened to them."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weighting {scheme!r}; choose from {', '.join(SCHEMES)}")
    sims = similarities.to(torch.float64)
    stats = WeightStats(rows=sims.shape[0])
    with _one_thread_for_one_row(sims):
        if scheme == "softmax":
            weights = torch.softmax(sims / temperature, dim=1)
        elif scheme == "sparsemax":
            weights = sparsemax(sims)
        else:
            weights = _clp(sims, clip_all=(scheme == "clp-clipped"), stats=stats)
    stats.signed_rows = int((weights < 0).any(dim=1).sum())
    if weights.numel():
        stats.max_abs_weight = float(weights.abs().max())
    return weights.to(torch.float32), stats


@contextmanager
def _one_thread_for_one_row(sims: torch.Tensor) -> Iterator[None]:
    """torch splits a long reduction across threads when it has a single output (one row), which
    makes the sum depend on the thread count; with two rows or more each row is summed alone, in
    a fixed order. A lone row is therefore reduced on one thread: the same bytes either way."""
    threads = torch.get_num_threads()
    if sims.shape[0] != 1 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _clp(sims: torch.Tensor, clip_all: bool, stats: WeightStats) -> torch.Tensor:
    """cos / sum(cos) (the paper), with degenerate rows (or, clipped, every row) clipped."""
    total = sims.sum(dim=1, keepdim=True)
    degenerate = (total <= TINY_SUM_FRACTION * sims.abs().sum(dim=1, keepdim=True)).squeeze(1)
    stats.degenerate_rows = int(degenerate.sum())
    clip = torch.ones_like(degenerate) if clip_all else degenerate
    has_negative = (sims < 0).any(dim=1)
    stats.clipped_rows = int((clip & has_negative).sum())
    positive = sims.clamp(min=0)
    positive_total = positive.sum(dim=1, keepdim=True)
    none_positive = (positive_total <= 0).squeeze(1)
    uniform = clip & none_positive
    stats.uniform_rows = int(uniform.sum())
    k = sims.shape[1]
    safe_total = torch.where(clip.unsqueeze(1), positive_total, total)
    numer = torch.where(clip.unsqueeze(1), positive, sims)
    weights = numer / torch.where(safe_total == 0, torch.ones_like(safe_total), safe_total)
    if k:
        weights[uniform] = 1.0 / k
    return weights


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension (Martins & Astudillo, 2016), as FOCUS uses."""
    if scores.shape[-1] == 0:
        return scores.clone()
    sorted_scores, _ = torch.sort(scores, dim=-1, descending=True)
    cumulative = sorted_scores.cumsum(dim=-1)
    ranks = torch.arange(1, scores.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
    support = 1 + ranks * sorted_scores > cumulative
    support_size = support.sum(dim=-1, keepdim=True)
    tau = (cumulative.gather(-1, support_size - 1) - 1) / support_size.to(scores.dtype)
    return (scores - tau).clamp(min=0)
