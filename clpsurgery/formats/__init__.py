"""Bytes and files: safetensors headers, checkpoints, the streaming writer, the output folder. Nothing of CLP."""
