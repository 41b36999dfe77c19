"""The plan of a transfer: inputs resolved and checked, vocabularies, overlap, tensors to rebuild.

A plan is a plain value built from headers, configs and tokenizers only: it holds no open file
and no tensor data, so `inspect` can print it before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import CheckpointLayout
from clpsurgery.formats.safetensors_header import DTYPE_SIZES, FLOAT_DTYPES
from clpsurgery.mixing.choices import HELPER_FREE_METHODS
from clpsurgery.pipeline import memory
from clpsurgery.pipeline.options import TransferOptions
from clpsurgery.vocab.architecture import (
    FAMILY_BY_MODEL_TYPE,
    VocabTensors,
    config_model_type,
    find_vocab_tensors,
    read_config,
)
from clpsurgery.vocab.vocabulary import (
    Overlap,
    Vocabulary,
    find_tokenizer_file,
    load_vocabulary,
    match_overlap,
)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class TransferPlan:
    """Everything init will do, decided before any tensor data is read."""

    source_path: Path
    helper_path: Path
    source: CheckpointLayout
    helper: CheckpointLayout | None  # None: a helper-free method (only the target tokenizer is read)
    source_tensors: VocabTensors
    helper_embedding: str | None
    source_vocab: Vocabulary
    target_vocab: Vocabulary
    overlap: Overlap
    source_config: dict
    source_config_path: Path
    generation_config_path: Path | None
    helper_config: dict | None
    options: TransferOptions

    @property
    def hidden_size(self) -> int:
        return self.source.info(self.source_tensors.embedding).shape[1]

    @property
    def dense(self) -> bool:
        """The paper's dense form: clp over the whole overlap."""
        return self.options.method == "clp" and self.options.top_k is None

    @property
    def target_size(self) -> int:
        """The target tokenizer's id space: rows with a token behind them."""
        return self.overlap.target_size

    @property
    def output_rows(self) -> int:
        """Rows written: the id space, padded up to --pad-vocab-to-multiple (the written vocab_size)."""
        multiple = self.options.pad_vocab_to_multiple or 1
        return -(-self.target_size // multiple) * multiple

    def output_file_name(self, source_file: Path) -> str:
        """The output weights file made from a source file: a sharded source keeps its shard
        names, a single file becomes model.safetensors."""
        return source_file.name if self.source.is_sharded else "model.safetensors"

    @property
    def k(self) -> int:
        """Neighbours per missing token (the whole overlap in the dense form; for fvt, the pieces
        the memory model allows for)."""
        if self.options.method == "fvt":
            return memory.FVT_PIECES
        return self.overlap.count if self.options.top_k is None else min(self.options.top_k, self.overlap.count)

    def memory_estimate(self) -> dict[str, int]:
        """Bytes held at once by the search and by the write stage, besides the row blocks."""
        return memory.memory_estimate(
            self.source, self.source_tensors.names, self.helper, self.helper_embedding, self.target_size,
            self.overlap.count, int(self.overlap.missing_ids.size), self.k, self.dense, self.options.method,
        )

    @property
    def block_budget(self) -> int:
        """What --max-memory leaves for a block of rebuilt rows once the write stage's fixed costs are paid."""
        return self.options.max_memory - self.memory_estimate()["write"]

    def check_memory(self) -> None:
        """Refuse a run that cannot fit --max-memory, before anything is written."""
        estimate = self.memory_estimate()
        need = max(estimate["search"], estimate["write"] + memory.MIN_BLOCK_BYTES)
        if need > self.options.max_memory:
            raise SurgeryError(
                "--max-memory",
                f"{_mib(self.options.max_memory)} cannot hold this transfer: it needs about {_mib(need)} "
                f"(search {_mib(estimate['search'])}, write {_mib(estimate['write'])} plus row blocks)",
            )

    def summary(self) -> dict:
        """The plan as plain data, for `inspect` and the manifest."""
        emb = self.source.info(self.source_tensors.embedding)
        rebuilt = {name: [self.output_rows, *self.source.info(name).shape[1:]] for name in self.source_tensors.names}
        rebuilt_bytes = sum(
            math.prod(shape) * DTYPE_SIZES[self.source.info(name).dtype] for name, shape in rebuilt.items()
        )
        untouched = sum(
            ref.info.nbytes for name, ref in self.source.tensors.items() if name not in self.source_tensors.names
        )
        return {
            "source": str(self.source_path),
            "helper": str(self.helper_path),
            "source_vocab_size": self.source_vocab.size,
            "target_vocab_size": self.target_size,
            "overlap": self.overlap.count,
            "missing": int(self.overlap.missing_ids.size),
            "embedding": {"name": self.source_tensors.embedding, "shape": list(emb.shape), "dtype": emb.dtype},
            "head": self.source_tensors.head,
            "head_bias": self.source_tensors.head_bias,
            "tied": self.source_tensors.tied,
            "helper_embedding": None if self.helper is None else {"name": self.helper_embedding, "shape": list(self.helper.info(self.helper_embedding).shape)},
            "rebuilt_tensors": rebuilt,
            "bytes_to_compute": rebuilt_bytes,
            "bytes_to_copy": untouched,
            "neighbours_per_token": self.k,
            "memory_estimate": self.memory_estimate(),
        }


def find_source_file(path: Path, explicit: str | None, name: str, option: str) -> Path:
    """A side file (tokenizer.json, config.json) of the source: named by an option, or beside it."""
    if explicit:
        candidate = Path(explicit)
        return candidate / name if candidate.is_dir() else candidate
    folder = path if path.is_dir() else path.parent
    candidate = folder / name
    if not candidate.is_file():
        raise SurgeryError(candidate, f"not found; name it with {option}")
    return candidate


def find_source_tokenizer(path: Path, explicit: str | None) -> Path:
    """The source's tokenizer: named by --source-tokenizer (a file or folder), or beside SOURCE."""
    if explicit:
        return Path(explicit)
    folder = path if path.is_dir() else path.parent
    if find_tokenizer_file(folder) is None:
        raise SurgeryError(folder / "tokenizer.json", "not found; name the source's tokenizer with --source-tokenizer")
    return folder


def find_helper_embedding(shapes: dict[str, tuple[int, ...]], place: str, config: dict | None) -> VocabTensors:
    """The helper's input embedding: only that is read, so an unknown model type is searched by name."""
    try:
        return find_vocab_tensors(shapes, place, config=config)
    except SurgeryError:
        if config is None or config_model_type(config) in FAMILY_BY_MODEL_TYPE:
            raise
        return find_vocab_tensors(shapes, place, config=None)


def make_plan(
    source_path: str | Path,
    helper_path: str | Path,
    options: TransferOptions,
    source_tokenizer: str | None = None,
    source_config: str | None = None,
) -> TransferPlan:
    """Open and check both models, read both vocabularies and compute the overlap."""
    source_path, helper_path = Path(source_path), Path(helper_path)
    source = CheckpointLayout.open(source_path)
    helper_free = options.method in HELPER_FREE_METHODS
    if not helper_path.is_dir():
        what = "the target tokenizer" if helper_free else "weights, tokenizer.json, config.json"
        raise SurgeryError(helper_path, f"the helper must be a model folder ({what})")
    helper = None if helper_free else CheckpointLayout.open(helper_path)
    config_path = find_source_file(source_path, source_config, "config.json", "--source-config")
    config = read_config(config_path)
    generation_config_path = config_path.parent / "generation_config.json"
    helper_config_path = helper_path / "config.json"
    helper_config = read_config(helper_config_path) if helper_config_path.is_file() else None
    source_shapes = {n: r.info.shape for n, r in source.tensors.items()}
    source_tensors = find_vocab_tensors(
        source_shapes, str(source_path), options.embedding_tensor, options.head_tensor, options.head_bias_tensor, config
    )
    helper_tensors = None if helper is None else find_helper_embedding({n: r.info.shape for n, r in helper.tensors.items()}, str(helper_path), helper_config)
    for name in source_tensors.names:
        dtype = source.info(name).dtype
        if dtype not in FLOAT_DTYPES or dtype.startswith("F8"):
            raise SurgeryError(source_path, f"tensor {name!r} is {dtype}; clpsurgery rebuilds F16, BF16, F32 and F64 embeddings")
    if helper is not None and helper.info(helper_tensors.embedding).dtype not in FLOAT_DTYPES:
        raise SurgeryError(helper_path, f"helper embedding {helper_tensors.embedding!r} is {helper.info(helper_tensors.embedding).dtype}, not a float")

    source_vocab = load_vocabulary(find_source_tokenizer(source_path, source_tokenizer), config)
    target_vocab = load_vocabulary(helper_path, helper_config)
    source_rows = source.info(source_tensors.embedding).shape[0]
    if source_vocab.size > source_rows:
        raise SurgeryError(
            source_vocab.path,
            f"tokenizer has ids up to {source_vocab.size - 1} but the embedding {source_tensors.embedding!r} has {source_rows} rows",
        )
    if helper is not None:
        helper_rows, helper_hidden = helper.info(helper_tensors.embedding).shape
        if helper_rows < target_vocab.size:
            raise SurgeryError(
                helper_path,
                f"helper embedding {helper_tensors.embedding!r} has {helper_rows} rows, fewer than its tokenizer's {target_vocab.size} ids",
            )
        if helper_config is not None:
            configured_hidden = helper_config.get("hidden_size", helper_config.get("n_embd", helper_config.get("d_model")))
            tied_proj = helper_config.get("word_embed_proj_dim")  # OPT embeds at a smaller width
            if isinstance(configured_hidden, int) and helper_hidden not in (configured_hidden, tied_proj):
                raise SurgeryError(
                    helper_path,
                    f"helper embedding width {helper_hidden} does not match hidden size {configured_hidden} in its config.json",
                )
    overlap = match_overlap(source_vocab, target_vocab, source_rows, options.match)
    if overlap.count == overlap.counts().get("role", 0) and not helper_free:
        raise SurgeryError(
            helper_path,
            f"its tokenizer shares no token with the source's under --match {options.match} "
            f"(special tokens aside): nothing to transfer from",
        )
    plan = TransferPlan(
        source_path=source_path,
        helper_path=helper_path,
        source=source,
        helper=helper,
        source_tensors=source_tensors,
        helper_embedding=None if helper_tensors is None else helper_tensors.embedding,
        source_vocab=source_vocab,
        target_vocab=target_vocab,
        overlap=overlap,
        source_config=config,
        source_config_path=config_path,
        generation_config_path=generation_config_path if generation_config_path.is_file() else None,
        helper_config=helper_config,
        options=options,
    )
    plan.check_memory()
    return plan
