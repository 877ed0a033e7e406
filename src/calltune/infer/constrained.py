"""Constrained decoding: generation that can only produce well-formed calls of the offered tools.

Owns the grammar of a prompt format's tool calls (`tool_call_grammar`), the `GrammarConstraint` logits
hook that masks every token the grammar forbids (`row_constraint`: the same for one row of the
server's `ContinuousDecoder`), and `generate_constrained`: calltune's batched generation
(`calltune.infer.generate.generate`) with one grammar (or none) per prompt.

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance, MIT): a small wheel
with no dependencies that computes token masks on the CPU and takes Lark grammars with inline JSON
Schemas (``%json {...}``), so a format's whole output -- optional text, ``<tool_call>`` wrappers, the
call JSON -- is one grammar. Why it and not xgrammar, outlines or lm-format-enforcer: docs/design.md.

For the hermes format each call is ``<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>``, with N
one of the offered tool names and A valid against that tool's ``parameters`` schema (with
``additionalProperties: false`` added at the top when the schema does not say, so the model can't
invent argument names). JSON is forced into the formats' own spacing (``", "``, ``": "``), the spacing
the model was trained on. Modes:

- ``auto``: free text, or text followed by call blocks; once ``<tool_call>`` is written the rest must
  be calls (a lazy trigger, so plain answers are not constrained at all);
- ``required``: the output is call blocks and nothing else (first token on);
- ``parallel=False`` allows one call instead of one or more;
- `no_call_grammar` (``tool_choice: none``): any text that does not open a call.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from typing import Any, Literal

import torch

from calltune.errors import CalltuneError
from calltune.formats import PromptFormat
from calltune.infer.generate import Generation, generate
from calltune.schema import Tool

log = logging.getLogger(__name__)

Mode = Literal["auto", "required"]

# The formats' JSON spacing (json.dumps defaults), and no free whitespace the model could loop in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstrainedDecodingError(CalltuneError):
    """Constrained decoding can't be set up: the library is missing, or a grammar does not compile."""


def available() -> bool:
    """Whether llguidance is installed (``pip install 'calltune[serve]'``)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    try:
        import llguidance
    except ImportError:
        raise ConstrainedDecodingError("constrained decoding needs llguidance: pip install 'calltune[serve]' "
                                       "(or pip install llguidance), or turn it off with --no-constrained") from None
    return llguidance


def supports(fmt: PromptFormat) -> bool:
    """Whether `tool_call_grammar` knows `fmt`'s call syntax (the ``<tool_call>`` JSON blocks of hermes)."""
    return fmt.name == "hermes"


