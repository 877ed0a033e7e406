"""Per-message `weight` (OpenAI's chat fine-tuning format): an assistant turn with weight 0 is context,
never trained, in every format and for both ``train_on`` values; the schema accepts it only as 0/1 on
assistant turns, keeps it through JSONL and out of the chat dicts; the OpenAI JSONL source reads it.

The case it exists for: a broken call, the tool's validation error, then the corrected call, where only
the correction is trained. Rendered with the real SmolLM2 tokenizer (`chat_template` with the
Qwen2.5-style template of test_formats_toolcalling, since SmolLM2's template ignores tools).
"""

from __future__ import annotations

import copy
import json

import pytest

from calltune.formats import FormatError, get_format
from calltune.formats.chat import render_chat, select_turns, trained_turns
from calltune.schema import Example, Message, SchemaError, ToolCall
from calltune.sources import Rejects
from calltune.sources.openai_jsonl import load_openai_jsonl
from test_formats_toolcalling import qwen_turn

EOT = "<|im_end|>"
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BROKEN = ToolCall.of("get_weather", {"town": "Paris"}, id="c1")
FIXED = ToolCall.of("get_weather", {"city": "Paris"}, id="c2")
FIXED_TURN = Message(role="assistant", tool_calls=[FIXED], weight=1)
ERROR = "error: get_weather has no argument 'town'; required: city"
# formats whose layout holds [user, assistant, tool, assistant]; xlam is single-turn (tested apart)
MULTI_TURN_FORMATS = ("hermes", "chat_template", "function_call", "tool_uses")


def retry_example(first_weight=0, second_weight=None) -> Example:
    return Example(messages=[
        Message(role="user", content="Weather in Paris?"),
        Message(role="assistant", tool_calls=[BROKEN], weight=first_weight),
        Message(role="tool", tool_call_id="c1", content=ERROR),
        Message(role="assistant", tool_calls=[FIXED], weight=second_weight),
    ], tools=[TOOL], source="mem", row=0)


def turn_text(name, fmt, message: Message) -> str:
    """The text of an assistant turn as the format writes it, before its end-of-turn."""
    return qwen_turn(message) if name == "chat_template" else fmt.assistant_text(message)


def trained_text(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask) if m])


def first_turn_span(tok, ids, first: str, second: str) -> tuple[int, int]:
    """Token range [a, b) of the first assistant turn: from the token where its text starts to the one
    where the second turn's text starts (the tool result lies between and is untrained anyway)."""
    starts, text = [], ""
    for k in range(len(ids)):
        starts.append(len(text))
        text = tok.decode(ids[:k + 1])
    at, until = text.index(first), text.index(second)
    assert at < until
    a = max(k for k, s in enumerate(starts) if s <= at)
    b = max(k for k, s in enumerate(starts) if s <= until)
    return a, b


# --------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("name", MULTI_TURN_FORMATS)
def test_weight_0_turn_is_context_and_the_correction_is_trained(name, train_on, tokenizer, tokenizer_for):
    tok, fmt, ex = tokenizer_for(name), get_format(name), retry_example()
    broken, fixed = turn_text(name, fmt, ex.messages[1]), turn_text(name, fmt, ex.messages[3])
    ids, mask = fmt.render(ex, tok, train_on=train_on)
    # the whole corrected turn and its end-of-turn are trained, nothing else
    assert trained_text(tok, ids, mask) == fixed + EOT
    # the broken call and the error are rendered as context, and no token of the first turn is trained
    text = tok.decode(ids)
    assert broken in text and "has no argument 'town'" in text
    a, b = first_turn_span(tok, ids, broken, fixed)
    assert b - a > 5 and not any(mask[a:b])
    # without the weight, both turns are trained (train_on="all"): the weight is what removed the first
    ids_w, mask_w = fmt.render(retry_example(first_weight=None), tok)
    assert ids_w == ids
    assert trained_text(tok, ids_w, mask_w) == broken + EOT + fixed + EOT
    assert any(mask_w[a:b])  # the span checked above is where the first turn's trained tokens were


@pytest.mark.parametrize("name", MULTI_TURN_FORMATS)
def test_train_on_last_picks_the_last_trained_turn(name, tokenizer, tokenizer_for):
    tok, fmt = tokenizer_for(name), get_format(name)
    ex = retry_example(first_weight=1, second_weight=0)
    broken = turn_text(name, fmt, ex.messages[1])
    for train_on in ("all", "last"):  # the final turn has weight 0, so "last" means the first turn
        ids, mask = fmt.render(ex, tok, train_on=train_on)
        assert trained_text(tok, ids, mask) == broken + EOT
    ids, mask = fmt.render(retry_example(first_weight=0, second_weight=0), tok, train_on="last")
    assert len(ids) > 20 and not any(mask)  # no trained turn: nothing is trained


