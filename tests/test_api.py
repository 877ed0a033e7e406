"""The Python API (`calltune.api`, exported from `calltune`), and the README's Python snippet run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_calltune_is_light_and_exports_the_api():
    code = ("import sys, calltune; assert 'torch' not in sys.modules; "
            "import calltune.recipe; assert 'torch' not in sys.modules, 'recipes import torch'; "
            "assert callable(calltune.train) and callable(calltune.evaluate) and callable(calltune.run); "
            "assert calltune.train.TrainConfig().method == 'lora'; "
            "assert calltune.load_examples('bfcl', 'simple_python', limit=2)[1].row == 1; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path, smollm2_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "calltune.train(" in block)
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    for old, new in (('"runs/python-api/model"', repr(str(tmp_path / "model"))),
                     ('{"train.method": "lora", "train.max_steps": 2}',  # one step is enough to run
                      '{"train.method": "lora", "train.max_steps": 1}'),
                     ('{"max_new_tokens": 64}', '{"max_new_tokens": 16}'),
                     ('overrides={"train.max_steps": 2}',
                      f'output_dir={str(tmp_path / "run")!r}, overrides={{"train.max_steps": 1, '
                      '"train.method": "lora", "eval.max_new_tokens": 8, "data.eval_limit": 1}')):
        assert old in snippet, f"the README snippet no longer holds {old}"
        snippet = snippet.replace(old, new)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert set(namespace["metrics"]["bfcl"]["accuracy"]) == {"simple_python", "irrelevance"}
    assert namespace["summary"]["train"]["steps"] == 1
    assert json.loads((tmp_path / "model" / "train_log.json").read_text())[-1]["step"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"] == "xlam-qlora"


@pytest.mark.slow
def test_an_explicit_eval_format_wins_over_the_saved_one(tmp_path, smollm2_path):
    """A model saved with the hermes format, evaluated with --format viggo, renders viggo prompts."""
    from typer.testing import CliRunner

    from calltune.cli import app
    from calltune.formats import get_format, save_format

    import shutil

    model = tmp_path / "model"
    shutil.copytree(smollm2_path, model)
    save_format(get_format("hermes"), model)
    data = ROOT.parent / "shared" / "data" / "viggo" / "valid.csv"
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(data), "--source", "viggo", "--format", "viggo",
                                      "--limit", "1", "--max-new-tokens", "4", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["format"] == "viggo"


def test_train_into_a_finished_model_folder_needs_overwrite(tmp_path, monkeypatch):
    import calltune
    from calltune.train.output import FINISHED, OutputDirError

    monkeypatch.chdir(ROOT)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / FINISHED).write_text("{}")  # what a finished training leaves
    with pytest.raises(OutputDirError, match="overwrite"):
        calltune.train("recipes/xlam-qlora.yaml", output_dir=model_dir)
    with pytest.raises(OutputDirError, match="exclude each other"):
        calltune.run("recipes/xlam-qlora.yaml", output_dir=tmp_path, resume=True, overwrite=True)
