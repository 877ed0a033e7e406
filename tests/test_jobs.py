"""The fine-tuning jobs service of `calltune serve` (`calltune.serve.jobs`), against real servers on localhost.

Quick (no training; the job queue is paused so jobs stay queued): uploads and their validation (line
and field in the 400), the upload bound, unknown ids (404), ids / file names / suffixes that try to
leave the data directory, base models outside the allow list, the checks a job passes before it is
queued, pagination and cancelling queued jobs, the API key on every route, and what a restart does
to jobs that were running (`Supervisor.recover`).

Slow (LoRA on the real SmolLM2, a few steps): the whole flow with the official `openai` client (upload,
job, events, checkpoints, chat with the ``ft:`` model, cancelling a second job mid-run); Scale LLM
Engine's client (``scale-llm-engine``) from a CSV URL to ``fine_tuned_model`` and a completion; and
SIGKILL of a ``calltune serve`` process while a job trains, then a restart that resumes it.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from calltune.serve.jobs import MIN_SPLIT_EXAMPLES
from conftest import SAMPLES
from serving import free_port, running
from toolcall_model import ASK_PARIS, TOOLS, examples

KEY = "jobs-key"
BASE = "smollm2-135m-instruct"
TOOLS_WIRE = [t.to_dict() for t in TOOLS]


# -- data ----------------------------------------------------------------------------------------
def _wire(example) -> dict:
    """An `Example` as an OpenAI chat fine-tuning row (arguments as JSON strings, call ids set)."""
    messages = []
    for m in example.messages:
        d = m.to_dict()
        for k, call in enumerate(d.get("tool_calls") or []):
            call.setdefault("id", f"call_{k}")
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
        messages.append(d)
    return {"messages": messages, "tools": example.tools_as_dicts()}


def _weighted_row() -> dict:
    """A row whose first assistant turn is context only (``weight: 0``)."""
    return {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                         {"role": "assistant", "content": "Five, I think.", "weight": 0},
                         {"role": "user", "content": "Use the tool, please."},
                         {"role": "assistant", "weight": 1, "tool_calls": [
                             {"id": "call_9", "type": "function",
                              "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}],
            "tools": TOOLS_WIRE}


def training_jsonl() -> bytes:
    """Twice the tiny tool-calling set of `toolcall_model`, plus a weighted row: 13 rows."""
    rows = [_wire(e) for e in examples()] * 2 + [_weighted_row()]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# Few steps, a high constant learning rate: enough for SmolLM2 to reproduce the tiny set
FAST = {"train": {"method": "lora", "max_steps": 8, "batch_size": 6, "save_steps": 4, "logging_steps": 2,
                  "warmup_ratio": 0.0, "lr_scheduler": "constant", "max_length": 512},
        "eval": {"max_new_tokens": 40}}
FAST_LR = 30.0  # x 1e-4 = 3e-3


# -- helpers -------------------------------------------------------------------------------------
def _raw(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or raw bytes) of a request made without a client library."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        data, status = err.read(), err.code
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _wait(check, timeout: float, every: float = 1.0, what: str = "condition"):
    """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _app(data_dir: Path, **options):
    from calltune.serve import create_app
    from calltune.serve.jobs import FineTuning

    jobs = FineTuning(data_dir, {BASE: BASE}, **options)
    return create_app({}, api_key=KEY, jobs=jobs, default_max_tokens=48), jobs