def test_xlam_weight_0_trains_nothing_and_multi_turn_is_refused(tokenizer):
    fmt = get_format("xlam")
    single = Example(messages=[Message(role="user", content="Weather in Paris?"),
                               Message(role="assistant", tool_calls=[FIXED], weight=0)], tools=[TOOL])
    for train_on in ("all", "last"):
        ids, mask = fmt.render(single, tokenizer, train_on=train_on)
        assert tokenizer.decode(ids).endswith('<calls>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                              '</calls><|im_end|>')
        assert not any(mask)
    trained = single.model_copy(update={"messages": [single.messages[0], FIXED_TURN]})
    ids_t, mask_t = fmt.render(trained, tokenizer)
    assert ids_t == ids
    assert trained_text(tokenizer, ids_t, mask_t) == fmt.assistant_text(FIXED_TURN) + EOT
    # the retry layout needs several turns, which the single-turn xlam layout has no place for
    with pytest.raises(FormatError, match="mem, row 0: the xlam format takes one user turn and one assistant turn"):
        fmt.render(retry_example(), tokenizer)


def test_trained_flags_rule_and_render_chat(tokenizer):
    ex = retry_example()
    assert trained_turns(ex.messages) == [False, True]
    assert trained_turns(ex.messages, "last") == [False, True]
    assert trained_turns(retry_example(1, 0).messages, "last") == [True, False]
    assert trained_turns(retry_example(0, 0).messages, "last") == [False, False]
    assert select_turns([True, True, False], "last") == [False, True, False]
    with pytest.raises(ValueError, match="train_on must be one of 'all', 'last', got 'first'"):
        select_turns([True], "first")
    messages = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    ids, mask = render_chat(tokenizer, messages, trained=[True, False], train_on="last")
    assert trained_text(tokenizer, ids, mask) == "a1" + EOT
    with pytest.raises(FormatError, match="1 trained flags for 2 assistant turns"):
        render_chat(tokenizer, messages, trained=[True])


# --------------------------------------------------------------------------- schema

def test_weight_is_0_or_1_on_assistant_messages_only():
    assert Message(role="assistant", content="a", weight=0).trained is False
    assert Message(role="assistant", content="a", weight=1).trained is True
    assert Message(role="assistant", content="a").trained is True
    with pytest.raises(SchemaError, match=r"messages\[0\]: weight is only allowed on assistant messages, "
                                          r"not on role 'user'"):
        Example(messages=[{"role": "user", "content": "hi", "weight": 1}])
    for bad in (2, -1, True, 1.0, "1"):
        with pytest.raises(SchemaError, match=r"messages\[1\]\.weight: weight must be 0 or 1, got "):
            Example(messages=[{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "a", "weight": bad}])


def test_weight_round_trips_through_json_and_stays_out_of_chat_dicts():
    ex = retry_example(first_weight=0, second_weight=1)
    line = ex.to_json()
    assert [m.get("weight") for m in json.loads(line)["messages"]] == [None, 0, None, 1]
    again = Example.from_json(line)
    assert again == ex and [m.weight for m in again.messages] == [None, 0, None, 1]
    assert all("weight" not in d for d in ex.messages_as_dicts())
    assert "weight" not in json.loads(retry_example(first_weight=None).to_json())["messages"][1]


# --------------------------------------------------------------------------- OpenAI JSONL source

def test_openai_jsonl_reads_weight_and_rejects_bad_ones(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"town": "Paris"}'}}
    fixed = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    good = {"tools": [TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call], "weight": 0},
        {"role": "tool", "tool_call_id": "c1", "content": ERROR},
        {"role": "assistant", "tool_calls": [fixed], "weight": 1}]}
    two = copy.deepcopy(good)
    two["messages"][1]["weight"] = 2
    on_user = copy.deepcopy(good)
    on_user["messages"][0]["weight"] = 0
    as_bool = copy.deepcopy(good)
    as_bool["messages"][3]["weight"] = True
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, two, on_user, as_bool)))
    rejects = Rejects()
    examples = load_openai_jsonl(path, rejects=rejects)
    assert len(examples) == 1
    example = examples[0]
    assert [m.weight for m in example.messages] == [None, 0, None, 1]
    assert [m.trained for m in example.messages if m.role == "assistant"] == [False, True]
    assert "weights" not in example.meta
    assert {item["row"]: item["reason"] for item in rejects.items} == {
        1: "bad weight: messages[1].weight must be 0 or 1, got 2",
        2: "bad weight: messages[0].weight is only allowed on assistant messages, not on role 'user'",
        3: "bad weight: messages[3].weight must be 0 or 1, got True"}
    assert rejects.counts == {"load: bad weight": 3}
    # and keeps it through the JSONL written between pipeline stages
    assert Example.from_json(example.to_json()).messages == example.messages
