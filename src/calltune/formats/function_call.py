"""The llama_functions layout (marclove/llama_functions, as the Scale LLM Engine fine-tuning tutorial
uses it), raw text (one string, wrapped here)::

    {bos}[INST] <<SYS>>\\n<<API>>\\n{instruction}\\n\\n```\\n{"functions":[...]}\\n```\\n<</API>>\\n<</SYS>>
    \\n\\n{user} [/INST]
     {"function_call":{"name":"f","arguments":{...}}} {eos}

An answer is `` {"function_call":{...}} `` (compact JSON, a space on each side, as the dataset has it)
or `` {text} ``, then the eos token; only the answers and their eos are trained (not those with
``weight`` 0). Later turns follow as ``{bos}[INST] {user} [/INST] {answer} {eos}`` (the dataset's
``</s><s>[INST] ...``; bos only when the tokenizer adds one by default, so SmolLM2 gets
``...<|im_end|>[INST] ...``). The chat template is not used; tokenization restarts at each answer,
where a prompt ends, so prompt ids are a prefix of the training ids.

- The ``<<API>>`` block appears when the example has tools; its instruction is the example's system
  text, else the dataset's fixed instruction (`INSTRUCTION`, typo kept: it is what the data shows).
  Functions are ``{"name", "description", "parameters"}`` with canonical JSON-Schema parameters (the
  dataset lists parameters as an array instead). Without tools a system text is a plain ``<<SYS>>``.
- Tool results, which the dataset does not have, are an extension in the same style: a user-side
  turn ``{"function_response":{"name":"f","content":...}}`` (content as JSON when the result is a
  JSON object/array); consecutive user/tool messages share one ``[INST]`` joined by a blank line.
- One call per answer; parallel calls, text beside a call, two assistant turns in a row or a system
  turn after the start raise `FormatError`.

`parse`: text that starts with ``{`` is read as a call object and must be
``{"function_call":{"name":...,"arguments":{...}}}`` with nothing after it; ``"function_call"``
after other text is an error; any other text is a plain answer (``content``).
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.chat import FormatError, bos_prefix, end_of_turn, render_segments, trained_turns
from calltune.formats.tool_json import CallError, call_from_object, result_value, snippet, tool_names
from calltune.schema import Example, Message

INSTRUCTION = ("You may answer by calling one of the following functions. If you can infer a function's required "
               "arguments, respond with a the function name and arguments. If multiple functions can be called, "
               "pick the one that best answers the question.")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class FunctionCallFormat(PromptFormat):
    """Llama-2 ``[INST] <<SYS>><<API>>...`` prompts, `` {"function_call": ...} `` answers, raw text."""

    name = "function_call"

    def assistant_text(self, message: Message) -> str:
        calls = message.tool_calls or []
        if len(calls) > 1:
            raise FormatError(f"the function_call format has one call per answer; this turn has {len(calls)} "
                              f"parallel calls ({', '.join(c.name for c in calls)})")
        if calls and message.content and message.content.strip():
            raise FormatError("the function_call format can't put text beside a call")
        if calls:
            return " " + _compact({"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}) + " "
        return " " + (message.content or "").strip() + " "

    def _system(self, system: str | None, tools: list[dict[str, Any]]) -> str:
        if tools:
            functions = _compact({"functions": [t["function"] for t in tools]})
            system = f"<<API>>\n{system or INSTRUCTION}\n\n```\n{functions}\n```\n<</API>>"
        return f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""

    def segments(self, example: Example, tokenizer: PreTrainedTokenizerBase,
                 train_on: str = "all") -> tuple[list[tuple[str, bool]], list[int]]:
        """The conversation as ``[(text, trained), ...]`` (ending with ``[/INST]`` if the last turn isn't an
        answer), and the indices of the answer segments, where tokenization restarts (see `render_segments`)."""
        messages = example.messages
        system = messages[0].content if messages and messages[0].role == "system" else None
        body = messages[1:] if system is not None else messages
        names = tool_names(messages)
        offset = 1 if system is not None else 0
        trained = iter(trained_turns(body, train_on))  # one flag per answer, in order
        bos, eos = bos_prefix(tokenizer), end_of_turn(tokenizer)
        segments: list[tuple[str, bool]] = []
        cuts: list[int] = []
        pending: list[str] = []  # user/tool texts of the [INST] being built
        first = True

        def close_inst() -> None:
            nonlocal first
            head = self._system(system, example.tools_as_dicts()) if first else ""
            segments.append((f"{bos}[INST] {head}" + "\n\n".join(pending) + " [/INST]", False))
            pending.clear()
            first = False

        for k, m in enumerate(body):
            turn = f"turn {k + offset} ({m.role})"
            if m.role == "system":
                raise FormatError(f"{example.where}: {turn}: the function_call format has one system text, "
                                  "at the start")
            if m.role == "assistant":
                if not pending:
                    raise FormatError(f"{example.where}: {turn}: an answer must follow a user or tool turn")
                close_inst()
                try:
                    answer = self.assistant_text(m)
                except FormatError as err:
                    raise FormatError(f"{example.where}: {turn}: {err}") from None
                cuts.append(len(segments))
                segments.append((answer + eos, next(trained)))
            elif m.role == "tool":
                payload = {"name": names.get(k + offset)} if names.get(k + offset) else {}
                payload["content"] = result_value(m.content)
                pending.append(_compact({"function_response": payload}))
            else:
                pending.append((m.content or "").strip())
        if pending:
            close_inst()
        return segments, cuts

    def _render(self, example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                train_on: str = "all") -> tuple[list[int], list[int]]:
        segments, cuts = self.segments(example, tokenizer, train_on)
        return render_segments(tokenizer, segments, max_length=max_length, cuts=cuts)

    def _prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        messages = list(example.messages)
        if messages and messages[-1].role == "assistant":
            messages = messages[:-1]
        context = example.model_copy(update={"messages": messages})
        segments, cuts = self.segments(context, tokenizer)
        return render_segments(tokenizer, segments, cuts=cuts)[0]

    def parse(self, text: str) -> Parsed:
        stripped = text.strip()
        if not stripped.startswith("{"):
            if '"function_call"' in stripped:
                return Parsed(content=text, error=f"text before the function_call object: {snippet(stripped)}")
            return Parsed(content=stripped or None)
        try:
            try:
                obj, end = json.JSONDecoder().raw_decode(stripped)
            except json.JSONDecodeError as err:
                raise CallError(f"function_call is not JSON ({err.msg} at character {err.pos}): "
                                f"{snippet(stripped)}") from None
            if stripped[end:].strip():
                raise CallError(f"text after the function_call object: {snippet(stripped[end:])}")
            if not isinstance(obj, dict) or "function_call" not in obj:
                raise CallError(f"a JSON answer without a 'function_call' key: {snippet(stripped)}")
            return Parsed(tool_calls=[call_from_object(obj["function_call"], "function_call")])
        except CallError as err:
            return Parsed(content=text, error=str(err))
