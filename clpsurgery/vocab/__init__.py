"""Tokenizer files, vocabularies and their overlap, architectures (which tensors are vocab-sized), model configs."""
