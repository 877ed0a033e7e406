"""Load on `calltune serve`: concurrent chat completions with tools, batched against one at a time.

Run (starts the server itself, once per ``--max-batch`` value and engine, on a free localhost port):

    python benchmarks/serve_load.py          # smollm2-135m-instruct: 8 clients and 1, at --max-batch 8 and 1
    python benchmarks/serve_load.py --model runs/bfcl-default/model --clients 16,1 --requests 64 --max-batch 16,1
    python benchmarks/serve_load.py --clients 4 --requests 8 --max-tokens 16   # smoke run
    python benchmarks/serve_load.py --max-batch 8 --prefix-cache-mb 512,0   # with and without the prefix cache
    .venv-vllm/bin/python benchmarks/serve_load.py --model runs/bfcl-default/model --engines calltune,vllm

Owns the benchmark only: nothing in `calltune` imports it. For each ``--max-batch`` value it starts
``calltune serve MODEL --max-batch B --max-queue CLIENTS`` (so nothing is refused with 429), sends one
warm-up request, then has ``--clients`` threads, each an `openai` client, send ``--requests`` chat
completions in all (a user question from `QUESTIONS` in turn, with `TOOLS` offered, ``tool_choice:
auto``, greedy, ``max_tokens`` ``--max-tokens``), each thread sending its next request as soon as its
last one is answered. Every setting gets the same requests in the same order. With ``--engines
vllm`` the same load goes to ``calltune serve MODEL --engine vllm`` (vLLM's OpenAI server with the
model's chat template and tool-call parser; it batches as it sees fit, so no ``--max-batch``); vLLM
is unconstrained, so compare it with calltune's ``--no-constrained``.

Reported per setting: requests/s and completion tokens/s (the server's ``usage.completion_tokens``
over the wall time from the first request to the last answer), p50/p95 request latency (seconds, as a
client sees it), how many answers called a tool, and whether the greedy answers are the same as the
first setting's (batched decoding in bf16 may flip near-tied tokens; in fp32 they match).

Writes ``--out`` (JSON, default runs/bench/serve_load.json), each server's output beside it
(``<--out's stem>-server-K.log``, K counting the servers started from 0) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Search flights between two airports on a date.",
        "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                                        "date": {"type": "string", "description": "YYYY-MM-DD"}},
                       "required": ["origin", "destination", "date"]}}},
]

QUESTIONS = [
    "What's the weather in Oslo?",
    "How warm is it in Lisbon right now, in fahrenheit?",
    "What is 17 plus 25?",
    "Find me a flight from JFK to LHR on 2026-12-20.",
    "Tell me a short joke about cats.",
    "Add 3.5 and 1.25 please.",
    "Is it raining in Tokyo?",
    "Any flights from SFO to NRT on 2027-01-05?",
    "Explain in one sentence what a function call is.",
    "What's 1000 plus 2345?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, port: int, max_batch: int, max_queue: int, constrained: bool, log: Path,
           engine: str = "calltune", prefix_cache_mb: int | None = None) -> subprocess.Popen:
    """`calltune serve` in a subprocess, its output in `log`; returns once /health answers (or raises with
    the log's tail)."""
    command = [sys.executable, "-c", "from calltune.cli import main; main()", "serve", model, "--port", str(port)]
    if engine == "vllm":  # vLLM's server, with the model's chat template and tool-call parser
        command += ["--engine", "vllm"]
    else:
        command += ["--max-batch", str(max_batch), "--max-queue", str(max_queue),
                    "--constrained" if constrained else "--no-constrained"]
        if prefix_cache_mb is not None:
            command += ["--prefix-cache-mb", str(prefix_cache_mb)]
    # the server's output goes to a file: a pipe nobody reads fills up and blocks a server that logs every
    # request (vLLM's does), which then stops answering
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 1200  # vLLM's engine start takes minutes on a CPU
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start ({log}):\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Send `requests` completions from `clients` threads; per request: latency, tokens and the answer."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def ask(i: int) -> dict:
        started = time.perf_counter()
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tools=TOOLS,
            tool_choice="auto", max_tokens=max_tokens, temperature=0)
        message = response.choices[0].message
        answer = [(c.function.name, c.function.arguments) for c in message.tool_calls or []] or message.content
        return {"seconds": time.perf_counter() - started, "tokens": response.usage.completion_tokens,
                "called": bool(message.tool_calls), "answer": answer}

    ask(0)  # warm-up: first-use costs (grammar compilation, allocation) stay out of the figures
    results: list[dict | None] = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                results[i] = ask(i)
            except Exception as err:  # reported after the run
                failures.append(err)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        print(f"  {len(failures)} requests failed, the first: {failures[0]!r}", flush=True)
    results = [r for r in results if r is not None]
    if not results:
        raise RuntimeError(f"every request failed, the first: {failures[0]!r}")
    latencies = sorted(r["seconds"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"wall_seconds": wall, "errors": len(failures), "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall,
            "completion_tokens": tokens, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "called": sum(r["called"] for r in results), "answers": [r["answer"] for r in results]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="anything `calltune serve` takes")
    parser.add_argument("--clients", default="8,1", help="comma-separated numbers of concurrent client threads")
    parser.add_argument("--requests", type=int, default=32, help="requests per setting")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", default="8,1", help="comma-separated --max-batch values to compare")
    parser.add_argument("--prefix-cache-mb", default="", help="comma-separated --prefix-cache-mb values to compare "
                        "(calltune engine; default: the server's)")
    parser.add_argument("--no-constrained", action="store_true", help="serve with --no-constrained")
    parser.add_argument("--engines", default="calltune", help="comma-separated: calltune (once per --max-batch), "
                        "vllm (`calltune serve --engine vllm`: needs vLLM here and a model calltune saved)")
    parser.add_argument("--out", default="runs/bench/serve_load.json")
    args = parser.parse_args(argv)

    clients = [int(c) for c in args.clients.split(",")]
    settings: dict[str, dict] = {}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    caches = [int(c) for c in args.prefix_cache_mb.split(",")] if args.prefix_cache_mb else [None]
    runs = [("calltune", int(b), c) for b in args.max_batch.split(",") for c in caches] if "calltune" in engines else []
    runs += [("vllm", 0, None)] if "vllm" in engines else []
    for k, (engine, max_batch, cache_mb) in enumerate(runs):
        port = _free_port()
        label = f"calltune --max-batch {max_batch}" if engine == "calltune" else "vllm"
        label += f" --prefix-cache-mb {cache_mb}" if cache_mb is not None else ""
        log = Path(args.out).parent / f"{Path(args.out).stem}-server-{k}.log"
        proc = _start(args.model, port, max_batch, max(clients), not args.no_constrained, log, engine, cache_mb)
        try:
            for n in clients:
                print(f"{label}: {args.requests} requests from {n} clients ...", flush=True)
                settings[f"{label} / {n}"] = _load(f"http://127.0.0.1:{port}", args.model, n, args.requests,
                                                   args.max_tokens)
        finally:
            _stop(proc)
    first = next(iter(settings.values()))["answers"]
    print(f"\n{args.model}, {args.requests} requests per setting, max_tokens {args.max_tokens}, "
          f"constrained {not args.no_constrained}\n")
    print("| server / clients | errors | requests/s | tokens/s | p50 latency (s) | p95 latency (s) "
          "| answers calling | same answers as the first setting |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in settings.items():
        same = sum(a == b for a, b in zip(r["answers"], first))
        print(f"| {name} | {r['errors']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} "
              f"| {r['p95_s']:.2f} | {r['called']}/{len(r['answers'])} | {same}/{len(r['answers'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "settings": settings}, indent=1))
    return settings


if __name__ == "__main__":
    main()