# -- quick: a server whose queue is paused --------------------------------------------------------
@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A jobs-only server (no chat model loaded) whose job queue is stopped: jobs stay queued."""
    data_dir = tmp_path_factory.mktemp("paused") / "data"
    app, jobs = _app(data_dir, max_upload_bytes=64 * 1024)
    with running(app) as url:
        jobs.supervisor.stop()
        yield url, jobs


@pytest.fixture(scope="module")
def uploaded(paused):
    return _client(paused[0]).files.create(file=("train.jsonl", training_jsonl()), purpose="fine-tune")


def test_upload_list_retrieve_content_delete(paused, uploaded):
    client = _client(paused[0])
    assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == ("fine-tune", "train.jsonl", len(training_jsonl()))
    assert uploaded.examples == 13 and uploaded.source == "openai_jsonl"
    assert uploaded.id in [f.id for f in client.files.list().data]
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert client.files.content(uploaded.id).read() == training_jsonl()
    other = client.files.create(file=("again.jsonl", training_jsonl()), purpose="fine-tune")
    assert client.files.delete(other.id).deleted
    assert other.id not in [f.id for f in client.files.list().data]
    assert not list(paused[1].store.files_dir.glob(f"{other.id}*"))


def _bad_weight() -> bytes:
    rows = _lines(training_jsonl())[:4]
    rows[2]["messages"][1]["weight"] = 2
    return _jsonl(rows)


def _empty_name() -> bytes:
    rows = _lines(training_jsonl())[:3]
    rows[1]["messages"][1]["tool_calls"][0]["function"]["name"] = ""
    return _jsonl(rows)


def _undeclared() -> bytes:
    rows = _lines(training_jsonl())[:3]
    rows[2]["messages"][1]["tool_calls"][0]["function"]["name"] = "multiply"
    return _jsonl(rows)


@pytest.mark.parametrize("name,data,extra,says", [
    ("w.jsonl", _bad_weight(), {}, ["w.jsonl, line 3", "messages[1].weight must be 0 or 1, got 2"]),
    ("n.jsonl", _empty_name(), {}, ["n.jsonl, line 2", "messages[1].tool_calls[0].function.name"]),
    ("u.jsonl", _undeclared(), {}, ["u.jsonl, line 3", "'multiply'"]),
    ("j.jsonl", training_jsonl().split(b"\n")[0] + b"\n\n" + training_jsonl()[:50], {}, ["j.jsonl, line 3", "not JSON"]),
    ("c.csv", b"question,answer\nhi,hello\n", {"source": "llama_functions"}, ["c.csv, field 'input'", "prompt,response"]),
    ("x.json", b"[]", {"source": "xlam"}, ["x.json"]),
])
def test_bad_upload_is_a_400_naming_line_and_field(paused, name, data, extra, says):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        _client(paused[0]).files.create(file=(name, data), purpose="fine-tune", extra_body=extra)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == "file" and body["code"] == "invalid_file"
    for text in says:
        assert text in body["message"]
    assert str(paused[1].store.root) not in body["message"]  # the server's paths stay private
    assert not [f for f in _client(paused[0]).files.list().data if f.filename == name]


def test_upload_fields_and_size_are_checked(paused):
    import openai

    client = _client(paused[0])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", training_jsonl()), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="did you mean 'xlam'"):
        client.files.create(file=("a.json", b"[]"), purpose="fine-tune", extra_body={"source": "xlamm"})
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", training_jsonl() * 40), purpose="fine-tune")
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


def test_unknown_ids_are_404(paused):
    url = paused[0]
    missing_file, missing_job = "file-" + "0" * 24, "ftjob-" + "0" * 24
    for method, path in [("GET", f"/v1/files/{missing_file}"), ("DELETE", f"/v1/files/{missing_file}"),
                         ("GET", f"/v1/files/{missing_file}/content"), ("GET", "/v1/files/nope"),
                         ("GET", f"/v1/fine_tuning/jobs/{missing_job}"), ("POST", f"/v1/fine_tuning/jobs/{missing_job}/cancel"),
                         ("GET", f"/v1/fine_tuning/jobs/{missing_job}/events"),
                         ("GET", f"/v1/fine_tuning/jobs/{missing_job}/checkpoints"), ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
                         ("GET", f"/v1/llm/fine-tunes/{missing_job}"), ("PUT", f"/v1/llm/fine-tunes/{missing_job}/cancel"),
                         ("GET", f"/v1/llm/fine-tunes/{missing_job}/events")]:
        status, body = _raw(url + path, method, headers=_auth())
        assert status == 404, (method, path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    import openai

    with pytest.raises(openai.NotFoundError):
        _client(url).fine_tuning.jobs.retrieve(missing_job)


@pytest.mark.parametrize("trick", ["..%2Fcalltune.db", "file-..%2F..%2Fcalltune.db", "%2E%2E", "..",
                                   "file-" + "0" * 23 + "%00", "%2Fetc%2Fpasswd", "file-" + "a" * 24 + "%2F..%2F..%2Fcalltune.db"])
def test_ids_cannot_address_files_outside_their_folder(paused, trick):
    for path in (f"/v1/files/{trick}", f"/v1/files/{trick}/content", f"/v1/fine_tuning/jobs/{trick}",
                 f"/v1/fine_tuning/jobs/{trick}/events", f"/v1/llm/fine-tunes/{trick}"):
        status, body = _raw(paused[0] + path, headers=_auth())
        assert status == 404 and "error" in body, (path, status, body)


def test_file_names_and_suffixes_cannot_leave_the_data_dir(paused, uploaded):
    import openai

    client = _client(paused[0])
    root = paused[1].store.root
    stored = client.files.create(file=("../../escape.jsonl", training_jsonl()), purpose="fine-tune")
    assert stored.filename == "escape.jsonl"
    assert not (root.parent / "escape.jsonl").exists() and not (root.parent.parent / "escape.jsonl").exists()
    assert [p.name for p in paused[1].store.files_dir.iterdir() if p.name.startswith(stored.id)] == [f"{stored.id}.jsonl"]
    for suffix in ["../../x", "a/b", "x:y", "", "a" * 41, "..", "ü"]:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix=suffix)
        assert err.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError, match="training_file"):
        client.fine_tuning.jobs.create(model=BASE, training_file="../calltune.db")
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("calltune.db")) == ["files", "runs"]


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/etc", "../smollm2-135m-instruct",
                                   "smollm2-135m-instruct/../x", "ft:smollm2-135m-instruct::ftjob-" + "0" * 24, "gpt2"])
def test_base_model_must_be_allowed(paused, uploaded, model):
    import openai

    before = len(_client(paused[0]).fine_tuning.jobs.list(limit=100).data)
    with pytest.raises(openai.BadRequestError) as err:
        _client(paused[0]).fine_tuning.jobs.create(model=model, training_file=uploaded.id)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_available"
    assert BASE in err.value.body["message"]
    assert len(_client(paused[0]).fine_tuning.jobs.list(limit=100).data) == before


def test_a_job_is_checked_before_it_is_queued(paused, uploaded):
    import openai

    client, store = _client(paused[0]), paused[1].store
    results = store.add_file("file-" + "f" * 24, "report.md", 3, "fine-tune-results", None, "file-" + "f" * 24 + ".md", None)
    (store.files_dir / results["path"]).write_text("hi\n")
    few = client.files.create(file=("few.jsonl", _jsonl(_lines(training_jsonl())[:3])), purpose="fine-tune")
    before = len(client.fine_tuning.jobs.list(limit=100).data)
    cases = [
        (dict(training_file="file-" + "1" * 24), "training_file", "no file with id"),
        (dict(training_file=uploaded.id, validation_file="file-" + "2" * 24), "validation_file", "no file with id"),
        (dict(training_file=results["id"]), "training_file", "not 'fine-tune'"),
        (dict(training_file=few.id), "training_file", "at least 5"),
        (dict(training_file=uploaded.id, method={"type": "dpo"}), "method.type", "not supported"),
        (dict(training_file=uploaded.id, extra_body={"calltune": {"train": {"max_stepz": 3}}}),
         "calltune.train.max_stepz", "Extra inputs"),
        (dict(training_file=uploaded.id, extra_body={"calltune": {"train": {"method": "dora"}}}),
         "calltune.train.method", "lora"),
        (dict(training_file=uploaded.id, extra_body={"calltune": {"format": "hermez"}}), "calltune.format", "hermes"),
        (dict(training_file=uploaded.id, hyperparameters={"n_epochs": "three"}), "hyperparameters.n_epochs", ""),
        (dict(training_file=uploaded.id, seed=-1), "seed", ""),
    ]
    for kwargs, param, says in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=BASE, **kwargs)
        assert err.value.body["param"] == param and says in err.value.body["message"], err.value.body
    assert len(client.fine_tuning.jobs.list(limit=100).data) == before


def test_jobs_page_and_a_queued_job_cancels(paused, uploaded):
    client = _client(paused[0])
    made = [client.fine_tuning.jobs.create(model=BASE, training_file=uploaded.id, suffix=f"p{i}", seed=i,
                                           metadata={"n": str(i)},
                                           method={"type": "supervised", "supervised": {"hyperparameters": {
                                               "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0}}},
                                           extra_body={"calltune": {"train": {"method": "qlora"}}})
            for i in range(3)]
    job = client.fine_tuning.jobs.retrieve(made[0].id)
    assert job.status in ("validating_files", "queued") and job.seed == 0 and job.metadata == {"n": "0"}
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
    assert job.recipe["train"]["method"] == "qlora" and job.recipe["data"]["train"] == uploaded.id
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == [made[2].id, made[1].id] and first.has_more
    rest = client.fine_tuning.jobs.list(limit=2, after=made[1].id)
    assert made[0].id in [j.id for j in rest.data]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)][:3] == [m.id for m in reversed(made)]
    assert client.fine_tuning.jobs.cancel(made[1].id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(made[1].id).status == "cancelled"  # again: unchanged
    events = [e.message for e in client.fine_tuning.jobs.list_events(made[1].id)]
    assert events[0] == "Fine-tuning job cancelled" and events[-1].startswith("Validating training file")
    assert client.fine_tuning.jobs.checkpoints.list(made[1].id).data == []
    status, body = _raw(paused[0] + f"/v1/llm/fine-tunes/{made[1].id}", headers={"x-api-key": KEY})
    assert (status, body["status"], body["fine_tuned_model"]) == (200, "CANCELLED", None)
    status, body = _raw(paused[0] + f"/v1/llm/fine-tunes/{made[0].id}", headers={"x-api-key": KEY})
    assert body["status"] == "PENDING"


def test_the_api_key_guards_every_route(paused, uploaded):
    url, job = paused[0], "ftjob-" + "0" * 24
    routes = [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", f"/v1/files/{uploaded.id}"),
              ("GET", f"/v1/files/{uploaded.id}/content"), ("DELETE", f"/v1/files/{uploaded.id}"),
              ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"), ("GET", f"/v1/fine_tuning/jobs/{job}"),
              ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"), ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
              ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints"), ("GET", "/v1/llm/fine-tunes"),
              ("POST", "/v1/llm/fine-tunes"), ("GET", f"/v1/llm/fine-tunes/{job}"),
              ("PUT", f"/v1/llm/fine-tunes/{job}/cancel"), ("GET", f"/v1/llm/fine-tunes/{job}/events"),
              ("POST", "/v1/llm/completions-sync?model_endpoint_name=x"), ("GET", "/v1/models")]
    for headers in ({}, _auth("wrong"), {"x-api-key": "wrong"}, {"Authorization": "Basic d3Jvbmc6"}):
        for method, path in routes:
            status, body = _raw(url + path, method, body=b"{}" if method in ("POST", "PUT") else None, headers=headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (headers, method, path)
    assert _client(url).files.retrieve(uploaded.id).id == uploaded.id
    assert _raw(url + "/v1/llm/fine-tunes", headers={"x-api-key": KEY})[0] == 200  # the llmengine client's header
    assert uploaded.id in [f.id for f in _client(url).files.list().data]  # nothing was deleted without the key


def test_a_restart_resumes_running_jobs_from_a_checkpoint_or_fails_them(tmp_path):
    """`Supervisor.recover`: what a server finds at start-up from a run the last one left."""
    from calltune.serve.jobs import CreateJob, FineTuning

    jobs = FineTuning(tmp_path / "data", {BASE: BASE})
    store = jobs.store
    file = jobs.store_upload(_put(jobs, training_jsonl()), "train.jsonl", "openai_jsonl")
    made = [jobs.create_job(CreateJob(model=BASE, training_file=file["id"])) for _ in range(3)]
    with_checkpoint, without, queued = (j["id"] for j in made)
    for job_id in (with_checkpoint, without):
        store.update_job(job_id, status="running")
    store.update_job(queued, status="queued")
    for step, whole in ((2, True), (4, True), (6, False)):  # checkpoint-6 was being written when the server died
        folder = store.run_dir(with_checkpoint) / "model" / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if whole:
            (folder / "trainer_state.json").write_text("{}")
    from calltune.serve.worker import Supervisor

    Supervisor(store, on_success=None).recover()
    resumed, failed = store.get_job(with_checkpoint), store.get_job(without)
    assert resumed["status"] == "running" and resumed["resume_from"] == "model/checkpoints/checkpoint-4"
    assert "resuming from checkpoint-4" in store.list_events(with_checkpoint)[0][0]["message"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_restarted"
    assert "before its first checkpoint" in failed["error"]["message"]
    assert store.get_job(queued)["status"] == "queued"


@pytest.mark.parametrize("args,says", [
    (["--allow-base", BASE], "--allow-base needs --data-dir"),
    (["--data-dir", "{tmp}"], "needs at least one --allow-base"),
    (["--data-dir", "{tmp}", "--allow-base", "no-such-model"], "not a built-in alias"),
    (["--data-dir", "{tmp}", "--allow-base", f"a={BASE}", "--allow-base", f"a={BASE}"], "each name once"),
])
def test_serve_checks_its_fine_tuning_options(tmp_path, args, says):
    from typer.testing import CliRunner

    from calltune.cli import app

    result = CliRunner().invoke(app, ["serve", *(a.format(tmp=tmp_path / "data") for a in args)])
    assert result.exit_code == 2 and says in result.output, result.output


def _put(jobs, data: bytes) -> Path:
    temp = jobs._temp()
    temp.write_bytes(data)
    return temp


# -- slow: training ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A jobs-only server that trains (LoRA on SmolLM2) in its worker process."""
    app, jobs = _app(tmp_path_factory.mktemp("live") / "data", grace=5.0)
    with running(app) as url:
        yield url, jobs, app


