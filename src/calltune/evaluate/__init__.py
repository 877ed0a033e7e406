"""Evaluation stage: extract calls from model outputs (via the prompt format), then score them.

`metrics` holds the metric definitions (with their sources); `runner` generates and writes
predictions, metrics and plots. Called, the package is `calltune.api.evaluate`:
``calltune.evaluate(model, examples)`` (see `calltune.callable_package`).
"""

from calltune.callable_package import make_callable

make_callable(__name__, "evaluate")
