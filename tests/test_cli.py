import json
from pathlib import Path

from typer.testing import CliRunner

from calltune.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_validate_ok_on_shipped_recipe(monkeypatch):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["validate", "recipes/viggo-lora.yaml"])
    assert result.exit_code == 0, result.output
    assert "lora fine-tuning of smollm2-135m-instruct on viggo" in result.output


def test_recipe_with_unknown_key_exits_2_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: smollm2-135m-instruct\nformat: viggo\n"
                   "data: {source: viggo, train: t.csv}\ntrain: {epoch: 2}\n")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2
    assert "train.epoch: unknown key; did you mean 'epochs'?" in " ".join(result.output.split())


def test_unknown_model_exits_2():
    result = runner.invoke(app, ["resolve", "smolm2-135m-instruct"])
    assert result.exit_code == 2
    assert "Did you mean 'smollm2-135m-instruct'" in " ".join(result.output.split())


def test_eval_on_csv_with_missing_columns_names_file_and_field(tmp_path):
    data = tmp_path / "v.csv"
    data.write_text("mr,text\nrequest(specifier[x]),y\n")
    result = runner.invoke(app, ["eval", "smollm2-135m-instruct", "--data", str(data), "--format", "viggo"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "v.csv" in out and "field 'ref'" in out


def test_set_needs_key_value(monkeypatch):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["run", "recipes/viggo-lora.yaml", "--set", "train.max_steps"])
    assert result.exit_code == 2 and "--set takes key=value" in result.output


def _command(*names):
    import typer.main

    command = typer.main.get_command(app)
    for name in names:
        command = command.commands[name]
    return command


def test_config_switches_come_from_the_config_models():
    from calltune.evaluate.config import EvalConfig
    from calltune.sources.clean import CleanConfig

    for names, cls, skip in ((("data", "clean"), CleanConfig, set()), (("eval",), EvalConfig, {"base"})):
        params = {p.name: p for p in _command(*names).params}
        for field, info in cls.model_fields.items():
            if field in skip:
                continue
            assert field in params, f"{' '.join(names)} has no option for {cls.__name__}.{field}"
            assert params[field].help == info.description
            assert params[field].default == info.default


def test_a_negated_switch_reaches_the_cleaning(tmp_path):
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}],
           "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                        "parameters": {"type": "object", "properties": {
                                                            "city": {"type": "string"}}, "required": ["city"]}}}]}
    data = tmp_path / "raw.jsonl"
    data.write_text((json.dumps(row) + "\n") * 2)
    kept = {}
    for flag in ("--dedupe", "--no-dedupe"):
        out = tmp_path / f"clean{flag}.jsonl"
        result = runner.invoke(app, ["data", "clean", "--source", "openai_jsonl", "--input", str(data), "-o", str(out),
                                     flag])
        assert result.exit_code == 0, result.output
        kept[flag] = len(out.read_text().splitlines())
    assert kept == {"--dedupe": 1, "--no-dedupe": 2}


def test_a_bug_is_not_reported_as_a_user_error(tmp_path, monkeypatch):
    import calltune.sources.clean

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(calltune.sources.clean, "clean_command", broken)
    data = tmp_path / "raw.jsonl"
    data.write_text("{}\n")
    result = runner.invoke(app, ["data", "clean", "--source", "openai_jsonl", "--input", str(data),
                                 "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code != 2 and isinstance(result.exception, ValueError)
    assert "an internal invariant failed" in str(result.exception)
