"""The source's side files that do not depend on its vocabulary, carried into the output byte for byte.

Carried: what sentence-transformers reads beside the weights, so that `SentenceTransformer(OUT)`
pools and normalises as the source did instead of falling back to plain mean pooling:
modules.json, config_sentence_transformers.json, sentence_bert_config.json, and the folder of each
module modules.json names (1_Pooling/, 2_Dense/, 2_Normalize/: they act on hidden vectors, never on
token ids).
Not carried: what the output writes itself (the weights and their index, config.json,
generation_config.json, the tokenizer files), a module folder that holds a tokenizer file (a
module with a vocabulary of its own), and the model card, licence and training notes (README.md,
LICENSE, data_config.json), which describe the source model, not the output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from clpsurgery.vocab.vocabulary import TOKENIZER_FILES

MODULES_FILE = "modules.json"
SENTENCE_TRANSFORMERS_FILES = (MODULES_FILE, "config_sentence_transformers.json", "sentence_bert_config.json")


def _module_folders(folder: Path) -> list[str]:
    """The folders modules.json names, each a plain folder inside FOLDER (an unreadable
    modules.json names none: the file itself is still carried, as it is)."""
    try:
        modules = json.loads((folder / MODULES_FILE).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    found = []
    for path in paths:
        if not isinstance(path, str) or not path or "\\" in path:
            continue
        parts = PurePosixPath(path).parts
        if PurePosixPath(path).is_absolute() or any(p in ("", ".", "..") for p in parts):
            continue
        steps = [folder.joinpath(*parts[: k + 1]) for k in range(len(parts))]
        if all(s.is_dir() and not s.is_symlink() for s in steps):
            found.append(PurePosixPath(*parts).as_posix())
    return list(dict.fromkeys(found))


def _files_under(folder: Path, relative: str) -> list[str] | None:
    """Every plain file under FOLDER/RELATIVE as a relative POSIX path, or None where the module
    holds a tokenizer file (symlinks are left out)."""
    files = []
    for root, dirs, names in os.walk(folder / relative):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
        for name in sorted(names):
            path = Path(root) / name
            if name in TOKENIZER_FILES:
                return None
            if path.is_file() and not path.is_symlink():
                files.append(path.relative_to(folder).as_posix())
    return files


def carried_side_files(folder: Path) -> list[str]:
    """The side files of a source model folder that the output carries (relative POSIX paths)."""
    if not (folder / MODULES_FILE).is_file():
        return []
    carried = [name for name in SENTENCE_TRANSFORMERS_FILES if (folder / name).is_file() and not (folder / name).is_symlink()]
    for module in _module_folders(folder):
        carried += _files_under(folder, module) or []
    return carried
