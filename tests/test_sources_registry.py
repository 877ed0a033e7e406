import pytest

from calltune.recipe import RecipeError, validate_recipe
from calltune.sources import SOURCES, load_source

from conftest import SAMPLES


def test_every_source_is_registered():
    assert set(SOURCES) == {"viggo", "xlam", "glaive", "llama_functions", "openai_jsonl", "hermes", "bfcl"}


def test_bfcl_categories_as_a_source():
    examples = load_source("bfcl", "live_simple, live_irrelevance", limit=3)
    assert [e.meta["bfcl"]["category"] for e in examples] == ["live_simple"] * 3 + ["live_irrelevance"] * 3
    assert examples[0].final_assistant().tool_calls and not examples[-1].final_assistant().tool_calls


def test_bfcl_unknown_category_suggests():
    with pytest.raises(ValueError, match="live_simple"):
        load_source("bfcl", "live_simpel")


def test_recipe_with_bfcl_categories_is_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: b\nmodel: smollm2-135m-instruct\nformat: hermes\n"
                    "data: {source: bfcl, train: 'live_simple,live_multipel', eval: simple_python}\n")
    with pytest.raises(RecipeError, match="unknown BFCL category 'live_multipel'; did you mean 'live_multiple'"):
        validate_recipe(path)


def test_hub_id_is_used_when_no_train_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm2-135m-instruct\nformat: xlam\n"
                    "data: {source: xlam, hub_id: Salesforce/xlam-function-calling-60k}\n")
    recipe = validate_recipe(path)
    assert recipe.data.train_path == "Salesforce/xlam-function-calling-60k"
    path.write_text("name: x\nmodel: smollm2-135m-instruct\nformat: xlam\ndata: {source: xlam}\n")
    with pytest.raises(RecipeError, match="give data.train"):
        validate_recipe(path)
    assert (SAMPLES / "xlam_function_calling_60k.json").exists()
