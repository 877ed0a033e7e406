"""The server under hostile and careless clients: a real uvicorn server with tiny random models.

A fuzz suite of malformed requests (each must get a 4xx in OpenAI's error shape, the server must keep
answering and its memory stay bounded), then one test per defence: the body-size limit (refused
before the body is read), the context limit (refused without waiting for the generation lock),
`$ref` to a URL or a file (refused, nothing fetched), a cut-off call (finish_reason ``length``,
nothing leaked into content), clients that disconnect (their generation stops at once and the next
request runs), authentication on every route but a bare liveness check, and SIGTERM.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest

from calltune.serve.protocol import Limits
from serving import free_port, running, tiny_models

KEY = "hostile-key"
CONTEXT = 512  # the tiny models' max_position_embeddings
BODY_LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    return tiny_models(tmp_path_factory.mktemp("hostile"), tokenizer, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(models):
    from calltune.serve import create_app

    app = create_app(models, api_key=KEY, default_max_tokens=8,
                     limits=Limits(max_body_bytes=BODY_LIMIT, max_messages=64, max_tools=16, max_depth=16))
    with running(app) as url:
        yield url, app


def send(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method: str = "POST",
         timeout: float = 120) -> tuple[int, dict | str]:
    """(status, JSON body or text) of one raw HTTP request."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=AUTH if headers is None else headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode(errors="replace")


def chat(url: str, payload, **kwargs):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return send(url, "/v1/chat/completions", body, **kwargs)


def _ok_request():
    return {"model": "tiny-base", "messages": HI, "max_tokens": 4}


def _with(**fields):
    return {"model": "tiny-base", "messages": HI, "max_tokens": 4, **fields}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def _tool(parameters=None, name="add", description="Add."):
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": ADD["function"]["parameters"] if parameters is None else parameters}}


def _call(id="c1", name="add", arguments='{"a": 1, "b": 2}'):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _history(*messages):
    return _with(messages=[{"role": "user", "content": "add 1 and 2"}, *messages], tools=[ADD])


SURROGATE = "\ud800"


