"""The `calltune` command line: one command per stage, plus `run` for the whole pipeline.

Owns argument parsing and user-facing messages only; every command calls into the stage packages.
Bad input (unknown model, recipe key, source or format; unreadable, non-UTF-8 or directory data
paths; an output that would overwrite an input or cannot be created; a ``--set`` that contradicts an
option) exits with code 2 and a one-line message naming the file (row, field) or option, never a
traceback. Output paths are checked before anything is read or written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from calltune.errors import CalltuneError, UsageError
from calltune.evaluate.config import EvalConfig
from calltune.sources.clean import CleanConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune small language models for function calling, end to end.")
console = Console()
err_console = Console(stderr=True)


def _message(err: Exception) -> str:
    """The user-facing text of `err`: pydantic errors on one line, OS errors naming the file."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
    if isinstance(err, OSError) and err.strerror:
        names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{names or 'a file'}: {err.strerror}; check the path and its permissions"
    return str(err)


def _fail(err: Exception) -> NoReturn:
    # Text, not markup: messages quote data ("name[x]") that rich would read as style tags
    err_console.print(Text.assemble(("error: ", "bold red"), _message(err)), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _user_errors():
    """What a command reports as a one-line error (exit code 2): calltune's own errors, a config that fails
    validation, a file that can't be read or written, an optional dependency that is missing."""
    from pydantic import ValidationError

    from calltune.evaluate.bfcl_checker import BFCLCheckerError
    from calltune.sources.bfcl import BFCLNotInstalledError

    return (CalltuneError, ValidationError, OSError, BFCLNotInstalledError, BFCLCheckerError)


def _parse_overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs (values parsed as YAML) -> ``{key: value}``; a key given twice must agree."""
    import yaml

    from calltune.recipe import yaml_error

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise UsageError(f"--set takes key=value (e.g. train.max_steps=20), got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UsageError(f"--set {pair}: the value is not valid YAML ({yaml_error(err)}); quote it") from None
        if key in out and out[key] != parsed:
            raise UsageError(f"--set {key} is given twice, as {out[key]!r} and {parsed!r}; give it once")
        out[key] = parsed
    return out


def _given(ctx: typer.Context, param: str) -> bool:
    """Whether option `param` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(param)  # by name: typer may vendor its own click
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _flag(param: str, value: Any) -> str:
    name = param.rstrip("_").replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


def _merge_set(ctx: typer.Context, overrides: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`options` (``{param: value}``) with the ``--set`` `overrides` applied; a key set both ways must agree.

    Raises:
        UsageError: a ``--set`` key that is also an option given on the command line with another value.
    """
    merged = {**options}
    for key, value in overrides.items():
        if key in options and _given(ctx, key) and value != options[key]:
            raise UsageError(f"--set {key}={json.dumps(value, default=str)} disagrees with {_flag(key, options[key])}; "
                             f"give {key} once (the option or --set)")
        merged[key] = value
    return merged


def _settings(cls: type, settings: dict[str, Any], origin: str):
    """``cls(**settings)`` (a pydantic config), a validation error turned into one `UsageError` line."""
    import difflib

    from pydantic import ValidationError

    from calltune.recipe import model_fields

    try:
        return cls(**settings)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(map(str, e["loc"]))
            choices = model_fields(cls, tuple(e["loc"])) if e["type"] == "extra_forbidden" else []
            if choices:
                close = difflib.get_close_matches(str(e["loc"][-1]), choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{key}: unknown setting{hint} (allowed: {', '.join(choices)})")
            else:
                problems.append(f"{key}: {e['msg']}")
        raise UsageError(f"{origin}: " + "; ".join(problems)) from None


def _config_options(cls: type, skip: tuple[str, ...] = ()):
    """Decorator: one option per field of the pydantic config `cls` (its name, type, default and description),
    so a command's switches can't drift from the config they fill. The command receives them as one dict
    argument, ``settings`` (field -> value, defaults included); `_merge_set` tells given from default."""
    import inspect
    import typing

    def decorate(command):
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)  # this module's annotations are strings
        params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "settings"]
        names = []
        for name, info in cls.model_fields.items():
            if name in skip:
                continue
            kind = info.annotation
            if type(None) in typing.get_args(kind):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            flag = name.replace("_", "-")
            option = typer.Option(info.default, f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}",
                                  help=info.description)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
            names.append(name)

        def wrapper(**kwargs):
            return command(**{k: v for k, v in kwargs.items() if k not in names},
                           settings={k: kwargs[k] for k in names})

        wrapper.__signature__ = signature.replace(parameters=sorted(params, key=lambda p: p.kind))
        wrapper.__doc__, wrapper.__name__ = command.__doc__, command.__name__
        return wrapper
    return decorate


# -- path checks: run before anything is read or written ----------------------------------------
def _check_parents(option: str, path: Path) -> None:
    for parent in path.parents:  # nearest first; the first that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
            return


def _check_output_file(option: str, path: Optional[Path]) -> None:
    """`path` can be written as a file: it is not a folder and no parent of it is a file."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder, not a file; give a file path (e.g. {path / 'out.jsonl'})")
    _check_parents(option, path)


def _check_output_dir(option: str, path: Optional[Path]) -> None:
    """`path` can be used as an output folder: it is not a file and no parent of it is a file."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder; give a folder path")
    _check_parents(option, path)


def _same_file(a: Path, b: Path) -> bool:
    """Same file after resolving symlinks and ``..`` (and hard links, when both exist)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_no_overlap(inputs: dict[str, Any], outputs: dict[str, Optional[Path]]) -> None:
    """No output file is an (existing, local) input file, nor another output file.

    `inputs` and `outputs` map the option name (for the message) to its path; None entries and
    inputs that are no local file (hub ids) are skipped.
    """
    ins = {k: Path(v) for k, v in inputs.items() if v is not None and Path(v).exists()}
    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    for out_name, out in outs:
        for in_name, inp in ins.items():
            if _same_file(out, inp):
                raise UsageError(f"{out_name} {out} is the same file as {in_name} {inp}: it would overwrite the "
                                 "input; choose another output path")
    for i, (a_name, a) in enumerate(outs):
        for b_name, b in outs[i + 1:]:
            if _same_file(a, b):
                raise UsageError(f"{a_name} {a} and {b_name} {b} are the same file; give them different paths")


def _check_run_output(option: str, out: Path, writes: list[str], data: dict[str, Any]) -> None:
    """`out` can be a run folder, and none of the files written in it (`writes`) is a data file."""
    _check_output_dir(option, out)
    _check_no_overlap(data, {f"{option}'s {name}": out / name for name in writes})


RUN_WRITES = ["recipe.json", "rejects.jsonl", "summary.json", "report.md", "loss.png"]
EVAL_WRITES = ["predictions.jsonl", "metrics.json", "rejects.jsonl", "confusion.png"]


def _data_paths(r) -> dict[str, Any]:
    """``{"data.train": path, "data.eval": path}`` of a recipe (for the overlap checks)."""
    return {"data.train": r.data.train_path, "data.eval": r.data.eval}


def _check_data_files(r) -> None:
    """Each local data file of recipe `r` is a readable, non-empty file (before any output is written)."""
    from calltune.sources.base import check_file, is_local_path

    if r.data.source == "bfcl":  # categories, not files
        return
    for key, value in _data_paths(r).items():
        if value and is_local_path(value):
            check_file(value, f"{key} {value}")


def _check_set_output_dir(overrides: dict[str, Any], output: Optional[Path], expected: Optional[Path]) -> None:
    """``--set output_dir=X`` and ``-o`` together must name the same folder (`expected` is what -o implies)."""
    if output is None or "output_dir" not in overrides:
        return
    if Path(str(overrides["output_dir"])).resolve() != Path(expected).resolve():
        raise UsageError(f"--set output_dir={overrides['output_dir']} disagrees with --output {output}; "
                         "give the output folder once")


@app.command()
def run(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; see recipes/ (default: the embedded "
                                                            "BFCL job, recipes/bfcl-default.yaml)"),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="run folder (default runs/<name>)"),
        set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set train.max_steps=20"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in the folder from its newest "
                                                             "complete checkpoint (a saved model is kept)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="run again into a folder that holds an earlier run")):
    """Prepare -> train -> evaluate base and tuned -> report.md.

    Without a recipe: the embedded default job (fine-tune SmolLM2-135M-Instruct on BFCL's live
    categories, score base and tuned on its non-live ones with the official AST checker).
    """
    from calltune.recipe import load_recipe

    try:
        overrides = _parse_overrides(set_)
        _check_set_output_dir(overrides, output, output)
        r = load_recipe(recipe, overrides)
        out = Path(output) if output else r.out
        _check_run_output("--output" if output else "output_dir", out, RUN_WRITES, _data_paths(r))
        _check_data_files(r)
        from calltune.train.output import check_run_dir, is_main_process

        if is_main_process():  # under a launcher the others start later, maybe after it wrote into the folder
            check_run_dir(out, resume=resume, overwrite=overwrite)
        from calltune.pipeline import run_recipe  # imports torch: after the cheap checks

        summary = run_recipe(r, output, resume_from_checkpoint=resume, overwrite=overwrite)
    except _user_errors() as err:
        _fail(err)
    if not is_main_process():  # a launcher's other processes: the main one evaluates and reports
        return summary
    console.print((out / "report.md").read_text())
    console.print(f"[green]report:[/] {out / 'report.md'}")
    return summary


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             accelerate_config: Optional[Path] = typer.Option(None, "--accelerate-config", help="also check the "
                                                              "accelerate config to launch it with (recipes/accelerate/)")):
    """Check a recipe without loading weights: names, paths and each local data file (readable, the
    source's columns, its first rows convert); report every problem at once."""
    from calltune.recipe import RecipeError, validate_recipe
    from calltune.train.config import check_accelerate_config

    try:
        try:
            r, problems = validate_recipe(recipe), []
        except RecipeError as err:
            if accelerate_config is None:
                raise
            r, problems = None, list(err.problems)
        if accelerate_config is not None:
            problems += [f"--accelerate-config {accelerate_config}: {p}"
                         for p in check_accelerate_config(accelerate_config, method=r.train.method if r else None,
                                                          torch_compile=bool(r and r.train.torch_compile))]
        if problems:
            raise RecipeError(str(recipe), problems)
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]ok[/] {recipe}: {r.train.method} fine-tuning of {r.model} on {r.data.source}")


