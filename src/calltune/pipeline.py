"""The pipeline behind `calltune run`: prepare -> train -> evaluate base and tuned -> report.

Owns `run_recipe` and the report it writes into the run folder:
``report.md`` (a table in the Levanter ViGGO tutorial's layout: one row per metric, one column per model),
``loss.png`` (training loss curve), ``summary.json`` (every figure of the report), plus the
artefacts of each stage: ``rejects.jsonl``, ``model/``, ``eval-base/``, ``eval-tuned/``.

Under a launcher (``accelerate launch -m calltune run``) every process prepares the data and trains;
only the main process writes files and evaluates (after training, then the others return).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from calltune.augment import augment
from calltune.evaluate.runner import evaluate_model
from calltune.evaluate.tasks import TASKS
from calltune.formats import get_format
from calltune.recipe import Recipe
from calltune.sources import Rejects, load_source
from calltune.sources.clean import clean, split_validation
from calltune.train import train
from calltune.train.output import is_main_process, world_size
from calltune.runtime import keep_freed_memory, release_freed_memory

METRIC_ROWS = {
    **{name: [(m.name, m.label) for m in task.metrics] for name, task in TASKS.items()},  # the report's table rows
    # rows under the BFCL per-category table: `calltune.evaluate.bfcl_checker.NON_LIVE_SUMMARY` entries
    "bfcl_summary": [("simple", "simple (mean of Python, Java, JavaScript)"), ("non_live_ast", "non-live AST summary")],
}


def recipe_format(recipe: Recipe):
    """The recipe's prompt format; ``auto`` picks by the model's chat template (see `get_format`)."""
    if recipe.format == "auto":
        from calltune.models import load_tokenizer, resolve_model

        return get_format("auto", tokenizer=load_tokenizer(resolve_model(recipe.model)))
    return get_format(recipe.format, **recipe.format_options)


def prepare(recipe: Recipe, out: Path):
    """Load, clean, split and augment; rejects go to ``out/rejects.jsonl``. Returns (train, eval, counts, rejects)."""
    rejects = Rejects(out / "rejects.jsonl")
    d = recipe.data
    train_ex = load_source(d.source, d.train_path, split=d.train_split, rejects=rejects, limit=d.limit)
    loaded = len(train_ex)
    clean_report = None
    if recipe.clean is not None:
        result = clean(train_ex, recipe.clean, rejects)
        train_ex, clean_report = result.examples, result.report
    held_out_unused = 0
    if d.eval:
        eval_ex = load_source(d.source, d.eval, split=d.eval_split, rejects=rejects, limit=d.eval_limit)
    else:  # a seeded 10% of the cleaned examples, as hosted fine-tuning services split them
        train_ex, eval_ex = split_validation(train_ex, d.val_fraction, seed=recipe.train.seed)
        held_out_unused = len(eval_ex) - len(eval_ex[:d.eval_limit or None])  # held out, past eval_limit
        eval_ex = eval_ex[:d.eval_limit or None]
    augment_report = None
    if recipe.augment is not None:  # after the split: nothing made from an eval example is trained on
        augmented = augment(train_ex, recipe.augment, rejects)
        train_ex, augment_report = augmented.examples, augmented.report
    if is_main_process():
        rejects.write()
    counts = {"loaded_train_examples": loaded, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
              "held_out_unused": held_out_unused,
              "rejected_rows": len(rejects), "rejects_by_reason": rejects.counts, "clean": clean_report,
              "augment": augment_report}
    return train_ex, eval_ex, counts, rejects


def loss_png(history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Plot the training loss per optimizer step from the Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _data_lines(data: dict[str, Any]) -> list[str]:
    """The report's data section: cleaning, augmentation and rejects counts (`prepare`'s summary)."""
    lines = ["", "## Data", "", f"- loaded training examples: {data.get('loaded_train_examples', '–')}; trained on: "
             f"{data.get('train_examples', '–')}; eval examples: {data.get('eval_examples', '–')}"]
    if data.get("clean"):
        c = data["clean"]
        lines.append(f"- cleaning: kept {c['kept']} of {c['input']}, rejected {c['rejected'] or 'none'}")
    if data.get("augment"):
        a = data["augment"]
        lines.append(f"- augmentation: {a['originals']} originals kept of {a['input']} (mix {a['mix'] or 'all'}; "
                     f"{a['trimmed_tool_lists']} tool lists trimmed), {a['new']} new examples:")
        lines += [f"  - {rule}: {r['made']} made of {r['asked']} asked, {r['rejected']} rejected by the schema check"
                  for rule, r in a["rules"].items()]
        lines.append(f"- calls in the trained examples: {a['categories_after']}")
    if data.get("rejects_by_reason"):
        lines.append("- rejected rows by stage and reason (`rejects.jsonl`; `render: N tokens` = longer than "
                     "max_length): " + ", ".join(f"{k}: {v}" for k, v in sorted(data["rejects_by_reason"].items())))
    return lines


def write_report(recipe: Recipe, out: Path, summary: dict[str, Any]) -> Path:
    """Write ``report.md`` from the run's summary (also saved as ``summary.json``).

    With BFCL eval examples it adds the official checker's accuracy per category and, under it,
    BFCL's non-live summary rows (`calltune.evaluate.bfcl_checker.bfcl_summary`: unweighted means of
    category accuracies; n is the number of examples under the mean). A summary row is shown when
    its categories were all evaluated; otherwise a line names the missing categories.
    """
    base, tuned = summary.get("eval_base"), summary.get("eval_tuned")
    t = summary.get("train", {})
    lines = [f"# calltune report: {recipe.name}", "",
             f"Model `{recipe.model}`, method `{recipe.train.method}`, format `{recipe.format}`, "
             f"data `{recipe.data.source}` ({summary['data']['train_examples']} train / "
             f"{summary['data']['eval_examples']} eval examples, {summary['data']['rejected_rows']} rows rejected).", "",
             "| Metric | Base | Tuned |", "| --- | ---: | ---: |"]
    task = (tuned or base or {}).get("task", "viggo")
    for key, label in METRIC_ROWS[task]:
        lines.append(f"| {label} | {_fmt(base.get(key) if base else None)} | {_fmt(tuned.get(key) if tuned else None)} |")
    bfcl_base, bfcl_tuned = (base or {}).get("bfcl"), (tuned or {}).get("bfcl")
    if bfcl_tuned or bfcl_base:
        ref = bfcl_tuned or bfcl_base
        lines += ["", f"BFCL, official AST checker (bfcl-eval {ref.get('bfcl_version')}), accuracy per category, "
                  "then BFCL's non-live summary (unweighted means of category accuracies, as the leaderboard's):", "",
                  "| Category | n | Base | Tuned |", "| --- | ---: | ---: | ---: |"]
        for cat in ref.get("accuracy", {}):
            lines.append(f"| {cat} | {ref['total'][cat]} | {_fmt((bfcl_base or {}).get('accuracy', {}).get(cat))} | "
                         f"{_fmt((bfcl_tuned or {}).get('accuracy', {}).get(cat))} |")
        from calltune.evaluate.bfcl_checker import summary_categories

        sides = [(bfcl_base or {}).get("summary") or {}, (bfcl_tuned or {}).get("summary") or {}]
        for key, label in METRIC_ROWS["bfcl_summary"]:
            if any(key in side for side in sides):
                n = sum(ref["total"].get(c, 0) for c in summary_categories(key))
                lines.append(f"| {label} | {n} | {_fmt(sides[0].get(key))} | {_fmt(sides[1].get(key))} |")
        labels = dict(METRIC_ROWS["bfcl_summary"])
        lacking = [f"{labels.get(key, key)} needs {', '.join(cats)}"
                   for key, cats in (ref.get("summary_missing") or {}).items() if not any(key in s for s in sides)]
        if lacking:
            lines += ["", "Not reported, not every category evaluated: " + "; ".join(lacking) + "."]
    lines += _data_lines(summary["data"])
    lines += ["", "## Training", "",
              f"- optimizer steps: {t.get('steps')}, examples: {t.get('train_examples')}",
              f"- wall time: {t.get('seconds', 0):.0f} s; training tokens/s (non-padding): {t.get('tokens_per_s', 0):.0f}",
              f"- final logged loss: {t.get('final_loss')}", "", "![training loss](loss.png)", "",
              "## Wall times (s)", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in summary["wall_seconds"].items()]
    lines += ["", "## Machine", "", f"- {summary['machine']}", "",
              "Artefacts: `eval-*/predictions.jsonl`, `eval-*/metrics.json`, `eval-*/confusion.png`, "
              "`rejects.jsonl`, `model/` (TensorBoard logs in `model/checkpoints/runs`).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cached_base_eval(recipe: Recipe, eval_ex, out: Path, fmt) -> dict[str, Any]:
    """Evaluate the base model, reusing an identical earlier evaluation from ``$CALLTUNE_HOME/evals``.

    The base model's outputs depend only on the model, the eval examples, the format and the
    generation settings, and its scores on the code that generates and scores them, so runs that
    share those (viggo-full and viggo-lora) pay for it once. The key is a hash of those and of the
    installed distribution versions of calltune, transformers and torch (and bfcl-eval when
    installed: its checker scores BFCL examples); the cached folder is copied into ``out/eval-base``.
    An editable calltune keeps its version while its code changes: clear ``$CALLTUNE_HOME/evals``
    after changing generation or scoring code.
    """
    import hashlib
    import shutil
    from importlib import metadata

    from calltune.models import calltune_home, resolve_model

    versions = {}
    for dist in ("calltune", "transformers", "torch", "bfcl-eval"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    settings = recipe.eval.model_dump(exclude={"base"})
    digest = hashlib.sha256(json.dumps([resolve_model(recipe.model), fmt.name, fmt.options(), settings, versions,
                                        [e.to_json() for e in eval_ex]], sort_keys=True).encode()).hexdigest()[:16]
    cache = calltune_home() / "evals" / digest
    target = out / "eval-base"
    if (cache / "metrics.json").exists():
        shutil.copytree(cache, target, dirs_exist_ok=True)
        metrics = json.loads((target / "metrics.json").read_text())
        metrics["cached_from"] = str(cache)
        return metrics
    metrics = evaluate_model(recipe.model, eval_ex, target, recipe.eval, fmt=fmt)
    shutil.copytree(target, cache, dirs_exist_ok=True)
    return metrics


def run_recipe(recipe: Recipe, output_dir: str | Path | None = None, callbacks: list | None = None,
               resume_from_checkpoint: str | Path | bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end and return its summary (also in ``summary.json`` and ``report.md``).

    `callbacks` (transformers `TrainerCallback`s) watch training; `resume_from_checkpoint` (True: the
    newest complete checkpoint of ``model/``; or a ``model/checkpoints/checkpoint-N`` folder of an
    earlier run into the same `output_dir`) continues training from that step, or reuses the model when
    it was saved already; `overwrite` trains afresh over an earlier run's model (`calltune.train.train`).
    Under a launcher, processes other than the main one return after training with the summary so far.
    """
    out = Path(output_dir) if output_dir else recipe.out
    main = is_main_process()
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "recipe.json").write_text(recipe.model_dump_json(indent=2) + "\n")
    fmt = recipe_format(recipe)
    walls: dict[str, float] = {}
    summary: dict[str, Any] = {"recipe": recipe.name, "wall_seconds": walls,
                               "machine": f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} threads, torch {torch.__version__}"}

    t0 = time.perf_counter()
    train_ex, eval_ex, counts, rejects = prepare(recipe, out)
    summary["data"] = counts
    walls["prepare"] = time.perf_counter() - t0

    def evaluate_base():
        t0 = time.perf_counter()
        summary["eval_base"] = _cached_base_eval(recipe, eval_ex, out, fmt)
        walls["evaluate base"] = time.perf_counter() - t0

    alone = world_size() == 1  # with other processes waiting to train, the main one evaluates after training
    if recipe.eval.base and alone:
        evaluate_base()

    t0 = time.perf_counter()
    result = train(recipe.model, train_ex, fmt, recipe.train, out / "model", rejects=rejects, callbacks=callbacks,
                   resume_from_checkpoint=resume_from_checkpoint, overwrite=overwrite)
    if main:
        rejects.write()
    # plus the rows training could not render
    counts.update(rejected_rows=len(rejects), rejects_by_reason=rejects.counts)
    walls["train"] = time.perf_counter() - t0
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    summary["train"] = {"steps": result.steps, "train_examples": result.train_examples,
                        "seconds": result.train_seconds, "tokens_seen": result.tokens_seen,
                        "tokens_per_s": result.tokens_per_s, "final_loss": losses[-1] if losses else None}
    if not main:
        return summary
    loss_png(result.log_history, out / "loss.png", f"{recipe.name}: training loss")
    release_freed_memory()
    keep_freed_memory()  # training is over: generation reuses freed blocks instead of faulting in new ones
    if recipe.eval.base and not alone:
        evaluate_base()

    t0 = time.perf_counter()
    summary["eval_tuned"] = evaluate_model(str(out / "model"), eval_ex, out / "eval-tuned", recipe.eval, fmt=fmt)
    walls["evaluate tuned"] = time.perf_counter() - t0

    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_report(recipe, out, summary)
    return summary
