"""Running an evaluation: generate for an eval split, parse, score, and write the artefacts.

Owns `evaluate_model` (`EvalConfig`, the `eval:` section of a recipe, is in `calltune.evaluate.config`).
What is scored is the task (`calltune.evaluate.tasks`): ``viggo``, ``toolcall`` or ``bfcl``, set by
``EvalConfig.task`` or else chosen from the format and the examples (`default_task`). It writes into
its output folder: ``predictions.jsonl`` (one line per example: input, reference, raw output, parsed
calls, scores), ``metrics.json`` (the task, its metrics, timing, model and format) and
``confusion.png`` (a function-name confusion matrix: reference rows, predicted columns, the 20 most
frequent reference names and ``(other)``; see `confusion_counts`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from calltune.errors import CalltuneError
from calltune.evaluate.config import EvalConfig
from calltune.evaluate.tasks import Task, default_task, get_task
from calltune.formats import PromptFormat
from calltune.infer import load_for_inference
from calltune.infer.constrained import checked_tool_call_grammar, generate_constrained
from calltune.infer.vllm_engine import generate_vllm
from calltune.schema import Example

UNPARSEABLE = "(unparseable)"
NO_CALL = "(no call)"
OTHER = "(other)"  # confusion matrix: the names beyond the most frequent ones


def _first_name(parsed) -> str:
    if parsed.error is not None:
        return UNPARSEABLE
    return parsed.tool_calls[0].name if parsed.tool_calls else NO_CALL


def resolve_task(cfg: EvalConfig, fmt: PromptFormat, examples: list[Example]) -> Task:
    """``cfg.task`` if set, else the default for the format and examples (`default_task`)."""
    return get_task(cfg.task or default_task(fmt.name, examples))


def confusion_counts(pairs: list[tuple[str, str]], top: int = 20) -> tuple[list[str], list[str], list[list[int]]]:
    """Count (reference, predicted) function-name pairs into a matrix of bounded size.

    Rows are the `top` most frequent reference names (most frequent first, ties by name), then
    `NO_CALL` when some reference makes no call, then `OTHER` holding every other reference name.
    Columns are the same kept names in the same order (so hits lie on the diagonal), then `NO_CALL`
    and `UNPARSEABLE` (always there), then `OTHER` for every other predicted name, when there is one.
    Folding keeps every pair: the matrix sums to ``len(pairs)``. Time O(len(pairs)), size at most
    ``(top + 2) x (top + 3)`` whatever the number of distinct names.

    Returns:
        ``(rows, cols, matrix)`` with ``matrix[i][j]`` = number of pairs whose reference falls in
        ``rows[i]`` and whose prediction falls in ``cols[j]``.
    """
    pair_counts = Counter(pairs)
    ref_counts = Counter(r for r, _ in pairs)
    names = sorted((r for r in ref_counts if r not in (NO_CALL, UNPARSEABLE)), key=lambda r: (-ref_counts[r], r))
    kept = names[:max(top, 0)]
    index = {name: i for i, name in enumerate(kept)}
    rows = kept + ([NO_CALL] if NO_CALL in ref_counts else [])
    row_index = {**index, NO_CALL: len(kept)}
    cols = kept + [NO_CALL, UNPARSEABLE]
    col_index = {**index, NO_CALL: len(kept), UNPARSEABLE: len(kept) + 1}
    if any(r not in row_index for r in ref_counts):
        rows.append(OTHER)
    if any(p not in col_index for _, p in pair_counts):
        cols.append(OTHER)
    matrix = [[0] * len(cols) for _ in rows]
    for (ref, pred), n in pair_counts.items():
        matrix[row_index.get(ref, len(rows) - 1)][col_index.get(pred, len(cols) - 1)] += n
    return rows, cols, matrix


def confusion_png(pairs: list[tuple[str, str]], path: Path, title: str, top: int = 20) -> Path:
    """Save a confusion matrix of (reference, predicted) function names as a PNG.

    The matrix is `confusion_counts` (`top` most frequent reference names, the rest folded into
    ``(other)``; ``(no call)`` and ``(unparseable)`` columns), so memory, drawing time and image
    size stay bounded whatever the number of distinct names (a full BFCL eval has about a thousand).
    The image is at most about ``(1 + 0.7 * (top + 3)) x (1 + 0.55 * (top + 2))`` inches at 110 dpi;
    tick labels longer than 40 characters are shortened.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def short(names: list[str]) -> list[str]:
        return [n if len(n) <= 40 else n[:39] + "…" for n in names]

    rows, cols, counts = confusion_counts(pairs, top=top)
    if rows and rows[-1] == OTHER:
        distinct = len({r for r, _ in pairs} - {NO_CALL, UNPARSEABLE})
        title += f"\n{top} most frequent of {distinct} reference names, the rest in {OTHER}"
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.55 * max(len(rows), 1)))
    if rows:
        peak = max(map(max, counts))
        ax.imshow(counts, cmap="Blues")
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=8,
                            color="white" if c > peak / 2 else "black")
    ax.set_xticks(range(len(cols)), short(cols), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), short(rows))
    ax.set_xlabel("predicted function")
    ax.set_ylabel("reference function")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tokenizer_and_format(model_name: str):
    """The tokenizer and saved format of a model, without loading its weights (the vllm engine loads its own)."""
    from calltune.formats import load_format
    from calltune.models import load_tokenizer, resolve_model

    path = resolve_model(model_name)
    return load_tokenizer(path), load_format(path)


