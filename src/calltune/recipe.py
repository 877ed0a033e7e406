"""Recipes: the YAML files in `recipes/` that name a model, data, format, training and evaluation.

Owns `Recipe` (whose keys map 1:1 onto the stage configs: `DataConfig` here, `TrainConfig` in
`calltune.train.config`, `EvalConfig` in `calltune.evaluate.config`), `load_recipe`, and
`validate_recipe`, which checks a recipe without loading weights and reports every problem at once.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from calltune.augment.config import AugmentConfig
from calltune.errors import CalltuneError
from calltune.evaluate.config import EvalConfig
from calltune.sources.clean import CleanConfig
from calltune.train.config import TrainConfig


class DataConfig(BaseModel):
    """Where the examples come from. Paths are relative to the working directory, or hub ids."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="dataset adapter: viggo, xlam, glaive, llama_functions, hermes, openai_jsonl, bfcl")
    hub_id: str | None = Field(None, description="the dataset's hub id, loaded when `train` is not given")
    train: str | None = Field(None, description="training file (or hub id); overrides hub_id")
    train_split: str = Field("train", description="split of a hub dataset")
    eval: str | None = Field(None, description="evaluation file or hub id (default: hold out val_fraction of the "
                                               "cleaned training examples, seeded, as the hosted fine-tuning API does)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share held out for eval when `eval` is not given")
    eval_split: str = Field("validation", description="split of a hub dataset for eval")
    limit: int | None = Field(None, ge=1, description="use only the first N training rows (per category for bfcl)")
    eval_limit: int | None = Field(None, ge=1, description="evaluate only the first N eval examples (per category for "
                                                          "bfcl), whether read from `eval` or split off the training rows")

    @model_validator(mode="after")
    def _train_or_hub(self) -> "DataConfig":
        if not (self.train or self.hub_id):
            raise ValueError("give data.train (a file) or data.hub_id (a hub dataset id)")
        return self

    @property
    def train_path(self) -> str:
        return self.train or self.hub_id  # type: ignore[return-value]


class Recipe(BaseModel):
    """A whole job: ``calltune run RECIPE`` runs prepare -> train -> evaluate base and tuned -> report."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="run name; the default output folder is runs/<name>")
    model: str = Field(description="alias, local folder, .gguf file or hub id")
    format: str = Field(description="prompt format, e.g. viggo, hermes")
    format_options: dict[str, Any] = Field(default_factory=dict, description="the format's options, e.g. "
                                           "{compact: true} for hermes (saved with the model)")
    data: DataConfig
    clean: CleanConfig | None = Field(None, description="cleaning rules applied to the training examples "
                                                        "(calltune.sources.clean); omit to use rows as loaded")
    augment: AugmentConfig | None = Field(None, description="augmentation rules applied to the cleaned training "
                                                            "examples (calltune.augment); omit to train on them as they are")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str | None = Field(None, description="where everything goes (default runs/<name>)")

    @property
    def out(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)


class RecipeError(CalltuneError):
    """A recipe has problems; `problems` lists every one, each naming the key path.

    The message is one line for one problem (``path: problem``), else a count and one line per problem.
    """

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{path}: {problems[0]}")
        else:
            super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def model_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where `loc` (a pydantic error location) points inside `model`; [] if unknown."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        # ``X | None`` -> X
        models = [a for a in (typing.get_args(annotation) or (annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) != 1:
            return []
        model = models[0]
    return list(model.model_fields)


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(map(str, loc))
        if e["type"] == "extra_forbidden":
            choices = model_fields(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(f"{key}: unknown key{hint} (allowed: {', '.join(choices)})")
        else:
            out.append(f"{key}: {e['msg']}")
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.max_steps", 20)`` sets ``d["train"]["max_steps"]``, creating mappings on the way."""
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {p!r} is not a mapping of keys")
    node[last] = value


DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "bfcl-default.yaml"


