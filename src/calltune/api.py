"""The Python API: what the command line does, as functions (`import calltune; calltune.run(...)`).

Owns `load_examples`, `train`, `evaluate` and `run`; the CLI commands are thin layers over the same
stage functions. Recipes can be given as a path, a `Recipe`, or a plain dict of its keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calltune.recipe import Recipe, load_recipe
from calltune.schema import Example
from calltune.sources import Rejects, load_source


def _recipe(recipe: Recipe | dict[str, Any] | str | Path | None, overrides: dict[str, Any] | None) -> Recipe:
    if isinstance(recipe, (Recipe, dict)):
        from calltune.recipe import set_dotted

        data = recipe.model_dump() if isinstance(recipe, Recipe) else dict(recipe)
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)  # one key at a time: the rest of its section is kept
        return Recipe(**data)
    return load_recipe(recipe, overrides)


def load_examples(source: str, path: str | Path, *, split: str = "train", limit: int | None = None,
                  rejects: Rejects | None = None) -> list[Example]:
    """Read a dataset into canonical examples with the adapter called `source` (`calltune.sources.SOURCES`).

    `path` is a file, a hub dataset id, or for ``bfcl`` a comma-separated list of categories;
    `limit` keeps the first N rows (per category for BFCL). Unusable rows go to `rejects`.

    Raises:
        ValueError: unknown source. SourceError: the file is not what the source expects.
    """
    return load_source(source, path, split=split, rejects=rejects, limit=limit)


def train(recipe: Recipe | dict[str, Any] | str | Path | None, output_dir: str | Path | None = None,
          overrides: dict[str, Any] | None = None, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Prepare a recipe's data (load, clean, split, augment) and train; returns the saved model folder.

    `output_dir` defaults to ``runs/<name>/model``; rejects go beside it. `overrides` are dotted
    recipe keys (``{"train.max_steps": 20}``). No evaluation runs (see `run`). A folder that already
    holds a run needs `resume` (continue from its newest complete checkpoint) or `overwrite` (start
    afresh), as ``calltune train --resume / --overwrite``.

    Raises:
        RecipeError: the recipe is invalid. CalltuneError (SourceError, OutputDirError, ...): its data or
        the output folder can't be used.
    """
    from calltune.pipeline import prepare, recipe_format
    from calltune.train import train as train_model
    from calltune.train.output import check_output_dir

    r = _recipe(recipe, overrides)
    out = Path(output_dir) if output_dir else r.out / "model"
    check_output_dir(out, resume=resume, overwrite=overwrite, what="output_dir")
    train_ex, _, _, rejects = prepare(r, out.parent)
    result = train_model(r.model, train_ex, recipe_format(r), r.train, out, rejects=rejects,
                         resume_from_checkpoint=resume, overwrite=overwrite)
    rejects.write()
    return result.output_dir


def evaluate(model: str | Path, examples: list[Example], *, format: str | None = None,
             config: dict[str, Any] | None = None, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Generate for `examples` with `model`, parse with its prompt format and score; returns the metrics.

    `format` names the prompt format (default: the one saved with the model); `config` sets
    `EvalConfig` fields (``{"task": "toolcall", "max_new_tokens": 64}``; the task defaults as in
    `calltune.evaluate.tasks.default_task`, so BFCL examples are also scored by BFCL's checker).
    Files (predictions, metrics, confusion matrix) are written only when `output_dir` is given.
    """
    import tempfile

    from calltune.evaluate.runner import EvalConfig, evaluate_model
    from calltune.formats import get_format

    fmt = get_format(format) if format else None
    cfg = EvalConfig(**(config or {}))
    if output_dir is not None:
        return evaluate_model(str(model), examples, output_dir, cfg, fmt=fmt)
    with tempfile.TemporaryDirectory(prefix="calltune-eval-") as tmp:
        return evaluate_model(str(model), examples, tmp, cfg, fmt=fmt)


def run(recipe: Recipe | dict[str, Any] | str | Path | None = None, output_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """`calltune run`: prepare -> evaluate base -> train -> evaluate tuned -> report; returns the summary.

    `recipe` None is the embedded default job (BFCL live -> BFCL non-live). `resume` / `overwrite` as
    ``calltune run --resume / --overwrite`` (a folder that already holds a run needs one of them).
    """
    from calltune.pipeline import run_recipe

    return run_recipe(_recipe(recipe, overrides), output_dir, resume_from_checkpoint=resume or None,
                      overwrite=overwrite)
