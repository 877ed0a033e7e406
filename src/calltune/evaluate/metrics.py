"""Function-call metrics. Extraction (a format's `parse`) happens before; this module only scores.

Owns the ViGGO metrics of the Levanter ViGGO tutorial (function name accuracy, attribute set
accuracy, attribute value accuracy, overall accuracy = their mean), plus exact match and the rate of
unparseable outputs. The tutorial names the metrics and reports them in [0, 1] but prints no code;
the definitions below are the reading of those names used throughout calltune:

- function name accuracy: share of examples whose predicted function (dialogue act) equals the
  reference's.
- attribute set accuracy: share of examples whose set of predicted argument names equals the
  reference's set (order-free).
- attribute value accuracy: per example, the share of the reference's attributes whose predicted
  value is identical; averaged over examples (an example with no reference attribute scores 1 if the
  prediction has none either).
- overall accuracy: the mean of the three above.
- exact match: the predicted call equals the reference call (name, argument names and values).
- unparseable rate: share of outputs the format could not parse into a call.

An unparseable output scores 0 on every metric. All metrics: higher is better except
`unparseable_rate`.
"""

from __future__ import annotations

from typing import Any

from calltune.formats import Parsed
from calltune.schema import ToolCall

HIGHER_IS_BETTER = {"function_name_accuracy": True, "attribute_set_accuracy": True, "attribute_value_accuracy": True,
                    "overall_accuracy": True, "exact_match": True, "unparseable_rate": False}


def score_viggo_call(pred: ToolCall | None, ref: ToolCall) -> dict[str, float]:
    """Scores of one prediction (None = unparseable) against its reference, each in {0, 1} or [0, 1]."""
    if pred is None:
        return {"function_name_accuracy": 0.0, "attribute_set_accuracy": 0.0, "attribute_value_accuracy": 0.0,
                "exact_match": 0.0, "unparseable": 1.0}
    ref_args, pred_args = ref.arguments, pred.arguments
    if ref_args:
        value = sum(1 for k, v in ref_args.items() if k in pred_args and pred_args[k] == v) / len(ref_args)
    else:
        value = float(not pred_args)
    return {
        "function_name_accuracy": float(pred.name == ref.name),
        "attribute_set_accuracy": float(set(pred_args) == set(ref_args)),
        "attribute_value_accuracy": value,
        "exact_match": float(pred.name == ref.name and pred_args == ref_args),
        "unparseable": 0.0,
    }


def single_call(parsed: Parsed) -> ToolCall | None:
    """The one call of a ViGGO answer, or None when the output did not parse into exactly one call."""
    if parsed.error is not None or len(parsed.tool_calls) != 1:
        return None
    return parsed.tool_calls[0]


def viggo_metrics(parsed: list[Parsed], refs: list[ToolCall]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Aggregate ViGGO metrics over a split.

    Args:
        parsed: the format's parse of each model output, aligned with `refs`.
        refs: the reference call of each example.

    Returns:
        ``(metrics, per_example)``: metrics averaged over examples (keys of `HIGHER_IS_BETTER` plus
        ``n``), and each example's scores.

    Raises:
        ValueError: `parsed` and `refs` differ in length.
    """
    if len(parsed) != len(refs):
        raise ValueError(f"{len(parsed)} predictions for {len(refs)} references")
    per_example = [score_viggo_call(single_call(p), r) for p, r in zip(parsed, refs)]
    n = max(len(per_example), 1)
    mean = {k: sum(s[k] for s in per_example) / n for k in per_example[0]} if per_example else {}
    metrics: dict[str, Any] = {
        "function_name_accuracy": mean.get("function_name_accuracy", 0.0),
        "attribute_set_accuracy": mean.get("attribute_set_accuracy", 0.0),
        "attribute_value_accuracy": mean.get("attribute_value_accuracy", 0.0),
    }
    metrics["overall_accuracy"] = sum(metrics.values()) / 3
    metrics["exact_match"] = mean.get("exact_match", 0.0)
    metrics["unparseable_rate"] = mean.get("unparseable", 0.0)
    metrics["n"] = len(per_example)
    return metrics, per_example
