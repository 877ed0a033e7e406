"""Hostile invocations of the CLI: each exits 2 with one ``error:`` line naming the file (row, field)
or option, no traceback, and leaves the input files' bytes as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calltune.cli import app
from conftest import SAMPLES, VIGGO

runner = CliRunner()
XLAM = SAMPLES / "xlam_function_calling_60k.json"
LLAMA = SAMPLES / "llama_functions.jsonl"
BOM = b"\xef\xbb\xbf"


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


def user_error(result, *names: str) -> str:
    """Assert exit 2 via `_fail` (not an exception) and exactly one ``error:`` line naming `names`; return it."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a caught traceback
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    rest = [line for line in result.output.splitlines() if line.strip() and not line.startswith("error:")]
    assert not rest, result.output  # the message is not wrapped onto more lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def no_heavy_work(monkeypatch):
    """A check that failed to stop the command must not go on to train, evaluate, merge or export."""
    import calltune.evaluate.runner
    import calltune.pipeline
    import calltune.serve.export
    import calltune.train

    def reached(*args, **kwargs):
        raise AssertionError("the command got past its checks")

    monkeypatch.setattr(calltune.pipeline, "run_recipe", reached)
    monkeypatch.setattr(calltune.pipeline, "prepare", reached)
    monkeypatch.setattr(calltune.train, "train", reached, raising=False)
    monkeypatch.setattr(calltune.train, "merge_adapter", reached, raising=False)
    monkeypatch.setattr(calltune.evaluate.runner, "evaluate_model", reached)
    monkeypatch.setattr(calltune.serve.export, "export_hf", reached)
    monkeypatch.setattr(calltune.serve.export, "export_gguf", reached)


@pytest.fixture
def xlam(tmp_path) -> Path:
    path = tmp_path / "xlam.json"
    shutil.copyfile(XLAM, path)
    return path


@pytest.fixture
def canonical(tmp_path, xlam) -> Path:
    """Canonical JSONL written by `calltune data clean` (input of `data augment`)."""
    out = tmp_path / "canonical.jsonl"
    result = invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", out])
    assert result.exit_code == 0, result.output
    return out


def recipe(tmp_path: Path, train: Path | str, source: str = "xlam", name: str = "r.yaml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(f"name: r\nmodel: smollm2-135m-instruct\nformat: hermes\n"
                    f"data: {{source: {source}, train: '{train}'}}\n{extra}")
    return path


def with_bad_byte(src: Path, dst: Path, line: int) -> Path:
    """Copy `src` to `dst` with a Latin-1 byte (0xe9, not UTF-8) in the middle of line `line` (1-based)."""
    lines = src.read_bytes().split(b"\n")
    text = lines[line - 1]
    lines[line - 1] = text[:len(text) // 2] + b"\xe9" + text[len(text) // 2:]
    dst.write_bytes(b"\n".join(lines))
    return dst


# -- paths: directories and files where the other is expected ----------------------------------

def test_clean_input_is_a_directory(tmp_path):
    folder = tmp_path / "data.json"  # a data-file suffix, so no hub lookup
    folder.mkdir()
    out = tmp_path / "out.jsonl"
    line = user_error(invoke(["data", "clean", "--source", "xlam", "--input", folder, "-o", out]), str(folder))
    assert "directory" in line and not out.exists()


def test_clean_output_parent_is_a_file(tmp_path, xlam):
    before = digest(xlam)
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", xlam / "out.jsonl"]),
               "--output", str(xlam), "not a folder")
    assert digest(xlam) == before


def test_clean_output_is_a_directory(tmp_path, xlam):
    before = digest(xlam)
    folder = tmp_path / "out"
    folder.mkdir()
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", folder]), "--output", str(folder))
    assert digest(xlam) == before and not list(folder.iterdir())


def test_clean_rejects_path_is_a_directory(tmp_path, xlam):
    folder = tmp_path / "rejects"
    folder.mkdir()
    out = tmp_path / "out.jsonl"
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", out, "--rejects", folder]),
               "--rejects", str(folder))
    assert not out.exists()


def test_augment_input_is_a_directory(tmp_path):
    folder = tmp_path / "in.jsonl"
    folder.mkdir()
    user_error(invoke(["data", "augment", "--input", folder, "-o", tmp_path / "a.jsonl"]), str(folder), "directory")


