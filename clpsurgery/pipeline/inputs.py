"""A command's inputs, resolved once: Hub ids fetched, the source's tokenizer and config found, OUT
checked against them before any slow work.

Every command that writes an output starts here (`resolve_inputs`), so the checks are the same for
init, extend and apply: OUT is not an input nor inside one, no input lies inside OUT, OUT does
not exist (or `force` and it is a previous output), `--device cuda` has a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.hub import resolve_model
from clpsurgery.formats.output_folder import check_out_path
from clpsurgery.vocab.vocabulary import find_tokenizer_file


@dataclass(frozen=True)
class Inputs:
    """Where a transfer reads from, every path local and checked to exist."""

    source: Path  # a .safetensors file or a model folder
    helper: Path  # the helper folder (init, extend) or the init output whose record apply replays
    source_tokenizer: Path  # the source's tokenizer: a folder holding it, or the file
    source_config: Path  # the source's config.json


def resolve_inputs(
    source: str | Path, helper: str | Path, out: Path | None = None, *, helper_weights: bool = True, helper_role: str = "helper",
    source_tokenizer: str | Path | None = None, source_config: str | Path | None = None, force: bool = False, device: str = "cpu", quiet: bool = True,
) -> Inputs:
    """SOURCE and HELPER as local paths (a Hub id, org/name[@revision], fetched into the Hugging
    Face cache: only the side files when `helper_weights` is false), with the source's tokenizer and
    config. With OUT, OUT is checked against them before anything is fetched and again after."""
    source_tokenizer = None if source_tokenizer is None else str(source_tokenizer)
    source_config = None if source_config is None else str(source_config)
    if out is not None:
        check_out_apart(out, Path(source), Path(helper), source_tokenizer, source_config)
        check_out_path(out, force)  # before any slow work, a download included; checked again when OUT is written
        if device == "cuda":
            from clpsurgery.mixing.backend import resolve_device  # torch: only for --device cuda

            resolve_device(device)  # --device cuda without a GPU: one line, before any slow work
    source_path = resolve_model(source, role="source", quiet=quiet)
    helper_path = Path(helper) if helper_role == "transfer" else resolve_model(helper, role=helper_role, quiet=quiet, weights=helper_weights)
    if out is not None:
        check_out_apart(out, source_path, helper_path, source_tokenizer, source_config)
    config_path = find_source_file(source_path, source_config, "config.json", "--source-config")  # the config's error first
    return Inputs(source_path, helper_path, find_source_tokenizer(source_path, source_tokenizer), config_path)


def check_out_apart(out: Path, source: Path, helper: Path, source_tokenizer: str | None = None, source_config: str | None = None) -> None:
    """OUT must not be SOURCE or HELPER, nor lie inside either; nor may any input lie inside OUT
    (replacing OUT with --force would delete it)."""
    resolved = Path(out).resolve()
    for role, place in (("SOURCE", source), ("HELPER", helper)):
        folder = place.resolve() if place.is_dir() else place.resolve().parent if place.is_file() else None
        if folder is None:
            continue
        if resolved == place.resolve() or (place.is_dir() and folder in (resolved, *resolved.parents)):
            raise SurgeryError(out, f"is {role} or inside it; choose an output folder elsewhere")
    inputs = (("SOURCE", source), ("HELPER", helper), ("--source-tokenizer", source_tokenizer), ("--source-config", source_config))
    for role, place in inputs:
        if place is not None and resolved in Path(place).resolve().parents:
            raise SurgeryError(out, f"holds {role} ({place}); choose an output folder elsewhere")


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
