"""GGUF export (`calltune.serve.export`): llama.cpp's converter taken from the llama-cpp-python sdist and
cached; exported files loaded back with transformers (which dequantises GGUF) generate what the HF model
generates, and carry the folder's chat template as ``tokenizer.chat_template``.

The converter is fetched once into ``$CALLTUNE_HOME/llama.cpp`` (a ~75 MB download with pip the first
time; later sessions reuse it, so they need no network).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calltune.serve.export import (
    LLAMA_CPP_PYTHON,
    ConverterNotFound,
    converter_cache,
    export_gguf,
    fetch_converter,
)

PROMPTS = ["What's the weather in Paris?", "Add 2 and 3.", "<|im_start|>user\nHello!<|im_end|>\n"]


@pytest.fixture(scope="session")
def converter() -> Path:
    return fetch_converter()


@pytest.fixture
def no_pypi(tmp_path, monkeypatch):
    """pip with no index and no local wheels: any download fails at once."""
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))


def tiny_llama(path: Path, tokenizer, dtype: torch.dtype) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and the hermes format, saved in `dtype`.

    Weights drawn with std 0.5 (not 0.02) so greedy decoding walks through varied tokens instead of
    repeating one; hidden sizes are multiples of 32, the block of q8_0.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from calltune.formats import get_format, save_format

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_format(get_format("hermes"), path)
    return path


def load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()


def greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each prompt (stopping at end of sequence)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            done = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
            out.append(done[0, len(ids):].tolist())
    return out


def gguf_chat_template(gguf: Path) -> str:
    from gguf import GGUFReader

    return GGUFReader(gguf).fields["tokenizer.chat_template"].contents()


def assert_carries_template(gguf: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(folder).chat_template
    assert isinstance(template, str) and template
    assert gguf_chat_template(gguf) == template


# -- getting the converter ------------------------------------------------------------------------
@pytest.mark.slow
def test_converter_is_cached_without_the_sdist_and_reused_offline(converter, no_pypi, tmp_path, monkeypatch):
    from calltune.serve.export import find_converter

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no converter of this machine's own on PATH
    cache = converter_cache()
    assert converter == cache / "convert_hf_to_gguf.py" and cache.name == f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    for part in ("conversion/__init__.py", "gguf-py/gguf/gguf_writer.py", "LICENSE"):
        assert (cache / part).is_file(), part
    assert not list(cache.parent.rglob("*.tar.gz"))  # the ~75 MB download is deleted after extraction
    assert find_converter() == converter  # pip has no index now: this is the cache


def test_fetch_without_pypi_names_the_command_and_leaves_no_cache(tmp_path, no_pypi):
    with pytest.raises(ConverterNotFound) as err:
        fetch_converter(cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "pip download --no-deps --no-binary :all:" in message and f"llama-cpp-python=={LLAMA_CPP_PYTHON}" in message
    assert "git clone" in message and "--converter" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_given_converter_must_exist(tmp_path):
    from calltune.serve.export import find_converter

    with pytest.raises(ConverterNotFound, match="Leave --converter out"):
        find_converter(tmp_path / "nope.py")


def test_a_missing_converter_requirement_is_named(tmp_path, tokenizer):
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import calltune_missing_requirement\n")
    model = tiny_llama(tmp_path / "tiny", tokenizer, torch.float32)
    with pytest.raises(RuntimeError, match="needs the Python package 'calltune_missing_requirement'.*pip install"):
        export_gguf(str(model), tmp_path / "m.gguf", converter=script)


def test_two_disagreeing_chat_templates_are_refused_before_converting(tmp_path, tokenizer):
    """llama.cpp reads tokenizer_config.json's template first, transformers chat_template.jinja: refuse the mix."""
    import json

    model = tiny_llama(tmp_path / "tiny", tokenizer, torch.float32)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("raise SystemExit('the converter must not run')\n")
    with pytest.raises(ValueError, match="tokenizer_config.json has a chat_template that differs"):
        export_gguf(str(model), tmp_path / "m.gguf", converter=script)


# -- exported files -------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_export_is_lossless_and_carries_the_chat_template(tmp_path, tokenizer, converter, monkeypatch):
    """A bf16 model exported as bf16: the same weights, so the same greedy tokens, and its chat template."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    model = tiny_llama(tmp_path / "tiny", tokenizer, torch.bfloat16)
    gguf = export_gguf(str(model), tmp_path / "out" / "tiny-bf16.gguf", outtype="bf16")
    assert_carries_template(gguf, model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    back = load_gguf(gguf, torch.bfloat16)
    weights = back.state_dict()
    for name, weight in hf.state_dict().items():
        assert torch.equal(weight, weights[name]), name
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    expected = greedy(hf, prompts, 16)
    assert len({tuple(ids) for ids in expected}) == len(PROMPTS) and all(len(set(ids)) > 3 for ids in expected)
    assert greedy(back, prompts, 16) == expected


@pytest.mark.slow
def test_f16_export_of_an_fp32_model_generates_the_same_tokens(tmp_path, tokenizer, converter):
    """f16 rounds each fp32 weight (relative error <= 2**-11); on these prompts no greedy token changes."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tmp_path / "tiny", tokenizer, torch.float32)
    gguf = export_gguf(str(model), tmp_path / "tiny-f16.gguf", outtype="f16", converter=converter)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert greedy(load_gguf(gguf, torch.float32), prompts, 16) == greedy(hf, prompts, 16)


@pytest.mark.slow
def test_q8_0_export_of_a_tuned_adapter_makes_the_same_calls(tmp_path, converter):
    """The tiny tuned SmolLM2 adapter, merged and quantised to q8_0: the same parsed tool calls as the merged
    HF model (calltune's own greedy decoding, as evaluation runs it), and the merged folder's chat template."""
    from toolcall_model import ASK_PARIS, ASK_TWO, TOOLS, tuned_adapter
    from transformers import AutoModelForCausalLM

    from calltune.formats import load_format
    from calltune.infer.generate import generate
    from calltune.models import load_tokenizer
    from calltune.schema import Example, Message
    from calltune.serve.export import export_hf

    adapter = tuned_adapter(tmp_path)
    gguf = export_gguf(adapter, tmp_path / "tuned-q8_0.gguf", outtype="q8_0", converter=converter)
    merged = export_hf(adapter, tmp_path / "merged")
    assert_carries_template(gguf, merged)

    fmt, tokenizer = load_format(merged), load_tokenizer(str(merged))
    prompts = [fmt.prompt(Example(messages=[Message(role="user", content=q)], tools=TOOLS), tokenizer)
               for q in (ASK_PARIS, ASK_TWO)]

    def calls(model) -> list[list[tuple[str, dict]]]:
        return [[(c.name, c.arguments) for c in fmt.parse(g.text).tool_calls]
                for g in generate(model, tokenizer, prompts, max_new_tokens=80)]

    expected = calls(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    weather = lambda city: ("get_weather", {"city": city})
    assert expected == [[weather("Paris")], [weather("Tokyo"), weather("Rome")]]  # the check has teeth
    assert calls(load_gguf(gguf, torch.float32)) == expected
