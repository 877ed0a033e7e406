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
