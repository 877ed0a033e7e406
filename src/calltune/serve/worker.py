"""Running fine-tuning jobs: the worker process that trains one job, and the supervisor that starts it.

`Supervisor` is a thread of the server. It takes jobs one at a time, oldest first (``validating_files``
-> ``queued`` once the job's data is in its run folder, then ``running``), starts a worker process
for each (``python -m calltune.serve.worker DATA_DIR JOB_ID``), and watches it: a job cancelled
through the API gets SIGTERM, then SIGKILL after `Supervisor.grace` seconds; a worker that exits 0
has its model added to the server's `ModelRegistry` before the job is marked ``succeeded``, so the
``ft:`` model answers as soon as the job says so. Only the supervisor writes a job's status; the
worker writes events and checkpoints.

The worker runs the job's recipe through `calltune.pipeline.run_recipe`, as ``calltune run`` does,
with a `TrainerCallback` that writes progress (step, loss, tokens/s) as ``metrics`` events and each
saved checkpoint (every ``train.save_steps`` steps, `calltune.train.trainer`) as a checkpoint row;
the tuned model's evaluation metrics become an event and the last checkpoint's metrics. It exits
when its server does (it polls its parent), so a killed server leaves no orphan training.

Durability: when the server starts, a job still ``running`` (the server died under it) is resumed
from its last complete checkpoint (one with ``trainer_state.json``, HF Trainer's
``resume_from_checkpoint``; checkpoints hold the weights, optimizer, scheduler, RNG and data-order
state, so training ends as an uninterrupted run would), finished if its run had already completed, or
marked ``failed`` with the reason when it saved no checkpoint. Queued jobs stay queued. A server stopped
with SIGTERM leaves its running job the same way, to be resumed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from calltune.serve.jobstore import JobStore, new_id, now

log = logging.getLogger(__name__)

RESULT = "worker-result.json"  # the worker's outcome, in the run folder


def last_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step checkpoint under ``run_dir/model/checkpoints`` that was saved whole (its
    ``trainer_state.json`` is written last), or None."""
    folder = run_dir / "model" / "checkpoints"
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def run_finished(run_dir: Path) -> bool:
    """Whether the run folder holds a completed run (`run_recipe` writes ``summary.json`` last)."""
    return (run_dir / "summary.json").exists() and (run_dir / RESULT).exists() and \
        json.loads((run_dir / RESULT).read_text()).get("ok") is True


