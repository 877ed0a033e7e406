"""Stage packages that are also API functions: ``calltune.train(recipe)`` beside ``calltune.train.TrainConfig``.

Owns `make_callable`. `calltune.train` and `calltune.evaluate` are packages (configs, trainer,
metrics) and, called, the functions of the same name in `calltune.api`: the package's module object
gets a `types.ModuleType` subclass whose ``__call__`` forwards there, so both uses work and
``import calltune`` loads neither torch nor the API until one of them is used.
"""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function: str) -> None:
    """Make the module `module_name` callable as ``calltune.api.<function>`` (same arguments, same result)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from calltune import api

            return getattr(api, function)(*args, **kwargs)

    _CallablePackage.__call__.__doc__ = f"`calltune.api.{function}`."
    sys.modules[module_name].__class__ = _CallablePackage
