"""The `calltune` command line: one command per stage, plus `run` for the whole pipeline.

Owns argument parsing and user-facing messages only; every command calls into the stage packages.
Bad input (unknown model, recipe key, source or format; unreadable data) exits with code 2 and a
one-paragraph message, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune small language models for function calling, end to end.")
console = Console()
err_console = Console(stderr=True)


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(2)


def _user_errors():
    from calltune.formats import FormatError
    from calltune.models import ModelNotFound
    from calltune.recipe import RecipeError
    from calltune.schema import SchemaError
    from calltune.sources import SourceError

    return (RecipeError, SourceError, ModelNotFound, SchemaError, FormatError, FileNotFoundError, ValueError)


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set takes key=value (e.g. train.max_steps=20), got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


@app.command()
def run(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; see recipes/ (default: the embedded "
                                                            "BFCL job, recipes/bfcl-default.yaml)"),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="run folder (default runs/<name>)"),
        set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set train.max_steps=20")):
    """Prepare -> train -> evaluate base and tuned -> report.md.

    Without a recipe: the embedded default job (fine-tune SmolLM2-135M-Instruct on BFCL's live
    categories, score base and tuned on its non-live ones with the official AST checker).
    """
    from calltune.pipeline import run_recipe
    from calltune.recipe import load_recipe

    try:
        r = load_recipe(recipe, _parse_overrides(set_))
        summary = run_recipe(r, output)
    except _user_errors() as err:
        _fail(err)
    out = Path(output) if output else r.out
    console.print((out / "report.md").read_text())
    console.print(f"[green]report:[/] {out / 'report.md'}")
    return summary


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML")):
    """Check a recipe without loading weights; report every problem at once."""
    from calltune.recipe import validate_recipe

    try:
        r = validate_recipe(recipe)
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]ok[/] {recipe}: {r.train.method} fine-tuning of {r.model} on {r.data.source}")


@app.command()
def train(recipe: Path = typer.Argument(..., help="recipe YAML"),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="model folder (default runs/<name>/model)"),
          set_: list[str] = typer.Option([], "--set", help="override a recipe key")):
    """Train only (no evaluation): saves the model or adapter with its prompt format."""
    from calltune.pipeline import prepare, recipe_format
    from calltune.recipe import load_recipe
    from calltune.train import train as run_train

    try:
        r = load_recipe(recipe, _parse_overrides(set_))
        out = Path(output) if output else r.out / "model"
        train_ex, _, counts, rejects = prepare(r, out.parent)
        result = run_train(r.model, train_ex, recipe_format(r), r.train, out, rejects=rejects)
        rejects.write()
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]saved[/] {out}: {result.steps} steps, {result.train_seconds:.0f} s, "
                  f"{result.tokens_per_s:.0f} tokens/s")


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="model: alias, folder, adapter, .gguf or hub id"),
          data: Optional[str] = typer.Option(None, "--data", help="eval file or hub id (with --benchmark bfcl: "
                                                                   "comma-separated categories)"),
          source: str = typer.Option("viggo", "--source", help="dataset adapter"),
          benchmark: Optional[str] = typer.Option(None, "--benchmark", help="bfcl: BFCL's single-turn categories, "
                                                  "scored by its official AST checker (default: every non-live "
                                                  "category, calltune.sources.bfcl.NON_LIVE_EVAL)"),
          split: str = typer.Option("validation", "--split", help="hub split"),
          fmt: Optional[str] = typer.Option(None, "--format", help="prompt format (default: the one saved with the model)"),
          limit: Optional[int] = typer.Option(None, "--limit", help="first N examples only (per BFCL category)"),
          batch_size: int = typer.Option(32, "--batch-size"),
          workers: Optional[int] = typer.Option(None, "--workers", help="decoders in parallel threads, sharing "
                                                "--batch-size (default: one per CPU thread, 64+ slots each)"),
          max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
          constrained: bool = typer.Option(False, "--constrained/--no-constrained",
                                           help="constrained decoding: calls name an offered tool, arguments fit its schema"),
          output: Path = typer.Option(Path("runs/eval"), "--output", "-o")):
    """Generate for an eval split and score: predictions.jsonl, metrics.json, confusion.png."""
    from calltune.evaluate.runner import EvalConfig, evaluate_model
    from calltune.formats import get_format
    from calltune.runtime import keep_freed_memory
    from calltune.sources import Rejects, load_source

    keep_freed_memory()
    try:
        if benchmark is not None:
            if benchmark != "bfcl":
                raise ValueError(f"--benchmark: unknown benchmark {benchmark!r} (choices: bfcl)")
            from calltune.sources.bfcl import NON_LIVE_EVAL

            source, data = "bfcl", data or ",".join(NON_LIVE_EVAL)
        if data is None:
            raise ValueError("give --data (an eval file or hub id) or --benchmark bfcl")
        rejects = Rejects(output / "rejects.jsonl")
        examples = load_source(source, data, split=split, rejects=rejects, limit=limit)
        rejects.write()
        cfg = EvalConfig(batch_size=batch_size, workers=workers, max_new_tokens=max_new_tokens,
                         constrained=constrained)
        metrics = evaluate_model(model, examples, output, cfg, fmt=get_format(fmt) if fmt else None)
    except _user_errors() as err:
        _fail(err)
    console.print_json(json.dumps(metrics))


@app.command()
def merge(adapter: Path = typer.Argument(..., help="LoRA adapter folder"),
          output: Path = typer.Argument(..., help="where the merged model goes")):
    """Fold a LoRA adapter into its base model: full HF safetensors that plain transformers loads."""
    from calltune.train import merge_adapter

    try:
        merge_adapter(adapter, output)
    except _user_errors() as err:
        _fail(err)
    console.print(f"[green]merged[/] {adapter} -> {output}")


@app.command()
def show(recipe: Path = typer.Argument(..., help="recipe YAML"),
         n: int = typer.Option(1, "-n", help="how many examples"),
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
def data_clean(source: str = typer.Option(..., "--source", help="dataset adapter: xlam, glaive, llama_functions, hermes, openai_jsonl"),
               input_: str = typer.Option(..., "--input", help="file or hub id the source reads"),
               output: Path = typer.Option(..., "--output", "-o", help="kept examples as canonical JSONL"),
               val_output: Optional[Path] = typer.Option(None, "--val-output", help="move --val-fraction of the kept examples here"),
               rejects: Optional[Path] = typer.Option(None, "--rejects", help="every dropped row with stage and reason (JSONL)"),
               trailing_user: str = typer.Option("trim", "--trailing-user", help="conversations ending on a user/tool turn: keep, drop or trim"),
               remove_no_call: bool = typer.Option(False, "--remove-no-call", help="drop examples without any tool call (the Llama-3 glaive-v2 project's --remove-no-fc)"),
               max_no_call_fraction: Optional[float] = typer.Option(None, "--max-no-call-fraction", help="drop no-call examples (seeded) until at most this share"),
               coerce_types: bool = typer.Option(True, "--coerce-types/--no-coerce-types", help="repair '42' -> 42 etc. before validating"),
               dedupe: bool = typer.Option(True, "--dedupe/--no-dedupe", help="drop repeated examples"),
               val_fraction: float = typer.Option(0.1, "--val-fraction", help="share held out with --val-output"),
               seed: int = typer.Option(0, "--seed", help="seed of the balance choice and the split"),
               set_: list[str] = typer.Option([], "--set", help="any other CleanConfig field, e.g. --set reject_unknown_arguments=true")):
    """Validate, repair and filter a tool-calling dataset into canonical JSONL (rules: calltune.sources.clean)."""
    from calltune.sources.clean import CleanConfig, clean_command

    try:
        cfg = CleanConfig(**{**_parse_overrides(set_), "trailing_user": trailing_user, "remove_no_call": remove_no_call,
                             "max_no_call_fraction": max_no_call_fraction, "coerce_types": coerce_types,
                             "dedupe": dedupe, "seed": seed})
        report = clean_command(source, input_, output, val_output, rejects, cfg, val_fraction=val_fraction)
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
    from calltune.recipe import set_dotted

    try:
        data = {}
        if config is not None:
            data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            data = data.get("augment", data) if isinstance(data, dict) else data
            if not isinstance(data, dict):
                raise ValueError(f"{config}: expected a mapping of rule settings")
        for key, value in _parse_overrides(set_).items():
            set_dotted(data, key, value)
        report = augment_command(input_, output, AugmentConfig(**data), source, rejects)
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
            raise ValueError(f"--model takes NAME=PATH or PATH, got {item!r}")
        if name in out:
            raise ValueError(f"model name {name!r} is given twice")
        out[name] = path
    if not out:
        raise ValueError("give a model to serve: `calltune serve MODEL` or `--model NAME=PATH` (repeatable)")
    return out


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
          max_tokens: int = typer.Option(512, "--max-tokens", help="completion length when a request sets none")):
    """OpenAI-compatible server: POST /v1/chat/completions, GET /v1/models (use with the openai client)."""
    from calltune.runtime import keep_freed_memory
    from calltune.serve import run as run_server

    keep_freed_memory()
    try:
        models = _served_models(model, named)
        console.print(f"serving {', '.join(models)} on http://{host}:{port}/v1"
                      + (" (API key required)" if api_key else ""))
        run_server(models, host=host, port=port, api_key=api_key, constrained=constrained,
                   default_max_tokens=max_tokens)
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
           converter: Optional[Path] = typer.Option(None, "--converter", help="path to llama.cpp's convert_hf_to_gguf.py "
                                                                              "(default: $LLAMA_CPP_DIR or PATH)")):
    """Export for other runtimes: merged HF safetensors, or GGUF for llama.cpp / Ollama."""
    from calltune.serve.export import export_gguf, export_hf

    try:
        if fmt == "gguf":
            out = export_gguf(model, output, outtype=outtype, converter=converter)
        elif fmt == "hf":
            out = export_hf(model, output)
        else:
            raise ValueError(f"unknown export format {fmt!r}; choices: gguf, hf")
    except (RuntimeError, *_user_errors()) as err:
        _fail(err)
    console.print(f"[green]exported[/] {model} -> {out}")


def main() -> None:
    from calltune.runtime import flush_denormals

    flush_denormals()  # before PyTorch starts its worker threads, which copy the setting
    app()


if __name__ == "__main__":
    sys.exit(main())