@app.command()
def train(recipe: Path = typer.Argument(..., help="recipe YAML"),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="model folder (default runs/<name>/model)"),
          set_: list[str] = typer.Option([], "--set", help="override a recipe key"),
          resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint in "
                                                             "the model folder"),
          overwrite: bool = typer.Option(False, "--overwrite", help="train afresh over an earlier run's model and "
                                                                   "checkpoints")):
    """Train only (no evaluation): saves the model or adapter with its prompt format."""
    from calltune.recipe import load_recipe

    try:
        overrides = _parse_overrides(set_)
        _check_set_output_dir(overrides, output, output.parent if output else None)
        r = load_recipe(recipe, overrides)
        out = Path(output) if output else r.out / "model"
        _check_output_dir("--output" if output else "output_dir", out)
        _check_no_overlap(_data_paths(r), {"the rejects file": out.parent / "rejects.jsonl"})
        _check_data_files(r)
        from calltune.train.output import check_output_dir, is_main_process

        if is_main_process():  # under a launcher the others start later, maybe after it wrote into the folder
            check_output_dir(out, resume=resume, overwrite=overwrite, what="--output" if output else "output_dir")
        from calltune.pipeline import prepare, recipe_format  # import torch: after the cheap checks
        from calltune.train import train as run_train

        train_ex, _, counts, rejects = prepare(r, out.parent)
        result = run_train(r.model, train_ex, recipe_format(r), r.train, out, rejects=rejects,
                           resume_from_checkpoint=resume, overwrite=overwrite)
        if not is_main_process():  # a launcher's other processes: the main one writes and reports
            return
        rejects.write()
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]saved[/] {out}: {result.steps} steps, {result.train_seconds:.0f} s, "
                  f"{result.tokens_per_s:.0f} tokens/s")


