"""A causal language model folder loaded through the model library, or one clear line saying why not.

The one place that imports transformers (the `refine` extra); score and refine load every model
here, so that a folder that is not a causal LM, lacks weights or has no tokenizer fails the same
way for both.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clpsurgery.errors import SurgeryError
from clpsurgery.mixing.backend import resolve_device

EXTRA_HINT = "pip install 'clpsurgery[refine]'"


@dataclass
class LoadedModel:
    """A model ready to run: the module (on its device, in eval mode), its tokenizer and the token
    each segment starts with."""

    path: Path
    model: Any
    tokenizer: Any
    start_token_id: int
    device: str

    @property
    def context(self) -> int | None:
        """The longest sequence its positions allow, where its config says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 1:
                return value
        return None


def transformers_module():
    """transformers, or an error that names the extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise SurgeryError("transformers", f"is not installed; score and refine load models with it: {EXTRA_HINT}") from e
    return transformers


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """The model library's warnings and progress bars off while it loads: errors are ours to say."""
    logging = transformers_module().utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def check_causal_lm_folder(path: Path, role: str) -> dict:
    """The folder's config.json, if it describes a causal LM the library knows; else one line."""
    if not path.exists():
        raise SurgeryError(path, "does not exist")
    if not path.is_dir():
        raise SurgeryError(path, f"is not a folder; {role} is a model folder (config.json, weights, tokenizer)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SurgeryError(path, f"has no config.json: not a model folder the model library can load as {role}")
    try:
        config = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as e:
        raise SurgeryError(config_path, f"cannot be read as JSON ({type(e).__name__})") from e
    if not isinstance(config, dict):
        raise SurgeryError(config_path, "is not a JSON object")
    transformers = transformers_module()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and not any(a in causal for a in architectures):
        raise SurgeryError(path, f"is a {', '.join(map(str, architectures))}, not a causal language model (score and refine read text left to right)")
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
        why = f"model type {model_type!r} has no causal-LM class" if known else f"model type {model_type!r} is unknown to transformers {transformers.__version__}"
        raise SurgeryError(path, f"is not a causal language model the model library can load: {why}")
    return config


def torch_device(requested: str) -> str:
    """`--device auto|cpu|cuda` as a torch device: auto takes the GPU where torch sees one."""
    return resolve_device(requested)


def load_causal_lm(path: str | Path, role: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model in `dtype` on `device`, in eval mode, with its tokenizer. Every weight the model
    declares must be in the folder: the library would fill a missing one with random values."""
    path = Path(path)
    check_causal_lm_folder(path, role)
    transformers = transformers_module()
    with _quiet_library():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # the library raises anything from OSError to TypeError for a bad folder
            raise SurgeryError(path, f"has no tokenizer the model library can load ({type(e).__name__}: {_first_line(e)})") from e
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        except Exception as e:
            raise SurgeryError(path, f"cannot be loaded as a causal language model ({type(e).__name__}: {_first_line(e)})") from e
    missing = [k for k in info.get("missing_keys", ()) if k not in _tied_names(model)]
    if missing:
        raise SurgeryError(path, f"lacks {len(missing)} of the model's weights (first: {sorted(missing)[0]}); the library would make them up")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SurgeryError(path, "its tokenizer declares neither a BOS nor an EOS token to start a segment with")
    model.to(device)
    model.eval()
    return LoadedModel(path, model, tokenizer, int(start), device)


def _tied_names(model) -> set[str]:
    """Parameter names that share their tensor with another (a tied head is stored once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
