"""The new rows as the only trainable values of a loaded model.

Each trained tensor (the input embedding; an untied head) gets an fp32 master copy of its new rows,
put into the stored tensor at every forward pass (a parametrization, so whatever the module does
with its weight, a scale or a tied head, sees the trained rows). Every parameter of the model is
frozen; the stored tensors themselves are never written, so every other row keeps its value.
A tied model has one tensor and one master, seen by the embedding and the head alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parametrize


class WithNewRows(torch.nn.Module):
    """weight -> weight with rows `ids` replaced by the master rows, in the weight's dtype."""

    def __init__(self, ids: torch.Tensor, master: torch.nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("ids", ids, persistent=False)
        self.master = master

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_put((self.ids,), self.master.to(weight.dtype))


@dataclass
class TrainedRows:
    """The masters by side ("embedding", "head" when untied) and the ids they stand for."""

    ids: np.ndarray
    masters: dict[str, torch.nn.Parameter]
    tied: bool

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.masters.values())

    def rows(self, side: str, dtype: torch.dtype) -> torch.Tensor:
        """The trained rows of one side, as they will be stored (CPU, the tensor's dtype)."""
        return self.masters[side].detach().to("cpu", dtype)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.masters.values())


def is_tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def train_new_rows(model, new_ids: np.ndarray) -> TrainedRows:
    """Freeze the model and make its new rows (embedding, and an untied head) trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = is_tied(model)
    device = embedding.weight.device
    ids = torch.as_tensor(new_ids, dtype=torch.long, device=device)
    modules = {"embedding": embedding} if tied or head is None else {"embedding": embedding, "head": head}
    masters = {}
    for side, module in modules.items():
        masters[side] = torch.nn.Parameter(module.weight.detach()[ids].float().clone())
        parametrize.register_parametrization(module, "weight", WithNewRows(ids, masters[side]))
    if tied:  # the head reads the same tensor: the same master
        parametrize.register_parametrization(head, "weight", WithNewRows(ids, masters["embedding"]))
    return TrainedRows(np.asarray(new_ids), masters, tied)


def stop_training_rows(model) -> None:
    """Take the parametrizations off again, leaving the stored tensors as they were loaded."""
    for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