def _events(client, job_id: str) -> list:
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=10000).data))  # oldest first


def _finished(client, job_id: str):
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


@pytest.mark.slow
def test_openai_client_flow_end_to_end(live):
    url, jobs, app = live
    client = _client(url)
    train = client.files.create(file=("train.jsonl", training_jsonl()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, suffix="weather", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": FAST_LR}}},
        extra_body={"calltune": FAST})
    done = _wait(lambda: _finished(client, job.id), 900, 2, "the job to finish")
    assert done.status == "succeeded", done.error
    name = f"ft:{BASE}:weather:{job.id}"
    assert done.fine_tuned_model == name and done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert name in [m.id for m in client.models.list().data]

    events = _events(client, job.id)
    messages = [e.message for e in events]
    assert messages[0].startswith("Validating training file") and messages[-1] == "The job has successfully completed"
    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert [s["step"] for s in steps] == [2, 4, 6, 8] and all(s["tokens_per_s"] > 0 for s in steps)
    evaluation = [e.data for e in events if e.message.startswith("Evaluation of the tuned model")]
    assert evaluation and "exact_call_accuracy" in evaluation[0]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 8, 4]  # the final model, then the saves, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == name
    assert checkpoints[-1].fine_tuned_model_checkpoint == f"{name}:ckpt-step-4"
    assert all(c.metrics.train_loss is not None and c.metrics.step for c in checkpoints)

    report, summary = (client.files.retrieve(f) for f in done.result_files)
    assert report.purpose == "fine-tune-results" and report.filename.endswith("report.md")
    assert b"calltune report" in client.files.content(report.id).read()
    assert json.loads(client.files.content(summary.id).read())["train"]["steps"] == 8

    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": ASK_PARIS}],
                                            tools=TOOLS_WIRE, max_tokens=48)
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] == "Paris"

    # a second job, cancelled once it has saved a checkpoint: its worker stops within seconds
    long = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="long",
                                          extra_body={"calltune": {**FAST, "train": {**FAST["train"], "max_steps": 500,
                                                                                     "save_steps": 1}}})
    _wait(lambda: client.fine_tuning.jobs.checkpoints.list(long.id).data, 600, 1, "a checkpoint of the second job")
    pid = jobs.store.get_job(long.id)["worker_pid"]
    started = time.time()
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    _wait(lambda: not _alive(pid), 15, 0.2, "the worker to stop")
    assert time.time() - started < 15
    _wait(lambda: "Training stopped" in _events(client, long.id)[-1].message, 15, 0.5, "the stop event")
    kept = client.fine_tuning.jobs.checkpoints.list(long.id).data
    assert kept and (jobs.store.run_dir(long.id) / "model" / "checkpoints").exists()
    assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    assert f"ft:{BASE}:long:{long.id}" not in [m.id for m in client.models.list().data]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _llama_csv(rows: int) -> bytes:
    """The `rows` shortest usable calling rows of the llama_functions sample (the quickest to train) as LLM
    Engine's prompt,response CSV, in the sample's order."""
    from calltune.sources.llama_functions import llama_functions_row_to_example

    usable = []
    for line in (SAMPLES / "llama_functions.jsonl").read_text().splitlines():
        row = json.loads(line)
        try:
            llama_functions_row_to_example(row, "sample", 0)
        except ValueError:
            continue
        if "<<API>>" in row["input"]:
            usable.append(row)
    shortest = sorted(range(len(usable)), key=lambda k: len(usable[k]["input"]) + len(usable[k]["output"]))[:rows]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "response"])
    writer.writeheader()
    for k in sorted(shortest):
        writer.writerow({"prompt": usable[k]["input"], "response": usable[k]["output"]})
    return out.getvalue().encode()


