"""The fine-tuning service of ``calltune serve``: OpenAI's files and fine-tuning jobs routes.

Owns `FineTuning` (the service: data directory, allowed base models, upload bound) and its FastAPI
router, which `calltune.serve.app.create_app(..., jobs=FineTuning(...))` includes beside the chat
routes (so the same API key and the same error shape hold on every route). Follows
https://platform.openai.com/docs/api-reference/files and .../fine-tuning:

- ``POST /v1/files`` (multipart: ``file``, ``purpose`` = ``fine-tune``, and the calltune field
  ``source`` naming the file's layout, one of `calltune.sources.SOURCES`; default ``openai_jsonl``:
  chat JSONL with ``tools`` and per-message ``weight``), ``GET /v1/files``, ``GET``/``DELETE
  /v1/files/{id}``, ``GET /v1/files/{id}/content``. An upload is converted whole by its source; any
  row the source rejects makes the upload a 400 that names the line (row) and the source's reason,
  which names the field.
- ``POST /v1/fine_tuning/jobs``: ``model`` (a name given to ``--allow-base``), ``training_file``,
  ``validation_file`` (else a seeded 10% of the training examples is held out), ``suffix``, ``seed``,
  ``metadata``, ``method`` (``{"type": "supervised", "supervised": {"hyperparameters": {n_epochs,
  batch_size, learning_rate_multiplier}}}``) or the older top-level ``hyperparameters``, and the
  calltune extension ``calltune`` (`CalltuneOptions`: recipe sections ``train``, ``eval``, ``format``,
  ...; e.g. ``{"train": {"method": "qlora", "max_steps": 200}}``, sent with the openai client's
  ``extra_body``). The job's recipe is built and validated here, so every mistake is a 400 before
  anything is queued. ``learning_rate_multiplier`` scales `BASE_LEARNING_RATE`. The job keeps its own
  copy of its files (in its run folder), so deleting a file later does not touch it.
- ``GET /v1/fine_tuning/jobs`` (``after``, ``limit``), ``GET .../{id}``, ``POST .../{id}/cancel``,
  ``GET .../{id}/events``, ``GET .../{id}/checkpoints`` (newest first, ``after`` and ``limit``).

A finished job's model is served as ``ft:<base>:<suffix>:<job-id>``. The thin Scale LLM Engine routes
(the ``scale-llm-engine`` client: ``POST/GET /v1/llm/fine-tunes``, ``GET .../{id}``, ``PUT
.../{id}/cancel``, ``GET .../{id}/events``, ``POST /v1/llm/completions-sync``) map onto the same jobs;
there a training file may also be an http(s) URL, fetched (size-bounded) and validated like an
upload, a ``prompt,response`` CSV read by the ``llama_functions`` source unless it ends in ``.jsonl``.

Safety: ids are checked against their pattern before they name a path (anything else is a 404), file
names are kept only as metadata, suffixes match ``[A-Za-z0-9_-]{1,40}``, and a job's base model is
looked up in the server's allow list, never taken from the request as a path or hub id.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import secrets
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calltune.errors import CalltuneError
from calltune.infer.engine import RequestError
from calltune.serve.jobstore import ACTIVE, JobStore, new_id, now
from calltune.serve.worker import Supervisor, _ft_name

log = logging.getLogger(__name__)

BASE_LEARNING_RATE = 1e-4  # learning_rate_multiplier 1.0 (TrainConfig's default learning rate)
FILE_SOURCES = ("openai_jsonl", "xlam", "glaive", "llama_functions", "hermes", "viggo")  # bfcl reads no file
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
MIN_SPLIT_EXAMPLES = 5  # the fewest training examples whose 10% split holds out at least one
_SUFFIX = r"^[A-Za-z0-9_-]{1,40}$"


def _error(message: str, param: str | None = None, status: int = 400, code: str | None = None,
           type: str = "invalid_request_error") -> RequestError:
    return RequestError(message, param=param, status=status, code=code, type=type)


def _not_found(kind: str, value: str, param: str | None = None) -> RequestError:
    return _error(f"No {kind} found with id {value!r}.", param=param, status=404, code=f"{kind.replace(' ', '_')}_not_found",
                  type="not_found_error")


# -- requests ------------------------------------------------------------------------------------
class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Hyperparameters(_In):
    """OpenAI's supervised hyperparameters; ``"auto"`` keeps calltune's default."""

    n_epochs: Any = None  # "auto" or 1..50
    batch_size: Any = None  # "auto" or 1..256
    learning_rate_multiplier: Any = None  # "auto" or a number in (0, 100]

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier")
    @classmethod
    def _auto_or_number(cls, value: Any, info) -> Any:
        if value is None or value == "auto":
            return value
        if info.field_name == "learning_rate_multiplier":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 100:
                return float(value)
            raise ValueError(f"must be 'auto' or a number above 0 and at most 100, got {value!r}")
        top = 50 if info.field_name == "n_epochs" else 256
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top:
            return value
        raise ValueError(f"must be 'auto' or an integer from 1 to {top}, got {value!r}")


class SupervisedMethod(_In):
    hyperparameters: Hyperparameters | None = None


class Method(_In):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None


class CalltuneOptions(BaseModel):
    """The calltune extension of a job: recipe sections, as in a recipe file (`calltune.recipe.Recipe`).

    ``train`` sets `TrainConfig` fields (``method``: full, lora or qlora; ``max_steps``,
    ``save_steps``, ``lora``, ...), ``eval`` `EvalConfig` fields (the base model is not evaluated
    unless ``{"base": true}``), ``format``/``format_options`` the prompt format (default ``auto``),
    ``clean``/``augment`` the data rules, ``limit``/``eval_limit`` how many rows to use.
    """

    model_config = ConfigDict(extra="forbid")
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    format: str | None = None
    format_options: dict[str, Any] | None = None
    clean: dict[str, Any] | None = None
    augment: dict[str, Any] | None = None
    limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)


class CreateJob(_In):
    """``POST /v1/fine_tuning/jobs``."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(None, pattern=_SUFFIX)
    seed: int | None = Field(None, ge=0, le=2 ** 31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[Any] | None = None
    calltune: CalltuneOptions | None = None


class CreateFineTune(BaseModel):
    """``POST /v1/llm/fine-tunes`` (Scale LLM Engine's `CreateFineTuneRequest`)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    wandb_config: dict[str, Any] | None = None
    suffix: str | None = Field(None, pattern=_SUFFIX)


class CompletionSync(BaseModel):
    """``POST /v1/llm/completions-sync`` (Scale LLM Engine's `CompletionSyncV1Request`)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(0.2, ge=0, le=1)
    stop_sequences: list[str] | None = None
    top_p: float | None = Field(None, gt=0, le=1)


# LLM Engine's names for its hyperparameters -> TrainConfig fields
LLM_ENGINE_HYPERPARAMETERS = {"lr": "learning_rate", "epochs": "epochs", "warmup_ratio": "warmup_ratio",
                              "weight_decay": "weight_decay"}
_PEFT = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
LLM_ENGINE_STATUS = {"validating_files": "PENDING", "queued": "PENDING", "running": "RUNNING", "succeeded": "SUCCESS",
                     "failed": "FAILURE", "cancelled": "CANCELLED"}


# -- the service ---------------------------------------------------------------------------------
class FineTuning:
    """The files and fine-tuning jobs service of one server.

    Args:
        data_dir: where the state (SQLite), files and runs live; created if missing.
        allowed_bases: ``{name: model}``: the base models a job may name (``model``) and what each is
            (alias, folder or hub id, chosen by the operator; ``{"smollm2-135m-instruct":
            "smollm2-135m-instruct"}``).
        max_upload_bytes: the largest upload (and fetched URL) accepted; larger ones get 413.
        fetch_timeout: seconds to fetch a training file URL (LLM Engine routes).
        grace: seconds a cancelled worker gets after SIGTERM before SIGKILL.

    Raises:
        ValueError: no allowed base model, or one that is neither a built-in alias, an existing folder
            nor a hub id.
    """

    def __init__(self, data_dir: str | Path, allowed_bases: dict[str, str], max_upload_bytes: int = 256 * 2 ** 20,
                 fetch_timeout: float = 30.0, grace: float = 10.0):
        if not allowed_bases:
            raise CalltuneError("the fine-tuning service needs at least one base model jobs may use (--allow-base NAME)")
        from calltune.models import _HUB_ID, ALIASES

        for name, model in allowed_bases.items():
            if not (model in ALIASES or Path(model).exists() or _HUB_ID.match(model)):
                raise CalltuneError(f"--allow-base {name}: {model!r} is not a built-in alias ({', '.join(ALIASES)}), "
                                 "an existing folder or a hub id")
        self.store = JobStore(data_dir)
        self.allowed = dict(allowed_bases)
        self.max_upload_bytes = max_upload_bytes
        self.fetch_timeout = fetch_timeout
        self.grace = grace
        self.registry = None
        self.supervisor: Supervisor | None = None
        self._loading = threading.Lock()

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, app, registry) -> None:
        """Add the routes to `app` and run the job queue while it serves; finished jobs' models go
        into `registry` (those of earlier runs at start-up)."""
        self.registry = registry
        self.supervisor = Supervisor(self.store, self._serve_model, grace=self.grace)
        app.include_router(self.router())
        app.router.add_event_handler("startup", self.start)
        app.router.add_event_handler("shutdown", self.stop)

    def start(self) -> None:
        if self.supervisor.thread is not None:
            return
        for job in self.store.list_jobs(limit=10000, status=("succeeded",))[0]:
            try:
                self._serve_model(job, self.store.run_dir(job["id"]) / "model")
            except Exception:
                log.exception("could not load %s", job["fine_tuned_model"])
        self.supervisor.start()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()

    def _serve_model(self, job: dict[str, Any], model_dir: Path) -> None:
        name = _ft_name(job)
        with self._loading:
            if self.registry is not None and self.registry.get(name) is None:
                self.registry.add(name, str(model_dir))

    # -- files --------------------------------------------------------------------------------
    def store_upload(self, temp: Path, filename: str, source: str) -> dict[str, Any]:
        """Validate an uploaded file (at `temp`, in the files folder) with `source`; keep it as a new file.

        Raises:
            RequestError: unknown source or extension, a file the source can't read, or any row it
                rejects (400 naming the line or row and the reason).
        """
        if source not in FILE_SOURCES:
            close = difflib.get_close_matches(source, FILE_SOURCES, n=1)
            raise _error(f"source: unknown source {source!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (choices: {', '.join(FILE_SOURCES)})", param="source")
        ext = Path(filename).suffix.lower()
        if ext not in EXTENSIONS:
            if source != "openai_jsonl":
                raise _error(f"file: the file name {filename!r} must end in one of {', '.join(EXTENSIONS)} (the "
                             f"{source} source reads those)", param="file")
            ext = ".jsonl"
        file_id = new_id("file")
        path = self.store.files_dir / f"{file_id}{ext}"
        temp.rename(path)
        try:
            examples = _check_rows(path, filename, source)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.store.add_file(file_id, filename, path.stat().st_size, "fine-tune", source, path.name, examples)

    def _temp(self) -> Path:
        return self.store.files_dir / f".upload-{uuid.uuid4().hex}"

    def fetch(self, url: str, param: str) -> dict[str, Any]:
        """Download an http(s) training file (at most `max_upload_bytes`) and store it as an upload."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _error(f"{param}: {url!r} is neither a file id (file-...) nor an http(s) URL", param=param)
        name = Path(urllib.parse.unquote(parts.path)).name or "data.csv"
        source = "openai_jsonl" if name.lower().endswith(".jsonl") else "llama_functions"
        if Path(name).suffix.lower() not in EXTENSIONS:
            name += ".csv"
        temp = self._temp()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "calltune"}),
                                        timeout=self.fetch_timeout) as response, temp.open("wb") as out:
                size = 0
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise _error(f"{param}: {url} is larger than this server's upload limit of "
                                     f"{self.max_upload_bytes} bytes", param=param, status=413, code="file_too_large")
                    out.write(chunk)
            return self.store_upload(temp, name, source)
        except (urllib.error.URLError, OSError, ValueError) as err:
            if isinstance(err, RequestError):
                raise
            reason = getattr(err, "reason", None) or err
            raise _error(f"{param}: could not fetch {url}: {reason}", param=param) from None
        finally:
            temp.unlink(missing_ok=True)

    # -- jobs ---------------------------------------------------------------------------------
    def create_job(self, request: CreateJob, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check a job request, build its recipe, snapshot its data into the run folder and add it.

        Raises:
            RequestError: a base model that is not allowed, a missing or non-fine-tune file, a
                validation file of another source, too few examples for the 10% split, an
                unsupported method, or a recipe value that does not validate (the param names it).
        """
        fetched: list[str] = []  # files fetched from URLs for this job: removed if it is refused
        try:
            return self._create_job(request, train_overrides, fetched)
        except BaseException:
            for file_id in fetched:
                self.store.delete_file(file_id)
            raise

    def _create_job(self, request: CreateJob, train_overrides: dict[str, Any] | None,
                    fetched: list[str]) -> dict[str, Any]:
        if request.model not in self.allowed:
            raise _error(f"model: {request.model!r} is not a base model this server fine-tunes; allowed: "
                         f"{', '.join(sorted(self.allowed))} (set with `calltune serve --allow-base NAME`)",
                         param="model", code="model_not_available")
        train_file = self._fine_tune_file(request.training_file, "training_file", fetched)
        val_file = self._fine_tune_file(request.validation_file, "validation_file", fetched) \
            if request.validation_file else None
        if val_file is not None and val_file["source"] != train_file["source"]:
            raise _error(f"validation_file: its source is {val_file['source']!r}, the training file's "
                         f"{train_file['source']!r}; both must have the same layout", param="validation_file")
        if val_file is None and (train_file["examples"] or 0) < MIN_SPLIT_EXAMPLES:
            raise _error(f"training_file: {train_file['examples']} examples; without a validation_file 10% of them "
                         f"are held out for evaluation, which needs at least {MIN_SPLIT_EXAMPLES}. Upload more "
                         "examples or give a validation_file.", param="training_file")
        if request.method is not None and request.method.type != "supervised":
            raise _error(f"method.type: {request.method.type!r} is not supported; this server runs supervised "
                         "fine-tuning (full, LoRA or QLoRA: set calltune.train.method)", param="method.type")
        hp = (request.method.supervised.hyperparameters if request.method and request.method.supervised else None) \
            or request.hyperparameters or Hyperparameters()
        options = request.calltune or CalltuneOptions()
        job_id = new_id("job")
        seed = request.seed if request.seed is not None else secrets.randbelow(2 ** 31)
        run_dir = self.store.run_dir(job_id)
        data_dir = run_dir / "data"
        train_cfg: dict[str, Any] = {"seed": seed}
        if isinstance(hp.n_epochs, int):
            train_cfg["epochs"] = hp.n_epochs
        if isinstance(hp.batch_size, int):
            train_cfg["batch_size"] = hp.batch_size
        if isinstance(hp.learning_rate_multiplier, (int, float)):
            train_cfg["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
        train_cfg.update(train_overrides or {})
        train_cfg.update(options.train)
        recipe_data = {
            "name": job_id, "model": self.allowed[request.model], "format": options.format or "auto",
            "format_options": options.format_options or {},
            "data": {"source": train_file["source"], "train": str(data_dir / f"train{Path(train_file['path']).suffix}"),
                     "eval": str(data_dir / f"validation{Path(val_file['path']).suffix}") if val_file else None,
                     "limit": options.limit, "eval_limit": options.eval_limit},
            "clean": options.clean, "augment": options.augment,
            "train": train_cfg, "eval": {"base": False, **options.eval}, "output_dir": str(run_dir)}
        recipe = _validated_recipe(recipe_data)
        data_dir.mkdir(parents=True)
        shutil.copyfile(self.store.file_path(train_file), recipe.data.train)
        if val_file is not None:
            shutil.copyfile(self.store.file_path(val_file), recipe.data.eval)
        t = recipe.train
        job = {"id": job_id, "created_at": now(), "status": "validating_files", "model": request.model,
               "training_file": train_file["id"], "validation_file": val_file["id"] if val_file else None,
               "suffix": request.suffix, "seed": seed, "metadata": request.metadata,
               "hyperparameters": {"n_epochs": t.epochs if t.epochs != int(t.epochs) else int(t.epochs),
                                   "batch_size": t.batch_size,
                                   "learning_rate_multiplier": t.learning_rate / BASE_LEARNING_RATE},
               "method": {"type": "supervised"}, "recipe": json.loads(recipe.model_dump_json())}
        job = self.store.add_job(job)
        self.store.add_event(job_id, f"Validating training file: {train_file['id']}"
                                     + (f" and validation file: {val_file['id']}" if val_file else ""))
        self.store.add_event(job_id, f"Created fine-tuning job: {job_id} ({t.method}, {request.model})",
                             data={"method": t.method, "recipe": public_recipe(job)})
        if self.supervisor is not None:
            self.supervisor.wake.set()
        return job

    def _fine_tune_file(self, file_id: str, param: str, fetched: list[str]) -> dict[str, Any]:
        if "://" in file_id:
            file = self.fetch(file_id, param)
            fetched.append(file["id"])
            return file
        file = self.store.get_file(file_id)
        if file is None:
            raise _error(f"{param}: no file with id {file_id!r}; upload it first (POST /v1/files, purpose "
                         "fine-tune)", param=param, code="file_not_found")
        if file["purpose"] != "fine-tune":
            raise _error(f"{param}: file {file_id} has purpose {file['purpose']!r}, not 'fine-tune'", param=param,
                         code="invalid_file_purpose")
        if not self.store.file_path(file).exists():
            raise _error(f"{param}: the content of file {file_id} is missing", param=param, code="file_not_found")
        return file

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job is None:
            raise _not_found("fine-tuning job", job_id)
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job not finished yet (a running one's worker is stopped within seconds).

        Raises:
            RequestError: 404 unknown job; 400 a job that already succeeded or failed.
        """
        job = self.job(job_id)
        if job["status"] == "cancelled":
            return job
        if self.store.update_job(job_id, only_if=ACTIVE, status="cancelled", finished_at=now()):
            self.store.add_event(job_id, "Fine-tuning job cancelled")
            if self.supervisor is not None:
                self.supervisor.wake.set()
            return self.job(job_id)
        job = self.job(job_id)
        if job["status"] == "cancelled":
            return job
        raise _error(f"The job {job_id} has already {job['status']}; only a job that is validating its files, "
                     "queued or running can be cancelled.", code="job_not_cancellable")

    # -- routes -------------------------------------------------------------------------------
    def router(self) -> APIRouter:
        router = APIRouter()

        @router.post("/v1/files")
        def upload(file: UploadFile = File(...), purpose: str = Form("fine-tune"),
                   source: str = Form("openai_jsonl")) -> dict[str, Any]:
            if purpose != "fine-tune":
                raise _error(f"purpose: {purpose!r} is not supported; this server keeps files with purpose "
                             "'fine-tune'", param="purpose")
            filename = Path((file.filename or "upload.jsonl").replace("\\", "/")).name[:255] or "upload.jsonl"
            temp = self._temp()
            try:
                with temp.open("wb") as out:
                    shutil.copyfileobj(file.file, out)
                return file_object(self.store_upload(temp, filename, source))
            finally:
                temp.unlink(missing_ok=True)

        @router.get("/v1/files")
        def list_files(purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                       order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict[str, Any]:
            page, more = self.store.list_files(purpose, after, limit, newest_first=order == "desc")
            data = [file_object(f) for f in page]
            return {"object": "list", "data": data, "has_more": more,
                    "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

        def existing_file(file_id: str) -> dict[str, Any]:
            file = self.store.get_file(file_id)
            if file is None:
                raise _not_found("file", file_id)
            return file

        @router.get("/v1/files/{file_id}")
        def get_file(file_id: str) -> dict[str, Any]:
            return file_object(existing_file(file_id))

        @router.delete("/v1/files/{file_id}")
        def delete_file(file_id: str) -> dict[str, Any]:
            existing_file(file_id)
            self.store.delete_file(file_id)
            return {"id": file_id, "object": "file", "deleted": True}

        @router.get("/v1/files/{file_id}/content")
        def file_content(file_id: str):
            file = existing_file(file_id)
            path = self.store.file_path(file)
            if not path.exists():
                raise _not_found("file", file_id)
            return FileResponse(path, media_type="application/octet-stream", filename=file["filename"])

        @router.post("/v1/fine_tuning/jobs")
        def create(body: CreateJob) -> dict[str, Any]:
            return job_object(self.create_job(body))

        @router.get("/v1/fine_tuning/jobs")
        def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
            page, more = self.store.list_jobs(after, limit)
            return {"object": "list", "data": [job_object(j) for j in page], "has_more": more}

        @router.get("/v1/fine_tuning/jobs/{job_id}")
        def get_job(job_id: str) -> dict[str, Any]:
            return job_object(self.job(job_id))

        @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
        def cancel(job_id: str) -> dict[str, Any]:
            return job_object(self.cancel(job_id))

        @router.get("/v1/fine_tuning/jobs/{job_id}/events")
        def events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=10000)) -> dict[str, Any]:
            self.job(job_id)
            page, more = self.store.list_events(job_id, after, limit)
            return {"object": "list", "data": [event_object(e) for e in page], "has_more": more}

        @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
        def checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=10000)) -> dict[str, Any]:
            job = self.job(job_id)
            page, more = self.store.list_checkpoints(job_id, after, limit)
            return {"object": "list", "data": [checkpoint_object(job, c) for c in page], "has_more": more,
                    "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

        self._llm_engine_routes(router)
        return router

    def _llm_engine_routes(self, router: APIRouter) -> None:
        """Scale LLM Engine's fine-tune and completion routes (the ``scale-llm-engine`` client)."""

        @router.post("/v1/llm/fine-tunes")
        def create(body: CreateFineTune) -> dict[str, Any]:
            hyper = dict(body.hyperparameters or {})
            options = hyper.pop("calltune", None)
            train: dict[str, Any] = {}
            for key, value in hyper.items():
                if key == "peft_config":
                    if not isinstance(value, dict):
                        raise _error("hyperparameters.peft_config: must be an object", param="hyperparameters.peft_config")
                    unknown = [k for k in value if k not in _PEFT]
                    if unknown:
                        raise _error(f"hyperparameters.peft_config.{unknown[0]}: not supported (supported: "
                                     f"{', '.join(_PEFT)})", param=f"hyperparameters.peft_config.{unknown[0]}")
                    train["lora"] = {_PEFT[k]: v for k, v in value.items()}
                else:  # LLM Engine's names, or any TrainConfig field (checked with the recipe)
                    train[LLM_ENGINE_HYPERPARAMETERS.get(key, key)] = value
            try:
                request = CreateJob(model=body.model, training_file=body.training_file,
                                    validation_file=body.validation_file, suffix=body.suffix,
                                    calltune=CalltuneOptions(**options) if options is not None else None)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise _error(f"hyperparameters.calltune.{where}: {first['msg']}", param="hyperparameters") from None
            return {"id": self.create_job(request, train_overrides={"method": "lora", **train})["id"]}

        def status(job: dict[str, Any]) -> dict[str, Any]:
            return {"id": job["id"], "fine_tuned_model": job.get("fine_tuned_model"),
                    "status": LLM_ENGINE_STATUS[job["status"]]}

        @router.get("/v1/llm/fine-tunes")
        def list_() -> dict[str, Any]:
            return {"jobs": [status(j) for j in self.store.list_jobs(limit=10000)[0]]}

        @router.get("/v1/llm/fine-tunes/{job_id}")
        def get(job_id: str) -> dict[str, Any]:
            return status(self.job(job_id))

        @router.put("/v1/llm/fine-tunes/{job_id}/cancel")
        def cancel(job_id: str) -> dict[str, Any]:
            self.job(job_id)
            try:
                return {"success": self.cancel(job_id)["status"] == "cancelled"}
            except RequestError as err:
                if err.status == 404:
                    raise
                return {"success": False}

        @router.get("/v1/llm/fine-tunes/{job_id}/events")
        def events(job_id: str) -> dict[str, Any]:
            self.job(job_id)
            page, _ = self.store.list_events(job_id, newest_first=False)
            return {"events": [{"timestamp": float(e["created_at"]), "message": e["message"], "level": e["level"]}
                               for e in page]}

        @router.post("/v1/llm/completions-sync")
        def completion(body: CompletionSync, model_endpoint_name: str = Query(...)) -> dict[str, Any]:
            return self.complete_prompt(model_endpoint_name, body)

    def complete_prompt(self, model: str, body: CompletionSync) -> dict[str, Any]:
        """LLM Engine's completion: the prompt (Llama-2 chat with an <<API>> block, as the
        ``llama_functions`` source reads it, or plain text as one user turn) -> the model's answer,
        a call written as `` {"function_call": {"name", "arguments"}} ``, as in that dataset."""
        from calltune.infer import engine
        from calltune.schema import Example, Message

        served = self.registry.get(model) if self.registry is not None else None
        if served is None:
            names = ", ".join(self.registry.names()) if self.registry is not None else ""
            raise _error(f"The model `{model}` does not exist. Models served: {names}", param="model_endpoint_name",
                         status=404, code="model_not_found")
        example = _llama_prompt(body.prompt) or Example(messages=[Message(role="user", content=body.prompt)])
        params = engine.Params(tool_choice="auto" if example.tools else "none", max_tokens=body.max_new_tokens,
                               temperature=body.temperature, top_p=body.top_p or 1.0, stop=body.stop_sequences or [])
        done = engine.complete(self.registry, served, example, params)
        calls = done.message.tool_calls or []
        text = (" " + json.dumps({"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}) + " ") \
            if calls else (done.message.content or "")
        return {"request_id": str(uuid.uuid4()),
                "output": {"text": text, "num_prompt_tokens": done.prompt_tokens,
                           "num_completion_tokens": done.completion_tokens}}


def _llama_prompt(prompt: str):
    """A Llama-2 chat prompt as an `Example` ending on its last user turn, or None if it is not one."""
    from calltune.sources.llama_functions import llama_functions_row_to_example

    try:
        example = llama_functions_row_to_example({"prompt": prompt, "response": "-"}, "prompt", 0)
    except ValueError:
        return None
    return example.model_copy(update={"messages": example.messages[:-1]})


def _validated_recipe(data: dict[str, Any]):
    """The job's `Recipe`; a value that does not validate is a 400 naming it as the request does."""
    from calltune.recipe import Recipe

    try:
        recipe = Recipe(**data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            if loc and loc[0] in ("train", "eval", "format", "format_options", "clean", "augment"):
                loc = ["calltune", *loc]
            elif loc[:2] in (["data", "limit"], ["data", "eval_limit"]):
                loc = ["calltune", loc[1]]
            problems.append((".".join(loc), str(e["msg"]).removeprefix("Value error, ")))
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise _error(f"{problems[0][0]}: {problems[0][1]}{more}", param=problems[0][0]) from None
    from calltune.formats import FORMATS

    if recipe.format != "auto" and recipe.format not in FORMATS:
        close = difflib.get_close_matches(recipe.format, FORMATS, n=1)
        raise _error(f"calltune.format: unknown prompt format {recipe.format!r}"
                     + (f"; did you mean {close[0]!r}?" if close else "") + f" (choices: auto, {', '.join(sorted(FORMATS))})",
                     param="calltune.format")
    return recipe


# -- validation of uploads -----------------------------------------------------------------------
def _row_lines(path: Path) -> list[int] | None:
    """The 1-based line on which each row of a JSONL or CSV file starts (None for other kinds)."""
    ext = path.suffix.lower()
    if ext == ".jsonl":
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            return [n for n, line in enumerate(f, 1) if line.strip()]
    if ext == ".csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.reader(f)
            starts, line = [], 1
            for _ in reader:
                starts.append(line)
                line = reader.line_num + 1
            return starts[1:]  # after the header
    return None


def _check_rows(path: Path, filename: str, source: str) -> int:
    """Convert the whole file with `source`; the number of examples, or a 400 for the first bad row."""
    from calltune.sources import Rejects, SourceError, load_source

    rejects = Rejects()
    try:
        examples = load_source(source, str(path), rejects=rejects)
    except SourceError as err:
        where = [filename] + ([f"row {err.row}"] if err.row is not None else []) \
            + ([f"field {err.field!r}"] if err.field else [])
        problem = err.problem.replace(str(path), filename)
        raise _error(f"{', '.join(where)}: {problem}", param="file", code="invalid_file") from None
    if rejects.items:
        first = rejects.items[0]
        lines = _row_lines(path)
        row = first["row"]
        at = f"line {lines[row]}" if lines is not None and row is not None and row < len(lines) else f"row {row}"
        more = f" ({len(rejects.items) - 1} more rows have problems)" if len(rejects.items) > 1 else ""
        reason = str(first["reason"]).replace(str(path), filename)
        raise _error(f"{filename}, {at}: {reason}{more}. The file was not stored; fix the row and upload it again "
                     f"(source {source!r}).", param="file", code="invalid_file")
    if not examples:
        raise _error(f"{filename}: no examples in the file", param="file", code="invalid_file")
    return len(examples)


# -- responses -----------------------------------------------------------------------------------
def file_object(file: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's file object (plus LLM Engine's ``size`` and calltune's ``source`` and ``examples``)."""
    return {"id": file["id"], "object": "file", "bytes": file["bytes"], "size": file["bytes"],
            "created_at": file["created_at"], "filename": file["filename"], "purpose": file["purpose"],
            "status": "processed", "status_details": None, "expires_at": None, "source": file["source"],
            "examples": file["examples"]}


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's fine-tuning job object (plus calltune's ``recipe``: what the job runs, without paths)."""
    hp = job["hyperparameters"]
    return {"id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "error": job["error"],
            "fine_tuned_model": job["fine_tuned_model"], "finished_at": job["finished_at"], "hyperparameters": hp,
            "model": job["model"], "organization_id": "calltune", "result_files": job["result_files"] or [],
            "seed": job["seed"], "status": job["status"], "trained_tokens": job["trained_tokens"],
            "training_file": job["training_file"], "validation_file": job["validation_file"],
            "estimated_finish": None, "integrations": [], "metadata": job["metadata"],
            "user_provided_suffix": job["suffix"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "recipe": public_recipe(job)}


def public_recipe(job: dict[str, Any]) -> dict[str, Any]:
    """The job's recipe with its file ids in place of the server's paths."""
    recipe = json.loads(json.dumps(job["recipe"]))
    recipe["data"].update(train=job["training_file"], eval=job["validation_file"])
    recipe.pop("output_dir", None)
    return recipe


def event_object(event: dict[str, Any]) -> dict[str, Any]:
    return {"id": event["id"], "object": "fine_tuning.job.event", "created_at": event["created_at"],
            "level": event["level"], "message": event["message"], "data": event["data"] or {}, "type": event["type"]}


def checkpoint_object(job: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any]:
    metrics = dict(checkpoint["metrics"])
    name = metrics.pop("fine_tuned_model_checkpoint", None) or f"{_ft_name(job)}:ckpt-step-{checkpoint['step']}"
    return {"id": checkpoint["id"], "object": "fine_tuning.job.checkpoint", "created_at": checkpoint["created_at"],
            "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job["id"], "metrics": metrics,
            "step_number": checkpoint["step"]}
