"""One chat completion, from a canonical `Example` to an assistant `Message` with structured tool calls.

Owns the completion logic shared by the HTTP server (`calltune.serve`) and `calltune chat`: which
tools the prompt offers and which grammar constrains the output for a `tool_choice` (`plan`),
generation in the model's shared continuous batch (`complete`: the request joins its model's
`calltune.infer.scheduler.BatchScheduler`, so concurrent requests decode together, each with its
own budget, sampling, stop strings, grammar and adapter), parsing with the model's own prompt format
(the one it was trained with), and streaming (`stream_complete`: content deltas as the model writes
them, tool calls once parsed); and `RequestError`, a request that can't be served, which the server
turns into an OpenAI error body (429 with ``Retry-After`` when the model's batch and queue are full).

tool_choice:
- ``none``: the prompt offers no tools and the output is not parsed for calls (constrained: it can't
  open a call either);
- ``auto``: tools offered; the model answers in text or calls (constrained: calls must be well formed);
- ``required``: at least one call (constrained: the output is call blocks from the first token);
- a named function: exactly like required, with that function the only one allowed.
Without constrained decoding ``required`` and named choices can only be hoped for: the output is
parsed as in ``auto``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from calltune.errors import CalltuneError
from calltune.infer import constrained as cd
from calltune.infer.registry import ModelRegistry, ServedModel
from calltune.infer.scheduler import Cancelled, QueueFull, Ticket
from calltune.schema import Example, Message, ToolCall

log = logging.getLogger(__name__)


class RequestError(CalltuneError):
    """A request the server can't serve; becomes an OpenAI error body with `status` (and `headers`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers


@dataclass
class Params:
    """How to complete one request (the OpenAI request fields, defaults applied)."""

    tool_choice: str = "auto"  # none, auto, required, function
    function: str | None = None  # the function a named tool_choice forces
    parallel_tool_calls: bool = True
    max_tokens: int | None = None  # as requested; None: default_max_tokens, or what the context has room for
    default_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    constrained: bool = True
    json_schema: dict[str, Any] | None = None  # response_format json_object / json_schema


@dataclass
class Completion:
    """The assistant turn (tool calls carry ``call_...`` ids), why it ended, and token counts."""

    message: Message
    finish_reason: str  # stop, length or tool_calls
    prompt_tokens: int
    completion_tokens: int
    text: str  # the raw completion
    constrained: bool


@dataclass
class Plan:
    prompt: list[int]
    grammar: str | None
    parse_calls: bool
    max_tokens: int  # completion tokens allowed: as requested, and within the model's context


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def plan(served: ServedModel, example: Example, params: Params) -> Plan:
    """The prompt ids, the grammar (or None), whether to parse calls (for `params.tool_choice`), and
    the completion budget.

    Raises:
        RequestError: ``context_length_exceeded`` (as OpenAI's) when the prompt, or the prompt and an
            explicit `params.max_tokens`, don't fit the model's context (the message gives both
            numbers); a JSON Schema that can't be enforced.
    """
    offer = bool(example.tools) and params.tool_choice != "none"
    shown = example if offer else example.model_copy(update={"tools": []})
    prompt = served.fmt.prompt(shown, served.tokenizer)
    context = served.context_length
    if params.max_tokens is not None and len(prompt) + params.max_tokens > context:
        raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the messages, "
                           f"{params.max_tokens} in the completion). Please reduce the length of the messages "
                           "or completion.", param="messages", code="context_length_exceeded")
    if len(prompt) >= context:
        raise RequestError(f"This model's maximum context length is {context} tokens. However, your messages "
                           f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                           param="messages", code="context_length_exceeded")
    max_tokens = params.max_tokens or min(params.default_max_tokens, context - len(prompt))
    grammar = None
    if offer and params.constrained and cd.supports(served.fmt):
        tools = example.tools
        if params.tool_choice == "function":
            tools = [t for t in tools if t.name == params.function]
        mode = "auto" if params.tool_choice == "auto" else "required"
        grammar = cd.checked_tool_call_grammar(served.tokenizer, served.fmt, tools, mode, params.parallel_tool_calls)
    elif offer and params.constrained:
        log.warning("%s: constrained decoding does not know format %r; generating unconstrained",
                    served.name, served.fmt.name)
    elif not offer and params.json_schema is not None and params.constrained:
        grammar = cd.json_grammar(params.json_schema)
        try:
            cd.compile_grammar(served.tokenizer, grammar)
        except cd.ConstrainedDecodingError as err:
            raise RequestError(f"response_format: the JSON Schema can't be enforced: {err}",
                               param="response_format") from None
    elif example.tools and params.tool_choice == "none" and params.constrained and cd.supports(served.fmt):
        grammar = cd.no_call_grammar(served.fmt)  # a model tuned to call may try anyway: it can't
    return Plan(prompt=prompt, grammar=grammar, parse_calls=offer, max_tokens=max_tokens)


def finish(served: ServedModel, plan_: Plan, text: str, finish_reason: str, prompt_tokens: int,
           completion_tokens: int) -> Completion:
    """Parse a completion into an assistant message (calls get ids) and its finish reason.

    A completion cut at the token limit keeps finish_reason ``length`` (even after complete calls), and
    the call it was writing is dropped, not returned as content: only calls that parsed whole are kept.
    """
    calls: list[ToolCall] = []
    content: str | None = text.strip() or None
    if plan_.parse_calls:
        if finish_reason == "length":
            text = _without_cut_call(text)
        parsed = served.fmt.parse(text)
        if parsed.error and finish_reason == "length":  # a cut call in a format without call markers
            content = None
        elif parsed.error:
            log.info("%s: unparseable call (%s); returned as text", served.name, parsed.error)
        else:
            calls = [ToolCall.of(c.name, c.arguments, id=new_call_id()) for c in parsed.tool_calls]
            content = (parsed.content or "").strip() or None
    message = Message(role="assistant", content=content if (content or calls) else "", tool_calls=calls or None)
    reason = "tool_calls" if calls and finish_reason != "length" else finish_reason
    return Completion(message=message, finish_reason=reason, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, text=text, constrained=plan_.grammar is not None)


