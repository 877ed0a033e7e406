"""Rendering a conversation through a chat template into token ids and an assistant-only loss mask.

Owns `render_chat`, the one place where text turns become ``(input_ids, loss_mask)``, shared by every
prompt format for training, and `render_prompt` for inference, so training and inference can't drift.
`render_segments` does the same for raw-text formats that bypass the chat template (xlam,
function_call): ``[(text, trained), ...]`` -> ``(input_ids, loss_mask)`` by the same masking rule.

Masking rule (assistant-only loss): a token is trained iff it lies inside a trained assistant turn's
content or its end-of-turn marker (the template's text between the generation prompt and the end of
the first end-of-turn string after it). System, user and tool turns, the generation prompt
(``<|im_start|>assistant\\n``) and whatever a template puts after end-of-turn are never trained.

Which assistant turns are trained is decided in one place, `trained_turns`, for every format: not
those with ``weight`` 0 (OpenAI's fine-tuning ``weight``, see `calltune.schema.Message`), and with
``train_on="last"`` only the last of the others.

Every place where text becomes ids goes through `encode`, which spells the placeholders of supplied
control strings (see `calltune.formats.literal`) as plain text; without placeholders it is one plain
``tokenizer(text)`` call, as it always was.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from calltune.errors import CalltuneError

if TYPE_CHECKING:
    from calltune.schema import Message

TRAIN_ON = ("all", "last")


class FormatError(CalltuneError):
    """A conversation can't be rendered by a format (the message names the example and the turn)."""


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The string that ends an assistant turn: the tokenizer's eos token (``<|im_end|>`` for ChatML)."""
    if not tokenizer.eos_token:
        raise FormatError("the tokenizer has no eos_token; set one so assistant turns can end")
    return tokenizer.eos_token


def select_turns(trainable: Sequence[bool], train_on: str = "all") -> list[bool]:
    """Apply `train_on` to per-assistant-turn flags: ``"all"`` keeps them, ``"last"`` keeps only the
    last True one (all False if there is none). Raises ValueError for another `train_on`."""
    if train_on not in TRAIN_ON:
        raise FormatError(f"train_on must be one of {', '.join(map(repr, TRAIN_ON))}, got {train_on!r}")
    flags = [bool(t) for t in trainable]
    if train_on == "last":
        last = max((k for k, t in enumerate(flags) if t), default=-1)
        return [k == last for k in range(len(flags))]
    return flags


def trained_turns(messages: Sequence["Message"], train_on: str = "all") -> list[bool]:
    """One flag per assistant message of canonical `messages`, in order: whether its tokens are trained.

    A turn with ``weight`` 0 is context, never trained (OpenAI's fine-tuning ``weight``); of the
    others, ``train_on="last"`` keeps only the last. Every format takes its trained turns from here:
    chat formats pass them to `render_chat`, raw-text formats mark their answer segments with them.
    """
    return select_turns([m.trained for m in messages if m.role == "assistant"], train_on)


@dataclass(frozen=True)
class Literals:
    """The placeholders of one render: ``table`` maps each placeholder (a private-use character, and
    the ASCII escape ``json.dumps`` writes for it with ``ensure_ascii=True``) to the special-token
    string it stands for; ``pattern`` finds any of them."""

    table: dict[str, str]
    pattern: re.Pattern


# Set by `calltune.formats.literal.literal_scope` while a format renders an example that had control
# strings in its data; None otherwise (text is then tokenized exactly as given).
ACTIVE_LITERALS: ContextVar[Literals | None] = ContextVar("calltune_literals", default=None)


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """``{text: id}`` of the tokens that text must never produce: added tokens marked special and the
    named special tokens (bos, eos, unk, pad, ...)."""
    out = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for text, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        out.setdefault(text, i)
    return {text: i for text, i in out.items() if text}