def malformed_requests() -> list[tuple[str, bytes]]:
    """(label, body) of requests that must each be refused with a 4xx."""
    cases: list[tuple[str, object]] = []
    for i, raw in enumerate([b"", b"{", b"{not json", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00",
                             b'{"model": "tiny-base", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
                             b'{"model": "tiny-base", "messages": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
                             b'{"model": "tiny-base"' + b", " * 10, b"\x00" * 100]):
        cases.append((f"raw {i}", raw))
    bad_fields = {
        "model": [None, 1, "", ["tiny"], {"name": "tiny"}],
        "messages": [None, "hi", {}, [], [1], [None], ["hi"], [{"content": "hi"}], [{"role": "robot", "content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": "user", "content": [{"type": "text", "text": 3}]}], [{"role": "user", "content": {"a": 1}}],
                     [{"role": "user", "content": "hi", "name": 7}], [{"role": "assistant", "content": "hi"}],
                     [{"role": "tool", "content": "x"}], [{"role": "tool", "content": "x", "tool_call_id": "nope"}],
                     [{"role": "user", "content": "x", "tool_calls": [_call()]}]],
        "stream": ["yes", 1, "true", 0, [], {}],
        "parallel_tool_calls": ["no", 0, "false"],
        "temperature": ["0", -1, 3, [], None and "x" or "hot"],
        "top_p": [0, 2, "1", -0.5],
        "max_tokens": [0, -1, "10", 1.5, 10 ** 9, 10 ** 18, 10 ** 30, [], CONTEXT],
        "max_completion_tokens": [0, "5", 10 ** 12],
        "n": [0, 2, "1", 1.0],
        "seed": ["x", 1.5, []],
        "stop": [5, [1], ["a", "b", "c", "d", "e"], {"s": 1}],
        "tools": ["add", {}, [1], [{}], [{"type": "function"}], [{"type": "retrieval", "function": ADD["function"]}],
                  [{"type": "function", "function": {"name": ""}}], [{"type": "function", "function": {"name": "a b"}}],
                  [{"type": "function", "function": {"name": "x" * 65}}], [_tool(), _tool()],
                  [_tool(parameters=[])], [_tool(parameters={"type": "nonsense"})],
                  [_tool(parameters={"type": "object", "properties": 5})],
                  [_tool(parameters={"type": "object", "required": "a"})],
                  [_tool(parameters={"type": "object", "properties": {"a": {"minimum": "zero"}}})],
                  [_tool(parameters={"$ref": "http://127.0.0.1:1/schema.json"})],
                  [_tool(parameters={"$ref": "file:///etc/passwd"})],
                  [_tool(parameters={"type": "object", "properties": {"a": {"$ref": "other.json#/a"}}})],
                  [_tool(parameters=_nested(300))], [_tool(parameters=_nested(17))],
                  [_tool(name=f"f{i}") for i in range(17)],
                  [_tool(description=SURROGATE)], [_tool(parameters={"type": "object", "description": SURROGATE})]],
        "tool_choice": ["sometimes", 1, {"type": "function"}, {"type": "function", "function": {"name": "nope"}},
                        "required"],
        "response_format": ["json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": 3}],
        "stream_options": ["yes", {"include_usage": "yes"}],
        "constrained": ["no", 1],
    }
    for field, values in bad_fields.items():
        for i, value in enumerate(values):
            cases.append((f"{field} {i}", _with(**{field: value})))
    for role in ["system", "developer", "user", "assistant", "tool"]:
        for i, content in enumerate([5, True, {"x": 1}, [{"type": "text"}, 3], [{"type": "input_audio"}]]):
            message = {"role": role, "content": content, **({"tool_call_id": "c1"} if role == "tool" else {})}
            cases.append((f"{role} content {i}", _with(messages=[*HI, message, *HI])))
    for i, name in enumerate(["../../etc/passwd", "/etc/passwd", "tiny/../tiny-base", "tiny\x00", "~/model"]):
        cases.append((f"model path {i}", _with(model=name)))
    cases += [
        ("unknown model", _with(model="gpt-4")),
        ("no model", {"messages": HI}),
        ("too many messages", _with(messages=HI * 65)),
        ("surrogate content", _with(messages=[{"role": "user", "content": SURROGATE}])),
        ("surrogate part", _with(messages=[{"role": "user", "content": [{"type": "text", "text": "a" + SURROGATE}]}])),
        ("surrogate system", _with(messages=[{"role": "system", "content": SURROGATE}, *HI])),
        ("surrogate stop", _with(stop=[SURROGATE])),
        ("surrogate key", _with(tools=[_tool(parameters={"type": "object", "properties": {SURROGATE: {}}})])),
        ("over context", _with(messages=[{"role": "user", "content": "word " * 2000}])),
        ("over context with max_tokens", _with(max_tokens=CONTEXT - 10)),
        ("tool answers no call", _history({"role": "tool", "tool_call_id": "c9", "content": "3"})),
        ("tool before any call", _with(messages=[{"role": "tool", "tool_call_id": "c1", "content": "3"}, *HI])),
        ("call answered twice", _history({"role": "assistant", "tool_calls": [_call()]},
                                          {"role": "tool", "tool_call_id": "c1", "content": "3"},
                                          {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("call to a function not offered", _history({"role": "assistant", "tool_calls": [_call(name="sub")]},
                                                     {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("duplicate call ids", _history({"role": "assistant", "tool_calls": [_call(), _call()]},
                                         {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("call arguments not JSON", _history({"role": "assistant", "tool_calls": [_call(arguments="{oops")]},
                                              {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("call arguments a list", _history({"role": "assistant", "tool_calls": [_call(arguments="[1]")]},
                                            {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("call arguments too deep", _history({"role": "assistant", "tool_calls": [_call(arguments=_nested(40))]},
                                              {"role": "tool", "tool_call_id": "c1", "content": "3"})),
        ("call without id", _history({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add"}}]})),
        ("ends on assistant", _history({"role": "assistant", "content": "3"})),
        ("ends on assistant call", _history({"role": "assistant", "tool_calls": [_call()]})),
    ]
    out = []
    for label, body in cases:
        out.append((label, body if isinstance(body, bytes) else json.dumps(body).encode()))
    return out


def _check_error(status, body, label):
    assert 400 <= status < 500, (label, status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, (label, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], (label, body)


def test_malformed_requests_get_4xx_in_openai_shape_and_the_server_holds(server):
    url, _ = server
    cases = malformed_requests()
    assert len(cases) >= 150
    assert chat(url, _ok_request())[0] == 200
    rss = psutil.Process().memory_info().rss
    for label, body in cases:
        status, answer = chat(url, body)
        _check_error(status, answer, label)
    for path, method in [("/v1/chat/completions", "GET"), ("/v1/nothing", "POST"), ("/v1/models/nope", "GET")]:
        status, answer = send(url, path, b"{}" if method == "POST" else None, method=method)
        _check_error(status, answer, path)
    status, answer = chat(url, _ok_request())
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert psutil.Process().memory_info().rss - rss < 300 * 2 ** 20


@pytest.mark.parametrize("label,param,fragment", [
    ("stream 0", "stream", "valid boolean"),
    ("parallel_tool_calls 0", "parallel_tool_calls", "valid boolean"),
    ("max_tokens 4", "messages", "maximum context length is 512"),
    ("surrogate content", "messages[0].content", "not valid Unicode"),
    ("tools 11", "tools[0].function.parameters", "not a valid JSON Schema"),
    ("tools 18", "tools[0].function.parameters", "nested deeper"),
    ("tool answers no call", "messages[1].tool_call_id", "answers no earlier tool call"),
    ("call to a function not offered", "messages[1].tool_calls[0].function.name", "not among the request's tools"),
    ("too many messages", "messages", "at most 64"),
    ("tools 20", "tools", "at most 16"),
    ("over context", "messages", "maximum context length is 512"),
])
def test_refusals_name_the_field(server, label, param, fragment):
    body = dict(malformed_requests())[label]
    status, answer = chat(server[0], body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and fragment in answer["error"]["message"], answer


def test_over_context_message_gives_both_numbers(server):
    status, answer = chat(server[0], _with(max_tokens=CONTEXT - 10))
    error = answer["error"]
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"] and "in the completion" in error["message"]


def test_default_max_tokens_is_capped_by_the_context(tmp_path_factory, models):
    from calltune.serve import create_app

    app = create_app(models, default_max_tokens=100_000)
    with running(app) as url:
        status, answer = chat(url, {"model": "tiny-base", "messages": HI, "constrained": False})
    assert status == 200
    assert answer["usage"]["total_tokens"] <= CONTEXT


def test_oversized_body_is_refused_before_it_is_read(server):
    url = urllib.parse.urlsplit(server[0])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for k, v in {**AUTH, "Content-Length": str(50 * 2 ** 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b'{"model": "tiny-base", "messages": [')  # 50 MB announced, 37 bytes sent: no reply would come if it waited
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and body["error"]["code"] == "request_too_large"
    chunked = chat(server[0], b'{"model": "tiny-base", "messages": [' + b'{"role": "user", "content": "hi"},' * 3000)
    assert chunked[0] == 413


def test_over_context_is_refused_before_it_reaches_the_batch(server, monkeypatch):
    from calltune.infer.scheduler import BatchScheduler

    url, _ = server
    submitted = []
    original = BatchScheduler.submit

    def recording(self, prompt, *args, **kwargs):
        submitted.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(BatchScheduler, "submit", recording)
    status, answer = chat(url, _with(messages=[{"role": "user", "content": "word " * 2000}]), timeout=20)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert submitted == []  # refused before queueing: a full batch can't delay the answer
    status, answer = chat(url, _with(max_tokens=2), timeout=20)
    assert status == 200 and len(submitted) == 1, answer


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        _Recorder.hits.append(self.path)
        body = b'{"type": "object"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_external_refs_are_refused_and_nothing_is_fetched(server, tmp_path):
    probe = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    local = tmp_path / "schema.json"
    local.write_text('{"type": "object"}')
    try:
        for ref in [f"http://127.0.0.1:{probe.server_port}/schema.json", local.as_uri()]:
            parameters = {"type": "object", "properties": {"a": {"$ref": ref}}}
            status, answer = chat(server[0], _with(tools=[_tool(parameters=parameters)], tool_choice="required"))
            assert status == 400 and "points outside the schema" in answer["error"]["message"], answer
    finally:
        probe.shutdown()
    assert _Recorder.hits == []


def test_a_call_cut_by_max_tokens_is_finish_reason_length_and_not_content(server):
    status, answer = chat(server[0], _with(model="tiny", tools=[ADD], tool_choice="required", max_tokens=6))
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert not choice["message"]["content"] and not choice["message"].get("tool_calls")


def test_finish_drops_a_cut_call_and_keeps_the_whole_ones(tokenizer):
    from calltune.formats import get_format
    from calltune.infer.engine import Plan, finish
    from calltune.infer.registry import ServedModel

    served = ServedModel(name="m", path="m", model=None, tokenizer=tokenizer, fmt=get_format("hermes"))
    plan = Plan(prompt=[1], grammar=None, parse_calls=True, max_tokens=8)
    whole = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
    for text, calls in [(whole + "<", 1), (whole + "<tool_", 1), (whole + '<tool_call>\n{"name": "ad', 1),
                        ('<tool_call>\n{"name": "add", "argu', 0), ("Let me <tool", 0)]:
        done = finish(served, plan, text, "length", 1, 8)
        assert done.finish_reason == "length"
        assert len(done.message.tool_calls or []) == calls
        assert "<" not in (done.message.content or ""), done.message.content
    assert finish(served, plan, whole, "stop", 1, 8).finish_reason == "tool_calls"


class _Slow:
    """Counts the model's forward passes and slows each one, so a generation lasts long enough to leave."""

    def __init__(self, model, delay: float = 0.02):
        self.calls, self.delay = 0, delay
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        time.sleep(self.delay)


def test_a_stream_whose_client_leaves_stops_and_frees_the_model(server):
    url, app = server
    registry = app.state.registry
    slow = _Slow(registry.get("tiny-base").model)
    try:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", headers=AUTH, body=json.dumps(
            _with(max_tokens=400, stream=True, constrained=False)).encode())
        response = conn.getresponse()
        assert response.status == 200
        response.read1(64)  # the first chunks arrived: generation is under way
        started = slow.calls
        conn.sock.shutdown(2)
        conn.close()
        assert registry.scheduler(registry.get("tiny-base")).wait_idle(20)  # the request left the batch
        spent = slow.calls - started
        assert spent < 100, f"{spent} decode steps after the client left (max_tokens 400)"
        status, answer = chat(url, _ok_request(), timeout=30)
        assert status == 200
    finally:
        slow.handle.remove()


def test_a_request_whose_client_leaves_stops_and_frees_the_model(server):
    url, app = server
    registry = app.state.registry
    slow = _Slow(registry.get("tiny-base").model)
    try:
        with pytest.raises(TimeoutError):
            chat(url, _with(max_tokens=400, constrained=False), timeout=1.0)
        left = slow.calls
        assert registry.scheduler(registry.get("tiny-base")).wait_idle(20)  # the request left the batch
        assert slow.calls < 100 and slow.calls - left < 40, (left, slow.calls)
        assert chat(url, _ok_request(), timeout=30)[0] == 200
    finally:
        slow.handle.remove()


def test_auth_covers_every_route_but_a_bare_liveness_check(server):
    url, _ = server
    for path in ["/v1/models", "/v1/models/tiny", "/docs", "/openapi.json", "/redoc", "/v1/chat/completions", "/x"]:
        status, answer = send(url, path, None, headers={}, method="GET")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", path
    status, answer = send(url, "/health", None, headers={}, method="GET")
    assert status == 200 and answer == {"status": "ok"}


@pytest.mark.slow
def test_sigterm_stops_the_server_during_a_generation(tmp_path, tokenizer):
    models = tiny_models(tmp_path, tokenizer, max_position_embeddings=200_000)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from calltune.cli import main; main()", "serve", models["tiny-base"], "--port", str(port),
                             "--no-constrained", "--max-tokens", "150000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            try:
                if send(f"http://127.0.0.1:{port}", "/health", None, headers={}, method="GET")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        long = threading.Thread(target=lambda: _quietly(chat, f"http://127.0.0.1:{port}",
                                                        {"model": Path(models["tiny-base"]).as_posix(), "messages": HI},
                                                        headers={"Content-Type": "application/json"}, timeout=300),
                                daemon=True)
        long.start()
        time.sleep(3)  # the generation is running
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)  # raises TimeoutExpired if SIGTERM did not stop the generation and the server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _quietly(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except OSError:
        pass