@pytest.fixture
def csv_url(tmp_path):
    """The CSV served over HTTP on localhost, as the seed's Gist was."""
    (tmp_path / "data.csv").write_bytes(_llama_csv(MIN_SPLIT_EXAMPLES))  # the fewest a job without validation file takes
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data.csv"
    httpd.shutdown()


@pytest.mark.slow
def test_llm_engine_client_flow(live, csv_url, monkeypatch):
    """Seed 003's code, unchanged but for the URL: FineTune.create -> get -> fine_tuned_model -> Completion."""
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", live[0] + "/")
    monkeypatch.setenv("SCALE_API_KEY", KEY)
    monkeypatch.setenv("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")
    from llmengine import Completion, FineTune
    from llmengine.errors import BadRequestError

    response = FineTune.create(model=BASE, training_file=csv_url, hyperparameters={"lr": 2e-4},
                               suffix="function-call-llama")
    run_id = response.id
    _wait(lambda: FineTune.get(run_id).status in ("SUCCESS", "FAILURE", "CANCELLED"), 900, 2, "the fine-tune")
    job = FineTune.get(run_id)
    assert job.status == "SUCCESS", _client(live[0]).fine_tuning.jobs.retrieve(run_id).error
    ft_model = FineTune.get(run_id).fine_tuned_model
    assert ft_model == f"ft:{BASE}:function-call-llama:{run_id}"
    assert run_id in [j.id for j in FineTune.list().jobs]
    events = FineTune.get_events(run_id).events
    assert events[0].message.startswith("Validating training file") and any("loss" in e.message for e in events)
    recipe = _client(live[0]).fine_tuning.jobs.retrieve(run_id).recipe
    assert recipe["data"]["source"] == "llama_functions" and recipe["train"]["learning_rate"] == 2e-4
    assert FineTune.cancel(run_id).success is False  # already finished

    prompt = next(csv.DictReader(io.StringIO(_llama_csv(1).decode())))["prompt"]
    output = Completion.create(model=ft_model, prompt=prompt, max_new_tokens=64, temperature=0.0).output
    assert output.num_completion_tokens > 0 and isinstance(output.text, str)

    with pytest.raises(BadRequestError):
        FineTune.create(model=BASE, training_file="ftp://example.invalid/data.csv")
    with pytest.raises(BadRequestError):
        FineTune.create(model=BASE, training_file=csv_url, hyperparameters={"lr": "fast"})