def test_augment_output_is_a_directory_or_under_a_file(tmp_path, canonical):
    before = digest(canonical)
    folder = tmp_path / "out"
    folder.mkdir()
    user_error(invoke(["data", "augment", "--input", canonical, "-o", folder]), "--output", str(folder))
    user_error(invoke(["data", "augment", "--input", canonical, "-o", canonical / "a.jsonl"]),
               "--output", str(canonical), "not a folder")
    assert digest(canonical) == before


def test_augment_config_is_a_directory_or_bad_yaml(tmp_path, canonical):
    folder = tmp_path / "rules.yaml"
    folder.mkdir()
    user_error(invoke(["data", "augment", "--input", canonical, "-o", tmp_path / "a.jsonl", "--config", folder]),
               "--config", str(folder), "directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel: {count: [\n")
    user_error(invoke(["data", "augment", "--input", canonical, "-o", tmp_path / "a.jsonl", "--config", bad]),
               "--config", str(bad), "line 2")
    assert not (tmp_path / "a.jsonl").exists()


def test_validate_recipe_path_is_a_directory(tmp_path):
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    user_error(invoke(["validate", folder]), str(folder), "directory")


def test_run_output_is_a_file(tmp_path, xlam):
    before = digest(xlam)
    user_error(invoke(["run", recipe(tmp_path, xlam), "-o", xlam]), "--output", str(xlam), "not a folder")
    user_error(invoke(["run", recipe(tmp_path, xlam), "-o", xlam / "run"]), "--output", str(xlam), "not a folder")
    assert digest(xlam) == before


def test_run_data_is_a_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "train.json"
    folder.mkdir()
    user_error(invoke(["run", recipe(tmp_path, folder)]), "data.train", str(folder), "directory")
    assert not (tmp_path / "runs").exists()


def test_run_would_overwrite_its_data_with_rejects(tmp_path, xlam):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = run_dir / "rejects.jsonl"
    shutil.copyfile(LLAMA, data)
    before = digest(data)
    user_error(invoke(["run", recipe(tmp_path, data, source="llama_functions"), "-o", run_dir]),
               "rejects.jsonl", "data.train")
    assert digest(data) == before and sorted(p.name for p in run_dir.iterdir()) == ["rejects.jsonl"]


def test_train_output_is_a_file(tmp_path, xlam):
    user_error(invoke(["train", recipe(tmp_path, xlam), "-o", xlam]), "--output", str(xlam))


def test_eval_data_is_a_directory(tmp_path):
    folder = tmp_path / "valid.csv"
    folder.mkdir()
    user_error(invoke(["eval", "smollm2-135m-instruct", "--data", folder, "--format", "viggo",
                       "-o", tmp_path / "eval"]), str(folder), "directory")


def test_eval_output_is_a_file_or_holds_the_data(tmp_path):
    data = tmp_path / "valid.csv"
    shutil.copyfile(VIGGO / "valid.csv", data)
    before = digest(data)
    user_error(invoke(["eval", "smollm2-135m-instruct", "--data", data, "-o", data]), "--output", str(data))
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    inside = run_dir / "predictions.jsonl"
    shutil.copyfile(LLAMA, inside)
    user_error(invoke(["eval", "smollm2-135m-instruct", "--source", "llama_functions", "--data", inside,
                       "-o", run_dir]), "predictions.jsonl", "--data")
    assert digest(data) == before and digest(inside) == digest(LLAMA)


def test_merge_and_export_paths(tmp_path, xlam):
    user_error(invoke(["merge", xlam, tmp_path / "merged"]), str(xlam), "not an adapter folder")
    user_error(invoke(["merge", tmp_path, xlam]), "OUTPUT", str(xlam), "not a folder")
    user_error(invoke(["export", "smollm2-135m-instruct", "--format", "hf", "-o", xlam]), "--output", str(xlam))


def test_show_data_is_a_directory(tmp_path):
    folder = tmp_path / "train.csv"
    folder.mkdir()
    user_error(invoke(["show", recipe(tmp_path, folder, source="viggo")]), str(folder), "directory")


# -- output equal to an input --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_clean_output_equal_to_input_is_refused_before_anything(tmp_path, xlam, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    before = digest(xlam)
    out = {"same": xlam, "dotted": Path("sub/../xlam.json"), "symlink": tmp_path / "link.json",
           "hardlink": tmp_path / "hard.json"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        out.symlink_to(xlam)
    if spelling == "hardlink":
        os.link(xlam, out)
    val = tmp_path / "val.jsonl"
    rejects = tmp_path / "rejects.jsonl"
    result = invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", out,
                     "--val-output", val, "--rejects", rejects])
    user_error(result, "--output", "--input", str(xlam), "same file")
    assert digest(xlam) == before
    assert not val.exists() and not rejects.exists()  # refused before writing anything


