"""The server's batching: one decode loop per loaded model, which concurrent requests share.

Owns `BatchScheduler`: a background thread running a `calltune.infer.generate.ContinuousDecoder` on
one model. `submit` hands it a request (prompt, budget, sampling, stop strings, grammar, adapter,
streamer, cancel callable) and returns a `Ticket` to wait on; the request joins the running batch as
soon as one of `max_batch` slots is free and leaves when it finishes, so requests that arrive
together decode together instead of one after another. At most `max_batch` requests run and
`max_queue` wait; one more raises `QueueFull` at once (the server answers 429 with its
``retry_after``) rather than letting requests pile up. A request whose `cancel` turns True (its
client left, the server stops) leaves the batch at the next step, freeing its slot.

LoRA adapters on one base share its decode loop: each row runs with its own adapter (PEFT's
mixed-adapter batches), so requests for different adapters batch together.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

from calltune.errors import CalltuneError
from calltune.infer.generate import PREFIX_CACHE_BYTES, ContinuousDecoder, DecodeRequest, Generation

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Generation stopped early because its request was cancelled (its client left, or the server stops)."""


class QueueFull(CalltuneError):
    """Every slot is busy and the waiting queue is full; `retry_after` is a hint in whole seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Ticket:
    """A submitted request; `result` waits for its `Generation`."""

    def __init__(self):
        self._done = threading.Event()
        self._outcome: Generation | BaseException | None = None

    def _set(self, outcome: Generation | BaseException) -> None:
        self._outcome = outcome
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Generation:
        """The completion, once the request has left the batch.

        Raises:
            Cancelled: the request's cancel callable turned True, or the scheduler closed.
            TimeoutError: not finished within `timeout` seconds.
            Exception: whatever stopped the decode step the request was in.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the generation did not finish within {timeout} s")
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome.finish_reason == "cancelled":
            raise Cancelled("the request was cancelled during generation")
        return outcome


class BatchScheduler:
    """One model's decode loop in a daemon thread, shared by the requests `submit` hands it.

    Args:
        model, tokenizer: the loaded model (a PEFT model with several adapters is fine) and the tokenizer
            that pads its prompts.
        max_batch: most requests decoding at once (slots of the KV cache).
        max_queue: most requests waiting for a slot; one more raises `QueueFull`. Default 4 * max_batch.
        name: names the thread (``calltune-batch-NAME``).
        prefix_cache_mb: most MiB of earlier prompts' keys and values kept for prompts that start the
            same way (`calltune.infer.generate.PrefixStore`); 0 keeps none.

    Raises:
        ValueError: max_batch below 1 or max_queue below 0.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int | None = None, name: str = "model",
                 prefix_cache_mb: int = PREFIX_CACHE_BYTES // 2 ** 20):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        max_queue = 4 * max_batch if max_queue is None else max_queue
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        self.name, self.max_batch, self.max_queue = name, max_batch, max_queue
        self.decoder = ContinuousDecoder(model, tokenizer, max_batch, prefix_cache_bytes=prefix_cache_mb * 2 ** 20)
        self._changed = threading.Condition()
        self.in_flight = 0  # submitted and not yet finished: running or waiting
        self._seconds = 1.0  # moving mean of a request's time from submit to finish (for Retry-After)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.decoder.serve, args=(self._stop,), daemon=True,
                                        name=f"calltune-batch-{name}")
        self._thread.start()

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the decode loop: ``steps`` (decode steps), ``max_live`` (most rows in one step),
        ``row_steps`` (rows summed over steps), ``finished`` (requests done), ``in_flight`` (now),
        ``prefix_reused`` (prompt tokens taken from the prefix cache instead of prefilled)."""
        d = self.decoder
        return {"steps": d.steps, "max_live": d.max_live, "row_steps": d.row_steps, "finished": d.finished,
                "in_flight": self.in_flight, "prefix_reused": d.prefix_reused}

    def submit(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, grammar: str | None = None,
               adapter: str | None = None, tokenizer: Any = None, streamer: Any = None,
               cancel: Callable[[], bool] | None = None) -> Ticket:
        """Queue one request; returns at once with its `Ticket`.

        Args: as `calltune.infer.generate.DecodeRequest`'s; `grammar` (Lark, llguidance dialect) is
        compiled here against `tokenizer` (or the scheduler's) and constrains every token of the row.

        Raises:
            QueueFull: `max_batch` requests are running and `max_queue` are waiting.
            ConstrainedDecodingError: `grammar` does not compile.
            RuntimeError: the scheduler is closed.
        """
        if self._stop.is_set() or not self._thread.is_alive():
            raise RuntimeError(f"the batch scheduler of {self.name} is closed")
        hook = None
        if grammar is not None:
            from calltune.infer import constrained as cd

            hook = cd.row_constraint(tokenizer or self.decoder.tokenizer, grammar)
        with self._changed:
            if self.in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.name} is busy: {self.max_batch} requests are generating and {self.max_queue} "
                                f"are waiting, this server's limits (--max-batch, --max-queue). Retry later.",
                                retry_after=max(1, math.ceil(self._seconds)))
            self.in_flight += 1
        ticket = Ticket()
        started = _now()

        def done(outcome: Generation | BaseException) -> None:
            with self._changed:  # the slot is free before the waiter hears of it
                self.in_flight -= 1
                self._seconds = 0.8 * self._seconds + 0.2 * (_now() - started)
                self._changed.notify_all()
            ticket._set(outcome)

        try:
            self.decoder.submit(DecodeRequest(prompt=prompt, max_new_tokens=max_new_tokens, done=done,
                                              temperature=temperature, top_p=top_p, seed=seed, stop=list(stop or []),
                                              logits_hook=hook, streamer=streamer, cancel=cancel, adapter=adapter,
                                              tokenizer=tokenizer))
        except BaseException:
            with self._changed:
                self.in_flight -= 1
            raise
        return ticket

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running or waiting; False if some still are after `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight == 0, timeout)

    def close(self, timeout: float = 30) -> None:
        """Stop the decode loop: running and waiting requests end as cancelled; later submits raise."""
        self._stop.set()
        self.decoder.wake()
        self._thread.join(timeout)


def _now() -> float:
    import time

    return time.monotonic()
