"""Learning beside the surgery: `score` (bits per byte of a causal LM on a text, comparable across
tokenizers) and `refine` (train only the rows init or extend made, the body frozen).

This room loads models through the model library (transformers, the `refine` extra); nothing
below it does, and the surgery never imports it.
"""
