"""Instruct models: the source's chat template, and the special tokens it needs, kept in the output.

A chat template names special tokens by their strings (`<|im_start|>`, `<|im_end|>`); a target
tokenizer trained for another language rarely has them. Where it lacks one, the output keeps it:
the token is added to the target tokenizer as a special added token after its ids, its rows are
the source's (an overlap pair by string, as for any special token), the template travels into
the output's tokenizer_config.json (or chat_template.jinja, as the source keeps it), and where the
source's end-of-sequence token is one of them (the end of a turn), it stays the output's
eos_token, so that generation stops where the template ends a turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.vocab.tokenizer_files import parse_json_object
from clpsurgery.vocab.vocabulary import TOKENIZER_FILE, TOKENIZER_FILES, Vocabulary

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIALS_FILE = "special_tokens_map.json"


@dataclass(frozen=True)
class ChatTemplate:
    """The source's chat template and the source special tokens it names."""

    template: object  # a Jinja string, or a list of {"name", "template"} (named templates)
    origin: Path
    tokens: tuple[str, ...]

    def texts(self) -> list[str]:
        if isinstance(self.template, str):
            return [self.template]
        return [t.get("template", "") for t in self.template if isinstance(t, dict)]


def read_chat_template(folder: Path, source: Vocabulary) -> ChatTemplate | None:
    """The chat template beside the source's tokenizer (chat_template.jinja, or tokenizer_config.json's
    `chat_template`), with the source's special and added tokens whose strings it contains."""
    folder = folder if folder.is_dir() else folder.parent
    jinja = folder / TEMPLATE_FILE
    template: object = None
    origin = jinja
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SurgeryError(jinja, f"cannot read the chat template ({type(e).__name__})") from e
    elif (folder / CONFIG_FILE).is_file():
        origin = folder / CONFIG_FILE
        config = read_json_file(origin, "tokenizer config")
        template = config.get("chat_template") if isinstance(config, dict) else None
    if not template or not isinstance(template, (str, list)):
        return None
    found = ChatTemplate(template, origin, ())
    names = set(source.special_tokens) | {t for t, i in source.token_to_id.items() if i in source.added_ids}
    text = "\n".join(found.texts())
    return ChatTemplate(template, origin, tuple(sorted((t for t in names if t and t in text), key=lambda t: source.token_to_id[t])))


def missing_specials(tokens: tuple[str, ...], target: Vocabulary) -> tuple[str, ...]:
    """The tokens the target tokenizer lacks, by string."""
    return tuple(t for t in tokens if t not in target.token_to_id)


def _dump(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files_with_specials(
    target_folder: Path, target: Vocabulary, kept: tuple[str, ...], template: ChatTemplate | None, eos: str | None
) -> dict[str, bytes]:
    """The target's tokenizer files with `kept` added as special tokens after its ids, the
    source's chat template carried over, and `eos` (a kept token) as the end-of-sequence token."""
    path = target_folder / TOKENIZER_FILE
    if kept and not path.is_file():
        raise SurgeryError(path, "keeping the source's special tokens needs the target's tokenizer.json")
    files = {name: (target_folder / name).read_bytes() for name in TOKENIZER_FILES if (target_folder / name).is_file()}
    if kept:
        doc = read_json_file(path, "tokenizer")
        first = target.size  # after every id the target has, its added tokens included
        added = [
            {"id": first + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, token in enumerate(kept)
        ]
        doc["added_tokens"] = list(doc.get("added_tokens") or []) + added
        files[TOKENIZER_FILE] = _dump(doc)
    config = parse_json_object(target_folder / CONFIG_FILE, files[CONFIG_FILE]) if CONFIG_FILE in files else {}
    if kept:
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in added:
                decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        extra = [t for t in config.get("additional_special_tokens") or [] if t not in kept] + list(kept)
        config["additional_special_tokens"] = extra
    if eos is not None:
        config["eos_token"] = eos
    if template is not None:
        if template.origin.name == TEMPLATE_FILE:
            files[TEMPLATE_FILE] = template.origin.read_bytes()
            config.pop("chat_template", None)
        else:
            config["chat_template"] = template.template
    if config:
        files[CONFIG_FILE] = _dump(config)
    if SPECIALS_FILE in files and (kept or eos is not None):
        specials = parse_json_object(target_folder / SPECIALS_FILE, files[SPECIALS_FILE])
        if eos is not None:
            specials["eos_token"] = eos
        if kept:
            specials["additional_special_tokens"] = [t for t in specials.get("additional_special_tokens") or [] if t not in kept] + list(kept)
        files[SPECIALS_FILE] = _dump(specials)
    return files
