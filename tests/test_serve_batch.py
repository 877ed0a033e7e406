"""Batched serving: concurrent chat completions share one continuous batch per loaded model.

On a 2-layer random Llama in fp32 (where batching can't flip a greedy token) and a LoRA adapter on it,
both served from one loaded base: the scheduler alone (greedy and seeded sampling give the tokens a
request gets alone, and `generate` gives; per-request stop strings), then the real server driven by
the openai client from threads -- requests for the base and the adapter, streamed and not,
constrained and not, each with its own max_tokens, decode in one batch with the completions they get
one at a time; a client that leaves frees its slot while the others finish; a full queue answers 429
with Retry-After.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
import torch

from calltune.infer.generate import PrefixStore, generate
from calltune.infer.registry import ModelRegistry
from calltune.infer.scheduler import BatchScheduler
from serving import running, tiny_models

SWITCH = {"type": "function", "function": {
    "name": "set_light", "description": "Switch the light.",
    "parameters": {"type": "object", "properties": {"state": {"type": "string", "enum": ["on", "off"]}},
                   "required": ["state"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Ping.", "parameters": {}}}

# Each request: its model, prompt, max_tokens, whether it streams, and any tools (constrained unless said).
REQUESTS = [
    dict(model="tiny-base", content="hello there", max_tokens=5, stream=False),
    dict(model="tiny", content="a longer question about the weather in Paris today", max_tokens=11, stream=True),
    dict(model="tiny-base", content="lights on", max_tokens=40, stream=False, tools=[SWITCH, PING],
         tool_choice="required"),
    dict(model="tiny", content="lights off please", max_tokens=40, stream=True, tools=[SWITCH],
         tool_choice="required"),
    dict(model="tiny", content="ping", max_tokens=8, stream=False, tools=[SWITCH, PING], constrained=False),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    # Two layers and larger random weights than the default: completions depend on the whole prompt, so a
    # mask or position wrong for one row of a batch changes its tokens.
    return tiny_models(tmp_path_factory.mktemp("batch"), tokenizer, num_hidden_layers=2, initializer_range=0.3)


@pytest.fixture(scope="module")
def registry(models):
    registry = ModelRegistry(models, dtype=torch.float32, max_batch=8)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def server(registry):
    from calltune.serve import create_app

    app = create_app(registry, default_max_tokens=40)
    with running(app) as url:
        yield url, app


class _Gate:
    """A forward pre-hook that holds the model's first forward until `ready()` is true (or 30 s pass), so
    requests sent from threads are all queued before decoding starts; `delay` slows every forward."""

    def __init__(self, model, ready, delay: float = 0.0):
        self.ready, self.delay, self.open, self.calls = ready, delay, False, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        deadline = time.time() + 30
        while not self.open and not self.ready() and time.time() < deadline:
            time.sleep(0.005)
        self.open = True
        time.sleep(self.delay)


# -- the scheduler alone ---------------------------------------------------------------------------
def test_batched_greedy_and_seeded_rows_get_their_alone_tokens(registry, tokenizer):
    served = registry.get("tiny-base")
    scheduler = BatchScheduler(served.model, tokenizer, max_batch=5, name="unit")
    try:
        prompts = [tokenizer(text)["input_ids"] for text in ["hi", "what is the weather like", "one two three four"]]
        settings = [dict(max_new_tokens=6), dict(max_new_tokens=9), dict(max_new_tokens=7, temperature=1.0, seed=3)]
        alone = [scheduler.submit(p, **s, adapter="__base__").result(30) for p, s in zip(prompts, settings)]
        with torch.inference_mode(), served.model.disable_adapter():  # the evaluation's decoder, on the base
            evaluated = [generate(served.model, tokenizer, [p], max_new_tokens=s["max_new_tokens"])[0]
                         for p, s in zip(prompts[:2], settings)]
        assert [g.text for g in alone[:2]] == [g.text for g in evaluated]
        tuned = scheduler.submit(prompts[1], 9, adapter="tiny").result(30)
        with torch.inference_mode():  # PEFT's active adapter is "tiny"
            assert tuned.text == generate(served.model, tokenizer, prompts[1:2], max_new_tokens=9)[0].text
        assert tuned.text != alone[1].text
        stop = alone[1].text[len(alone[1].text) // 2:][:3]  # a piece from the middle of its text
        steps = scheduler.stats["steps"]
        gate = _Gate(served.model, lambda: scheduler.in_flight == 5)
        try:
            tickets = [scheduler.submit(p, **s, adapter="__base__") for p, s in zip(prompts, settings)]
            tickets.append(scheduler.submit(prompts[1], 9, stop=[stop], adapter="__base__"))
            tickets.append(scheduler.submit(prompts[1], 9, adapter="tiny"))
            batched = [t.result(30) for t in tickets]
        finally:
            gate.handle.remove()
        assert scheduler.stats["max_live"] == 5
        assert scheduler.stats["steps"] - steps < sum(g.completion_tokens for g in batched)
        assert [(g.text, g.finish_reason, g.completion_tokens) for g in batched[:3]] == \
            [(g.text, g.finish_reason, g.completion_tokens) for g in alone]
        assert batched[3].finish_reason == "stop" and stop not in batched[3].text
        assert alone[1].text.startswith(batched[3].text + stop)
        assert batched[4].text == tuned.text  # the adapter's row, beside base rows
        assert scheduler.wait_idle(5) and scheduler.in_flight == 0
    finally:
        scheduler.close()



def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(registry, tokenizer):
    served = registry.get("tiny-base")
    cached = BatchScheduler(served.model, tokenizer, max_batch=2, name="cached")
    uncached = BatchScheduler(served.model, tokenizer, max_batch=2, name="uncached", prefix_cache_mb=0)
    try:
        system = "You call tools. Tools: set_light(state), ping(). " * 4
        prompts = [tokenizer(system + q)["input_ids"] for q in ["lights on", "ping the server now", "lights off"]]
        shared = len(os.path.commonprefix(prompts))
        first = cached.submit(prompts[0], 8, adapter="__base__").result(30)
        assert cached.stats["prefix_reused"] == 0
        later = [cached.submit(p, 8, adapter="__base__").result(30) for p in prompts[1:]]
        assert cached.stats["prefix_reused"] >= 2 * shared  # each later prompt reused at least the system prompt
        fresh = [uncached.submit(p, 8, adapter="__base__").result(30) for p in prompts]
        assert uncached.stats["prefix_reused"] == 0
        assert [g.text for g in [first, *later]] == [g.text for g in fresh]
        # The adapter's keys differ from the base's: its rows never reuse the base's entries.
        reused = cached.stats["prefix_reused"]
        tuned = cached.submit(prompts[1], 8, adapter="tiny").result(30)
        assert cached.stats["prefix_reused"] == reused
        with torch.inference_mode():
            assert tuned.text == generate(served.model, tokenizer, prompts[1:2], max_new_tokens=8)[0].text
    finally:
        cached.close()
        uncached.close()


def test_the_prefix_store_keeps_the_longest_prefixes_within_its_bytes():
    token = 32  # bytes per token: two layers of (1, 1, n, 2) float32 keys and values

    def kv(n):
        return [(torch.full((1, 1, n, 2), float(n)), torch.full((1, 1, n, 2), -float(n))) for _ in range(2)]

    store = PrefixStore(max_bytes=token * 10)  # ten tokens' worth
    assert store.longest(None, [1, 2, 3]) == (0, [])
    store.put(None, [1, 2, 3], kv(3))
    store.put(None, [1, 2, 3, 4, 5], kv(5))  # holds [1, 2, 3]: that entry goes
    assert list(store.entries) == [(None, (1, 2, 3, 4, 5))] and store.bytes == token * 5
    store.put(None, [1, 2], kv(2))  # already held
    assert len(store.entries) == 1
    n, found = store.longest(None, [1, 2, 3, 9])
    assert n == 3 and found[0][0].shape[2] == 5
    assert store.longest("adapter", [1, 2, 3])[0] == 0  # entries are per adapter
    store.put("adapter", [7, 8, 9], kv(3))
    store.put(None, [4, 4], kv(2))  # 5 + 3 + 2 tokens: at the limit, all kept
    assert store.bytes == token * 10 and len(store.entries) == 3
    store.longest(None, [1, 2])  # touching the oldest makes the adapter's entry the least recently used
    store.put(None, [6], kv(1))
    assert ("adapter", (7, 8, 9)) not in store.entries and store.bytes == token * 8
    store.put(None, list(range(20)), kv(20))  # larger than the store: not kept
    assert store.bytes == token * 8


# -- the server ------------------------------------------------------------------------------------
def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _send(client, request: dict) -> tuple:
    """(content, [(call name, arguments)], finish_reason, completion tokens) of one request, streamed or not."""
    kwargs = dict(model=request["model"], messages=[{"role": "user", "content": request["content"]}],
                  max_tokens=request["max_tokens"])
    if "tools" in request:
        kwargs.update(tools=request["tools"], tool_choice=request.get("tool_choice", "auto"),
                      parallel_tool_calls=False)
    if request.get("constrained") is False:
        kwargs["extra_body"] = {"constrained": False}
    if not request["stream"]:
        response = client.chat.completions.create(**kwargs)
        choice = response.choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason, response.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) or None
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    calls = [(d.function.name, json.loads("".join(e.function.arguments or "" for e in deltas if e.index == d.index)))
             for d in deltas if d.function.name]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return content, calls, finish[0], chunks[-1].usage.completion_tokens


def _concurrently(fn, items) -> list:
    results: list = [None] * len(items)

    def run(i, item):
        try:
            results[i] = fn(item)
        except Exception as err:  # reported by the caller's assertions
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, item)) for i, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_concurrent_requests_decode_in_one_batch_with_their_sequential_completions(server, registry):
    url, _ = server
    client = _client(url)
    sequential = [_send(client, request) for request in REQUESTS]
    for request, (content, calls, finish, tokens) in zip(REQUESTS, sequential):
        if request.get("tool_choice") == "required":
            assert finish == "tool_calls" and len(calls) == 1 and content is None
        elif finish == "length":
            assert tokens == request["max_tokens"]
    assert [r[2] for r in sequential[:2]] == ["length", "length"]  # random weights rarely write end-of-turn
    scheduler = registry.scheduler(registry.get("tiny"))
    assert scheduler is registry.scheduler(registry.get("tiny-base"))  # base and adapter share one batch
    steps = scheduler.stats["steps"]
    gate = _Gate(registry.get("tiny").model, lambda: scheduler.in_flight == len(REQUESTS))
    try:
        batched = _concurrently(lambda request: _send(client, request), REQUESTS)
    finally:
        gate.handle.remove()
    assert batched == sequential
    assert scheduler.stats["max_live"] == len(REQUESTS)
    assert scheduler.stats["steps"] - steps < sum(r[3] for r in sequential)


def test_a_client_that_leaves_frees_its_slot_while_the_others_finish(server, registry):
    url, _ = server
    scheduler = registry.scheduler(registry.get("tiny-base"))
    short = dict(model="tiny-base", content="hello there", max_tokens=20, stream=False)
    expected = _send(_client(url), short)
    steps = scheduler.stats["steps"]
    gate = _Gate(registry.get("tiny-base").model, lambda: scheduler.in_flight == 2, delay=0.01)
    try:
        def leave(_):
            body = {"model": "tiny-base", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
                    "stream": True, "constrained": False}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                events = (line for line in response.iter_lines() if line.startswith("data:"))
                for _ in range(3):  # the role, then content: generation is under way; leave
                    next(events)
            return "left"

        results = _concurrently(lambda job: job(None), [leave, lambda _: _send(_client(url), short)])
        assert results == ["left", expected]
        assert scheduler.wait_idle(20)
    finally:
        gate.handle.remove()
    assert scheduler.stats["steps"] - steps < 150, "the stream that left kept decoding (max_tokens 400)"


def test_a_full_queue_answers_429_with_retry_after(models):
    from calltune.serve import create_app

    registry = ModelRegistry({"tiny-base": models["tiny-base"]}, dtype=torch.float32, max_batch=1, max_queue=1)
    release = threading.Event()
    model = registry.get("tiny-base").model
    gate = _Gate(model, release.is_set)
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        with running(create_app(registry)) as url:
            scheduler = registry.scheduler(registry.get("tiny-base"))
            post = lambda extra: httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=60)
            threads, statuses = [], []
            for n in (1, 2):  # one generating (held at its first forward), one waiting
                threads.append(threading.Thread(target=lambda: statuses.append(post({}).status_code)))
                threads[-1].start()
                deadline = time.time() + 20
                while scheduler.in_flight < n and time.time() < deadline:
                    time.sleep(0.01)
            for extra in ({}, {"stream": True}):
                refused = post(extra)
                assert refused.status_code == 429, refused.text
                assert int(refused.headers["Retry-After"]) >= 1
                error = refused.json()["error"]
                assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
                assert "--max-batch" in error["message"]
            release.set()
            for thread in threads:
                thread.join(60)
            assert statuses == [200, 200]
            assert post({}).status_code == 200  # room again
    finally:
        gate.handle.remove()
        registry.close()
