"""Interactive chat with a tool-calling model that runs real Python tools (`calltune chat`).

Owns `load_tools` (a Python file or module -> its public functions), `function_tool` (a function ->
the `Tool` JSON Schema the model is shown, from its signature, type hints and docstring),
`run_tool` (call it; an exception becomes the tool result, so the model can see what went wrong) and
`chat_loop`, the loop itself: read a user turn, let the model answer, and while it answers with calls
show them, run them, feed the results back as ``tool`` messages and let it continue -- until it
answers in text. The loop takes the model as a `complete(messages, tools) -> Message` callable and
the terminal as `read`/`write` callables, so it is tested without a model or a terminal.

A tools module exposes every public function defined in it (or the names in its ``__all__``)::

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
        \"\"\"Current weather of a city.

        Args:
            city: the city name, e.g. Paris
        \"\"\"
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from calltune.errors import CalltuneError
from calltune.schema import Message, Tool

Complete = Callable[[list[Message], list[Tool]], Message]


class ToolsError(CalltuneError):
    """A tools module can't be loaded or holds no usable function."""


# -- tools -----------------------------------------------------------------------------------------
def load_tools(source: str | Path) -> dict[str, Callable]:
    """The tool functions of a Python file (``tools.py``) or an importable module (``pkg.tools``).

    Raises:
        ToolsError: the file does not exist or fails to import, or it defines no public function.
    """
    path = Path(source)
    try:
        if path.suffix == ".py" or path.exists():
            if not path.is_file():
                raise ToolsError(f"tools file {path} not found")
            name = f"calltune_tools_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and typing look the module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(str(source))
    except ToolsError:
        raise
    except Exception as err:
        raise ToolsError(f"importing tools from {source} failed: {type(err).__name__}: {err}") from err
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, f in vars(module).items() if not n.startswith("_") and inspect.isfunction(f)
                 and f.__module__ == module.__name__]
    tools = {n: getattr(module, n) for n in names if callable(getattr(module, n, None))}
    if not tools:
        raise ToolsError(f"{source} defines no public function to use as a tool")
    return tools


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
               type(None): "null"}


def _type_schema(hint: Any) -> dict[str, Any]:
    """JSON Schema of a type hint (str, int, float, bool, list[X], dict, Literal, Optional, Union)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _type_schema(options[0])
        return {"anyOf": [_type_schema(a) for a in options]}
    if origin in (list, tuple, set):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    return {}


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) of a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)+)", doc, re.M)
    if section:
        for m in re.finditer(r"^[ \t]+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section.group(1), re.M):
            params[m.group(1)] = m.group(2).strip()
    if description.startswith(("Args:", "Arguments:", "Parameters:")):
        description = ""
    return description, params


def function_tool(name: str, fn: Callable) -> Tool:
    """The `Tool` for `fn`: parameters from its signature and hints, text from its docstring."""
    description, docs = _docstring_parts(fn.__doc__ or "")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    properties, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = _type_schema(hints.get(pname, param.annotation))
        if pname in docs:
            schema["description"] = docs[pname]
        properties[pname] = schema
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    parameters = {"type": "object", "properties": properties, **({"required": required} if required else {})}
    return Tool(function={"name": name, "description": description, "parameters": parameters})


def run_tool(tools: dict[str, Callable], name: str, arguments: dict[str, Any]) -> str:
    """Call tool `name` with `arguments`; the result as text (JSON unless it is a string).

    Never raises: an unknown tool, bad arguments or an exception inside the tool come back as
    ``error: ...`` text, which the model reads as the tool's result.
    """
    fn = tools.get(name)
    if fn is None:
        return f"error: there is no tool named {name!r}; the tools are {', '.join(tools)}"
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as err:
        return f"error: bad arguments for {name}: {err}"
    try:
        result = fn(**arguments)
    except Exception as err:
        return f"error: {type(err).__name__}: {err}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


# -- the loop --------------------------------------------------------------------------------------
def chat_loop(complete: Complete, tools: dict[str, Callable], read: Callable[[], str | None],
              write: Callable[[str], None], system: str | None = None, max_calls_per_turn: int = 8,
              messages: list[Message] | None = None) -> list[Message]:
    """Chat until `read` returns None (end of input) or ``/exit``; returns the whole conversation.

    Each user turn: the model answers; while its answer has tool calls, each call is shown
    (``-> name({...})``), run, and its result shown (``<- ...``) and appended as a ``tool`` message
    with the call's id; then the model continues. After `max_calls_per_turn` rounds of calls the turn
    stops with a note, so a model that keeps calling can't loop forever.
    """
    specs = [function_tool(name, fn) for name, fn in tools.items()]
    messages = list(messages or [])
    if system and not (messages and messages[0].role == "system"):
        messages.insert(0, Message(role="system", content=system))
    while True:
        text = read()
        if text is None or text.strip() in ("/exit", "/quit"):
            return messages
        if not text.strip():
            continue
        messages.append(Message(role="user", content=text))
        for _ in range(max_calls_per_turn):
            reply = complete(messages, specs)
            messages.append(reply)
            if not reply.tool_calls:
                write(reply.content or "")
                break
            if reply.content:
                write(reply.content)
            for i, call in enumerate(reply.tool_calls):
                call_id = call.id or f"call_{len(messages)}_{i}"
                if call.id is None:
                    call.id = call_id
                write(f"-> {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
                result = run_tool(tools, call.name, call.arguments)
                write(f"<- {result}")
                messages.append(Message(role="tool", tool_call_id=call_id, name=call.name, content=result))
        else:
            write(f"(stopped: the model made {max_calls_per_turn} rounds of tool calls without answering)")


def model_completer(model: str, max_tokens: int = 256, temperature: float = 0.0,
                    constrained: bool = True) -> Complete:
    """A `Complete` backed by a local model, through the same engine as `calltune serve`."""
    from calltune.infer.engine import Params, complete
    from calltune.infer.registry import ModelRegistry
    from calltune.schema import Example

    registry = ModelRegistry({"chat": model})
    served = registry.get("chat")
    from calltune.infer import constrained as cd

    params = Params(tool_choice="auto", max_tokens=max_tokens, temperature=temperature,
                    constrained=constrained and cd.available())

    def _complete(messages: list[Message], tools: list[Tool]) -> Message:
        return complete(registry, served, Example(messages=messages, tools=tools), params).message

    return _complete