def evaluate_model(model_name: str, examples: list[Example], out_dir: str | Path, cfg: EvalConfig | None = None,
                   fmt: PromptFormat | None = None, loaded: tuple | None = None) -> dict[str, Any]:
    """Generate for `examples` with `model_name`, score them as the task (`resolve_task`), write the artefacts.

    Args:
        model_name: anything `calltune.models.resolve_model` accepts, or a LoRA adapter folder.
        examples: eval examples; the final assistant turn is the reference, and the prompt is
            everything before it.
        out_dir: where predictions.jsonl, metrics.json and confusion.png go.
        cfg: the task and generation settings (default `EvalConfig()`).
        fmt: the prompt format; when given it wins over the format saved with the model; when None,
            the saved one (a base model has none, so then a format must be given).
        loaded: an already loaded ``(model, tokenizer, fmt)`` to reuse (the calltune engine only; the
            vllm engine, `EvalConfig.resolved_engine`, loads the model into vLLM from its folder).

    Returns:
        The metrics dict written to metrics.json: the task's metrics, ``task``, ``model``,
        ``format``, ``constrained`` and timing.

    Raises:
        ValueError: neither the model nor the caller gives a format, or the task cannot score an
            example (raised before generating; names the example).
        ConstrainedDecodingError: ``cfg.constrained`` with a format whose call syntax has no grammar.
    """
    cfg = cfg or EvalConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = cfg.resolved_engine()
    if engine == "vllm":
        model, tokenizer, saved = None, *_tokenizer_and_format(model_name)
    else:
        model, tokenizer, saved = loaded or load_for_inference(model_name)
    fmt = fmt if fmt is not None else saved
    if fmt is None:
        raise CalltuneError(f"{model_name} has no saved prompt format; pass one (e.g. --format viggo)")
    task = resolve_task(cfg, fmt, examples)
    task.check(examples)
    prompts = [fmt.prompt(e, tokenizer) for e in examples]
    start = time.perf_counter()
    grammars = None  # unconstrained: generate_constrained is plain `generate`
    if cfg.constrained:
        grammars = [checked_tool_call_grammar(tokenizer, fmt, e.tools) if e.tools else None for e in examples]
    if engine == "vllm":
        generations = generate_vllm(model_name, prompts, max_new_tokens=cfg.max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, tensor_parallel_size=cfg.tensor_parallel_size)
    else:
        generations = generate_constrained(model, tokenizer, prompts, grammars, max_new_tokens=cfg.max_new_tokens,
                                           batch_size=cfg.batch_size, progress=True, workers=cfg.workers)
    seconds = time.perf_counter() - start
    parsed = [fmt.parse(g.text) for g in generations]
    metrics, per_example = task.score(examples, parsed)
    new_tokens = sum(g.completion_tokens for g in generations)
    metrics.update({"task": task.name, "model": str(model_name), "format": fmt.name, "constrained": cfg.constrained,
                    "engine": engine,
                    "eval_seconds": round(seconds, 2),
                    "generated_tokens": new_tokens, "generated_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)})
    pairs = []
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for ex, gen, p, scores in zip(examples, generations, parsed, per_example):
            final = ex.final_assistant()
            ref_calls = (final.tool_calls or []) if final else []
            pairs.append((ref_calls[0].name if ref_calls else NO_CALL, _first_name(p)))
            f.write(json.dumps({
                "source": ex.source, "row": ex.row,
                "input": next((m.content for m in reversed(ex.messages) if m.role == "user"), None),
                "reference": [{"name": c.name, "arguments": c.arguments} for c in ref_calls] or
                             (final.content if final else None),
                "output": gen.text, "finish_reason": gen.finish_reason,
                "parsed": [{"name": c.name, "arguments": c.arguments} for c in p.tool_calls],
                "parse_error": p.error, "scores": scores,
            }, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    label = Path(str(model_name))
    label = label.parent.name if label.name == "model" else label.name  # runs/<name>/model -> <name>
    confusion_png(pairs, out_dir / "confusion.png", f"function names: {label}")
    return metrics
