"""GPU kernels for clpsurgery (Triton). Kernels take tensors and return tensors; no file I/O."""