def yaml_error(err: yaml.YAMLError) -> str:
    """A YAML parse error on one line: ``line L, column C: problem``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse and validate a recipe file; `overrides` (dotted keys, e.g. ``train.max_steps``) win.

    `path` None is the embedded default job, `DEFAULT_RECIPE` (fine-tune on BFCL's live categories,
    evaluate on its non-live ones), shipped inside the package so that `calltune run` needs no file.

    Raises:
        RecipeError: file missing, not YAML, or any key unknown or invalid (all listed at once).
    """
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.exists():
        raise RecipeError(str(path), ["file not found; check the path (recipes/ has examples)"])
    if not path.is_file():
        raise RecipeError(str(path), ["is a directory, not a recipe file; give the path of a YAML file"])
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a leading BOM is fine
    except OSError as err:
        raise RecipeError(str(path), [f"cannot be read ({err.strerror}); check its permissions"]) from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise RecipeError(str(path), [f"line {line} is not UTF-8; save the file as UTF-8"]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [f"not valid YAML: {yaml_error(err)}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["the top level must be a mapping of keys"])
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return Recipe(**data)
    except ValidationError as err:
        raise RecipeError(str(path), _problems(err)) from None


def _bfcl_problems(key: str, value: str) -> list[str]:
    try:
        from calltune.sources.bfcl import bfcl_categories

        known = bfcl_categories() + ["simple", "java", "javascript"]
    except ImportError as err:
        return [f"data.{key}: {err}"]
    out = []
    for category in (c.strip() for c in value.split(",")):
        if category not in known:
            close = difflib.get_close_matches(category, known, n=1)
            out.append(f"data.{key}: unknown BFCL category {category!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return out


CHECK_ROWS = 10


def _data_problems(source: str, key: str, value: str) -> list[str]:
    """Problems of the local data file `value` (recipe key ``data.<key>``) read by `source`.

    Opens the file, checks the source's columns and converts the first `CHECK_ROWS` rows; a problem
    if the file cannot be read, lacks a column, or none of those rows converts.
    """
    from calltune.sources import Rejects, SourceError, load_source

    rejects = Rejects()
    try:
        examples = load_source(source, value, rejects=rejects, limit=CHECK_ROWS)
    except SourceError as err:
        return [f"data.{key}: {err}"]
    if examples or not rejects.items:
        return []
    first = rejects.items[0]
    where = SourceError(value, first["row"], None, first["reason"])
    return [f"data.{key}: none of the first {len(rejects.items)} rows is usable by source {source!r}, e.g. {where}; "
            "check data.source and the file"]


def validate_recipe(path: str | Path) -> Recipe:
    """`load_recipe` plus the checks that need no weights: format, source and model names, data paths,
    and each local data file (readable, the source's columns, its first `CHECK_ROWS` rows convert).

    Raises:
        RecipeError: listing every problem found.
    """
    from calltune.formats import FORMATS
    from calltune.models import _HUB_ID, ALIASES
    from calltune.sources import SOURCES

    recipe = load_recipe(path)
    problems = []
    if recipe.format in FORMATS:
        try:
            FORMATS[recipe.format](**recipe.format_options)
        except (TypeError, ValueError) as err:
            problems.append(f"format_options: {err}")
    if recipe.format not in FORMATS and recipe.format != "auto":
        close = difflib.get_close_matches(recipe.format, FORMATS, n=1)
        problems.append(f"format: unknown prompt format {recipe.format!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "") + f" (choices: {', '.join(sorted(FORMATS))})")
    if recipe.data.source not in SOURCES:
        close = difflib.get_close_matches(recipe.data.source, SOURCES, n=1)
        problems.append(f"data.source: unknown source {recipe.data.source!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "") + f" (choices: {', '.join(sorted(SOURCES))})")
    for key in ("train", "eval", "hub_id"):
        value = getattr(recipe.data, key)
        if recipe.data.source == "bfcl" and value:
            problems += _bfcl_problems(key, value)
            continue
        if not value:
            continue
        if Path(value).exists():
            if recipe.data.source in SOURCES:
                problems += _data_problems(recipe.data.source, key, value)
            continue
        if Path(value).suffix.lower() in (".csv", ".json", ".jsonl", ".parquet"):
            problems.append(f"data.{key}: file {value!r} not found")
        elif not _HUB_ID.match(value):
            problems.append(f"data.{key}: {value!r} is neither an existing file nor a hub dataset id")
    m = recipe.model
    if not (m in ALIASES or Path(m).exists() or (_HUB_ID.match(m) and not m.endswith(".gguf"))):
        problems.append(f"model: {m!r} is not a built-in alias ({', '.join(ALIASES)}), an existing folder or "
                        ".gguf file, or a hub id")
    if problems:
        raise RecipeError(str(path), problems)
    return recipe