@app.command("eval")
@_config_options(EvalConfig, skip=("base",))
def eval_(model: str = typer.Argument(..., help="model: alias, folder, adapter, .gguf or hub id"),
          data: Optional[str] = typer.Option(None, "--data", help="eval file or hub id (with --benchmark bfcl: "
                                                                   "comma-separated categories)"),
          source: str = typer.Option("viggo", "--source", help="dataset adapter"),
          benchmark: Optional[str] = typer.Option(None, "--benchmark", help="bfcl: BFCL's single-turn categories, "
                                                  "scored by its official AST checker (default: every non-live "
                                                  "category, calltune.sources.bfcl.NON_LIVE_EVAL)"),
          split: str = typer.Option("validation", "--split", help="hub split"),
          fmt: Optional[str] = typer.Option(None, "--format", help="prompt format (default: the one saved with the model)"),
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N examples only (per BFCL category)"),
          output: Path = typer.Option(Path("runs/eval"), "--output", "-o"),
          settings: dict = None):
    """Generate for an eval split and score: predictions.jsonl, metrics.json, confusion.png."""
    from calltune.evaluate.runner import evaluate_model
    from calltune.formats import get_format
    from calltune.runtime import keep_freed_memory
    from calltune.sources import Rejects, load_source

    keep_freed_memory()
    try:
        if benchmark is not None:
            if benchmark != "bfcl":
                raise UsageError(f"--benchmark: unknown benchmark {benchmark!r} (choices: bfcl)")
            from calltune.sources.bfcl import NON_LIVE_EVAL

            source, data = "bfcl", data or ",".join(NON_LIVE_EVAL)
        if data is None:
            raise UsageError("give --data (an eval file or hub id) or --benchmark bfcl")
        _check_run_output("--output", output, EVAL_WRITES, {"--data": data if source != "bfcl" else None})
        cfg = _settings(EvalConfig, settings, "eval options")
        rejects = Rejects(output / "rejects.jsonl")
        examples = load_source(source, data, split=split, rejects=rejects, limit=limit)
        rejects.write()
        metrics = evaluate_model(model, examples, output, cfg, fmt=get_format(fmt) if fmt else None)
    except _user_errors() as err:
        _fail(err)
    console.print_json(json.dumps(metrics))


