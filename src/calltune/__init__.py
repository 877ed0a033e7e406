"""calltune: fine-tune small language models for function calling, end to end.

Stages, each its own module or package, data flowing one way:
sources -> canonical examples (`schema`) -> clean / `augment` -> `formats` -> `train` / `evaluate` / `serve`.

The Python API (`calltune.api`) is importable from here: `calltune.load_examples`, `calltune.train`,
`calltune.evaluate`, `calltune.run`, `calltune.load_recipe`. They load on first use, so
``import calltune`` stays light (no torch).
"""

__version__ = "0.1.0"

# `train` and `evaluate` are the stage packages, which forward calls to calltune.api (callable_package).
_API = {"load_examples": "calltune.api", "train": "calltune.train", "evaluate": "calltune.evaluate", "run": "calltune.api",
        "load_recipe": "calltune.recipe", "Recipe": "calltune.recipe", "Example": "calltune.schema"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(_API[name])
        return module if name in ("train", "evaluate") else getattr(module, name)
    raise AttributeError(f"module 'calltune' has no attribute {name!r}")
