"""calltune's decode loop (`calltune.infer.generate`) against plain `model.generate`, on the real SmolLM2
(slow) or a tiny random Llama."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from calltune.formats import get_format
from calltune.formats.chat import render_prompt
from calltune.infer.generate import _common_prefix, default_workers, generate, load_for_inference


def test_common_prefix_leaves_every_prompt_a_token():
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token is still prefilled
    assert _common_prefix([[7], [7, 8]]) == 0
    assert _common_prefix([[1, 2], [3, 2]]) == 0


def test_default_workers_give_every_worker_64_prompts_and_slots():
    assert default_workers(714, 384, threads=2) == 2  # the ViGGO eval on this machine
    assert default_workers(714, 384, threads=8) == 6  # 384 slots hold 6 workers of 64
    assert default_workers(100, 384, threads=2) == 1  # 100 prompts: not 64 each
    assert default_workers(714, 100, threads=2) == 1  # 100 slots: not 64 each
    assert default_workers(714, 384, threads=1) == 1
    assert default_workers(1, 1, threads=4) == 1


@pytest.fixture(scope="module")
def fp32_model(smollm2_path):
    return load_for_inference(smollm2_path, dtype=torch.float32)


def _one_at_a_time(model, tokenizer, prompt, max_new_tokens):
    eos = tokenizer.eos_token_id
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    stopped = eos in new
    return tokenizer.decode(new[:new.index(eos)] if stopped else new, skip_special_tokens=True), stopped


@pytest.mark.slow
def test_batched_prefix_shared_decoding_equals_one_prompt_at_a_time(fp32_model, viggo_valid, monkeypatch):
    """Shared-prefix cache, padding, rows leaving and joining the batch change nothing (fp32, greedy).

    The prompts differ in length (padding), share the instruction (prefix cache), are prefilled in one
    forward or in chunks, and finish at different steps (rows leave the batch); a wrong position id,
    mask or slot changes the greedy text.
    """
    model, tokenizer, _ = fp32_model
    fmt = get_format("viggo")
    examples = [viggo_valid[i] for i in (0, 3, 11, 40, 77)]
    prompts = [fmt.prompt(e, tokenizer) for e in examples]
    prompts.append(prompts[0][:20])  # a prompt that ends inside the others' common prefix
    for question in ("What is 2+2? Answer with a number only.", "Say hi."):  # answers that end early
        prompts.append(render_prompt(tokenizer, [{"role": "user", "content": question}]))
    assert len({len(p) for p in prompts}) > 1
    alone = [_one_at_a_time(model, tokenizer, prompt, 24) for prompt in prompts]
    # all rows at once; the same with the first join prefilled in chunks of 3 prompts; then 3 slots for
    # 8 prompts, so prompts join as rows finish (continuous batching)
    for batch_size, prefill_rows in ((len(prompts), 48), (len(prompts), 3), (3, 48)):
        monkeypatch.setattr(importlib.import_module("calltune.infer.generate"), "PREFILL_ROWS", prefill_rows)
        got = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size)
        for prompt, gen, (text, stopped) in zip(prompts, got, alone):
            assert gen.text == text
            assert gen.finish_reason == ("stop" if stopped else "length")
            assert gen.prompt_tokens == len(prompt)
        assert {g.finish_reason for g in got} == {"stop", "length"}  # rows left the batch at different steps
    # The ViGGO prompts alone share their whole 53-token instruction: it is computed once per call and
    # read by every row through gqa_attention's calltune_prefix (cascade attention), not kept per row.
    viggo = prompts[:5]
    assert _common_prefix(viggo) == 53
    for batch_size in (5, 2):
        got = generate(model, tokenizer, viggo, max_new_tokens=24, batch_size=batch_size)
        assert [g.text for g in got] == [text for text, _ in alone[:5]]


@pytest.mark.slow
def test_stop_strings_and_sampling(fp32_model, viggo_valid):
    model, tokenizer, _ = fp32_model
    prompt = get_format("viggo").prompt(viggo_valid[0], tokenizer)
    free = generate(model, tokenizer, [prompt], max_new_tokens=16)[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = generate(model, tokenizer, [prompt], max_new_tokens=16, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    torch.manual_seed(0)
    a = generate(model, tokenizer, [prompt] * 3, max_new_tokens=12, temperature=1.5)
    assert len({g.text for g in a}) > 1  # sampled rows differ
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tokenizer, [prompt, []])


@pytest.mark.slow
def test_workers_share_the_prompts_and_give_the_same_completions(fp32_model, viggo_valid):
    """Two decoders in two threads (`workers=2`) return what one decoder does, in input order; the
    logits hook gets original prompt indices; each worker runs on its share of the intra-op threads,
    restored afterwards; a worker's error reaches the caller; seeded sampling repeats."""
    model, tokenizer, _ = fp32_model
    fmt = get_format("viggo")
    prompts = [fmt.prompt(e, tokenizer) for e in viggo_valid[:10]]
    one = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=10, workers=1)
    threads = torch.get_num_threads()
    seen: dict[str, set[int]] = {}
    inside: set[int] = set()

    def end_row_7(rows, scores, last):  # row 7 (an original index) may only end its turn
        seen.setdefault(threading.current_thread().name, set()).update(rows)
        inside.add(torch.get_num_threads())
        for slot, row in enumerate(rows):
            if row == 7:
                scores[slot] = float("-inf")
                scores[slot, tokenizer.eos_token_id] = 0
        return scores

    rng = torch.get_rng_state()
    two = generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=10, workers=2, logits_hook=end_row_7)
    assert torch.equal(torch.get_rng_state(), rng)  # greedy decoding draws no seeds
    assert two[7].text == "" and two[7].finish_reason == "stop"
    assert [g.text for i, g in enumerate(two) if i != 7] == [g.text for i, g in enumerate(one) if i != 7]
    assert [g.prompt_tokens for g in two] == [len(p) for p in prompts]
    shares = list(seen.values())
    assert len(shares) == 2 and not shares[0] & shares[1] and shares[0] | shares[1] == set(range(10))
    assert inside == {max(1, threads // 2)} and torch.get_num_threads() == threads

    calls = {True: 0, False: 0}  # hook calls by the worker with row 0 and by the other

    def broken(rows, scores, last):  # the worker with row 0 fails at its first step; the other's rows
        calls[0 in rows] += 1       # may not end their turn, so alone it would take all 64 steps
        if 0 in rows:
            raise KeyError("hook failed")
        scores[:, tokenizer.eos_token_id] = float("-inf")
        return scores

    with pytest.raises(KeyError, match="hook failed"):
        generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=10, workers=2, logits_hook=broken)
    assert torch.get_num_threads() == threads
    assert calls[True] == 1 and calls[False] < 64  # the other worker stopped early
    sampled = []
    for _ in range(2):
        torch.manual_seed(3)
        sampled.append([g.text for g in generate(model, tokenizer, prompts[:4], max_new_tokens=8, batch_size=4,
                                                 workers=2, temperature=1.5)])
    assert sampled[0] == sampled[1] and len(set(sampled[0])) > 1
    with pytest.raises(ValueError, match="workers must be at least 1"):
        generate(model, tokenizer, prompts, workers=0)


def test_slot_layer_zeroes_its_storage_only_as_far_as_its_views_reach():
    """The two storages start uninitialised (garbage, NaN here); a view never shows a non-finite value
    (a masked column still meets its value in probs @ values), and memory past the widest view is left
    untouched, so it never becomes resident."""
    from calltune.infer.generate import SlotLayer

    layer = SlotLayer()
    layer.allocate(rows=4, max_width=64, like=torch.zeros(1, 3, 1, 8))
    for keys, values in layer._storage:
        keys.fill_(float("nan"))
        values.fill_(float("nan"))
    layer.resize(16, keep=0)
    assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    written = torch.randn(2, 3, 10, 8)
    layer.fill(0, written, written + 1)
    layer.resize(32, keep=2)  # the other storage, wider: the two kept rows move, the rest is zeros
    assert torch.equal(layer.keys[:2, :, :10], written) and torch.equal(layer.values[:2, :, :10], written + 1)
    assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    layer.resize(16, keep=2)
    assert torch.equal(layer.keys[:2, :, :10], written) and torch.isfinite(layer.values).all()
    for (keys, values), width in zip(layer._storage, (32, 16)):  # widths 16, 32, 16 alternate storages 1, 0, 1
        reached = 4 * 3 * width * 8
        assert torch.isnan(keys[reached:]).all() and torch.isnan(values[reached:]).all()


def _prefill_and_one_step(model, tokenizer, prompts):
    """Logits of `prompts` left-padded into one batch: at every real prompt position (prefill) and at
    one greedy decode step through the key/value cache; plus the attention mask used."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        step = model(input_ids=first[:, -1].argmax(-1, keepdim=True), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     position_ids=positions[:, -1:] + 1, past_key_values=cache).logits
    return first[mask.bool()], step, mask


@pytest.mark.slow
def test_gqa_attention_equals_transformers_eager_attention(fp32_model, smollm2_path, viggo_valid):
    """`gqa_attention` (the inference default) computes what transformers' eager attention does, with
    left padding and a KV cache, in fp32."""
    from calltune.infer.generate import GQA_ATTENTION

    model, tokenizer, _ = fp32_model
    assert model.config._attn_implementation == GQA_ATTENTION
    eager, _, _ = load_for_inference(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    fmt = get_format("viggo")
    prompts = [fmt.prompt(viggo_valid[i], tokenizer) for i in (0, 5, 9)]
    logits = [_prefill_and_one_step(m, tokenizer, prompts) for m in (model, eager)]
    mask = logits[0][2]
    assert mask.sum() < mask.numel()  # there is padding
    torch.testing.assert_close(logits[0][0], logits[1][0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0][1], logits[1][1], atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_fast_decode_linears_keep_the_logits_of_plain_transformers(fp32_model, smollm2_path, viggo_valid):
    """The flattened decode-step linears (and the rest of `load_for_inference`) compute what the
    unmodified transformers model does (fp32, prefill and one decode step)."""
    from calltune.models import load_model

    model, tokenizer, _ = fp32_model
    plain, _, _ = load_model(smollm2_path, dtype=torch.float32, attn_implementation="eager")
    prompts = [get_format("viggo").prompt(viggo_valid[i], tokenizer) for i in (1, 2)]
    results = [_prefill_and_one_step(m, tokenizer, prompts) for m in (model, plain)]
    mask = results[0][2]
    assert mask.sum() < mask.numel()  # there is padding
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    """A 1-layer random Llama with SmolLM2's tokenizer, loaded as `calltune eval` loads a model."""
    from serving import tiny_models

    return load_for_inference(tiny_models(tmp_path_factory.mktemp("tiny"), tokenizer)["tiny-base"], dtype=torch.float32)


def test_a_model_that_drops_the_shared_prefix_is_refused(tiny_model, viggo_valid, monkeypatch):
    """If a model's forward did not hand `calltune_prefix` to its attention layers, rows would attend to
    nothing of the instruction and generate garbage silently; `generate` raises instead."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from calltune.infer.generate import GQA_ATTENTION, gqa_attention

    model, tokenizer, _ = tiny_model
    prompts = [get_format("viggo").prompt(viggo_valid[i], tokenizer) for i in (0, 1)]
    assert len(generate(model, tokenizer, prompts, max_new_tokens=2)) == 2
    dropping = lambda *args, calltune_prefix=None, **kwargs: gqa_attention(*args, **kwargs)  # noqa: E731
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, GQA_ATTENTION, dropping)
    with pytest.raises(RuntimeError, match="did not pass the shared prefix"):
        generate(model, tokenizer, prompts, max_new_tokens=2)