def _up(port: int) -> bool:
    try:
        return _raw(f"http://127.0.0.1:{port}/health")[0] == 200
    except OSError:  # not listening yet
        return False


def _serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`calltune serve` for jobs only, in its own process (so the test can SIGKILL it)."""
    command = [sys.executable, "-m", "calltune.cli", "serve", "--data-dir", str(data_dir),
               "--allow-base", BASE, "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait(lambda: proc.poll() is not None or _up(port), 120, 0.5, "the server")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


@pytest.mark.slow
def test_server_killed_while_training_resumes_after_restart(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(data_dir, port, tmp_path / "server.log")
    try:
        client = _client(url)
        train = client.files.create(file=("train.jsonl", training_jsonl()), purpose="fine-tune")
        slow = {**FAST, "train": {**FAST["train"], "max_steps": 5, "save_steps": 2, "logging_steps": 1}}
        first = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="first",
                                               extra_body={"calltune": slow})
        second = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="second",
                                                extra_body={"calltune": {**FAST, "train": {**FAST["train"], "max_steps": 1}}})
        _wait(lambda: client.fine_tuning.jobs.checkpoints.list(first.id).data, 600, 0.5, "a checkpoint")
        before = _events(client, first.id)
        worker = _wait(lambda: _db_job(data_dir, first.id)["worker_pid"], 10, 0.2, "the worker pid")
        server.send_signal(signal.SIGKILL)
        server.wait()
        _wait(lambda: not _alive(worker), 10, 0.2, "the orphaned worker to exit")
        assert _db_job(data_dir, second.id)["status"] == "queued"

        server = _serve(data_dir, port, tmp_path / "server.log")
        client = _client(url)
        assert client.files.retrieve(train.id).bytes == len(training_jsonl())
        done = _wait(lambda: _finished(client, first.id), 900, 2, "the resumed job")
        assert done.status == "succeeded", done.error
        after = _events(client, first.id)
        assert [e.id for e in after[:len(before)]] == [e.id for e in before]  # nothing written was lost
        resumed = [e for e in after if "resuming from checkpoint-" in e.message]
        assert resumed and resumed[0].data["step"] >= 2
        assert any(e.message.startswith(f"Training started from step {resumed[0].data['step']}") for e in after)
        steps = [e.data["step"] for e in after if e.type == "metrics" and "train_loss" in (e.data or {})]
        assert steps[-1] == 5
        second_done = _wait(lambda: _finished(client, second.id), 600, 2, "the queued job")
        assert second_done.status == "succeeded", second_done.error
        served = [m.id for m in client.models.list().data]
        assert done.fine_tuned_model in served and second_done.fine_tuned_model in served
        answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=48, tools=TOOLS_WIRE,
                                                tool_choice="required", messages=[{"role": "user", "content": ASK_PARIS}])
        assert answer.choices[0].message.tool_calls[0].function.name in ("get_weather", "add")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _db_job(data_dir: Path, job_id: str) -> dict:
    from calltune.serve.jobstore import JobStore

    return JobStore(data_dir).get_job(job_id)