# -- the supervisor (in the server process) ------------------------------------------------------
class Supervisor:
    """Run queued jobs one at a time in worker processes; see the module docstring.

    Args:
        store: the service's state.
        on_success: called as ``on_success(job, model_dir)`` after a worker finished, before the job
            is marked succeeded (the server loads the model there); an exception fails the job.
        grace: seconds a cancelled or stopping worker gets after SIGTERM before SIGKILL.
    """

    def __init__(self, store: JobStore, on_success, grace: float = 10.0, poll: float = 0.5):
        self.store, self.on_success, self.grace, self.poll = store, on_success, grace, poll
        self.wake = threading.Event()  # set when a job is created or cancelled
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.current: subprocess.Popen | None = None

    def start(self) -> None:
        self.recover()
        self.thread = threading.Thread(target=self._loop, name="calltune-jobs", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop taking jobs and end a running worker; its job stays ``running`` and resumes at the next start."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=self.grace + 10)

    # -- start-up -----------------------------------------------------------------------------
    def recover(self) -> None:
        """Settle the jobs a previous server left ``running`` (see the module docstring)."""
        for job in self.store.list_jobs(limit=10000, status=("running",))[0]:
            _end_orphan(job)
            run_dir = self.store.run_dir(job["id"])
            if run_finished(run_dir):
                self.store.add_event(job["id"], "The server restarted after the job's run had finished; completing it.")
                self._succeed(job)
                continue
            checkpoint = last_checkpoint(run_dir)
            if checkpoint is None:
                save_steps = job["recipe"]["train"].get("save_steps")
                self._fail(job, "server_restarted", "The server stopped while the job was running, before its first "
                                                    f"checkpoint (one is saved every {save_steps} steps), so there was "
                                                    "nothing to resume from. Create the job again.")
                continue
            self.store.update_job(job["id"], resume_from=str(checkpoint.relative_to(run_dir)), worker_pid=None)
            self.store.add_event(job["id"], f"The server restarted while the job was running; resuming from "
                                            f"{checkpoint.name} (step {checkpoint.name[11:]}).",
                                 data={"step": int(checkpoint.name[11:])})

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            job = None
            try:
                self._promote()
                job = self.store.oldest_job("running") or self.store.oldest_job("queued")
                if job is None:
                    self.wake.wait(self.poll * 2)
                    self.wake.clear()
                    continue
                self._run(job)
            except Exception as err:  # a bug must not stop the queue: fail the job it hit, go on
                log.exception("fine-tuning supervisor")
                if job is not None:
                    self._fail(job, "internal_error", f"internal error of the job queue ({type(err).__name__}); "
                                                      "see the server log")
                time.sleep(self.poll)

    def _promote(self) -> None:
        """``validating_files`` -> ``queued`` once the job's data snapshot is in its run folder."""
        for job in self.store.list_jobs(limit=10000, status=("validating_files",))[0]:
            data = Path(job["recipe"]["data"]["train"])
            if not data.exists():
                self._fail(job, "invalid_training_file", "The training data of the job is missing from its run folder.")
                continue
            if self.store.update_job(job["id"], only_if=("validating_files",), status="queued"):
                self.store.add_event(job["id"], "Files validated, moving job to queued state")

    def _run(self, job: dict[str, Any]) -> None:
        job_id, run_dir = job["id"], self.store.run_dir(job["id"])
        resume = job.get("resume_from")
        if job["status"] == "queued":
            if not self.store.update_job(job_id, only_if=("queued",), status="running", started_at=now()):
                return  # cancelled meanwhile
            self.store.add_event(job_id, "Fine-tuning job started")
        (run_dir / RESULT).unlink(missing_ok=True)
        command = [sys.executable, "-m", "calltune.serve.worker", str(self.store.root), job_id]
        if resume:
            command += ["--resume", str(run_dir / resume)]
        with open(run_dir / "worker.log", "ab") as out:
            # own session: signals to the server's terminal don't reach it; the supervisor ends it
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.current = proc
        self.store.update_job(job_id, worker_pid=proc.pid)
        try:
            while proc.poll() is None:
                if self.stopping.is_set():
                    self._end(proc)
                    self.store.add_event(job_id, "The server is stopping; the job resumes from its last checkpoint "
                                                 "when it starts again.", level="warn")
                    return
                if self.store.get_job(job_id)["status"] == "cancelled":
                    self._end(proc)
                    checkpoint = last_checkpoint(run_dir)
                    self.store.add_event(job_id, "Training stopped" + (f"; its last checkpoint is {checkpoint.name}"
                                                                       if checkpoint else "") + ".")
                    return
                self._promote()  # jobs created meanwhile are queued behind this one
                self.wake.wait(self.poll)
                self.wake.clear()
        finally:
            if proc.poll() is None:  # leaving on an error: no worker may outlive its watch
                self._end(proc)
            self.current = None
            self.store.update_job(job_id, worker_pid=None)
        job = self.store.get_job(job_id)
        if job["status"] != "running":
            return
        if proc.returncode == 0 and run_finished(run_dir):
            self._succeed(job)
            return
        result = _read_result(run_dir)
        if result.get("message"):
            self._fail(job, result.get("code") or "training_failed", result["message"])
        else:
            self._fail(job, "worker_died", f"The training process ended with exit status {proc.returncode} "
                                           "without a result; see worker.log in the job's run folder.")

    def _end(self, proc: subprocess.Popen) -> None:
        """SIGTERM the worker, SIGKILL it after `grace` seconds; wait for it."""
        proc.terminate()
        try:
            proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- outcomes -----------------------------------------------------------------------------
    def _succeed(self, job: dict[str, Any]) -> None:
        job_id, run_dir = job["id"], self.store.run_dir(job["id"])
        summary = json.loads((run_dir / "summary.json").read_text())
        try:
            self.on_success(job, run_dir / "model")
        except Exception as err:
            log.exception("loading the model of %s", job_id)
            self._fail(job, "model_load_failed", f"The job trained, but its model could not be loaded for serving "
                                                 f"({type(err).__name__}: {err}).")
            return
        results = [self._result_file(job_id, run_dir / name) for name in ("report.md", "summary.json")
                   if (run_dir / name).exists()]
        if self.store.update_job(job_id, only_if=("running",), status="succeeded", finished_at=now(),
                                 fine_tuned_model=_ft_name(job), trained_tokens=int(summary.get("train", {}).get("tokens_seen") or 0),
                                 result_files=results):
            self.store.add_event(job_id, f"New fine-tuned model created: {_ft_name(job)}",
                                 data={"fine_tuned_model": _ft_name(job)})
            self.store.add_event(job_id, "The job has successfully completed")

    def _result_file(self, job_id: str, path: Path) -> str:
        """Copy a run artefact into the files area as a ``fine-tune-results`` file; returns its id."""
        file_id = new_id("file")
        stored = f"{file_id}{path.suffix}"
        shutil.copyfile(path, self.store.files_dir / stored)
        self.store.add_file(file_id, f"{job_id}-{path.name}", path.stat().st_size, "fine-tune-results", None, stored, None)
        return file_id

    def _fail(self, job: dict[str, Any], code: str, message: str) -> None:
        if self.store.update_job(job["id"], only_if=("validating_files", "queued", "running"), status="failed",
                                 finished_at=now(), error={"code": code, "message": message, "param": None}):
            self.store.add_event(job["id"], f"Fine-tuning job failed: {message}", level="error",
                                 data={"code": code})


def _ft_name(job: dict[str, Any]) -> str:
    """``ft:<base>:<suffix>:<job-id>`` (the suffix may be empty)."""
    return f"ft:{job['model']}:{job.get('suffix') or ''}:{job['id']}"


def _read_result(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return {}


def _end_orphan(job: dict[str, Any]) -> None:
    """Kill the worker a dead server left behind for `job`, if it still runs (it exits by itself
    within a second of its parent's death; this covers the gap)."""
    pid = job.get("worker_pid")
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone (or no /proc: the worker's own parent check ends it)
    if b"calltune.serve.worker" in cmdline and job["id"].encode() in cmdline:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


# -- the worker process --------------------------------------------------------------------------
class Cancelled(BaseException):
    """SIGTERM from the supervisor: stop at once (a BaseException, so no `except Exception` swallows it)."""


def _progress_callback(store: JobStore, job_id: str, run_dir: Path, ft_name: str):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Training progress as job events; each saved checkpoint as a checkpoint row."""

        last_loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            start = f" from step {state.global_step}" if state.global_step else ""
            store.add_event(job_id, f"Training started{start}: {state.max_steps} optimizer steps",
                            data={"step": state.global_step, "total_steps": state.max_steps})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_loss" in logs:  # the Trainer's closing summary
                store.add_event(job_id, f"Training finished at step {state.global_step}: mean training loss="
                                        f"{logs['train_loss']:.4f}, {logs.get('train_runtime') or 0:.0f} s",
                                data={"step": state.global_step, "mean_train_loss": logs["train_loss"],
                                      "train_runtime": logs.get("train_runtime")}, type="metrics")
            if "loss" not in logs:
                return
            self.last_loss = float(logs["loss"])
            data = {"step": state.global_step, "total_steps": state.max_steps, "train_loss": self.last_loss,
                    "learning_rate": logs.get("learning_rate"), "tokens_per_s": logs.get("tokens_per_s"),
                    "tokens_seen": logs.get("tokens_seen"), "epoch": logs.get("epoch")}
            store.add_event(job_id, f"Step {state.global_step}/{state.max_steps}: training loss={self.last_loss:.4f}, "
                                    f"tokens/s={logs.get('tokens_per_s') or 0:.0f}", data=data, type="metrics")

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = {"step": state.global_step, "train_loss": self.last_loss}
            store.add_checkpoint(job_id, state.global_step, str(folder.relative_to(run_dir)),
                                 {**metrics, "fine_tuned_model_checkpoint": f"{ft_name}:ckpt-step-{state.global_step}"})
            store.add_event(job_id, f"Checkpoint created at step {state.global_step}", data=metrics)

    return Progress()


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def work(data_dir: str, job_id: str, resume: str | None = None) -> int:
    """Train job `job_id` through `run_recipe`; write ``worker-result.json``; returns the exit status."""
    from calltune.recipe import Recipe

    store = JobStore(data_dir)
    job = store.get_job(job_id)
    run_dir = store.run_dir(job_id)
    result: dict[str, Any] = {"ok": False}
    try:
        from calltune.pipeline import run_recipe

        recipe = Recipe(**job["recipe"])
        callback = _progress_callback(store, job_id, run_dir, _ft_name(job))
        summary = run_recipe(recipe, run_dir, callbacks=[callback], resume_from_checkpoint=resume)
        tuned = _numbers(summary.get("eval_tuned"))
        n_eval = summary.get("data", {}).get("eval_examples")
        store.add_event(job_id, f"Evaluation of the tuned model on {n_eval} held-out examples: "
                                + ", ".join(f"{k}={v:.3f}" for k, v in tuned.items() if k.endswith(("accuracy", "rate"))),
                        data=tuned, type="metrics")
        train = summary.get("train", {})
        store.add_checkpoint(job_id, int(train.get("steps") or 0), "model",
                             {"step": train.get("steps"), "train_loss": train.get("final_loss"), **tuned,
                              "fine_tuned_model_checkpoint": _ft_name(job)})
        result = {"ok": True}
        return 0
    except Cancelled:
        result = {"ok": False, "code": "cancelled", "message": "cancelled"}
        return 1
    except Exception as err:  # reported as the job's error; the traceback goes to worker.log
        import traceback

        traceback.print_exc()
        result = {"ok": False, "code": "training_failed", "message": f"{type(err).__name__}: {err}"}
        return 1
    finally:
        (run_dir / RESULT).write_text(json.dumps(result) + "\n")


def _exit_with_parent() -> None:
    """End this process within a second once the server that started it is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _on_sigterm(signum, frame):
    raise Cancelled()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m calltune.serve.worker", description="Run one fine-tuning job.")
    parser.add_argument("data_dir")
    parser.add_argument("job_id")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume training from")
    args = parser.parse_args(argv)
    _exit_with_parent()
    signal.signal(signal.SIGTERM, _on_sigterm)
    from calltune.runtime import flush_denormals

    flush_denormals()
    return work(args.data_dir, args.job_id, args.resume)


if __name__ == "__main__":
    sys.exit(main())
