"""vLLM as calltune's engine for scale (`calltune.infer.vllm_engine`), on a tiny tuned SmolLM2.

The evaluation's default engine (``auto``) is vLLM wherever vLLM is installed and decoding is unconstrained.

Without vLLM: the server command calltune builds (template, parser, LoRA module) and its refusals.
With vLLM (``make test-vllm``: vLLM lives in its own environment, see the README): `calltune eval
--engine vllm` makes the same parsed calls as calltune's engine on the same prompts (greedy), and the
openai client against `calltune serve --engine vllm` gets the same structured ``tool_calls``, streamed
and not, as from calltune's own server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serving import free_port, running
from toolcall_model import ASK_ADD, ASK_PARIS, ASK_TWO, HELLO, TOOLS, examples, tuned_adapter

OPENAI_TOOLS = [t.to_dict() for t in TOOLS]
needs_vllm = pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None,
                                reason="vLLM is not installed here (make test-vllm installs it in its own environment)")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    return tuned_adapter(tmp_path_factory.mktemp("vllm-tuned"))


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> str:
    from calltune.serve.export import export_hf

    return str(export_hf(adapter, tmp_path_factory.mktemp("vllm-merged") / "model"))


# -- the command, without vLLM ----------------------------------------------------------------------
def test_server_command_for_a_merged_model_uses_its_template_and_the_hermes_parser(merged):
    from calltune.infer.vllm_engine import vllm_server_command

    cmd = vllm_server_command(merged, "tuned", port=8123, api_key="k")
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag("--model") == merged and flag("--served-model-name") == "tuned"
    assert flag("--chat-template") == str(Path(merged, "chat_template.jinja"))
    assert flag("--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in cmd
    assert flag("--port") == "8123" and flag("--api-key") == "k" and "--enable-lora" not in cmd


def test_server_command_for_an_adapter_serves_it_as_a_lora_module_on_its_base(adapter, smollm2_path):
    from calltune.infer.vllm_engine import vllm_server_command

    cmd = vllm_server_command(adapter, "tuned")
    assert cmd[cmd.index("--model") + 1] == smollm2_path
    assert cmd[cmd.index("--lora-modules") + 1] == f"tuned={adapter}" and "--enable-lora" in cmd
    assert cmd[cmd.index("--chat-template") + 1] == str(Path(adapter, "chat_template.jinja"))


def test_server_command_refuses_what_vllm_would_prompt_or_parse_differently(tmp_path, smollm2_path, merged):
    import shutil

    from calltune.formats import get_format, save_format
    from calltune.infer.vllm_engine import VLLMUnavailable, vllm_server_command

    with pytest.raises(VLLMUnavailable, match="not a model calltune saved"):
        vllm_server_command(smollm2_path, "base")  # nothing says how it writes calls
    xlam = tmp_path / "xlam"
    shutil.copytree(merged, xlam)
    save_format(get_format("xlam"), xlam)
    with pytest.raises(VLLMUnavailable, match="xlam format"):
        vllm_server_command(str(xlam), "x")
    assert "pythonic" in vllm_server_command(str(xlam), "x", tool_call_parser="pythonic")


def test_cli_prints_the_vllm_command_and_refuses_several_models(merged, adapter, monkeypatch):
    from typer.testing import CliRunner

    from calltune.cli import app
    from calltune.infer.vllm_engine import KV_CACHE_GB

    runner = CliRunner()
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    shown = runner.invoke(app, ["serve", merged, "--engine", "vllm", "--print-command", "--api-key", "secret"])
    assert shown.exit_code == 0, shown.output
    assert "vllm.entrypoints.openai.api_server" in shown.output and "--tool-call-parser hermes" in shown.output
    assert "secret" not in shown.output  # the key is masked
    # the CPU backend's cache is sized, not left to take the RAM; a size the user set wins
    assert f"VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GB} " in shown.output
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert "VLLM_CPU_KVCACHE_SPACE=7 " in runner.invoke(app, ["serve", merged, "--engine", "vllm", "--print-command"]).output
    two = runner.invoke(app, ["serve", "--model", f"a={merged}", "--model", f"b={adapter}", "--engine", "vllm"])
    assert two.exit_code == 2 and "one model" in two.output


def test_eval_config_refuses_constrained_decoding_on_vllm():
    from pydantic import ValidationError

    from calltune.evaluate.config import EvalConfig

    with pytest.raises(ValidationError, match="constrained decoding runs on the calltune engine only"):
        EvalConfig(engine="vllm", constrained=True)


def test_the_default_engine_is_vllm_where_it_is_installed_and_decoding_is_free(monkeypatch):
    import importlib.util

    from calltune.evaluate.config import EvalConfig

    real = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (real("json") if installed else None) if name == "vllm" else real(name, *a))
        assert EvalConfig().engine == "auto"
        assert EvalConfig().resolved_engine() == ("vllm" if installed else "calltune")
        assert EvalConfig(constrained=True).resolved_engine() == "calltune"  # vLLM runs no calltune grammar
        assert EvalConfig(engine="calltune").resolved_engine() == "calltune"
        assert EvalConfig(engine="vllm").resolved_engine() == "vllm"


# -- with vLLM ---------------------------------------------------------------------------------------
def _parsed(out_dir: Path) -> list[list[dict]]:
    return [json.loads(line)["parsed"] for line in (out_dir / "predictions.jsonl").read_text().splitlines()]


@needs_vllm
def test_eval_with_vllm_makes_the_same_calls_as_calltune(merged, tmp_path):
    from calltune.evaluate.config import EvalConfig
    from calltune.evaluate.runner import evaluate_model

    rows = examples()
    ours = evaluate_model(merged, rows, tmp_path / "calltune", EvalConfig(task="toolcall", max_new_tokens=80,
                                                                          engine="calltune"))
    theirs = evaluate_model(merged, rows, tmp_path / "vllm", EvalConfig(task="toolcall", max_new_tokens=80))
    # with vLLM installed, the default engine (auto) is vLLM's
    expected = _parsed(tmp_path / "calltune")
    assert sum(bool(p) for p in expected) >= 3  # the tuned model calls: the comparison has teeth
    assert _parsed(tmp_path / "vllm") == expected
    assert theirs["engine"] == "vllm" and ours["engine"] == "calltune"
    for metric in ("function_name_accuracy", "exact_call_accuracy"):
        assert theirs[metric] == ours[metric]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"vLLM's server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5):  # no API key needed
                return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vLLM's server not ready after {seconds} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vllm_url(adapter, tmp_path_factory):
    """`calltune serve ADAPTER --engine vllm` in a subprocess (the adapter as a LoRA module on its base)."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "calltune", "serve", "--model", f"tuned={adapter}",
                                 "--engine", "vllm", "--port", str(port), "--api-key", "k"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed_calls(client, question: str) -> list[tuple[str, dict]]:
    """Tool-call deltas of a streamed answer reassembled by index, as OpenAI's clients do."""
    parts: dict[int, dict] = {}
    for chunk in client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": question}],
                                                tools=OPENAI_TOOLS, max_tokens=80, temperature=0, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            part = parts.setdefault(delta.index, {"name": "", "arguments": ""})
            part["name"] += (delta.function.name or "") if delta.function else ""
            part["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]


@needs_vllm
def test_openai_client_gets_the_same_tool_calls_from_vllm_as_from_calltune(adapter, vllm_url):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from calltune.serve import create_app

    questions = [ASK_PARIS, ASK_TWO, ASK_ADD, HELLO]

    def answers(url: str, key: str | None) -> list:
        client = OpenAI(base_url=url, api_key=key or "none")
        return [client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": q}],
                                               tools=OPENAI_TOOLS, max_tokens=80, temperature=0).choices[0].message
                for q in questions]

    with running(create_app({"tuned": adapter}, constrained=False)) as url:
        ours = answers(f"{url}/v1", None)
    theirs = answers(vllm_url, "k")
    assert [_calls(m) for m in ours][:3] == [[("get_weather", {"city": "Paris"})],
                                             [("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Rome"})],
                                             [("add", {"a": 2, "b": 3})]]
    assert [_calls(m) for m in theirs] == [_calls(m) for m in ours]
    assert theirs[3].content and not theirs[3].tool_calls  # plain chat stays text

    client = OpenAI(base_url=vllm_url, api_key="k")
    with ThreadPoolExecutor(3) as pool:  # several streams at once, each reassembled
        streamed = list(pool.map(lambda q: _streamed_calls(client, q), questions[:3]))
    assert streamed == [_calls(m) for m in ours][:3]
