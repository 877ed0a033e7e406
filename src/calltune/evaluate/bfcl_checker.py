"""BFCL scoring with the leaderboard's own AST checker (``bfcl_eval.eval_checker.ast_eval.ast_checker``).

Owns `score_bfcl` (predicted calls of `load_bfcl` examples -> per-category accuracy and BFCL's
non-live summary), `bfcl_summary` (that summary) and `load_ast_checker`, which imports the official
checker without the rest of bfcl-eval.

Definitions, as in ``bfcl_eval/eval_checker/eval_runner.py``:
- AST categories (simple, multiple, parallel, parallel_multiple, java, javascript, live_*): an
  example is correct iff ``ast_checker(function_docs, decoded_calls, possible_answer, language,
  category, model)`` says valid. Decoded calls have BFCL's shape ``[{name: {arg: value}}, ...]``; an
  output the format could not parse (None) is a decoding failure, hence wrong. Language (python,
  java, javascript) follows the category name, as BFCL's `is_java` / `is_js` do.
- irrelevance, live_irrelevance: correct iff no call was decoded (None or an empty list).
- live_relevance: correct iff at least one call was decoded.
Accuracy is correct / total per category, higher is better; `score_bfcl` reports no overall BFCL
score (the leaderboard's overall is a weighted mix that includes multi-turn and agentic categories).

Non-live summary (`bfcl_summary`, in `score_bfcl`'s ``"summary"``), as the leaderboard's non-live table
computes it in ``bfcl_eval/eval_checker/eval_runner_helper.py`` (`generate_leaderboard_csv`, "Non-Live
Score", with `calculate_unweighted_accuracy`):
- ``simple`` = unweighted mean of the accuracies of simple_python, simple_java, simple_javascript
  (each category counts once, whatever its number of entries);
- ``non_live_ast`` = unweighted mean of simple (the mean above), multiple, parallel, parallel_multiple;
- irrelevance is reported as is (its per-category accuracy), outside both means.
An entry is given only when every category under it was evaluated; otherwise it is left out of
``"summary"`` and ``"summary_missing"`` names the categories it lacks (the leaderboard shows "N/A"
for it; its "overall non-live" column would count a missing category as 0, which calltune does not
report). The means are over the entries evaluated: with a per-category limit they are the means of
the limited categories' accuracies, not the leaderboard's full-data figures.

Function names are compared as BFCL writes them (``math.factorial``): the checker is run as a model
without ``underscore_to_dot``, so a format that sends ``math_factorial`` must map it back first.

Importing the checker: ``ast_checker.py`` needs only the light modules ``bfcl_eval.constants.enums``,
``constants.type_mappings`` and ``ast_eval.type_convertor.*``, plus ``constants.model_config`` for one
lookup (`MODEL_CONFIG_MAPPING[model].underscore_to_dot`); model_config imports every vendor SDK
(openai, anthropic, mistralai, ...). `load_ast_checker` finds ``ast_checker.py`` with
`importlib.util.find_spec` and executes it under a private module name while a stub
``bfcl_eval.constants.model_config`` (any model -> ``underscore_to_dot=False``) sits in `sys.modules`;
the previous entry is restored right after, so a real bfcl-eval import elsewhere in the process is
unaffected. ``pip install --no-deps bfcl-eval`` is all it needs.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from calltune.errors import CalltuneError
from calltune.schema import Example, ToolCall
from calltune.sources.bfcl import bfcl_version, category_language

CHECKER_MODULE = "bfcl_eval.eval_checker.ast_eval.ast_checker"
_MODEL_CONFIG = "bfcl_eval.constants.model_config"
_MODEL_NAME = "calltune"
_INSTALL_HINT = "install it with `pip install --no-deps bfcl-eval` (its own dependencies are not needed)"
_lock = threading.Lock()
_checker: types.ModuleType | None = None

# Summary entry -> its parts, in BFCL's order (eval_runner_helper.generate_leaderboard_csv); a part is a
# category or an earlier entry.
NON_LIVE_SUMMARY: dict[str, tuple[str, ...]] = {
    "simple": ("simple_python", "simple_java", "simple_javascript"),
    "non_live_ast": ("simple", "multiple", "parallel", "parallel_multiple"),
}


class BFCLCheckerError(ImportError):
    """The official checker cannot be loaded; the message names what is missing and what to do."""


@dataclass(frozen=True)
class _NoUnderscoreToDot:
    underscore_to_dot: bool = False


class _AnyModelConfig(dict):
    """Stands in for `MODEL_CONFIG_MAPPING`: every model keeps dotted function names."""

    def __missing__(self, key: str) -> _NoUnderscoreToDot:
        return _NoUnderscoreToDot()


def load_ast_checker() -> types.ModuleType:
    """The official ``ast_checker`` module of the installed bfcl-eval, loaded once without vendor SDKs.

    Raises:
        BFCLCheckerError: bfcl-eval is missing, the checker file moved, or it now imports something
            that is not installed (the message names it).
    """
    global _checker
    with _lock:
        if _checker is not None:
            return _checker
        try:
            spec = importlib.util.find_spec(CHECKER_MODULE)
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin is None:
            hint = (f"bfcl-eval is not installed; {_INSTALL_HINT}" if importlib.util.find_spec("bfcl_eval") is None
                    else f"the installed bfcl-eval has no module {CHECKER_MODULE}; calltune was written against "
                         "bfcl-eval 2026.x (BFCL v4): install a version that has it")
            raise BFCLCheckerError(hint)
        private = importlib.util.spec_from_file_location("calltune._bfcl_ast_checker", spec.origin)
        module = importlib.util.module_from_spec(private)
        stub = types.ModuleType(_MODEL_CONFIG, "calltune stub: only what ast_checker reads")
        stub.MODEL_CONFIG_MAPPING = _AnyModelConfig()
        saved = sys.modules.get(_MODEL_CONFIG)
        sys.modules[_MODEL_CONFIG] = stub
        try:
            private.loader.exec_module(module)
        except ImportError as err:
            missing = getattr(err, "name", None) or str(err)
            raise BFCLCheckerError(
                f"bfcl-eval's {spec.origin} imports {missing!r}, which is not available ({err}). calltune loads "
                f"the checker with a stub {_MODEL_CONFIG}; if the checker now needs more from it or a new "
                "dependency, install that dependency or a bfcl-eval version that calltune supports") from err
        finally:
            if saved is None:
                sys.modules.pop(_MODEL_CONFIG, None)
            else:
                sys.modules[_MODEL_CONFIG] = saved
        for name in ("ast_checker", "Language"):
            if not hasattr(module, name):
                raise BFCLCheckerError(f"bfcl-eval's {spec.origin} has no {name!r}; this bfcl-eval version is not "
                                       "supported by calltune")
        _checker = module
        return module


def to_bfcl_calls(calls: Sequence[ToolCall] | None) -> list[dict[str, dict[str, Any]]] | None:
    """Canonical calls -> BFCL's decoded shape ``[{name: {arg: value}}]``; None stays None."""
    if calls is None:
        return None
    return [{call.name: dict(call.arguments)} for call in calls]


