"""The target's config.json and generation_config.json: new vocab_size and special-token ids."""

from __future__ import annotations

import copy

from clpsurgery.vocab.architecture import text_config
from clpsurgery.vocab.vocabulary import Vocabulary

TOKEN_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
)


def target_token_id(
    key: str,
    source_value: object,
    helper_config: dict | None,
    source_vocab: Vocabulary,
    target_vocab: Vocabulary,
) -> tuple[object, str]:
    """The id a token-id field should hold for the target tokenizer, and where it came from.

    The helper already speaks the target tokenizer, so an id in its config is trusted first (its
    null says nothing); otherwise the source's token is looked up by string in the target
    vocabulary, then the token the target tokenizer declares for that role (bos_token_id: its
    bos); failing all, the field is cleared rather than left pointing at an unrelated token.
    """
    if helper_config is not None:
        helper_value = text_config(helper_config).get(key, helper_config.get(key))
        if helper_value is not None and _valid_ids(helper_value, target_vocab.size):
            return helper_value, "helper config"
    if source_value is None:
        return None, "unset in source"
    source_tokens = source_vocab.id_to_token()

    def remap(value: int) -> int | None:
        token = source_tokens.get(value)
        return target_vocab.token_to_id.get(token) if token is not None else None

    if isinstance(source_value, list):
        mapped = [remap(v) for v in source_value if isinstance(v, int)]
        if mapped and all(m is not None for m in mapped):
            return mapped, "same token string"
    elif isinstance(source_value, int):
        mapped_one = remap(source_value)
        if mapped_one is not None:
            return mapped_one, "same token string"
    role = key.removesuffix("_token_id")
    if role in target_vocab.roles:
        return target_vocab.roles[role], f"the target tokenizer's {role} token"
    return None, "no target token with the source's string"


def _valid_ids(value: object, size: int) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, int) and 0 <= v < size for v in values)


def update_token_ids(
    config: dict,
    helper_config: dict | None,
    source_vocab: Vocabulary,
    target_vocab: Vocabulary,
) -> dict[str, dict]:
    """Rewrite token-id fields in place (top level and text_config); return what changed."""
    changes: dict[str, dict] = {}
    sections = [("", config)]
    if isinstance(config.get("text_config"), dict):
        sections.append(("text_config.", config["text_config"]))
    for prefix, section in sections:
        helper_keys = set(text_config(helper_config)) | set(helper_config) if helper_config else set()
        for key in TOKEN_ID_KEYS:
            if key not in section and not (key in helper_keys and section is text_config(config)):
                continue
            old = section.get(key)
            new, why = target_token_id(key, old, helper_config, source_vocab, target_vocab)
            if key not in section and new is None:
                continue  # only the helper names it, with no id (a null): not added as null
            section[key] = new
            changes[prefix + key] = {"source": old, "target": new, "from": why}
    return changes


def target_config(
    source_config: dict,
    helper_config: dict | None,
    source_vocab: Vocabulary,
    target_vocab: Vocabulary,
    vocab_size: int,
    untie: bool = False,
) -> tuple[dict, dict[str, dict]]:
    """The source config with the target's vocab_size and token ids (and, with `untie`, its output
    head untied: tie_word_embeddings false wherever the config says it)."""
    config = copy.deepcopy(source_config)
    section = text_config(config)
    changes: dict[str, dict] = {"vocab_size": {"source": section.get("vocab_size"), "target": vocab_size}}
    section["vocab_size"] = vocab_size
    if section is not config and "vocab_size" in config:
        config["vocab_size"] = vocab_size
    if untie:
        changes["tie_word_embeddings"] = {"source": section.get("tie_word_embeddings", config.get("tie_word_embeddings")), "target": False}
        section["tie_word_embeddings"] = False
        if section is not config and "tie_word_embeddings" in config:
            config["tie_word_embeddings"] = False
    changes.update(update_token_ids(config, helper_config, source_vocab, target_vocab))
    return config, changes


def target_generation_config(
    generation_config: dict,
    helper_config: dict | None,
    source_vocab: Vocabulary,
    target_vocab: Vocabulary,
) -> tuple[dict, dict[str, dict]]:
    """The source generation_config with token ids for the target tokenizer."""
    config = copy.deepcopy(generation_config)
    return config, update_token_ids(config, helper_config, source_vocab, target_vocab)
