"""The models a server holds: each loaded once, LoRA adapters sharing their base's weights.

Owns `ModelRegistry`, built from ``{served name: model}`` (alias, folder, LoRA adapter folder, .gguf
or hub id; see `calltune.models.resolve_model`). Every base is loaded once; the adapters on it are
attached with PEFT (`PeftModel.from_pretrained`, then `load_adapter` for the rest) and picked per
request by name (PEFT's ``adapter_names``; the base itself is ``__base__``). A base with exactly one
adapter and no other user is merged in memory instead, which generates faster. Weights are cast to
the inference dtype (bf16 where the CPU has it, as in `calltune.infer.generate.load_for_inference`).

Each loaded model gets one `calltune.infer.scheduler.BatchScheduler` (`scheduler(served)`, made on
first use): its decode loop is the only code that runs the model, and the requests of every name on
that model -- the base and its adapters -- share its batch, each row with its own adapter.
`max_batch` and `max_queue` bound every scheduler. `add` serves one more model while the server
runs (a fine-tuning job's result); `close` stops the decode loops.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calltune.errors import CalltuneError
from calltune.formats import PromptFormat, get_format, load_format
from calltune.infer.generate import fast_decode_linears, inference_dtype
from calltune.models import is_adapter, load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One name the server answers to: the (possibly shared) model, its tokenizer and prompt format.

    `fmt` is the format saved with the model (hermes if it has none). `adapter` is the PEFT adapter
    name its rows run with, or None; `base_of_adapters` is True for a base model that also carries
    adapters (its rows run with none of them).
    """

    name: str
    path: str
    model: Any
    tokenizer: Any
    fmt: PromptFormat
    adapter: str | None = None
    base_of_adapters: bool = False

    @property
    def context_length(self) -> int:
        """Most tokens (prompt and completion) the model takes: its config's ``max_position_embeddings``."""
        config = getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", None) or 2048)


def _adapter_base(path: str) -> str:
    return resolve_model(json.loads(Path(path, "adapter_config.json").read_text())["base_model_name_or_path"])


class ModelRegistry:
    """Load `models` (``{name: model}``) once; look them up by name; give each loaded model its batch scheduler.

    Args:
        dtype: weights' dtype (default `inference_dtype`).
        allow_empty: no models yet (a fine-tuning server adds them).
        max_batch: most requests decoding at once per loaded model (`BatchScheduler`).
        max_queue: most requests waiting per loaded model before more are refused (default 4 * max_batch).
        prefix_cache_mb: MiB of earlier prompts' keys and values each loaded model keeps (`BatchScheduler`).

    Raises:
        CalltuneError: no models (without `allow_empty`); max_batch below 1 or max_queue below 0.
    """

    def __init__(self, models: dict[str, str], dtype: torch.dtype | None = None, allow_empty: bool = False,
                 max_batch: int = 8, max_queue: int | None = None, prefix_cache_mb: int | None = None):
        if not models and not allow_empty:
            raise CalltuneError("give at least one model to serve (--model NAME=PATH)")
        if max_batch < 1:
            raise CalltuneError(f"max_batch (--max-batch) must be at least 1, got {max_batch}")
        if max_queue is not None and max_queue < 0:
            raise CalltuneError(f"max_queue (--max-queue) must be at least 0, got {max_queue}")
        self.max_batch = max_batch
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        self.prefix_cache_mb = prefix_cache_mb
        self.lock = threading.Lock()  # guards `models` and `_schedulers`
        self._schedulers: dict[int, Any] = {}  # id(loaded model) -> its BatchScheduler
        self.models: dict[str, ServedModel] = {}
        dtype = self.dtype = dtype or inference_dtype()
        resolved = {name: resolve_model(path) for name, path in models.items()}
        groups: dict[str, list[str]] = {}  # base folder -> served names using it (adapters and the base itself)
        for name, path in resolved.items():
            groups.setdefault(_adapter_base(path) if is_adapter(path) else path, []).append(name)
        for base, names in groups.items():
            adapters = [n for n in names if is_adapter(resolved[n])]
            plain = [n for n in names if n not in adapters]
            model, base_tokenizer, _ = load_model(base, dtype=torch.float32, attn_implementation="sdpa")
            merged = False
            if adapters:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, resolved[adapters[0]], adapter_name=adapters[0])
                for name in adapters[1:]:
                    model.load_adapter(resolved[name], adapter_name=name)
                if len(adapters) == 1 and not plain:
                    model, merged = model.merge_and_unload(), True
                    log.info("merged the only adapter on %s (%s) in memory", base, adapters[0])
            model = fast_decode_linears(model.to(dtype).eval())
            model.generation_config.pad_token_id = base_tokenizer.pad_token_id
            for name in names:
                path = resolved[name]
                tokenizer = load_tokenizer(path) if Path(path, "tokenizer_config.json").exists() else base_tokenizer
                fmt = load_format(path)
                self.models[name] = ServedModel(
                    name=name, path=path, model=model, tokenizer=tokenizer, fmt=fmt or get_format("hermes"),
                    adapter=None if merged or name not in adapters else name,
                    base_of_adapters=bool(adapters) and not merged and name in plain)
                if fmt is None:
                    log.warning("%s (%s) has no saved prompt format; using hermes", name, path)

    def add(self, name: str, path: str) -> ServedModel:
        """Load `path` (anything the constructor takes) and serve it as `name` from now on, without a
        restart. It gets its own copy of its base (an adapter is merged into it in memory), so the
        models already served keep answering while it loads.

        Raises:
            CalltuneError: `name` is already served. ModelNotFound: `path` names no model.
        """
        if name in self.models:
            raise CalltuneError(f"a model named {name!r} is already served")
        served = ModelRegistry({name: path}, dtype=self.dtype).models[name]
        with self.lock:
            self.models[name] = served
        return served

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def scheduler(self, served: ServedModel):
        """The `calltune.infer.scheduler.BatchScheduler` of `served`'s loaded model (started on first use);
        names that share a loaded model share it."""
        from calltune.infer.scheduler import BatchScheduler

        with self.lock:
            key = id(served.model)
            if key not in self._schedulers:
                bounds = {} if self.prefix_cache_mb is None else {"prefix_cache_mb": self.prefix_cache_mb}
                self._schedulers[key] = BatchScheduler(served.model, served.tokenizer, self.max_batch, self.max_queue,
                                                       name=served.name, **bounds)
            return self._schedulers[key]

    def most_requests(self) -> int:
        """Most requests in flight (running and waiting) over every loaded model's scheduler."""
        loaded = len({id(served.model) for served in list(self.models.values())})
        return loaded * (self.max_batch + self.max_queue)

    def close(self) -> None:
        """Stop every decode loop (their requests end as cancelled)."""
        with self.lock:
            schedulers, self._schedulers = list(self._schedulers.values()), {}
        for scheduler in schedulers:
            scheduler.close()