def score_bfcl(examples: Sequence[Example], predicted_calls: Sequence[Sequence[ToolCall] | None]) -> dict[str, Any]:
    """Score predictions on `load_bfcl` examples with the official BFCL rules.

    Args:
        examples: from `calltune.sources.bfcl.load_bfcl` (they carry ``meta["bfcl"]``).
        predicted_calls: per example, the tool calls the format parsed from the model's output (an
            empty list: it answered without a call), or None when the output could not be parsed.

    Returns:
        ``{"bfcl_version", "accuracy": {category: float}, "correct": {category: int},
        "total": {category: int}, "summary": {entry: float}, "summary_missing": {entry: [category]},
        "results": [{"id", "category", "valid", "error", "error_type"}]}``: accuracies are fractions
        in [0, 1] (correct / total), categories in order of first appearance, results in the order
        of `examples`; ``summary`` / ``summary_missing`` are `bfcl_summary` of the accuracies (BFCL's
        non-live summary, defined in the module docstring).

    Raises:
        ValueError: lengths differ, or an example has no ``meta["bfcl"]``.
        BFCLCheckerError: the official checker cannot be loaded.
    """
    if len(examples) != len(predicted_calls):
        raise ValueError(f"score_bfcl: {len(examples)} examples but {len(predicted_calls)} predictions")
    checker = load_ast_checker()
    languages = {"python": checker.Language.PYTHON, "java": checker.Language.JAVA,
                 "javascript": checker.Language.JAVASCRIPT}
    results, correct, total = [], Counter(), Counter()
    for i, (example, calls) in enumerate(zip(examples, predicted_calls)):
        info = example.meta.get("bfcl")
        if not info:
            raise CalltuneError(f"score_bfcl: example {i} ({example.where}) has no meta['bfcl']; "
                             "load it with calltune.sources.bfcl.load_bfcl")
        category = info["category"]
        decoded = to_bfcl_calls(calls)
        result = _score_one(checker, languages[category_language(category)], info, decoded)
        results.append({"id": info["id"], "category": category, **result})
        total[category] += 1
        correct[category] += bool(result["valid"])
    accuracy = {c: correct[c] / total[c] for c in total}
    summary, missing = bfcl_summary(accuracy)
    return {"bfcl_version": bfcl_version(), "accuracy": accuracy, "correct": dict(correct), "total": dict(total),
            "summary": summary, "summary_missing": missing, "results": results}


