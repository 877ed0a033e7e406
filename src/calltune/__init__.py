"""calltune: fine-tune small language models for function calling, end to end.

Stages, each its own module or package, data flowing one way:
sources -> canonical examples (`schema`) -> `formats` -> `train` / `evaluate` / `serve`.
"""

__version__ = "0.1.0"