@app.command()
def merge(adapter: Path = typer.Argument(..., help="LoRA adapter folder"),
          output: Path = typer.Argument(..., help="where the merged model goes")):
    """Fold a LoRA adapter into its base model: full HF safetensors that plain transformers loads."""
    try:
        if adapter.exists() and not adapter.is_dir():
            raise UsageError(f"ADAPTER {adapter}: is a file, not an adapter folder; give the folder holding "
                             "adapter_config.json")
        _check_output_dir("OUTPUT", output)
        if output.exists() and _same_file(output, adapter):
            raise UsageError(f"OUTPUT {output} is the adapter folder itself; give a new folder for the merged model")
        from calltune.train import merge_adapter  # imports torch: after the cheap checks

        merge_adapter(adapter, output)
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]merged[/] {adapter} -> {output}")


@app.command()
def show(recipe: Path = typer.Argument(..., help="recipe YAML"),
         n: int = typer.Option(1, "-n", min=1, help="how many examples"),
         model: Optional[str] = typer.Option(None, "--model", help="tokenizer to render with (default: the recipe's)")):
    """Print training examples as the model sees them, trained tokens highlighted in green."""
    from rich.text import Text

    from calltune.formats import get_format
    from calltune.models import load_tokenizer, resolve_model
    from calltune.recipe import load_recipe
    from calltune.sources import load_source

    try:
        r = load_recipe(recipe)
        examples = load_source(r.data.source, r.data.train_path, split=r.data.train_split, limit=n)
        tokenizer = load_tokenizer(resolve_model(model or r.model))
        fmt = get_format(r.format, tokenizer=tokenizer) if r.format == "auto" else get_format(r.format, **r.format_options)
    except _user_errors() as err:
        _fail(err)
    for ex in examples[:n]:
        ids, mask = fmt.render(ex, tokenizer, max_length=r.train.max_length)
        text = Text()
        for tok, m in zip(ids, mask):
            text.append(tokenizer.decode([tok]), style="bold green" if m else "dim")
        console.rule(f"{ex.where}: {len(ids)} tokens, {sum(mask)} trained")
        console.print(text)


