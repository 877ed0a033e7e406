"""Running an evaluation: generate for an eval split, parse, score, and write the artefacts.

Owns `EvalConfig` (the `eval:` section of a recipe) and `evaluate_model`, which writes into its
output folder: ``predictions.jsonl`` (one line per example: input, reference, raw output, parsed
calls, scores), ``metrics.json`` (metrics, timing, model and format) and ``confusion.png`` (a
function-name confusion matrix: reference rows, predicted columns).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from calltune.evaluate.metrics import single_call, viggo_metrics
from calltune.formats import PromptFormat
from calltune.infer import generate, load_for_inference
from calltune.schema import Example

NO_CALL = "(unparseable)"


class EvalConfig(BaseModel):
    """How to evaluate: generation settings and how much of the eval split to use."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(32, ge=1, description="prompts generated together")
    max_new_tokens: int = Field(128, ge=1, description="generation budget per example")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N examples")
    base: bool = Field(True, description="also evaluate the base model, for the report's comparison")


def _reference(example: Example):
    final = example.final_assistant()
    if final is None or not final.tool_calls:
        raise ValueError(f"{example.where}: an eval example needs a final assistant turn with a call")
    return final.tool_calls[0]


def confusion_png(pairs: list[tuple[str, str]], path: Path, title: str) -> Path:
    """Save a confusion matrix of (reference, predicted) function names as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = sorted({r for r, _ in pairs})
    cols = refs + sorted({p for _, p in pairs} - set(refs))
    counts = [[sum(1 for r, p in pairs if r == a and p == b) for b in cols] for a in refs]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.55 * len(refs)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(refs)), refs)
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=8,
                        color="white" if c > max(map(max, counts)) / 2 else "black")
    ax.set_xlabel("predicted function")
    ax.set_ylabel("reference function")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_model(model_name: str, examples: list[Example], out_dir: str | Path, cfg: EvalConfig | None = None,
                   fmt: PromptFormat | None = None, loaded: tuple | None = None) -> dict[str, Any]:
    """Generate for `examples` with `model_name`, score with the ViGGO metrics, write the artefacts.

    Args:
        model_name: anything `calltune.models.resolve_model` accepts, or a LoRA adapter folder.
        examples: eval examples whose final assistant turn holds the reference call.
        out_dir: where predictions.jsonl, metrics.json and confusion.png go.
        fmt: the prompt format; the format saved with the model wins when there is one (a base model
            has none, so the recipe's format renders its prompts).
        loaded: an already loaded ``(model, tokenizer, fmt)`` to reuse.

    Returns:
        The metrics dict written to metrics.json.

    Raises:
        ValueError: neither the model nor the caller gives a format.
    """
    cfg = cfg or EvalConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.limit:
        examples = examples[:cfg.limit]
    model, tokenizer, saved = loaded or load_for_inference(model_name)
    fmt = saved or fmt
    if fmt is None:
        raise ValueError(f"{model_name} has no saved prompt format; pass one (e.g. --format viggo)")
    refs = [_reference(e) for e in examples]
    prompts = [fmt.prompt(e, tokenizer) for e in examples]
    start = time.perf_counter()
    generations = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, progress=True)
    seconds = time.perf_counter() - start
    parsed = [fmt.parse(g.text) for g in generations]
    metrics, per_example = viggo_metrics(parsed, refs)
    new_tokens = sum(g.completion_tokens for g in generations)
    metrics.update({"model": str(model_name), "format": fmt.name, "eval_seconds": round(seconds, 2),
                    "generated_tokens": new_tokens, "generated_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)})
    pairs = []
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for ex, ref, gen, p, scores in zip(examples, refs, generations, parsed, per_example):
            call = single_call(p)
            pairs.append((ref.name, call.name if call else NO_CALL))
            f.write(json.dumps({
                "source": ex.source, "row": ex.row,
                "input": next((m.content for m in reversed(ex.messages) if m.role == "user"), None),
                "reference": {"name": ref.name, "arguments": ref.arguments},
                "output": gen.text, "finish_reason": gen.finish_reason,
                "parsed": [{"name": c.name, "arguments": c.arguments} for c in p.tool_calls],
                "parse_error": p.error, "scores": scores,
            }, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    confusion_png(pairs, out_dir / "confusion.png", f"function names: {Path(str(model_name)).name}")
    return metrics
