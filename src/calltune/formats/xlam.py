"""The xLAM raw-text layout of the Phi-3 QLoRA recipe on xlam-function-calling-60k, without the chat template::

    <user>{query}</user>\\n\\n<tools>{tool}\\n{tool}</tools>\\n\\n<calls>{call}\\n{call}</calls>{eos}

(a bos token in front when the tokenizer adds one by default). Only ``<calls>...</calls>`` and the
eos are trained (nothing when the assistant turn has ``weight`` 0); `prompt` is everything up to
and including ``<calls>``, so a completion is ``{call}\\n{call}</calls>``. Tokenization restarts
after ``<calls>`` so the prompt ids are exactly a prefix of the training ids. A no-call answer
(xLAM's ``answers == "[]"``) is ``<calls></calls>``.

Tools are ``{"name", "description", "parameters"}`` with the canonical JSON-Schema parameters (not
xLAM's flat map), calls ``{"name", "arguments"}``, each written with `json.dumps`. That recipe wrote
them with Python ``str()`` (``{'name': 'f', 'arguments': {'flag': True}}``), which is neither JSON
nor safely parseable; JSON reads back exactly with `json.loads`.

Only single-turn examples fit: one user turn, then one assistant turn that has calls and no text
(or empty text: the no-call case). Anything else (a system turn, several turns, tool results, a text
answer) raises `FormatError` naming the example.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.chat import FormatError, bos_prefix, end_of_turn, render_segments, trained_turns
from calltune.formats.tool_json import CallError, call_from_object, dumps
from calltune.schema import Example, Message

OPEN, CLOSE = "<calls>", "</calls>"


class XlamFormat(PromptFormat):
    """``<user>..</user>\\n\\n<tools>..</tools>\\n\\n<calls>..</calls>`` + eos, raw text, JSON calls one per line."""

    name = "xlam"

    def assistant_text(self, message: Message) -> str:
        if message.content and message.content.strip():
            raise FormatError("the xlam format answers with calls only, but the assistant turn has text content")
        calls = [dumps({"name": c.name, "arguments": c.arguments}) for c in message.tool_calls or []]
        return OPEN + "\n".join(calls) + CLOSE

    def _context(self, example: Example) -> str:
        roles = [m.role for m in example.messages]
        if roles not in (["user", "assistant"], ["user"]):
            raise FormatError(f"{example.where}: the xlam format takes one user turn and one assistant turn; "
                              f"this example has turns {', '.join(roles)}")
        tools = "\n".join(dumps(t["function"]) for t in example.tools_as_dicts())
        return f"<user>{example.messages[0].content}</user>\n\n<tools>{tools}</tools>\n\n"

    def _render(self, example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                train_on: str = "all") -> tuple[list[int], list[int]]:
        context = self._context(example)
        if len(example.messages) != 2:
            raise FormatError(f"{example.where}: nothing to train, the example has no assistant turn")
        try:
            answer = self.assistant_text(example.messages[1])
        except FormatError as err:
            raise FormatError(f"{example.where}: {err}") from None
        trained = trained_turns(example.messages, train_on)[0]  # False for weight 0: nothing is trained
        # tokenization restarts after <calls>, where the prompt ends (see render_segments)
        segments = [(bos_prefix(tokenizer) + context, False), (OPEN, trained),
                    (answer.removeprefix(OPEN) + end_of_turn(tokenizer), trained)]
        return render_segments(tokenizer, segments, max_length=max_length, cuts=[2])

    def _prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        return render_segments(tokenizer, [(bos_prefix(tokenizer) + self._context(example), False), (OPEN, True)])[0]

    def parse(self, text: str) -> Parsed:
        """``[<calls>]{call}\\n{call}[</calls>]`` -> calls; text after ``</calls>`` is ignored."""
        body = text.strip().removeprefix(OPEN)
        end = body.find(CLOSE)
        if end >= 0:
            body = body[:end]
        body = body.strip()
        if not body:
            return Parsed()  # <calls></calls>: no call
        calls, pos, decoder = [], 0, json.JSONDecoder()
        try:
            while pos < len(body):
                what = f"call {len(calls)}"
                try:
                    obj, pos = decoder.raw_decode(body, pos)
                except json.JSONDecodeError as err:
                    raise CallError(f"{what} is not JSON ({err.msg} at character {err.pos}): "
                                    f"{body[pos:pos + 80]!r}") from None
                calls.append(call_from_object(obj, what))
                while pos < len(body) and body[pos].isspace():
                    pos += 1
        except CallError as err:
            return Parsed(content=text, error=str(err))
        return Parsed(tool_calls=calls)