@pytest.mark.parametrize("option", ["--val-output", "--rejects"])
def test_clean_other_outputs_equal_to_input_or_output(tmp_path, xlam, option):
    before = digest(xlam)
    out = tmp_path / "out.jsonl"
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", out, option, xlam]),
               option, "--input", "same file")
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", out, option, out]),
               option, "--output", "same file")
    assert digest(xlam) == before and not out.exists()


def test_augment_output_equal_to_input(tmp_path, canonical):
    before = digest(canonical)
    link = tmp_path / "link.jsonl"
    link.symlink_to(canonical)
    user_error(invoke(["data", "augment", "--input", canonical, "-o", link]), "--output", "--input", "same file")
    user_error(invoke(["data", "augment", "--input", link, "-o", canonical]), "--output", "--input", "same file")
    assert digest(canonical) == before


# -- encodings and BOMs ----------------------------------------------------------------------------

def test_non_utf8_json_names_file_and_line(tmp_path):
    bad = with_bad_byte(XLAM, tmp_path / "latin.json", 4)
    before = digest(bad)
    line = user_error(invoke(["data", "clean", "--source", "xlam", "--input", bad, "-o", tmp_path / "o.jsonl"]),
                      str(bad), "line 4", "UTF-8")
    assert "codec" not in line and digest(bad) == before


def test_non_utf8_jsonl_names_file_row_and_line(tmp_path):
    bad = with_bad_byte(LLAMA, tmp_path / "latin.jsonl", 3)
    user_error(invoke(["data", "clean", "--source", "llama_functions", "--input", bad, "-o", tmp_path / "o.jsonl"]),
               str(bad), "row 2", "line 3", "UTF-8")


def test_non_utf8_csv_names_file_and_line(tmp_path):
    bad = with_bad_byte(VIGGO / "valid.csv", tmp_path / "latin.csv", 5)
    user_error(invoke(["eval", "smollm2-135m-instruct", "--data", bad, "--format", "viggo", "-o", tmp_path / "e"]),
               str(bad), "line 5", "UTF-8")


def test_non_utf8_canonical_jsonl_for_augment(tmp_path, canonical):
    bad = with_bad_byte(canonical, tmp_path / "latin.jsonl", 2)
    user_error(invoke(["data", "augment", "--input", bad, "-o", tmp_path / "a.jsonl"]),
               str(bad), "row 1", "line 2", "UTF-8")


def test_non_utf8_recipe_names_the_line(tmp_path, xlam):
    path = recipe(tmp_path, xlam)
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    user_error(invoke(["validate", path]), str(path), "line 5", "UTF-8")


@pytest.mark.parametrize("source,sample", [("xlam", XLAM), ("llama_functions", LLAMA)])
def test_bom_is_accepted(tmp_path, source, sample):
    plain, bom = tmp_path / f"plain{sample.suffix}", tmp_path / f"bom{sample.suffix}"
    shutil.copyfile(sample, plain)
    bom.write_bytes(BOM + sample.read_bytes())
    reports = []
    for path in (plain, bom):
        out = tmp_path / f"{path.stem}.out.jsonl"
        result = invoke(["data", "clean", "--source", source, "--input", path, "-o", out])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.output))
    assert reports[1]["loaded"] == reports[0]["loaded"] > 0
    assert reports[1]["kept"] == reports[0]["kept"]


def test_bom_in_canonical_jsonl_and_recipe(tmp_path, canonical, xlam):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(BOM + canonical.read_bytes())
    result = invoke(["data", "augment", "--input", bom, "-o", tmp_path / "a.jsonl"])
    assert result.exit_code == 0, result.output
    path = recipe(tmp_path, xlam)
    path.write_bytes(BOM + path.read_bytes())
    result = invoke(["validate", path])
    assert result.exit_code == 0, result.output


# -- --set against options -------------------------------------------------------------------------

def clean_args(xlam: Path, tmp_path: Path, *extra) -> list:
    return ["data", "clean", "--source", "xlam", "--input", xlam, "-o", tmp_path / "o.jsonl",
            "--val-output", tmp_path / "v.jsonl", *extra]


