"""Evaluation stage: extract calls from model outputs (via the prompt format), then score them.

`tasks` names what an eval split is scored as (viggo, toolcall, bfcl) and the metrics of each, with
what they measure and whether higher is better; `viggo_metrics`, `toolcall_metrics` and
`bfcl_checker` compute them (definitions and sources in their docstrings); `runner` generates and
writes predictions, metrics and plots. Called, the package is `calltune.api.evaluate`:
``calltune.evaluate(model, examples)`` (see `calltune.callable_package`).
"""

from calltune.callable_package import make_callable

make_callable(__name__, "evaluate")
