"""A tiny tool-calling SmolLM2 for the serve and chat tests: a LoRA adapter trained for a few steps.

`tuned_adapter(root)` fine-tunes SmolLM2-135M-Instruct on a handful of hand-made hermes-format
examples (a call, parallel calls, a tool-result turn with its answer, plain chat) until it reproduces
them; the tests prompt with the same conversations. Trained once per process (cached in `_CACHE`);
set ``CALLTUNE_TEST_MODEL_DIR`` to keep the adapter between runs while developing.
"""

from __future__ import annotations

import os
from pathlib import Path

from calltune.schema import Example, Message, Tool, ToolCall

WEATHER = Tool(function={
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}})
ADD = Tool(function={
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}})
TOOLS = [WEATHER, ADD]

ASK_PARIS = "What's the weather in Paris?"
ASK_TWO = "What's the weather in Tokyo and in Rome?"
ASK_ADD = "What is 2 plus 3?"
HELLO = "Hello! Who are you?"
HELLO_ANSWER = "I am a helpful assistant."
PARIS_RESULT = '{"temperature": 18, "sky": "sunny"}'
PARIS_ANSWER = "It is 18 degrees and sunny in Paris."


def paris_call(id: str | None = "call_1") -> ToolCall:
    return ToolCall.of("get_weather", {"city": "Paris"}, id=id)


def examples() -> list[Example]:
    user = lambda text: Message(role="user", content=text)  # noqa: E731
    calls = lambda *c: Message(role="assistant", tool_calls=list(c))  # noqa: E731
    return [
        Example(messages=[user(ASK_PARIS), calls(paris_call())], tools=TOOLS),
        Example(messages=[user(ASK_TWO), calls(ToolCall.of("get_weather", {"city": "Tokyo"}),
                                               ToolCall.of("get_weather", {"city": "Rome"}))], tools=TOOLS),
        Example(messages=[user(ASK_ADD), calls(ToolCall.of("add", {"a": 2, "b": 3}))], tools=TOOLS),
        Example(messages=[user(ASK_PARIS), calls(paris_call()),
                          Message(role="tool", tool_call_id="call_1", content=PARIS_RESULT),
                          Message(role="assistant", content=PARIS_ANSWER)], tools=TOOLS),
        Example(messages=[user(HELLO), Message(role="assistant", content=HELLO_ANSWER)], tools=TOOLS),
        Example(messages=[user(HELLO), Message(role="assistant", content=HELLO_ANSWER)]),
    ]


_CACHE: dict[str, str] = {}


def tuned_adapter(root: Path) -> str:
    """Path of the trained adapter (trained on first use in this process)."""
    if "adapter" in _CACHE:
        return _CACHE["adapter"]
    from calltune.formats import get_format
    from calltune.train import TrainConfig, train

    keep = os.environ.get("CALLTUNE_TEST_MODEL_DIR")
    out = Path(keep) if keep else root / "tuned-adapter"
    if not (out / "adapter_config.json").exists():
        cfg = TrainConfig(method="lora", max_steps=8, batch_size=6, learning_rate=3e-3, warmup_ratio=0.0,
                          lr_scheduler="constant", logging_steps=4, save_steps=1000, max_length=512)
        train("smollm2-135m-instruct", examples(), get_format("hermes"), cfg, out)
    _CACHE["adapter"] = str(out)
    return str(out)
