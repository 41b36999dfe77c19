"""Which tensors hold the token embeddings, the output head and vocab-sized biases.

Found from `config.json` (`model_type`, `architectures`, `tie_word_embeddings`, `text_config`) and
the tensor names, with one entry per model family in `FAMILIES`. Every tensor whose first
dimension is indexed by token id is rebuilt the same way, row by row: the input embedding, an
untied head, a vocab-sized bias (a 1-D tensor is a column of rows of width one), and the copies
some checkpoints store beside them (T5's `encoder.embed_tokens.weight` and
`decoder.embed_tokens.weight` mirror `shared.weight`; BERT's `cls.predictions.decoder.bias`
mirrors `cls.predictions.bias`). Rebuilding a copy from identical source bytes gives identical
output, so copies stay copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import read_json_file


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its vocab-sized tensors (names without a wrapper prefix)."""

    name: str
    model_types: tuple[str, ...]
    embedding: tuple[str, ...]
    head: tuple[str, ...] = ()
    head_bias: tuple[str, ...] = ()
    # Other vocab-sized tensors: copies of the embedding, head or bias that some savers write.
    copies: tuple[str, ...] = ()
    # tie_word_embeddings when config.json does not say.
    tied_by_default: bool = True
    # Tied in the model whatever the config says (no separate head exists).
    always_tied: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), ("transformer.wte.weight", "wte.weight"), ("lm_head.weight",)),
    Family("bloom", ("bloom",), ("transformer.word_embeddings.weight", "word_embeddings.weight"), ("lm_head.weight",)),
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "phi3", "olmo", "olmo2", "stablelm", "starcoder2", "granite", "cohere", "smollm3"),
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("lm_head.weight",),
        tied_by_default=False,
    ),
    Family("gpt_neox", ("gpt_neox",), ("gpt_neox.embed_in.weight", "embed_in.weight"), ("embed_out.weight",), tied_by_default=False),
    Family(
        "falcon",
        ("falcon", "RefinedWeb", "RefinedWebModel"),
        ("transformer.word_embeddings.weight", "word_embeddings.weight"),
        ("lm_head.weight",),
    ),
    Family(
        "opt",
        ("opt",),
        ("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        ("lm_head.weight",),
    ),
    Family(
        "phi",
        ("phi", "phi-msft", "mixformer-sequential"),
        ("model.embed_tokens.weight", "transformer.embd.wte.weight", "layers.0.wte.weight"),
        ("lm_head.weight", "lm_head.linear.weight"),
        ("lm_head.bias", "lm_head.linear.bias"),
        tied_by_default=False,
    ),
    Family("mpt", ("mpt",), ("transformer.wte.weight",), ("lm_head.weight",), always_tied=True),
    Family(
        "t5",
        ("t5", "mt5", "umt5", "longt5"),
        ("shared.weight",),
        ("lm_head.weight",),
        copies=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    ),
    Family(
        "bert",
        ("bert", "distilbert", "electra"),
        ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.weight", "vocab_projector.weight"),
        ("cls.predictions.bias", "vocab_projector.bias"),
        copies=("cls.predictions.decoder.bias",),
    ),
    Family(
        "roberta",
        ("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"),
        ("roberta.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
        ("lm_head.decoder.weight",),
        ("lm_head.bias",),
        copies=("lm_head.decoder.bias",),
    ),
)
FAMILY_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
KNOWN_MODEL_TYPES = tuple(sorted(FAMILY_BY_MODEL_TYPE))
# A config without model_type: every family's names, most specific first.
ALL_NAMES = Family(
    "any",
    (),
    (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "transformer.word_embeddings.weight",
        "gpt_neox.embed_in.weight",
        "shared.weight",
        "model.decoder.embed_tokens.weight",
        "bert.embeddings.word_embeddings.weight",
        "roberta.embeddings.word_embeddings.weight",
        "distilbert.embeddings.word_embeddings.weight",
        "transformer.embd.wte.weight",
        "embeddings.word_embeddings.weight",
        "decoder.embed_tokens.weight",
        "wte.weight",
        "word_embeddings.weight",
        "embed_in.weight",
        "embed_tokens.weight",
    ),
    tuple(dict.fromkeys(n for f in FAMILIES for n in f.head)) + ("output.weight",),
    tuple(dict.fromkeys(n for f in FAMILIES for n in f.head_bias)),
    copies=tuple(dict.fromkeys(n for f in FAMILIES for n in f.copies)),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class VocabTensors:
    """The vocab-sized tensors of a checkpoint: input embedding, untied head, head bias, copies."""

    embedding: str
    head: str | None
    head_bias: str | None
    copies: tuple[str, ...] = ()
    family: str | None = None
    # What the config says about tying (None: no config, or the family decides).
    tied_in_config: bool | None = None

    @property
    def tied(self) -> bool:
        return self.head is None

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor rebuilt row by row, the embedding first."""
        return tuple(n for n in (self.embedding, self.head, self.head_bias, *self.copies) if n)

    def is_output_side(self, name: str, shape: tuple[int, ...], head_untied: bool) -> bool:
        """Whether a rebuilt tensor holds output rows (a head, a vocab-sized bias, a copy of the bias)
        rather than input rows (the embedding and its copies). A stored head of a model that ties
        it to the embedding at load time counts as input rows, unless the output unties it."""
        if name == self.head:
            return head_untied
        return name == self.head_bias or (name in self.copies and len(shape) == 1)


def head_name_for(family: str | None) -> str | None:
    """The name an untied output head takes in a family (None where the model has no separate head)."""
    found = FAMILY_BY_NAME.get(family, ALL_NAMES) if family else ALL_NAMES
    return None if found.always_tied or not found.head else found.head[0]


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


def config_model_type(config: dict | None) -> str | None:
    """The model_type that names the language model (text_config's first where the outer is unknown)."""
    if not config:
        return None
    outer = config.get("model_type")
    inner = text_config(config).get("model_type") if text_config(config) is not config else None
    for value in (outer, inner):
        if isinstance(value, str) and value in FAMILY_BY_MODEL_TYPE:
            return value
    return outer if isinstance(outer, str) else inner if isinstance(inner, str) else None


def family_for(config: dict | None, place: str) -> Family:
    """The family of a config; an unknown model_type is an error that names it."""
    model_type = config_model_type(config)
    if model_type is None:
        return ALL_NAMES
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        architectures = (config or {}).get("architectures")
        shown = f" ({', '.join(architectures)})" if isinstance(architectures, list) and architectures else ""
        raise SurgeryError(
            place,
            f"model_type {model_type!r}{shown} is not one clpsurgery knows; name its tensors with "
            f"--embedding-tensor, --head-tensor and --head-bias-tensor (known: {', '.join(KNOWN_MODEL_TYPES)})",
        )
    return family


def _tie_setting(config: dict | None) -> bool | None:
    if not config:
        return None
    for section in (text_config(config), config):
        value = section.get("tie_word_embeddings")
        if isinstance(value, bool):
            return value
    return None


def _lookup(candidates: tuple[str, ...], tensor_shapes: dict[str, tuple[int, ...]], prefix: str) -> str | None:
    """The first candidate present, tried with the checkpoint's wrapper prefix and without."""
    for name in candidates:
        for full in (prefix + name, name) if prefix else (name,):
            if full in tensor_shapes:
                return full
    return None


def _wrapper_prefix(candidates: tuple[str, ...], tensor_shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """An embedding found under a wrapper prefix (multimodal models: `model.language_model.` ...)."""
    for name in candidates:
        if name in tensor_shapes:
            return name, ""
    for name in candidates:
        hits = [t for t in tensor_shapes if t.endswith("." + name)]
        if len(hits) == 1:
            return hits[0], hits[0][: -len(name)]
    return None, ""


def find_vocab_tensors(
    tensor_shapes: dict[str, tuple[int, ...]],
    place: str,
    embedding: str | None = None,
    head: str | None = None,
    head_bias: str | None = None,
    config: dict | None = None,
) -> VocabTensors:
    """Find the vocab-sized tensors of a checkpoint (or check the ones named by hand).

    With tensors named by hand the model type does not matter; otherwise an unknown model_type
    is an error that names it, and a config without one is searched with every family's names.
    """
    by_hand = embedding is not None
    family = ALL_NAMES if by_hand and config_model_type(config) not in FAMILY_BY_MODEL_TYPE else family_for(config, place)
    prefix = ""
    if embedding is None:
        embedding, prefix = _wrapper_prefix(family.embedding, tensor_shapes)
        if embedding is None:
            kind = f"{family.name} " if family is not ALL_NAMES else ""
            raise SurgeryError(place, f"no {kind}input-embedding tensor found (name it with --embedding-tensor)")
    elif embedding not in tensor_shapes:
        raise SurgeryError(place, f"has no tensor {embedding!r}")
    shape = tensor_shapes[embedding]
    if len(shape) != 2:
        raise SurgeryError(place, f"embedding {embedding!r} has shape {list(shape)}, expected [vocab, hidden]")
    rows = shape[0]
    if head is None and not family.always_tied:
        head = _lookup(family.head, tensor_shapes, prefix)
        if head == embedding:
            head = None
    elif head is not None and head not in tensor_shapes:
        raise SurgeryError(place, f"has no tensor {head!r}")
    if head is not None:
        head_shape = tensor_shapes[head]
        if len(head_shape) != 2 or head_shape[0] != rows:
            raise SurgeryError(place, f"head {head!r} has shape {list(head_shape)}, embedding {embedding!r} has {list(shape)}")
    if head_bias is None:
        head_bias = _lookup(family.head_bias, tensor_shapes, prefix)
    elif head_bias not in tensor_shapes:
        raise SurgeryError(place, f"has no tensor {head_bias!r}")
    if head_bias is not None and tensor_shapes[head_bias] != (rows,):
        raise SurgeryError(place, f"head bias {head_bias!r} has shape {list(tensor_shapes[head_bias])}, expected [{rows}]")
    copies = []
    for name in family.copies:
        full = _lookup((name,), tensor_shapes, prefix)
        if full is None or full in (embedding, head, head_bias):
            continue
        if tensor_shapes[full][:1] != (rows,):
            raise SurgeryError(place, f"tensor {full!r} has shape {list(tensor_shapes[full])}, expected {rows} rows like {embedding!r}")
        copies.append(full)
    tied_in_config = _tie_setting(config)
    tied_expected = family.always_tied or (tied_in_config if tied_in_config is not None else family.tied_by_default)
    if config is not None and not by_hand and not tied_expected and head is None and family.head and family is not ALL_NAMES:
        raise SurgeryError(
            place,
            f"config.json says the output head is not tied, but no head tensor ({', '.join(family.head)}) is stored; "
            "name it with --head-tensor",
        )
    return VocabTensors(embedding, head, head_bias, tuple(copies), family.name if family is not ALL_NAMES else None, tied_in_config)
