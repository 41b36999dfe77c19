"""Which tensors hold the token embeddings and the output head, from config.json and tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SurgeryError
from .json_input import read_json_file

# Input-embedding tensor names, most specific first (GPT-2, BLOOM, LLaMA/Mistral/Qwen2/Gemma/Phi,
# GPT-NeoX, OPT, BERT/XLM-R, T5, MPT/Falcon, older Phi).
EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "transformer.word_embeddings.weight",
    "word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "bert.embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight",
    "embeddings.word_embeddings.weight",
    "shared.weight",
    "transformer.embd.wte.weight",
    "embed_tokens.weight",
)

# Untied output-head names (weight, then an optional vocab-sized bias).
HEAD_NAMES = (
    ("lm_head.weight", "lm_head.bias"),
    ("embed_out.weight", "embed_out.bias"),
    ("lm_head.linear.weight", "lm_head.linear.bias"),
    ("output.weight", None),
)


@dataclass(frozen=True)
class VocabTensors:
    """The vocab-sized tensors of a checkpoint: the input embedding and, if untied, the head."""

    embedding: str
    head: str | None
    head_bias: str | None

    @property
    def tied(self) -> bool:
        return self.head is None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.embedding, self.head, self.head_bias) if n)


def read_config(path: Path) -> dict:
    """config.json as a dict; SurgeryError if unreadable or not a JSON object."""
    doc = read_json_file(path, "config")
    if not isinstance(doc, dict):
        raise SurgeryError(path, "is not a JSON object")
    return doc


def text_config(config: dict) -> dict:
    """The part of a config that describes the language model (`text_config` for multimodal ones)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def config_vocab_size(config: dict) -> int | None:
    value = text_config(config).get("vocab_size", config.get("vocab_size"))
    return value if isinstance(value, int) else None


def find_vocab_tensors(
    tensor_shapes: dict[str, tuple[int, ...]],
    place: str,
    embedding: str | None = None,
    head: str | None = None,
    head_bias: str | None = None,
) -> VocabTensors:
    """Find the input embedding and untied head among a checkpoint's tensors (or check named ones)."""
    if embedding is None:
        embedding = next((n for n in EMBEDDING_NAMES if n in tensor_shapes), None)
        if embedding is None:
            raise SurgeryError(place, "no input-embedding tensor found (name it with --embedding-tensor)")
    elif embedding not in tensor_shapes:
        raise SurgeryError(place, f"has no tensor {embedding!r}")
    shape = tensor_shapes[embedding]
    if len(shape) != 2:
        raise SurgeryError(place, f"embedding {embedding!r} has shape {list(shape)}, expected [vocab, hidden]")
    if head is None:
        for weight, bias in HEAD_NAMES:
            if weight in tensor_shapes and weight != embedding:
                head = weight
                if head_bias is None and bias in tensor_shapes:
                    head_bias = bias
                break
    elif head not in tensor_shapes:
        raise SurgeryError(place, f"has no tensor {head!r}")
    if head is not None:
        head_shape = tensor_shapes[head]
        if len(head_shape) != 2 or head_shape[0] != shape[0]:
            raise SurgeryError(place, f"head {head!r} has shape {list(head_shape)}, embedding {embedding!r} has {list(shape)}")
    if head_bias is not None:
        if head_bias not in tensor_shapes:
            raise SurgeryError(place, f"has no tensor {head_bias!r}")
        if tensor_shapes[head_bias] != (shape[0],):
            raise SurgeryError(place, f"head bias {head_bias!r} has shape {list(tensor_shapes[head_bias])}, expected [{shape[0]}]")
    return VocabTensors(embedding, head, head_bias)