@app.command()
def resolve(model: str = typer.Argument(..., help="alias, folder, .gguf or hub id")):
    """Print where a model resolves to (dequantising a GGUF into the cache on first use)."""
    from calltune.models import resolve_model

    try:
        console.print(resolve_model(model))
    except _user_errors() as err:
        _fail(err)


data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(data_app, name="data")


@data_app.command("clean")
@_config_options(CleanConfig)
def data_clean(ctx: typer.Context,
               source: str = typer.Option(..., "--source", help="dataset adapter: xlam, glaive, llama_functions, hermes, openai_jsonl"),
               input_: str = typer.Option(..., "--input", help="file or hub id the source reads"),
               output: Path = typer.Option(..., "--output", "-o", help="kept examples as canonical JSONL"),
               val_output: Optional[Path] = typer.Option(None, "--val-output", help="move --val-fraction of the kept examples here"),
               rejects: Optional[Path] = typer.Option(None, "--rejects", help="every dropped row with stage and reason (JSONL)"),
               val_fraction: float = typer.Option(0.1, "--val-fraction", help="share held out with --val-output"),
               set_: list[str] = typer.Option([], "--set", help="any cleaning setting or val_fraction, e.g. "
                                                               "--set reject_unknown_arguments=true (must agree "
                                                               "with an option given for the same key)"),
               settings: dict = None):
    """Validate, repair and filter a tool-calling dataset into canonical JSONL (rules: calltune.sources.clean)."""
    from calltune.sources.clean import clean_command

    try:
        overrides = _parse_overrides(set_)
        settings = _merge_set(ctx, overrides, {**settings, "val_fraction": val_fraction})
        fraction = settings.pop("val_fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise UsageError(f"val_fraction (--val-fraction or --set) must be a number in [0, 1), got {fraction!r}")
        if val_output is None and (_given(ctx, "val_fraction") or "val_fraction" in overrides):
            raise UsageError("val_fraction is given but --val-output is not: give --val-output for the held-out "
                             "examples, or drop val_fraction")
        cfg = _settings(CleanConfig, settings, "clean settings (options or --set)")
        _check_output_file("--output", output)
        _check_output_file("--val-output", val_output)
        _check_output_file("--rejects", rejects)
        _check_no_overlap({"--input": input_}, {"--output": output, "--val-output": val_output, "--rejects": rejects})
        report = clean_command(source, input_, output, val_output, rejects, cfg, val_fraction=fraction)
    except _user_errors() as err:
        _fail(err)
    console.print_json(json.dumps(report))


@data_app.command("augment")
def data_augment(input_: str = typer.Option(..., "--input", help="canonical JSONL (from `calltune data clean`), or a "
                                                               "file or hub id that --source reads"),
                 output: Path = typer.Option(..., "--output", "-o", help="originals kept + new examples, canonical JSONL"),
                 source: Optional[str] = typer.Option(None, "--source", help="dataset adapter for --input (default: "
                                                                            "canonical JSONL)"),
                 config: Optional[Path] = typer.Option(None, "--config", help="YAML of the rules (a recipe's augment: "
                                                                            "block, or a whole recipe)"),
                 rejects: Optional[Path] = typer.Option(None, "--rejects", help="rows a rule or the source rejected (JSONL)"),
                 set_: list[str] = typer.Option([], "--set", help="a rule setting, e.g. --set parallel.count=100")):
    """Make new examples from existing ones: irrelevance, parallel, parallel_multiple, distractors,
    self_correction, answer_after_results (rules: calltune.augment.rules)."""
    import yaml

    from calltune.augment import AugmentConfig, augment_command
    from calltune.recipe import set_dotted, yaml_error
    from calltune.sources.base import read_text

    try:
        overrides = _parse_overrides(set_)
        _check_output_file("--output", output)
        _check_output_file("--rejects", rejects)
        _check_no_overlap({"--input": input_, "--config": config}, {"--output": output, "--rejects": rejects})
        data = {}
        if config is not None:
            try:
                data = yaml.safe_load(read_text(config, f"--config {config}")) or {}
            except yaml.YAMLError as err:
                raise UsageError(f"--config {config}: not valid YAML ({yaml_error(err)})") from None
            data = data.get("augment", data) if isinstance(data, dict) else data
            if not isinstance(data, dict):
                raise UsageError(f"--config {config}: expected a mapping of rule settings")
        for key, value in overrides.items():
            set_dotted(data, key, value)
        origin = f"--config {config} with --set" if config is not None and overrides else \
            (f"--config {config}" if config is not None else "--set")
        report = augment_command(input_, output, _settings(AugmentConfig, data, origin), source, rejects)
    except _user_errors() as err:
        _fail(err)
    console.print_json(json.dumps(report))


# -- serving, chat and export ---------------------------------------------------------------------
def _served_models(model: Optional[str], named: list[str]) -> dict[str, str]:
    """``calltune serve PATH`` and/or ``--model NAME=PATH ...`` -> ``{name: path}`` (PATH alone is named PATH)."""
    out: dict[str, str] = {}
    for item in ([model] if model else []) + list(named):
        name, _, path = item.partition("=") if "=" in item else (item, "", item)
        if not name or not path:
            raise UsageError(f"--model takes NAME=PATH or PATH, got {item!r}")
        if name in out:
            raise UsageError(f"model name {name!r} is given twice")
        out[name] = path
    if not out:
        raise UsageError("give a model to serve: `calltune serve MODEL` or `--model NAME=PATH` (repeatable)")
    return out


def _serve_vllm(model: Optional[str], named: list[str], host: str, port: int, api_key: Optional[str],
                data_dir: Optional[Path], tool_call_parser: Optional[str], print_command: bool) -> None:
    """`calltune serve --engine vllm`: print vLLM's server command for one model, then become that process."""
    import shlex

    from calltune.infer.vllm_engine import KV_CACHE_GB, vllm_server_command

    models = _served_models(model, named)
    if len(models) != 1 or data_dir is not None:
        raise UsageError("--engine vllm serves one model (a model folder, or a LoRA adapter on its base) and no "
                         "fine-tuning jobs API; serve several models or --data-dir with the calltune engine")
    (name, path), = models.items()
    cmd = vllm_server_command(path, name, host=host, port=port, api_key=api_key, tool_call_parser=tool_call_parser)
    shown = [("<key>" if i and cmd[i - 1] == "--api-key" else part) for i, part in enumerate(cmd)]
    # vLLM's CPU backend otherwise sizes its key/value cache from the machine's memory (GPUs ignore it)
    kv_cache = os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)
    shown = [f"VLLM_CPU_KVCACHE_SPACE={kv_cache}", *shown]
    console.print(shlex.join(shown), soft_wrap=True, markup=False, highlight=False)
    if not print_command:
        sys.stdout.flush()
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_cache
        os.execvp(cmd[0], cmd)


