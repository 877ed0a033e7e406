"""Inference: loading a tuned model with its prompt format, and batched greedy generation.

Shared by evaluation, `calltune chat` and `calltune serve`.
"""

from calltune.infer.generate import generate, load_for_inference

__all__ = ["generate", "load_for_inference"]