def _without_cut_call(text: str) -> str:
    """`text` without a last ``<tool_call>`` block that has no ``</tool_call>``, or a trailing piece
    of ``<tool_call>`` itself: what generation stopped in the middle of."""
    opener, closer = ContentSplitter.OPEN, "</tool_call>"
    last = text.rfind(opener)
    if last >= 0 and text.find(closer, last) < 0:
        return text[:last]
    for k in range(len(opener) - 1, 0, -1):
        if text.endswith(opener[:k]):
            return text[:-k]
    return text


def _submit(registry: ModelRegistry, served: ServedModel, plan_: Plan, params: Params, streamer,
            cancel: Callable[[], bool] | None) -> Ticket:
    """Put `plan_` into `served`'s continuous batch.

    Raises:
        RequestError: 429 (OpenAI's rate-limit shape, with ``Retry-After``) when the batch and its queue
            are full.
    """
    try:
        return registry.scheduler(served).submit(
            plan_.prompt, plan_.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            stop=params.stop, grammar=plan_.grammar, adapter=served.adapter, tokenizer=served.tokenizer,
            streamer=streamer, cancel=cancel)
    except QueueFull as err:
        raise RequestError(str(err), status=429, type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(err.retry_after)}) from None


def complete(registry: ModelRegistry, served: ServedModel, example: Example, params: Params,
             streamer=None, cancel: Callable[[], bool] | None = None) -> Completion:
    """Generate one assistant turn for `example` (its messages end on a user or tool turn), in the
    continuous batch of `served`'s model (other requests may decode alongside; a greedy completion
    is the one it would be alone). Blocks until the turn is complete.

    `streamer`: a transformers streamer fed the completion's tokens as they are chosen.
    `cancel`: polled before generation and at every decode step; once it returns True the request
    leaves the batch (the client left or the server is stopping) and `Cancelled` is raised.

    Raises:
        RequestError: as `plan`; 429 when the model's batch and queue are full. Cancelled: see `cancel`.
    """
    plan_ = plan(served, example, params)
    if cancel is not None and cancel():
        raise Cancelled("cancelled before generation")
    gen = _submit(registry, served, plan_, params, streamer, cancel).result()
    return finish(served, plan_, gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)


class ContentSplitter:
    """Turn streamed text into content deltas, holding back what may become a tool call.

    With `parse_calls`, everything from ``<tool_call>`` on is withheld (the calls are sent parsed
    at the end), and so is a trailing piece that could be the start of ``<tool_call>``. Leading and
    trailing whitespace is withheld too, so the deltas add up to the non-streamed ``content``.
    """

    OPEN = "<tool_call>"

    def __init__(self, parse_calls: bool):
        self.parse_calls = parse_calls
        self.text = ""
        self.sent = 0  # characters of self.text already sent (after the leading whitespace)
        self.lead = 0

    def feed(self, piece: str) -> str:
        self.text += piece
        if not self.sent:
            self.lead = len(self.text) - len(self.text.lstrip())
        safe = len(self.text.rstrip())
        if self.parse_calls:
            at = self.text.find(self.OPEN)
            if at >= 0:
                safe = min(safe, len(self.text[:at].rstrip()))
            else:
                for k in range(len(self.OPEN) - 1, 0, -1):
                    if self.text.endswith(self.OPEN[:k]):
                        safe = min(safe, len(self.text[:len(self.text) - k].rstrip()))
                        break
        start = max(self.sent, self.lead)
        if safe <= start:
            return ""
        self.sent = safe
        return self.text[start:safe]

    def rest(self, content: str | None) -> str:
        """What is left to send once the final `content` is known."""
        sent = self.text[self.lead:self.sent] if self.sent else ""
        content = content or ""
        return content[len(sent):] if content.startswith(sent) else ""


def stream_complete(registry: ModelRegistry, served: ServedModel, example: Example,
                    params: Params, cancel: Callable[[], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("start", None)`` once the request is accepted (in the model's batch or its queue),
    ``("content", delta)`` while the model writes, then ``("done", Completion)``.

    The model's decode loop feeds a `TextIteratorStreamer`; content reaches the client as it is
    generated, tool calls when the turn is complete (they are parsed from the whole text). Request
    errors, the 429 of a full queue included, are raised before ``start``.
    """
    from transformers import TextIteratorStreamer

    plan_ = plan(served, example, params)
    if cancel is not None and cancel():
        raise Cancelled("cancelled before generation")
    streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True)
    ticket = _submit(registry, served, plan_, params, streamer, cancel)
    yield "start", None
    splitter = ContentSplitter(parse_calls=plan_.parse_calls)
    for piece in streamer:  # ends when the request leaves the batch, however it leaves
        delta = splitter.feed(piece)
        if delta:
            yield "content", delta
    gen = ticket.result()
    completion = finish(served, plan_, gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
    rest = splitter.rest(completion.message.content)
    if rest:
        yield "content", rest
    yield "done", completion