# -- grammars ------------------------------------------------------------------------------------
def _arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(parameters) if parameters else {"type": "object", "properties": {}}
    if schema.get("type", "object") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def call_schema(tools: list[Tool], render_name=lambda name: name, loose: bool = False) -> dict[str, Any]:
    """JSON Schema of one call ``{"name": ..., "arguments": ...}`` of any of `tools` (``anyOf``).

    `loose` replaces every argument schema by "any object", for schemas llguidance can't compile.
    """
    options = []
    for tool in tools:
        arguments = {"type": "object"} if loose else _arguments_schema(tool.function.parameters)
        options.append({"type": "object",
                        "properties": {"name": {"const": render_name(tool.name)}, "arguments": arguments},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return {"anyOf": options, "x-guidance": JSON_OPTIONS}


def tool_call_grammar(fmt: PromptFormat, tools: list[Tool], mode: Mode = "auto", parallel: bool = True,
                      loose: bool = False) -> str:
    """The Lark grammar (llguidance dialect) of `fmt`'s completions that call only `tools`.

    Raises:
        ConstrainedDecodingError: `fmt` is not a format with a known call syntax, or `tools` is empty.
    """
    if not supports(fmt):
        raise ConstrainedDecodingError(f"constrained decoding knows the call syntax of the hermes format only, "
                                       f"not {fmt.name!r}; serve with --no-constrained")
    if not tools:
        raise ConstrainedDecodingError("a tool-call grammar needs at least one tool")
    schema = call_schema(tools, getattr(fmt, "_render_name", lambda name: name), loose=loose)
    more = '("\\n<tool_call>" body)*' if parallel else ""
    rules = ["body: \"\\n\" call \"\\n</tool_call>\"", f"call: %json {json.dumps(schema)}"]
    if mode == "required":
        start = f'start: "<tool_call>" body {more}'
    else:  # text, or text then calls: the lazy trigger ends TEXT at the first "<tool_call>"
        start = f"start: TEXT | call_hd body {more}"
        rules += ["TEXT: /(.|\\n)*/", 'call_hd[lazy]: TEXT "<tool_call>"']
    return "\n".join([start, *rules]) + "\n"


def no_call_grammar(fmt: PromptFormat) -> str:
    """Grammar of a plain-text answer: any text without the format's call opener (``tool_choice: none``)."""
    if not supports(fmt):
        raise ConstrainedDecodingError(f"constrained decoding knows the call syntax of the hermes format only, "
                                       f"not {fmt.name!r}")
    return "start: PLAIN\nPLAIN: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n"


def json_grammar(schema: dict[str, Any]) -> str:
    """Grammar of a JSON value valid against `schema` (for ``response_format: json_schema``)."""
    llguidance = _require()
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


# -- matching --------------------------------------------------------------------------------------
_TOKENIZERS: dict[int, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's view of a HF fast tokenizer, built once per tokenizer object (building it is slow)."""
    llguidance = _require()
    import llguidance.hf

    with _TOKENIZERS_LOCK:
        key = id(tokenizer)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
        return _TOKENIZERS[key][1]


@functools.lru_cache(maxsize=256)
def _pristine_matcher(tokenizer, grammar: str):
    """`grammar` compiled against `tokenizer` into a matcher that is never advanced (the 256 most recent)."""
    llguidance = _require()
    lt = ll_tokenizer(tokenizer)
    text = grammar
    if not text.lstrip().startswith("{"):  # Lark text -> llguidance's JSON grammar
        text = llguidance.LLMatcher.grammar_from_lark(text)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lt)
    if is_error:
        raise ConstrainedDecodingError(f"grammar does not compile: {messages[0] if messages else '?'}")
    matcher = llguidance.LLMatcher(lt, text, log_level=0)
    if matcher.is_error():
        raise ConstrainedDecodingError(f"grammar does not compile: {matcher.get_error()}")
    return matcher


def compile_grammar(tokenizer, grammar: str):
    """A fresh `LLMatcher` for `grammar`; raises ConstrainedDecodingError if it does not compile.

    Each grammar text is compiled once per tokenizer (so checking a request's grammar and then
    decoding under it compile it once); every call returns a deep copy of that untouched matcher,
    so every caller gets its own decoding state. The most recent 256 grammars are kept; a grammar
    that fails to compile is not cached.
    """
    return _pristine_matcher(tokenizer, grammar).deep_copy()


def checked_tool_call_grammar(tokenizer, fmt: PromptFormat, tools: list[Tool], mode: Mode = "auto",
                              parallel: bool = True) -> str:
    """`tool_call_grammar`, compiled once against `tokenizer` to check it. Argument schemas llguidance
    can't compile are loosened to "any object" (with a warning) rather than failing the request."""
    grammar = tool_call_grammar(fmt, tools, mode, parallel)
    try:
        compile_grammar(tokenizer, grammar)
    except ConstrainedDecodingError as err:
        log.warning("tool schemas not supported by llguidance (%s); constraining names and JSON only", err)
        grammar = tool_call_grammar(fmt, tools, mode, parallel, loose=True)
        compile_grammar(tokenizer, grammar)
    return grammar


class GrammarConstraint:
    """A `calltune.infer.generate` logits hook: mask each row's scores to the tokens its grammar allows.

    `matchers` maps a prompt's index to its llguidance `LLMatcher` (prompts without one are free).
    Each step the hook first feeds every constrained row the token it chose at the previous step
    (none at a row's first step), then masks its scores. Once a row's grammar is complete (the matcher
    has stopped), only end-of-turn is allowed, which ends the row.
    """

    def __init__(self, matchers: dict[int, Any], eos_token_id: int):
        self.matchers = matchers
        self.eos = eos_token_id
        self.failed: set[int] = set()

    def __call__(self, rows: list[int], scores: torch.Tensor, last: list[int] | None) -> torch.Tensor:
        vocab = scores.shape[-1]
        words = (vocab + 31) // 32
        for slot, row in enumerate(rows):
            matcher = self.matchers.get(row)
            if matcher is None:
                continue
            token = None if last is None else last[slot]
            if token is not None and not matcher.is_stopped() and not matcher.consume_token(token):
                self.failed.add(row)  # should not happen: the token was masked in
            if matcher.is_stopped() or row in self.failed:  # complete (or broken): only end-of-turn is left
                allowed = torch.zeros(vocab, dtype=torch.bool)
                allowed[self.eos] = True
            else:
                bitmask = torch.from_numpy(_bitmask(matcher, words))
                bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
                allowed = bits.reshape(-1)[:vocab].bool()
            scores[slot].masked_fill_(~allowed.to(scores.device), float("-inf"))
        return scores


def row_constraint(tokenizer, grammar: str):
    """A per-row logits hook for `calltune.infer.generate.DecodeRequest`: ``hook(scores, last) -> scores``
    masks one row's (vocab,) scores, in place, to what `grammar` allows after the tokens so far (`last`:
    the token chosen at the previous step, None at the first); once the grammar is complete only
    `tokenizer`'s end-of-turn is allowed. The grammar is compiled here (`compile_grammar`), so a bad one
    raises ConstrainedDecodingError before the row is submitted."""
    constraint = GrammarConstraint({0: compile_grammar(tokenizer, grammar)}, tokenizer.eos_token_id)

    def hook(scores: torch.Tensor, last: int | None) -> torch.Tensor:
        return constraint([0], scores[None], None if last is None else [last])[0]

    return hook


def _bitmask(matcher, words: int):
    """The matcher's next-token bitmask (bit t of word t // 32 set: token t allowed), `words` int32s."""
    import numpy as np

    mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)
    if len(mask) < words:  # the model has more logits than the tokenizer has tokens: those stay masked
        mask = np.concatenate([mask, np.zeros(words - len(mask), dtype=np.int32)])
    return mask[:words].copy()


# -- generation ------------------------------------------------------------------------------------
def generate_constrained(model, tokenizer, prompts: list[list[int]], grammars: list[str | None] | None = None,
                         max_new_tokens: int = 128, batch_size: int = 16, temperature: float = 0.0,
                         top_p: float = 1.0, stop: list[str] | None = None, streamer=None,
                         progress: bool = False, workers: int | None = None, cancel=None) -> list[Generation]:
    """Complete each prompt with `calltune.infer.generate.generate`, each under its grammar (None: free).

    Args:
        grammars: one Lark grammar (from `tool_call_grammar`, `json_grammar`) or None per prompt.
        temperature: 0 is greedy; sampling applies the mask first, then temperature and `top_p`.
        stop: strings that end a completion (cut from the returned text, finish_reason ``stop``).
        streamer: a transformers streamer (e.g. `TextIteratorStreamer`); only with a single prompt.
        workers: decoders in parallel threads (`generate`'s argument; each row's matcher is used by one).
        cancel: `generate`'s argument: polled every step, True stops generation.

    Returns:
        One `Generation` per prompt, in order.

    Raises:
        ValueError: not one grammar per prompt. ConstrainedDecodingError: a grammar does not compile.
    """
    grammars = grammars or [None] * len(prompts)
    if len(grammars) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(grammars)} grammars")
    matchers = {i: compile_grammar(tokenizer, g) for i, g in enumerate(grammars) if g is not None}
    hook = GrammarConstraint(matchers, tokenizer.eos_token_id) if matchers else None
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=temperature, top_p=top_p, stop=stop, logits_hook=hook, streamer=streamer,
                    progress=progress, workers=workers, cancel=cancel)
