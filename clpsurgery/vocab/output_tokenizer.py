"""The tokenizer_config.json an output carries, so that the model library loads its tokenizer.json
as it is.

The output's config.json is the source's, and so is its `model_type`; a tokenizer_config.json that
names no tokenizer class (or none at all) makes the model library pick the source's own class,
which rebuilds the tokenizer from the vocabulary by that model's recipe (GPT-2's byte-level
pre-tokenizer over a WordPiece vocabulary, BERT's WordPiece over a BPE one). Classes made for one
model do the same with any tokenizer.json (transformers 5 keeps only its vocabulary, merges and
post-processor). The one class that wraps tokenizer.json as it is, `PreTrainedTokenizerFast`
(`TokenizersBackend` in transformers 5, which reads the old name too), is therefore the output's
class wherever it has a tokenizer.json; everything else the target's config says (chat template,
added tokens, lengths) is kept. A few model types (Qwen2, Phi-3: transformers'
MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) load their own class whatever the config names.
"""

from __future__ import annotations

import json

from clpsurgery.vocab.tokenizer_files import ROLES, token_string
from clpsurgery.vocab.vocabulary import Vocabulary

CONFIG_FILE = "tokenizer_config.json"
WRAPPING_CLASS = "PreTrainedTokenizerFast"
# Classes that load tokenizer.json as it is (transformers 4 and 5 names of the same class).
WRAPPING_CLASSES = (WRAPPING_CLASS, "TokenizersBackend")


def output_tokenizer_config(config: dict | None, target: Vocabulary) -> dict:
    """The target's tokenizer config (None: it has none) as the output carries it beside a
    tokenizer.json: the wrapping class, and each role's special token (bos, eos, unk, pad, sep,
    cls, mask) that the target's vocabulary has, where the config names none. A role token the
    config names and the vocabulary lacks (which the library would add as a new token past the
    embedding) becomes the target's token of that role, or is dropped."""
    config = dict(config or {})
    if config.get("tokenizer_class") not in WRAPPING_CLASSES:
        config["tokenizer_class"] = WRAPPING_CLASS
    tokens = target.id_to_token()
    for role in ROLES:
        key = f"{role}_token"
        named = token_string(config.get(key))
        if named is not None and named in target.token_to_id:
            continue
        if role in target.roles and target.roles[role] in tokens:
            config[key] = tokens[target.roles[role]]
        elif named is not None:
            del config[key]
    return config


def output_tokenizer_config_file(current: bytes | None, target: Vocabulary) -> tuple[bytes | None, dict[str, dict]]:
    """The bytes of the output's tokenizer_config.json, and what differs from `current` (the
    target's own file, None where it has none) key by key; None for the bytes where `current` is
    already what output_tokenizer_config makes of it, or is not a JSON object (kept as it is: the
    library reads it, or fails on it, as in the target's folder)."""
    try:
        config = json.loads(current) if current is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, {}
    if config is not None and not isinstance(config, dict):
        return None, {}
    wanted = output_tokenizer_config(config, target)
    if wanted == config:
        return None, {}
    before = config or {}
    changes = {key: {"was": before.get(key), "written": wanted.get(key)} for key in sorted(before.keys() | wanted.keys()) if before.get(key) != wanted.get(key)}
    return (json.dumps(wanted, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), changes
