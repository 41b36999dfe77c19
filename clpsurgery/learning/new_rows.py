"""Which rows of a clpsurgery output init or extend made, read from its manifest.

The new rows are the target ids below the tokenizer's size that copy no source row: the manifest's
overlap pairs name every copied row (shared tokens, kept specials, an extension's source ids and
kept padding rows), so what is left is what a mixing computed. Rows past the tokenizer (vocab
padding) belong to no token and are not new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.json_input import read_json_file
from clpsurgery.formats.output_folder import MANIFEST_NAME
from clpsurgery.pipeline.manifest import decode_pairs


def read_manifest(out: Path, role: str = "OUT") -> dict:
    """The manifest of a clpsurgery output folder; one line when OUT is not one."""
    if not out.exists():
        raise SurgeryError(out, "does not exist")
    if not out.is_dir() or not (out / MANIFEST_NAME).is_file():
        raise SurgeryError(out, f"is not a clpsurgery output (no {MANIFEST_NAME}); {role} is a folder that init or extend wrote")
    manifest = read_json_file(out / MANIFEST_NAME, "manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), list) or not isinstance(manifest.get("tensors"), dict):
        raise SurgeryError(out / MANIFEST_NAME, "is not a clpsurgery manifest (no outputs, no tensors)")
    return manifest


def new_token_ids(manifest: dict, place: str | Path = MANIFEST_NAME) -> np.ndarray:
    """The sorted ids of the rows init or extend made."""
    try:
        target_size = manifest["vocabulary"]["target_size"]
        copied, _ = decode_pairs(manifest["overlap_pairs"])
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(place, f"records no readable vocabulary and overlap pairs ({type(e).__name__}): its new rows are unknown") from e
    if not isinstance(target_size, int) or target_size < 1:
        raise SurgeryError(place, f"records a target vocabulary of {target_size!r} tokens")
    return np.setdiff1d(np.arange(target_size, dtype=np.int64), copied)


def new_token_ids_of(folder: Path) -> np.ndarray | None:
    """A clpsurgery output's new ids; None for any other model folder."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    return new_token_ids(read_manifest(folder), folder / MANIFEST_NAME)