@pytest.mark.parametrize("extra,names", [
    (["--set", "seed=3", "--seed", "4"], ["--set seed=3", "--seed 4"]),
    (["--set", "val_fraction=0.5", "--val-fraction", "0.2"], ["--set val_fraction=0.5", "--val-fraction 0.2"]),
    (["--set", "dedupe=false", "--dedupe"], ["--set dedupe=false", "--dedupe"]),
    (["--set", "trailing_user=keep", "--trailing-user", "drop"], ["--set trailing_user", "--trailing-user drop"]),
])
def test_set_disagreeing_with_an_option_is_an_error(tmp_path, xlam, extra, names):
    before = digest(xlam)
    user_error(invoke(clean_args(xlam, tmp_path, *extra)), *names)
    assert digest(xlam) == before and not (tmp_path / "o.jsonl").exists()


def test_set_of_an_option_key_is_applied(tmp_path, xlam):
    result = invoke(clean_args(xlam, tmp_path, "--set", "val_fraction=0.5", "--set", "seed=3", "--seed", "3"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["val"] == int(report["kept"] * 0.5 + 0.5)  # 0.5, not the option's default 0.1
    default = json.loads(invoke(clean_args(xlam, tmp_path / "d")).output)
    assert default["val"] == int(default["kept"] * 0.1 + 0.5) != report["val"]


@pytest.mark.parametrize("extra,names", [
    (["--set", "seed=3", "--set", "seed=4"], ["--set seed", "twice"]),
    (["--set", "seed=[1,"], ["--set seed=[1,", "YAML"]),
    (["--set", "dedup=false"], ["dedup", "did you mean 'dedupe'"]),
    (["--set", "val_fraction=2"], ["val_fraction", "[0, 1)"]),
])
def test_bad_set_values(tmp_path, xlam, extra, names):
    user_error(invoke(clean_args(xlam, tmp_path, *extra)), *names)


def test_val_fraction_without_val_output(tmp_path, xlam):
    user_error(invoke(["data", "clean", "--source", "xlam", "--input", xlam, "-o", tmp_path / "o.jsonl",
                       "--val-fraction", "0.3"]), "val_fraction", "--val-output")


def test_run_set_output_dir_disagreeing_with_output(tmp_path, xlam):
    user_error(invoke(["run", recipe(tmp_path, xlam), "-o", tmp_path / "a", "--set", f"output_dir={tmp_path / 'b'}"]),
               "--set output_dir", "--output")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_augment_unknown_nested_setting(tmp_path, canonical):
    result = invoke(["data", "augment", "--input", canonical, "-o", tmp_path / "a.jsonl", "--set", "parallel.cont=3"])
    user_error(result, "parallel.cont", "did you mean 'count'")


# -- validate opens the data files ---------------------------------------------------------------

@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if validate loads a model or tokenizer."""
    import calltune.models

    def boom(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(calltune.models, "load_model", boom)
    monkeypatch.setattr(calltune.models, "load_tokenizer", boom)


def test_validate_ok_on_a_real_sample(tmp_path, xlam, no_weights):
    result = invoke(["validate", recipe(tmp_path, xlam)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_validate_empty_data_file(tmp_path, no_weights):
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    user_error(invoke(["validate", recipe(tmp_path, empty)]), "data.train", str(empty), "empty")


def test_validate_data_directory(tmp_path, no_weights):
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    user_error(invoke(["validate", recipe(tmp_path, folder)]), "data.train", str(folder), "directory")


def test_validate_non_utf8_data(tmp_path, no_weights):
    bad = with_bad_byte(LLAMA, tmp_path / "latin.jsonl", 2)
    user_error(invoke(["validate", recipe(tmp_path, bad, source="llama_functions")]),
               "data.train", str(bad), "row 1", "line 2")


def test_validate_eval_file_is_checked_too(tmp_path, xlam, no_weights):
    empty = tmp_path / "eval.json"
    empty.write_bytes(b"   \n")
    path = recipe(tmp_path, xlam)
    path.write_text(path.read_text().replace("data: {", f"data: {{eval: '{empty}', "))
    user_error(invoke(["validate", path]), "data.eval", str(empty), "empty")


def test_validate_wrong_columns_for_the_source(tmp_path, no_weights):
    glaive = tmp_path / "glaive.json"
    shutil.copyfile(SAMPLES / "glaive-function-calling-v2.json", glaive)
    user_error(invoke(["validate", recipe(tmp_path, glaive, source="xlam")]),
               "data.train", str(glaive), "field 'query'", "missing column")


def test_validate_first_rows_do_not_parse(tmp_path, no_weights):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": "q", "tools": "not json", "answers": "[]"}] * 3))
    user_error(invoke(["validate", recipe(tmp_path, bad)]), "data.train", str(bad), "row 0", "'tools'")
