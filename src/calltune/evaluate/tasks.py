"""Evaluation tasks: how an eval split is scored, and the metrics each task reports.

Owns `TASKS` (name -> `Task`), `get_task` and `default_task`. A `Task` lists its `Metric`s, each
with what it measures, where its definition comes from and whether higher is better, and scores
parsed outputs against the examples' final assistant turns. The scoring code lives in
`viggo_metrics`, `toolcall_metrics` and `bfcl_checker`, imported only when a task scores, so this
module stays light (`EvalConfig` checks its ``task`` against it without importing jsonschema).

- ``viggo``: the Levanter ViGGO tutorial's metrics, one call per answer (`viggo_metrics`).
- ``toolcall``: tool calling against JSON-Schema tools, any number of calls (`toolcall_metrics`).
- ``bfcl``: ``toolcall`` plus BFCL's official AST checker, accuracy per category and BFCL's non-live
  summary under ``metrics["bfcl"]`` (`bfcl_checker`); every example must come from `load_bfcl`.

Names: every metric is a share of examples in [0, 1]. ``*_accuracy`` is the share scored right
against the reference, ``*_rate`` the share of outputs with a property, ``*_precision`` and
``*_recall`` as usual; a name means the same in every task that reports it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from calltune.errors import CalltuneError

if TYPE_CHECKING:
    from calltune.formats import Parsed
    from calltune.schema import Example

LEVANTER = "Levanter ViGGO tutorial"
BFCL_AST = "BFCL ast_checker.py"


@dataclass(frozen=True)
class Metric:
    """One number of ``metrics.json``: its key, its row label in ``report.md``, what it measures."""

    name: str
    label: str
    measures: str
    source: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Task:
    """A way of scoring an eval split: its metrics and the function that computes them.

    `score(examples, parsed)` returns ``(metrics, records)``: the keys of `metrics` (plus counts
    such as ``n``), and one record per example for ``predictions.jsonl``. `problem(example)` says
    why the task cannot score an example (None if it can).
    """

    name: str
    description: str
    metrics: tuple[Metric, ...]
    score: Callable[[list[Example], list[Parsed]], tuple[dict[str, Any], list[dict[str, Any]]]]
    problem: Callable[[Example], str | None]

    def check(self, examples: list[Example]) -> None:
        """Raise `CalltuneError` naming the first example this task cannot score (run before generating)."""
        for example in examples:
            found = self.problem(example)
            if found is not None:
                raise CalltuneError(f"{example.where}: task {self.name!r}: {found}")


FUNCTION_NAME = Metric(
    "function_name_accuracy", "Function Name Accuracy",
    "the predicted function names equal the reference's (as a multiset; no call = no call)", LEVANTER)
EXACT_CALL = Metric(
    "exact_call_accuracy", "Exact Call Accuracy",
    "the predicted calls equal the reference calls: names, argument names and values", f"{BFCL_AST} (AST match)")
PARSEABLE = Metric(
    "parseable_rate", "Parseable Rate",
    "the format parsed the output (for viggo: into exactly one call)", "calltune (the format's parse)")

VIGGO_METRICS = (
    FUNCTION_NAME,
    Metric("attribute_set_accuracy", "Attribute Set Accuracy",
           "the predicted argument names equal the reference's, as a set", LEVANTER),
    Metric("attribute_value_accuracy", "Attribute Value Accuracy",
           "share of the reference's arguments predicted with the identical value, averaged over examples", LEVANTER),
    Metric("overall_accuracy", "Overall Accuracy",
           "mean of function name, attribute set and attribute value accuracy", LEVANTER),
    EXACT_CALL,
    PARSEABLE,
)

TOOLCALL_METRICS = (
    FUNCTION_NAME,
    EXACT_CALL,
    PARSEABLE,
    Metric("schema_valid_rate", "Schema-valid Rate",
           "the output parsed and every call names an offered tool with arguments valid against its JSON Schema",
           f"{BFCL_AST} (function and type checks)"),
    Metric("schema_valid_call_rate", "Schema-valid Call Rate",
           "schema_valid_rate among the outputs that call at least one tool", f"{BFCL_AST} (function and type checks)"),
    Metric("no_call_precision", "No-call Precision",
           "of the outputs without a call, the share whose reference has no call", "BFCL irrelevance detection"),
    Metric("no_call_recall", "No-call Recall",
           "of the references without a call, the share answered without a call", "BFCL irrelevance detection"),
)


def _final_call_problem(example: Example) -> str | None:
    final = example.final_assistant()
    return None if final is not None and final.tool_calls else "needs a final assistant turn with a call"


def _assistant_problem(example: Example) -> str | None:
    return None if example.final_assistant() is not None else "no assistant turn, so there is no reference to score against"


def _bfcl_problem(example: Example) -> str | None:
    if not example.meta.get("bfcl"):
        return "not a BFCL example: no meta['bfcl'] (set by calltune.sources.bfcl.load_bfcl)"
    return _assistant_problem(example)


def _score_viggo(examples: list[Example], parsed: list[Parsed]):
    from calltune.evaluate.viggo_metrics import viggo_metrics

    TASKS["viggo"].check(examples)
    return viggo_metrics(parsed, [e.final_assistant().tool_calls[0] for e in examples])


def _score_toolcall(examples: list[Example], parsed: list[Parsed]):
    from calltune.evaluate.toolcall_metrics import toolcall_metrics

    return toolcall_metrics(parsed, examples)


def _score_bfcl(examples: list[Example], parsed: list[Parsed]):
    from calltune.evaluate.bfcl_checker import score_bfcl

    metrics, records = _score_toolcall(examples, parsed)
    bfcl = score_bfcl(examples, [p.tool_calls if p.error is None else None for p in parsed])
    metrics["bfcl"] = {k: v for k, v in bfcl.items() if k != "results"}
    for record, result in zip(records, bfcl["results"]):
        record["bfcl"] = result
    return metrics, records


TASKS: dict[str, Task] = {
    "viggo": Task("viggo", "ViGGO meaning representations: one call per answer, scored per attribute",
                  VIGGO_METRICS, _score_viggo, _final_call_problem),
    "toolcall": Task("toolcall", "tool calls against JSON-Schema tools, including no-call answers",
                     TOOLCALL_METRICS, _score_toolcall, _assistant_problem),
    "bfcl": Task("bfcl", "toolcall, plus BFCL's official AST checker per category",
                 TOOLCALL_METRICS, _score_bfcl, _bfcl_problem),
}


def unknown_task(name: str) -> str:
    """The error text for a task name not in `TASKS`: "did you mean" and the choices."""
    close = difflib.get_close_matches(name, TASKS, n=1)
    return f"unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close else "") + \
        f" (choices: {', '.join(TASKS)})"


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        ValueError: unknown name (with "did you mean" and the choices).
    """
    if name not in TASKS:
        raise CalltuneError(unknown_task(name))
    return TASKS[name]


def default_task(format_name: str, examples: list[Example]) -> str:
    """The task used when none is configured: ``viggo`` for the viggo format, ``bfcl`` when every
    example comes from BFCL (``meta["bfcl"]``), else ``toolcall``."""
    if format_name == "viggo":
        return "viggo"
    if examples and all("bfcl" in e.meta for e in examples):
        return "bfcl"
    return "toolcall"
