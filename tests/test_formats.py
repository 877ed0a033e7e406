import pytest

from calltune.formats import FormatError, get_format
from calltune.formats.chat import render_chat
from calltune.sources.viggo import render_mr


def test_viggo_mask_covers_exactly_the_answer_and_end_of_turn(tokenizer, viggo_valid):
    fmt = get_format("viggo")
    for ex in viggo_valid[:50]:
        ids, mask = fmt.render(ex, tokenizer)
        assert len(ids) == len(mask)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert trained == ex.meta["mr"] + "<|im_end|>"
        # the trained tokens are one contiguous run at the end, before the template's closing newline
        first = mask.index(1)
        assert all(mask[first:first + sum(mask)]) and sum(mask[first:]) == sum(mask)


def test_prompt_is_the_untrained_prefix(tokenizer, viggo_valid):
    fmt = get_format("viggo")
    ex = viggo_valid[3]
    ids, mask = fmt.render(ex, tokenizer)
    prompt = fmt.prompt(ex, tokenizer)
    assert ids[:len(prompt)] == prompt
    assert mask.index(1) == len(prompt)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_parse_inverts_render(viggo_valid):
    fmt = get_format("viggo")
    for ex in viggo_valid:
        text = fmt.assistant_text(ex.messages[-1])
        parsed = fmt.parse(" " + text + "\n")
        assert parsed.error is None and render_mr(parsed.tool_calls[0]) == ex.meta["mr"]
    bad = fmt.parse("I think this is about a game.")
    assert bad.error and bad.tool_calls == []


def test_multi_turn_masks_every_assistant_turn_and_last_only(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]
    ids, mask = render_chat(tokenizer, messages)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "a1<|im_end|>a2<|im_end|>"
    ids, mask = render_chat(tokenizer, messages, train_on="last")
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "a2<|im_end|>"


def test_truncation_keeps_ids_and_mask_aligned(tokenizer, viggo_valid):
    ids, mask = get_format("viggo").render(viggo_valid[0], tokenizer, max_length=20)
    assert len(ids) == len(mask) == 20 and sum(mask) == 0


def test_unknown_format_suggests():
    with pytest.raises(ValueError, match="Did you mean 'viggo'"):
        get_format("vigo")


def test_viggo_format_refuses_two_calls(tokenizer, viggo_valid):
    ex = viggo_valid[0].model_copy(deep=True)
    ex.messages[-1].tool_calls = ex.messages[-1].tool_calls * 2
    with pytest.raises(FormatError, match="valid.csv, row 0: a ViGGO answer is exactly one call"):
        get_format("viggo").render(ex, tokenizer)
