"""vLLM as calltune's engine for scale: offline generation for evaluation and the OpenAI server for serving.

Owns `generate_vllm` (prompt token ids -> `Generation`s through vLLM's offline ``LLM`` API, greedy,
with tensor parallelism across GPUs when asked) and `vllm_server_command` (the ``vllm`` OpenAI server
command line for a model calltune saved: its chat template, the tool-call parser that reads its
format's calls, its LoRA adapter). vLLM is an optional dependency that lives best in its own
environment (see the README, "Serving with vLLM"); nothing here imports it until it is used.

Prompts are token ids rendered by calltune's format (``PromptFormat.prompt``), so vLLM decodes
exactly the prompt calltune's own engine decodes; the completion is parsed by the same format.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from calltune.errors import CalltuneError
from calltune.infer.generate import Generation
from calltune.models import is_adapter, resolve_model

# calltune formats whose calls one of vLLM's built-in tool-call parsers reads exactly (vllm.tool_parsers).
VLLM_TOOL_PARSERS = {"hermes": "hermes"}
KV_CACHE_GB = "4"  # vLLM's CPU backend reserves VLLM_CPU_KVCACHE_SPACE GB for keys and values; set when unset


class VLLMUnavailable(CalltuneError):
    """vLLM is not installed in this Python environment (or can't serve this model)."""


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailable(
            f"the vllm engine needs vLLM in this environment ({sys.executable}): {exc}. "
            "Install it as the README's 'Serving with vLLM' says (make vllm-env), then run calltune from there") from exc
    return vllm


def model_and_adapter(name: str) -> tuple[str, str | None, int]:
    """The base model folder, the LoRA adapter folder (or None) and the adapter's rank (0 without one).

    Raises:
        VLLMUnavailable: `name` is a GGUF file (vLLM reads HF folders here).
    """
    path = resolve_model(name)
    if not is_adapter(path):
        return path, None, 0
    config = json.loads(Path(path, "adapter_config.json").read_text(encoding="utf-8"))
    return resolve_model(config["base_model_name_or_path"]), path, int(config.get("r", 16))


def generate_vllm(name: str, prompts: list[list[int]], max_new_tokens: int = 128, eos_token_id: int | None = None,
                  tensor_parallel_size: int = 1, max_model_len: int | None = None) -> list[Generation]:
    """Greedy completions of `prompts` (token ids) by vLLM's offline engine, in prompt order.

    Args:
        name: an alias, model folder or LoRA adapter folder (served as a LoRA request on its base).
        prompts: one list of token ids per prompt, as ``PromptFormat.prompt`` renders them.
        max_new_tokens: generation budget per prompt.
        eos_token_id: the end-of-turn token that stops a completion (calltune's engine stops on the
            tokenizer's eos); vLLM's own stop tokens from the model's generation config apply too.
        tensor_parallel_size: GPUs one model is split across (vLLM's ``tensor_parallel_size``).
        max_model_len: context length vLLM plans for (default: the longest prompt plus the budget).

    Returns:
        One `Generation` per prompt: the text with special tokens removed, token counts (the stop
        token counted, as calltune's engine counts it) and ``finish_reason`` ``eos``, ``stop`` or ``length``.

    Raises:
        VLLMUnavailable: vLLM isn't installed here.
    """
    if not prompts:
        return []
    _import_vllm()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)
    base, adapter, rank = model_and_adapter(name)
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine_args = {"model": base, "dtype": "bfloat16", "tensor_parallel_size": tensor_parallel_size, "seed": 0,
                   "max_model_len": max_model_len or longest}
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        engine_args.update(enable_lora=True, max_lora_rank=max(rank, 8))
        lora = LoRARequest("adapter", 1, adapter)
    llm = LLM(**engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True,
                            stop_token_ids=[eos_token_id] if eos_token_id is not None else None)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora,
                           use_tqdm=True)
    generations = []
    for prompt, out in zip(prompts, outputs):
        done = out.outputs[0]
        stopped_on_eos = done.finish_reason == "stop" and done.stop_reason in (None, eos_token_id)
        generations.append(Generation(text=done.text, prompt_tokens=len(prompt),
                                      completion_tokens=len(done.token_ids),
                                      finish_reason="eos" if stopped_on_eos else done.finish_reason))
    return generations


def tool_parser_for(name: str, format_name: str | None, chat_template: str | None) -> str:
    """The vLLM tool-call parser that reads the calls of a model saved with `format_name`.

    Raises:
        VLLMUnavailable: no vLLM parser reads that format's calls exactly (pass one yourself).
    """
    if format_name in VLLM_TOOL_PARSERS:
        return VLLM_TOOL_PARSERS[format_name]
    if format_name == "chat_template" and chat_template and "<tool_call>" in chat_template:
        return "hermes"  # Qwen2.5 / Hermes-style templates
    raise VLLMUnavailable(
        f"{name}: no vLLM tool-call parser reads the calls of calltune's {format_name or 'unknown'} format "
        f"(those that do: {', '.join(sorted(VLLM_TOOL_PARSERS))}); pass --tool-call-parser with one of vLLM's parsers "
        "that fits the model, or serve it with calltune's own engine")


def vllm_server_command(name: str, served_name: str, host: str = "127.0.0.1", port: int = 8000,
                        api_key: str | None = None, tool_call_parser: str | None = None,
                        max_model_len: int | None = None, python: str | None = None) -> list[str]:
    """The command line that serves `name` through vLLM's OpenAI-compatible server as calltune would.

    The server gets the model's saved chat template (the format it was trained on, as Jinja; see
    `calltune.formats.jinja`), automatic tool choice with the tool-call parser for its format
    (`tool_parser_for`), and for a LoRA adapter folder the base model with the adapter as a LoRA
    module named `served_name`. It is vLLM's ``python -m vllm.entrypoints.openai.api_server`` form
    (equivalent to ``vllm serve``).

    Raises:
        VLLMUnavailable: the model has no calltune format and no `tool_call_parser` is given, or no vLLM
            parser reads its format's calls.
    """
    from calltune.formats import load_format

    base, adapter, rank = model_and_adapter(name)
    folder = Path(adapter or base)
    template = folder / "chat_template.jinja"
    fmt = load_format(folder)
    if fmt is None and not tool_call_parser:
        raise VLLMUnavailable(f"{name}: not a model calltune saved (no calltune_format.json in {folder}), so nothing "
                              "says how it writes tool calls; pass --tool-call-parser if its own chat template "
                              "renders tools, or serve it with calltune's engine and a format")
    text = template.read_text(encoding="utf-8") if template.exists() else None
    parser = tool_call_parser or tool_parser_for(name, fmt.name, text)
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
           "--dtype", "bfloat16", "--host", host, "--port", str(port),
           "--enable-auto-tool-choice", "--tool-call-parser", parser, "--generation-config", "vllm"]
    if text is not None:
        cmd += ["--chat-template", str(template)]
    if adapter:
        cmd += ["--enable-lora", "--max-lora-rank", str(max(rank, 8)), "--lora-modules", f"{served_name}={adapter}"]
    else:
        cmd += ["--served-model-name", served_name]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd
