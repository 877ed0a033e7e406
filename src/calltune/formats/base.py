"""What a prompt format is: one object that renders examples for training and parses completions.

Owns `PromptFormat` (the base every format extends), `Parsed` (what `parse` returns) and the
format file saved beside a trained model (`save_format` / `load_format`), so inference and serving
use exactly the format training used. `save_format` also writes the format as the saved tokenizer's
chat template, for runtimes that read only that (see `calltune.formats.jinja`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from calltune.formats.chat import FormatError, render_chat, render_prompt, trained_turns
from calltune.formats.literal import literal_scope
from calltune.schema import Example, Message, ToolCall

FORMAT_FILE = "calltune_format.json"


@dataclass
class Parsed:
    """A completion parsed back: the tool calls, any plain text, and why parsing failed (or None).

    `error` is set when the text was meant to be a call but isn't well formed; such an output counts
    as unparseable in the metrics. A plain-text answer with no call has ``tool_calls == []`` and no
    error.
    """

    tool_calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None
    error: str | None = None


class PromptFormat:
    """Base of the prompt formats. A format owns both directions:

    - `assistant_text(message)`: the text an assistant turn (content and/or tool calls) becomes;
    - `render(example, tokenizer) -> (input_ids, loss_mask)` for training (assistant-only loss;
      an assistant turn with ``weight`` 0 is never trained, see `calltune.formats.chat.trained_turns`);
    - `prompt(example, tokenizer) -> input_ids`: the context before the final assistant turn, with
      the generation prompt, for inference;
    - `parse(text) -> Parsed`: a completion back to tool calls.

    Subclasses set `name` and override `assistant_text`, `parse`, and where needed `to_chat` (or
    `_render`/`_prompt` for layouts that bypass the chat template; `render`/`prompt` themselves can't be
    overridden: they keep special-token strings in the data plain text, see `calltune.formats.literal`).
    """

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """Constructor arguments, saved with the model."""
        return {}

    # -- rendering -----------------------------------------------------------------------------
    def assistant_text(self, message: Message) -> str:
        raise NotImplementedError

    def to_chat(self, messages: list[Message], tools: list[dict[str, Any]]) -> tuple[list[dict], list[dict] | None]:
        """Turn canonical messages into text chat dicts for the template, and the `tools=` to pass.

        The assistant turns must stay one-to-one and in order (other roles may be merged or added):
        `render` marks them trained by the canonical assistant messages' weights.
        """
        out = []
        for m in messages:
            if m.role == "assistant":
                out.append({"role": "assistant", "content": self.assistant_text(m)})
            else:
                out.append({"role": m.role, "content": m.content or ""})
        return out, None

    def render(self, example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
               train_on: str = "all") -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` of the whole conversation; see `calltune.formats.chat.render_chat`.

        Special-token strings in the example's data come out as plain text, never as special tokens
        (`calltune.formats.literal`). Formats override `_render`, not this.
        """
        with literal_scope(example, tokenizer) as example:
            return self._render(example, tokenizer, max_length=max_length, train_on=train_on)

    def prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids of the conversation before its final assistant turn, plus the generation prompt.

        Supplied special-token strings stay plain text, as in `render`. Formats override `_prompt`.
        """
        with literal_scope(example, tokenizer) as example:
            return self._prompt(example, tokenizer)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # render/prompt hold the one guard against supplied control strings; formats extend the hooks
        for attr in ("render", "prompt"):
            if attr in vars(cls):
                raise TypeError(f"{cls.__name__} overrides PromptFormat.{attr}; override _{attr} instead, so "
                                "special-token strings in the data stay plain text")

    def _render(self, example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                train_on: str = "all") -> tuple[list[int], list[int]]:
        """`render` of an example whose special-token strings are placeholders (what formats override)."""
        try:
            chat, tools = self.to_chat(example.messages, example.tools_as_dicts())
            return render_chat(tokenizer, chat, tools, train_on=train_on, max_length=max_length,
                               trained=trained_turns(example.messages))
        except FormatError as err:
            raise FormatError(f"{example.where}: {err}") from None

    def _prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """`prompt` of an example whose special-token strings are placeholders (what formats override)."""
        messages = list(example.messages)
        if messages and messages[-1].role == "assistant":
            messages = messages[:-1]
        chat, tools = self.to_chat(messages, example.tools_as_dicts())
        return render_prompt(tokenizer, chat, tools)

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, text: str) -> Parsed:
        raise NotImplementedError


def save_format(fmt: PromptFormat, directory: str | Path) -> Path:
    """Write the format's name and options to ``directory/calltune_format.json``; returns that path.

    When `directory` holds a saved tokenizer (``tokenizer_config.json``; call this after
    ``tokenizer.save_pretrained``), its chat template becomes the format's (`calltune.formats.jinja`),
    so ``AutoTokenizer.from_pretrained(directory).apply_chat_template(...)`` renders what the format
    renders, and the base template it replaced is kept in the format file under ``base_chat_template``
    (`calltune.models.load_tokenizer` puts it back for calltune's own rendering). Saving twice into the
    same folder keeps the original base template.
    """
    from calltune.formats.jinja import BASE_KEY, folder_base_template, write_chat_template

    path = Path(directory) / FORMAT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    has_tokenizer, base = folder_base_template(path.parent, previous)
    data: dict[str, Any] = {"name": fmt.name, "options": fmt.options()}
    if has_tokenizer:
        data[BASE_KEY] = base
    # the format file (with the base template) first, so a failure below never loses the base
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if has_tokenizer:
        write_chat_template(fmt, path.parent, base)
    return path


def load_format(directory: str | Path) -> PromptFormat | None:
    """The format saved with a model, or None if the folder has no format file."""
    from calltune.formats import get_format

    path = Path(directory) / FORMAT_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return get_format(data["name"], **data.get("options", {}))
