"""What refine holds at once, estimated from headers and config.json before anything is loaded, and
the refusal when --max-memory or the machine cannot hold it.

- weights: the checkpoint's tensors, as stored (refine keeps their dtype);
- activations: what backpropagation to the input embedding keeps of every layer for one batch of
  --batch x --seq tokens (Korthikanti et al. 2022: 34 + 5 * heads * seq / hidden values per token,
  hidden wide, per layer, at two bytes each), in the model's element size;
- logits: the batch's logits in the model's dtype, in fp32, their log-softmax and its gradient;
- trained rows: each trained tensor once more with its new rows put in (and its gradient), and for
  the new rows an fp32 master copy, its gradient and Adam's two moments;
- the runtime: torch and the model library themselves.
"""

from __future__ import annotations

import os

from clpsurgery.errors import SurgeryError
from clpsurgery.pipeline.inspection import format_bytes

FP32 = 4
RUNTIME_BYTES = 512 * 2**20


def estimate(weights_bytes: int, element_bytes: int, config: dict, batch: int, seq: int, trained: list[tuple[int, int]], new_rows: int) -> dict[str, int]:
    """Bytes held at peak by each part; `trained`: (rows, width) of each trained tensor."""
    layers = _first_int(config, ("num_hidden_layers", "n_layer", "num_layers"), 1)
    hidden = _first_int(config, ("hidden_size", "n_embd", "d_model"), 1)
    heads = _first_int(config, ("num_attention_heads", "n_head"), 1)
    vocab = max((rows for rows, _ in trained), default=_first_int(config, ("vocab_size",), 1))
    tokens = batch * seq
    activations = int(layers * tokens * hidden * (34 + 5 * heads * seq / hidden) * element_bytes / 2)
    logits = tokens * vocab * (element_bytes + 3 * FP32)
    rows = sum(2 * r * w * element_bytes + 4 * new_rows * w * FP32 for r, w in trained)
    return {"weights": weights_bytes, "activations": activations, "logits": logits, "trained rows": rows, "runtime": RUNTIME_BYTES}


def _first_int(config: dict, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def available_memory() -> int | None:
    """The memory the machine can give now (MemAvailable), where the system says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(parts: dict[str, int], max_memory: int | None, gpu_free: int | None = None) -> int:
    """Refuse, in one line, an estimate that exceeds --max-memory, the machine's available
    memory or (on a GPU) the GPU's free memory; returns the total."""
    total = in_ram = sum(parts.values())
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
    if max_memory is not None and total > max_memory:
        raise SurgeryError("--max-memory", f"refine needs about {format_bytes(total)} ({detail}), more than the {format_bytes(max_memory)} allowed; lower --batch or --seq, or allow more")
    if gpu_free is not None:
        on_gpu = total - parts["runtime"]
        if on_gpu > gpu_free:
            raise SurgeryError("--device", f"refine needs about {format_bytes(on_gpu)} on the GPU ({detail}), and it has {format_bytes(gpu_free)} free; lower --batch or --seq, or use --device cpu")
        in_ram = parts["weights"] + parts["runtime"]  # what the machine holds while the weights load
    free = available_memory()
    if free is not None and in_ram > free:
        raise SurgeryError("memory", f"refine needs about {format_bytes(in_ram)} ({detail}), and this machine has {format_bytes(free)} available; lower --batch or --seq")
    return total
