"""ViGGO metrics (task ``viggo``). Extraction (a format's `parse`) happens before; this module only scores.

The metrics of the Levanter ViGGO tutorial (function name accuracy, attribute set accuracy,
attribute value accuracy, overall accuracy = their mean), plus exact-call accuracy and the
parseable rate, named as in every task (`calltune.evaluate.tasks`). The tutorial names the metrics
and reports them in [0, 1] but prints no code; the definitions below are the reading of those names
used throughout calltune:

- function name accuracy: share of examples whose predicted function (dialogue act) equals the
  reference's.
- attribute set accuracy: share of examples whose set of predicted argument names equals the
  reference's set (order-free).
- attribute value accuracy: per example, the share of the reference's attributes whose predicted
  value is identical; averaged over examples (an example with no reference attribute scores 1 if the
  prediction has none either).
- overall accuracy: the mean of the three above.
- exact-call accuracy: the predicted call equals the reference call (name, argument names and values).
- parseable rate: share of outputs the format parsed into exactly one call.

An output that did not parse into one call scores 0 on every metric. All are higher-is-better.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from calltune.schema import ToolCall

if TYPE_CHECKING:  # annotations only: calltune.formats pulls in transformers
    from calltune.formats import Parsed

SCORES = ("function_name_accuracy", "attribute_set_accuracy", "attribute_value_accuracy", "exact_call_accuracy",
          "parseable_rate")


def score_viggo_call(pred: ToolCall | None, ref: ToolCall) -> dict[str, float]:
    """Scores of one prediction (None = unparseable) against its reference, keyed by `SCORES`, each in
    [0, 1]; a split's metric is their mean over examples."""
    if pred is None:
        return dict.fromkeys(SCORES, 0.0)
    ref_args, pred_args = ref.arguments, pred.arguments
    if ref_args:
        value = sum(1 for k, v in ref_args.items() if k in pred_args and pred_args[k] == v) / len(ref_args)
    else:
        value = float(not pred_args)
    return {
        "function_name_accuracy": float(pred.name == ref.name),
        "attribute_set_accuracy": float(set(pred_args) == set(ref_args)),
        "attribute_value_accuracy": value,
        "exact_call_accuracy": float(pred.name == ref.name and pred_args == ref_args),
        "parseable_rate": 1.0,
    }


def single_call(parsed: "Parsed") -> ToolCall | None:
    """The one call of a ViGGO answer, or None when the output did not parse into exactly one call."""
    if parsed.error is not None or len(parsed.tool_calls) != 1:
        return None
    return parsed.tool_calls[0]


def viggo_metrics(parsed: list["Parsed"], refs: list[ToolCall]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Aggregate ViGGO metrics over a split.

    Args:
        parsed: the format's parse of each model output, aligned with `refs`.
        refs: the reference call of each example.

    Returns:
        ``(metrics, per_example)``: metrics averaged over examples (`SCORES`, ``overall_accuracy``
        and ``n``; 0.0 for an empty split), and each example's `score_viggo_call` scores.

    Raises:
        ValueError: `parsed` and `refs` differ in length.
    """
    if len(parsed) != len(refs):
        raise ValueError(f"{len(parsed)} predictions for {len(refs)} references")
    per_example = [score_viggo_call(single_call(p), r) for p, r in zip(parsed, refs)]
    n = max(len(per_example), 1)
    metrics: dict[str, Any] = {k: sum(s[k] for s in per_example) / n for k in SCORES}
    metrics["overall_accuracy"] = (metrics["function_name_accuracy"] + metrics["attribute_set_accuracy"]
                                   + metrics["attribute_value_accuracy"]) / 3
    metrics["n"] = len(per_example)
    return metrics, per_example