def _limits(pairs: list[str]):
    """`calltune.serve.protocol.Limits` from ``--limit KEY=N`` options."""
    from pydantic import ValidationError

    from calltune.serve.protocol import Limits

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in Limits.model_fields:
            raise UsageError(f"--limit takes KEY=N with KEY one of {', '.join(Limits.model_fields)}, got {pair!r}")
        values[key] = value
    try:
        return Limits(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise UsageError(f"--limit {first['loc'][0]}: {first['msg']}") from None


def _fine_tuning(data_dir: Optional[Path], allow_base: list[str], max_upload_mb: int):
    """The fine-tuning service of ``serve --data-dir D --allow-base NAME[=MODEL] ...``, or None without --data-dir."""
    if data_dir is None:
        if allow_base:
            raise UsageError("--allow-base needs --data-dir (where the fine-tuning jobs keep their files and runs)")
        return None
    if not allow_base:
        raise UsageError("--data-dir needs at least one --allow-base NAME: the base models jobs may fine-tune")
    from calltune.serve.jobs import FineTuning

    allowed: dict[str, str] = {}
    for item in allow_base:
        name, _, path = item.partition("=")
        if not name or name in allowed:
            raise UsageError(f"--allow-base takes NAME or NAME=MODEL, each name once; got {item!r}")
        allowed[name] = path or name
    return FineTuning(data_dir, allowed, max_upload_bytes=max_upload_mb * 2 ** 20)


@app.command()
def serve(model: Optional[str] = typer.Argument(None, help="model to serve (alias, folder, adapter, .gguf or hub id)"),
          named: list[str] = typer.Option([], "--model", "-m", help="NAME=PATH, repeatable: several models or "
                                                                      "LoRA adapters (sharing one loaded base)"),
          host: str = typer.Option("127.0.0.1", "--host"),
          port: int = typer.Option(8000, "--port"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CALLTUNE_API_KEY",
                                                help="require `Authorization: Bearer KEY` (env CALLTUNE_API_KEY)"),
          constrained: bool = typer.Option(True, "--constrained/--no-constrained",
                                           help="constrain tool calls to the offered tools and their JSON Schemas"),
          max_tokens: int = typer.Option(512, "--max-tokens", help="completion length when a request sets none"),
          limit: list[str] = typer.Option([], "--limit", help="KEY=N, repeatable: a bound on each request "
                                          "(max_body_bytes, max_messages, max_tools, max_depth, max_stop)"),
          data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="serve the fine-tuning jobs API too, "
                                                  "keeping its files, runs and state (SQLite) in this folder"),
          allow_base: list[str] = typer.Option([], "--allow-base", help="NAME or NAME=MODEL, repeatable: a base "
                                               "model fine-tuning jobs may name (with --data-dir)"),
          max_upload_mb: int = typer.Option(256, "--max-upload-mb", min=1, help="largest fine-tuning file upload"),
          max_batch: int = typer.Option(8, "--max-batch", min=1, help="most requests decoding together per "
                                        "loaded model (continuous batching)"),
          max_queue: Optional[int] = typer.Option(None, "--max-queue", min=0, help="most requests waiting for a "
                                                  "slot per loaded model, beyond which 429 [default: 4x --max-batch]"),
          prefix_cache_mb: int = typer.Option(512, "--prefix-cache-mb", min=0, help="keys and values of earlier "
                                              "prompts kept per loaded model, so a prompt that starts like one "
                                              "(same system prompt and tools) prefills only the rest; 0: none"),
          engine: Literal["calltune", "vllm"] = typer.Option("calltune", "--engine",
                                     help="calltune's own server, or vLLM's OpenAI server started with the model's "
                                          "chat template and tool-call parser (one model; needs vLLM installed)"),
          tool_call_parser: Optional[str] = typer.Option(None, "--tool-call-parser", help="vllm engine: vLLM's "
                                                         "tool-call parser [default: the one for the model's format]"),
          print_command: bool = typer.Option(False, "--print-command", help="vllm engine: print the vLLM command "
                                             "and exit instead of running it")):
    """OpenAI-compatible server: POST /v1/chat/completions, GET /v1/models (use with the openai client);
    with --data-dir also /v1/files and /v1/fine_tuning/jobs. With --engine vllm, vLLM's server instead."""
    from calltune.runtime import keep_freed_memory
    from calltune.serve import run as run_server

    if engine == "vllm":
        try:
            _serve_vllm(model, named, host, port, api_key, data_dir, tool_call_parser, print_command)
        except _user_errors() as err:
            _fail(err)
        return
    keep_freed_memory()
    try:
        limits = _limits(limit)
        jobs = _fine_tuning(data_dir, allow_base, max_upload_mb)
        models = _served_models(model, named) if model or named or jobs is None else {}
        console.print(f"serving {', '.join(models) or 'no model yet'} on http://{host}:{port}/v1"
                      + (f", fine-tuning {', '.join(jobs.allowed)} (data in {data_dir})" if jobs else "")
                      + (" (API key required)" if api_key else ""))
        run_server(models, host=host, port=port, api_key=api_key, constrained=constrained,
                   default_max_tokens=max_tokens, limits=limits, jobs=jobs, max_batch=max_batch, max_queue=max_queue,
                   prefix_cache_mb=prefix_cache_mb)
    except _user_errors() as err:
        _fail(err)


