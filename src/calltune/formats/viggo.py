"""The ViGGO meaning-representation format: the answer is ``act(attr[value], ...)`` as the corpus
writes it (the Levanter ViGGO tutorial's target), inside the model's chat template.
"""

from __future__ import annotations

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.chat import FormatError
from calltune.schema import Message
from calltune.sources.viggo import MRParseError, parse_mr, render_mr


class ViggoFormat(PromptFormat):
    """System instruction + utterance as the prompt; the meaning representation as the answer."""

    name = "viggo"

    def assistant_text(self, message: Message) -> str:
        if not message.tool_calls or len(message.tool_calls) != 1:
            raise FormatError("a ViGGO answer is exactly one call")
        return render_mr(message.tool_calls[0])

    def parse(self, text: str) -> Parsed:
        text = text.strip()
        try:
            return Parsed(tool_calls=[parse_mr(text)])
        except MRParseError as err:
            return Parsed(content=text, error=str(err))
