from pathlib import Path

import pytest

from calltune.recipe import RecipeError, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # recipe data paths are relative to the repository root
    recipe = validate_recipe(path)
    assert path.read_text().startswith(f"# calltune run recipes/{path.name}")
    assert recipe.name == path.stem


def test_unknown_keys_are_all_reported_with_suggestions(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm2-135m-instruct\nformat: viggo\n"
                    "data: {source: viggo, train: t.csv}\n"
                    "train: {learning_rat: 1.0e-4, lora: {rank: 8}}\nevals: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = "\n".join(info.value.problems)
    assert "train.learning_rat: unknown key; did you mean 'learning_rate'?" in problems
    assert "train.lora.rank: unknown key" in problems
    assert "evals: unknown key; did you mean 'eval'?" in problems
    assert len(info.value.problems) == 3


def test_validate_checks_names_and_paths_without_loading(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm3\nformat: hermez\n"
                    "data: {source: vigo, train: missing.csv}\n")
    with pytest.raises(RecipeError) as info:
        validate_recipe(path)
    text = str(info.value)
    assert "format: unknown prompt format 'hermez'" in text
    assert "data.source: unknown source 'vigo'; did you mean 'viggo'?" in text
    assert "data.train: file 'missing.csv' not found" in text
    assert "model: 'smollm3'" in text


def test_overrides_win(tmp_path):
    recipe = load_recipe(RECIPES[0], {"train.max_steps": 3, "data.eval_limit": 5})
    assert recipe.train.max_steps == 3 and recipe.data.eval_limit == 5


def test_bad_value_type(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: m\nformat: viggo\ndata: {source: viggo, train: t.csv}\ntrain: {batch_size: -1}\n")
    with pytest.raises(RecipeError, match="train.batch_size: Input should be greater than or equal to 1"):
        load_recipe(path)