@app.command()
def chat(model: str = typer.Argument(..., help="model: alias, folder, adapter, .gguf or hub id"),
         tools: Optional[str] = typer.Option(None, "--tools", help="Python file (or module) whose public functions are the tools"),
         system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
         max_tokens: int = typer.Option(256, "--max-tokens"),
         temperature: float = typer.Option(0.0, "--temperature"),
         constrained: bool = typer.Option(True, "--constrained/--no-constrained")):
    """Chat in the terminal; the model's tool calls are shown, run, and their results fed back."""
    from calltune.infer.chat import ToolsError, chat_loop, load_tools, model_completer

    try:
        functions = load_tools(tools) if tools else {}
        complete = model_completer(model, max_tokens=max_tokens, temperature=temperature, constrained=constrained)
    except (ToolsError, *_user_errors()) as err:
        _fail(err)
    console.print(f"tools: {', '.join(functions) or 'none'}. Type /exit or Ctrl-D to quit.", highlight=False)

    def read() -> Optional[str]:
        try:
            return console.input("[bold]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            return None

    def write(text: str) -> None:
        style = "cyan" if text.startswith(("-> ", "<- ")) else "green"
        console.print(text if style == "cyan" else f"model> {text}", style=style, highlight=False, markup=False)

    chat_loop(complete, functions, read, write, system=system)


@app.command()
def export(model: str = typer.Argument(..., help="model or LoRA adapter folder"),
           fmt: str = typer.Option("gguf", "--format", help="gguf (via llama.cpp's converter) or hf (merged safetensors)"),
           output: Path = typer.Option(..., "--output", "-o", help="the .gguf file, or the folder for hf"),
           outtype: str = typer.Option("q8_0", "--outtype", help="GGUF weight type: f32, f16, bf16, q8_0, auto"),
           converter: Optional[Path] = typer.Option(None, "--converter", help="optional: llama.cpp's convert_hf_to_gguf.py "
                                                    "(default: $LLAMA_CPP_DIR, PATH, else fetched once with pip from "
                                                    "the llama-cpp-python sdist into $CALLTUNE_HOME/llama.cpp)")):
    """Export for other runtimes: merged HF safetensors, or GGUF (with the model's chat template) for llama.cpp / Ollama."""
    from calltune.serve.export import export_gguf, export_hf

    try:
        if fmt == "gguf":
            _check_output_file("--output", output)
        elif fmt == "hf":
            _check_output_dir("--output", output)
        if output.exists() and Path(model).exists() and _same_file(output, Path(model)):
            raise UsageError(f"--output {output} is the model itself; give a new path")
        if fmt == "gguf":
            out = export_gguf(model, output, outtype=outtype, converter=converter)
        elif fmt == "hf":
            out = export_hf(model, output)
        else:
            raise UsageError(f"unknown export format {fmt!r}; choices: gguf, hf")
    except (RuntimeError, *_user_errors()) as err:
        _fail(err)
    console.print(f"[green]exported[/] {model} -> {out}")


def main() -> None:
    from calltune.runtime import flush_denormals

    flush_denormals()  # before PyTorch starts its worker threads, which copy the setting
    app()


if __name__ == "__main__":
    sys.exit(main())