def bfcl_summary(accuracy: dict[str, float]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """BFCL's non-live summary from per-category accuracies (`NON_LIVE_SUMMARY`, module docstring).

    Follows ``bfcl_eval/eval_checker/eval_runner_helper.py``: `generate_leaderboard_csv` builds
    ``simple_ast_non_live`` and ``summary_ast_non_live`` with `calculate_unweighted_accuracy` (the
    plain mean of the parts' accuracies, each part counted once whatever its size).

    Args:
        accuracy: ``{category: fraction correct in [0, 1]}`` of the categories evaluated.

    Returns:
        ``(summary, missing)``: ``summary`` maps each entry whose categories were all evaluated to
        its mean (a fraction in [0, 1]); ``missing`` maps each other entry of which at least one
        category was evaluated to the categories it lacks, in `NON_LIVE_SUMMARY` order (entries with
        no category evaluated appear in neither).
    """
    summary: dict[str, float] = {}
    missing: dict[str, list[str]] = {}
    for entry, parts in NON_LIVE_SUMMARY.items():
        categories = summary_categories(entry)
        lacking = [c for c in categories if c not in accuracy]
        if not lacking:
            values = [summary[p] if p in NON_LIVE_SUMMARY else accuracy[p] for p in parts]
            summary[entry] = sum(values) / len(values)
        elif len(lacking) < len(categories):
            missing[entry] = lacking
    return summary, missing


def summary_categories(entry: str) -> list[str]:
    """The BFCL categories under a `NON_LIVE_SUMMARY` entry (``non_live_ast`` -> simple_python, ...)."""
    return [c for part in NON_LIVE_SUMMARY[entry]
            for c in (summary_categories(part) if part in NON_LIVE_SUMMARY else [part])]


def _score_one(checker: types.ModuleType, language: Any, info: dict[str, Any],
               decoded: list[dict[str, dict[str, Any]]] | None) -> dict[str, Any]:
    category = info["category"]
    if "relevance" in category:  # irrelevance, live_irrelevance, live_relevance (eval_runner's rule)
        has_call = bool(decoded) and any(len(c) for c in decoded)
        if "irrelevance" in category:
            return ({"valid": True, "error": [], "error_type": None} if not has_call else
                    {"valid": False, "error": ["Valid syntax. Successfully decode AST when it should not."],
                     "error_type": "irrelevance_error:decoder_success"})
        return ({"valid": True, "error": [], "error_type": None} if has_call else
                {"valid": False, "error": ["Invalid syntax. Failed to decode AST when it should have."],
                 "error_type": "relevance_error:decoder_failed"})
    if decoded is None:
        return {"valid": False, "error": ["Invalid syntax. Failed to decode AST."],
                "error_type": "ast_decoder:decoder_failed"}
    try:
        out = checker.ast_checker(info["function"], decoded, info["ground_truth"], language, category, _MODEL_NAME)
    except Exception as err:  # the checker assumes well-formed values; a crash on odd output is a miss
        return {"valid": False, "error": [f"checker raised {type(err).__name__}: {err}"],
                "error_type": "calltune:checker_exception"}
    return {"valid": bool(out["valid"]), "error": out.get("error", []), "error_type": out.get("error_type")}