def _spell(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of `text` as plain text even if it is a special-token string (``split_special_tokens``).

    Raises:
        FormatError: the tokenizer still produced a special token (it ignores ``split_special_tokens``).
    """
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if set(ids) & set(special_tokens(tokenizer).values()):
        raise FormatError(f"the tokenizer can't spell {text!r} as plain text (split_special_tokens is ignored)")
    return ids


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str,
              offsets: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    if offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    return tokenizer(text, add_special_tokens=False)["input_ids"], None


def encode(tokenizer: PreTrainedTokenizerBase, text: str,
           offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``(ids, offset_mapping or None)`` of `text`, no special tokens added.

    Without active placeholders (`ACTIVE_LITERALS`) in `text` this is one ``tokenizer(text)`` call.
    Otherwise the text is cut at each placeholder: the pieces between are tokenized normally (the
    template's control strings stay special tokens), each placeholder becomes its special-token
    string in plain-text tokens, all of which get the placeholder's own offsets (so the span test on
    a token's start treats them as the one character they replace). Pieces are tokenized apart, as
    text is around a special token; a tokenizer that prefixes every input with a space marker
    (SentencePiece ``▁``) prefixes every piece, which stays plain text.

    Raises:
        FormatError: the tokenizer can't spell a special-token string as plain text (see `_spell`).
    """
    literals = ACTIVE_LITERALS.get()
    if literals is None or not literals.pattern.search(text):
        return _tokenize(tokenizer, text, offsets)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []

    def plain(start: int, stop: int) -> None:
        if start < stop:
            piece_ids, piece_spans = _tokenize(tokenizer, text[start:stop], offsets)
            ids.extend(piece_ids)
            spans.extend((a + start, b + start) for a, b in piece_spans or ())

    pos = 0
    for match in literals.pattern.finditer(text):
        plain(pos, match.start())
        spelled = _spell(tokenizer, literals.table[match.group()])
        ids.extend(spelled)
        spans.extend([match.span()] * len(spelled))
        pos = match.end()
    plain(pos, len(text))
    return ids, (spans if offsets else None)


def _template(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None, train_on: str = "all",
                max_length: int | None = None, trained: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """Render `messages` with the tokenizer's chat template and mark the trained tokens.

    Args:
        messages: HF chat dicts (``role``, ``content``, optional ``tool_calls``), already in the
            text the format wants the model to produce.
        tools: JSON-Schema tool dicts for templates that render tools (``tools=``).
        train_on: ``"all"`` trains every trainable assistant turn, ``"last"`` only the last of them.
        max_length: truncate to this many tokens (the mask is truncated alike).
        trained: one flag per assistant turn of `messages`, in order: False for a turn that is never
            trained (weight 0, see `trained_turns`); None trains them all. `train_on` applies on top.

    Returns:
        ``(input_ids, loss_mask)``, two lists of equal length; ``loss_mask[i] == 1`` where token i
        is a trained target.

    Raises:
        FormatError: the template's output for a prefix is not a prefix of the whole (a template
            that rewrites earlier turns can't be masked this way), no end-of-turn follows a turn, or
            `trained` does not have one flag per assistant turn.
    """
    eot = end_of_turn(tokenizer)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if trained is None:
        trained = [True] * len(assistant_turns)
    if len(trained) != len(assistant_turns):
        raise FormatError(f"{len(trained)} trained flags for {len(assistant_turns)} assistant turns; the format's "
                          "chat must keep the example's assistant turns one-to-one and in order")
    flags = select_turns(trained, train_on)
    assistant_turns = [i for i, flag in zip(assistant_turns, flags) if flag]
    text = _template(tokenizer, messages, tools, add_generation_prompt=False)
    spans = []
    for i in assistant_turns:
        before = _template(tokenizer, messages[:i], tools, add_generation_prompt=True)
        if not text.startswith(before):
            raise FormatError(f"the chat template renders turns 0..{i - 1} differently when turn {i} follows; "
                              "it can't be masked by prefix (use a built-in format instead)")
        end = text.find(eot, len(before))
        if end < 0:
            raise FormatError(f"no end-of-turn {eot!r} after assistant turn {i}")
        spans.append((len(before), end + len(eot)))
    return _tokenize_with_spans(tokenizer, text, spans, max_length)


def _tokenize_with_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]],
                         max_length: int | None) -> tuple[list[int], list[int]]:
    """Tokenize `text` (no special tokens added, see `encode`) and mark a token trained iff it starts
    inside a span."""
    ids, offsets = encode(tokenizer, text, offsets=True)
    mask = []
    for start, stop in offsets:
        mask.append(int(any(a <= start < b for a, b in spans) and stop > start))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of `messages` followed by the generation prompt: what the model continues at inference."""
    text = _template(tokenizer, messages, tools, add_generation_prompt=True)
    return encode(tokenizer, text)[0]


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The bos token text if the tokenizer adds one by default (Llama-2 ``<s>``, Phi-3), else ``""``.

    Raw-text formats render with ``add_special_tokens=False`` and put this in front themselves, so the
    text starts the way the model saw text in pre-training; SmolLM2 adds nothing.
    """
    bos = tokenizer.bos_token_id
    if bos is None or not tokenizer.bos_token:
        return ""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [bos] and without[:1] != [bos] else ""


def render_segments(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]],
                    max_length: int | None = None, cuts: Iterable[int] = ()) -> tuple[list[int], list[int]]:
    """Render raw-text `segments` ``[(text, trained), ...]`` (no chat template) into ``(input_ids, loss_mask)``.

    The texts are concatenated and tokenized with offsets (special-token strings the format writes,
    such as the eos text, become their special ids; those from the example's data were made
    placeholders by `calltune.formats.literal` and stay plain text, see `encode`); a token is trained
    iff it starts inside a trained segment, the same rule as `render_chat`. The caller includes
    bos/eos text where the format wants them.

    `cuts`: indices of segments before which tokenization restarts (the text is tokenized in pieces
    split there). A format cuts where its prompt ends, so that ``prompt`` ids (the text up to the cut,
    tokenized alone, as at inference) are exactly a prefix of the training ids even when a token
    would otherwise merge across the boundary (SmolLM2 merges ``></`` in ``<calls></calls>``).
    """
    bounds = sorted({0, len(segments), *(c for c in cuts if 0 < c < len(segments))})
    ids: list[int] = []
    mask: list[int] = []
    for start, stop in zip(bounds, bounds[1:]):
        piece, spans, pos = segments[start:stop], [], 0
        for text, trained in piece:
            if trained and text:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        piece_ids, piece_mask = _tokenize_with_spans(tokenizer, "".join(t for t, _ in piece), spans, None)
        ids += piece_ids
        mask += piece_mask
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
