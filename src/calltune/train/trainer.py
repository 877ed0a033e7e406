"""Fine-tuning: full, LoRA and QLoRA, through the transformers `Trainer` and PEFT.

Owns tokenising examples with a prompt format (`tokenize_examples`), the batch collator (padded or
padding-free packed), `CalltuneTrainer` (the `Trainer` with a loss computed only where labels are
trained and a tokens/s log) and `train`, which runs a `TrainConfig` and saves the result in HF format
with its prompt format.

Several processes (``accelerate launch`` or ``torchrun``; DDP, DeepSpeed ZeRO or FSDP, configured by the
launcher) train data-parallel: `train` runs in every process, each takes ``batch_size / processes``
examples of every micro-batch, and only the main process writes the model, logs and checkpoints
(each process adds its own RNG state to a checkpoint). Checkpoints are full Trainer checkpoints, so
`train` can resume one with its optimizer, scheduler, RNG and data order; the output folder's rules
(resume, overwrite, the final model's atomic rename) are in `calltune.train.output`.

Speed on CPU comes from: bf16 autocast (Trainer ``bf16=True``), padding-free packing of each (random)
batch into rows of at most max_length tokens so little is spent on padding (or, with packing off,
batches grouped by length), and the LM head + cross-entropy evaluated only at trained positions (for a
135M model with a 49k vocabulary the head is a fifth of the FLOPs per token). ``torch_compile`` adds
fused kernels for the work between the matmuls (`compile_decoder_layers`).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from calltune.errors import CalltuneError
from calltune.formats import FormatError, PromptFormat, save_format
from calltune.models import load_model
from calltune.runtime import flush_denormals, malloc_trim
from calltune.schema import Example
from calltune.sources.base import Rejects
from calltune.train.config import TrainConfig
from calltune.train.output import (CHECKPOINTS, LAST_WRITTEN, is_finished, latest_checkpoint, prepare_output_dir,
                                   publish, staging_dir, world_size)

IGNORE = -100


def tokenize_examples(examples: list[Example], fmt: PromptFormat, tokenizer, max_length: int,
                      rejects: Rejects | None = None, train_on: str = "all") -> list[dict[str, Any]]:
    """Render every example to ``{"input_ids", "labels", "length"}``; labels are -100 where not trained.

    An example longer than `max_length` is cut at the end of its last assistant turn that fits whole
    (a turn cut mid-way would teach the model to stop without its end-of-turn token or inside a call).
    Examples the format can't render, or with no whole trained turn within `max_length`, go to
    `rejects` (stage ``render``) with the reason.
    """
    rows = []
    for ex in examples:
        try:
            ids, mask = fmt.render(ex, tokenizer, train_on=train_on)
            rendered = len(ids)
            ids, mask = _cut_to_whole_turns(ids, mask, max_length)
        except FormatError as err:
            if rejects is None:
                raise
            rejects.add(ex.source, ex.row, f"format {fmt.name}: {err}", json.loads(ex.to_json()), stage="render")
            continue
        if not any(mask):
            if rejects is not None:
                rejects.add(ex.source, ex.row, f"{rendered} tokens: no whole assistant turn within max_length={max_length}",
                            json.loads(ex.to_json()), stage="render")
            continue
        rows.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)], "length": len(ids)})
    return rows


def _cut_to_whole_turns(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate to at most `max_length` tokens without keeping part of a trained span."""
    if len(ids) <= max_length:
        return ids, mask
    end = max_length
    if mask[end]:  # the cut falls inside a trained span: drop the span's head too
        while end > 0 and mask[end - 1]:
            end -= 1
    return ids[:end], mask[:end]


@dataclass
class Collator:
    """Batches tokenised rows.

    ``packing=False``: right-pad to the longest row; returns input_ids, attention_mask, labels (B, T).

    ``packing=True`` (padding-free packing): the rows are packed first-fit, longest first, into the
    fewest rows of at most `pack_length` tokens their total needs (more only when they don't fit), the
    capacity narrowed to the least that holds them, so little fill is computed; position_ids restarting at 0 for each
    example and no attention_mask; transformers turns restarting position_ids into a block-diagonal
    causal mask (`masking_utils.find_packed_sequence_indices`), so packed examples never attend to each
    other. The tail of a packed row is filled with pad tokens that form a sequence of their own
    (positions from 0, labels ignored), so nothing real attends to them. Capping the packed rows
    matters on CPU: without a variable-length attention kernel, one row of a whole batch (~2,000
    tokens) computes a 2,000 x 2,000 score matrix per head, far slower than padded batches.
    Returns input_ids, labels, position_ids (R, L) with R packed rows, and num_tokens (the real ones).
    """

    pad_token_id: int
    packing: bool = False
    pack_length: int | None = None  # packed row capacity in tokens (default: the longest row)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self._pack(rows)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def _pack(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        longest, total = max(lengths), sum(lengths)
        limit = max(self.pack_length or longest, longest)
        # The fewest rows the tokens need, each as narrow as first-fit decreasing allows: the
        # shorter the rows, the less fill is computed and the smaller each row's score matrix.
        rows_wanted = math.ceil(total / limit)
        capacity = max(longest, math.ceil(total / rows_wanted))
        bins, used = _first_fit_decreasing(rows, capacity)
        while len(bins) > rows_wanted and capacity < limit:
            capacity = min(limit, capacity + 16)
            bins, used = _first_fit_decreasing(rows, capacity)
        width = max(used)
        ids, labels, pos = [], [], []
        for packed, n in zip(bins, used):
            fill = width - n
            ids.append([t for r in packed for t in r["input_ids"]] + [self.pad_token_id] * fill)
            # The first token of each example is no target of the example before it.
            labels.append([IGNORE if i == 0 else t for r in packed for i, t in enumerate(r["labels"])] + [IGNORE] * fill)
            pos.append([i for r in packed for i in range(len(r["input_ids"]))] + list(range(fill)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
                "num_tokens": torch.tensor(sum(used))}


def _first_fit_decreasing(rows: list[dict[str, Any]], capacity: int) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Rows packed longest first into bins of at most `capacity` tokens; returns (bins, tokens per bin)."""
    bins: list[list[dict[str, Any]]] = []
    used: list[int] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(r["input_ids"])
        k = next((k for k, u in enumerate(used) if u + n <= capacity), None)
        if k is None:
            bins.append([])
            used.append(0)
            k = len(bins) - 1
        bins[k].append(r)
        used[k] += n
    return bins, used


def causal_lm_parts(model):
    """``(decoder, lm_head)`` of a causal LM, through PEFT and accelerate wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def selected_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions, and their count.

    The decoder runs on every token, but the LM head and the softmax run only where the shifted label
    is trained: shape (N, vocab) with N = trained tokens, instead of (B, T, vocab).
    """
    decoder, head = causal_lm_parts(model)
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


@contextmanager
def _forward_as(module: torch.nn.Module, forward):
    """Make `forward` the `module`'s forward for a while (restoring what was there, e.g. accelerate's autocast)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


class CalltuneTrainer(Trainer):
    """`transformers.Trainer` with `selected_loss` and a tokens/s figure in every log line.

    ``tokens_seen`` and ``tokens_per_s`` in the logs count every process's non-padding tokens;
    ``tokens_seen`` continues across a resume (`tokens_before`).
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0  # non-padding input tokens of this process since it started
        self.tokens_before = 0  # all processes' tokens before the checkpoint this run resumed from
        self._t0 = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        real = inputs.pop("num_tokens", None)  # packed batches say how many tokens are not fill
        self.tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(real)
        # The loss goes through the wrapped model's forward (DDP syncs gradients and FSDP gathers
        # weights only there), with the inner model's forward standing in for selected_loss.
        inner = self.accelerator.unwrap_model(model)
        with _forward_as(inner, lambda **batch: selected_loss(inner, batch)), self.accelerator.autocast():
            loss_sum, n = model(**inputs)
        if num_items_in_batch is None:
            denominator = max(n, 1) * self.args.gradient_accumulation_steps
        else:
            denominator = max(int(num_items_in_batch), 1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # num_items_in_batch counts every process's tokens, and data parallelism averages the
                # processes' gradients: scaled back, the step's gradient is that of the global mean.
                loss_sum = loss_sum * self.accelerator.num_processes
        loss = loss_sum / denominator
        return (loss, None) if return_outputs else loss

    def all_tokens_seen(self) -> int:
        """Non-padding tokens every process has trained on since this run started (a collective call)."""
        count = torch.tensor(self.tokens_seen, device=self.args.device)
        return int(self.accelerator.reduce(count, reduction="sum"))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._t0 is not None:  # every process logs at the same steps, so the reduction meets
            elapsed = time.perf_counter() - self._t0
            seen = self.all_tokens_seen()
            logs["tokens_per_s"] = round(seen / max(elapsed, 1e-9), 1)
            logs["tokens_seen"] = self.tokens_before + seen
        super().log(logs, *args, **kwargs)


class ReleaseFreedMemory(TrainerCallback):
    """Every `every` steps, hand memory freed by PyTorch back to the OS (glibc `malloc_trim`).

    Batches grouped by length have a different shape at every step; with glibc's allocator the freed
    blocks of all those shapes stay mapped, and resident memory grows step by step (figures in
    docs/design.md). A no-op where glibc is not the C library.
    """

    def __init__(self, every: int = 10):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            malloc_trim()


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@dataclass
class TrainResult:
    """What `train` produced: where the model is, the log history, and timing."""

    output_dir: Path
    log_history: list[dict[str, Any]]
    train_seconds: float
    tokens_seen: int
    steps: int
    train_examples: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(self.train_seconds, 1e-9)


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=cfg.lora.target_modules)


def prepare_model(model_name: str, cfg: TrainConfig):
    """Load the base model for `cfg.method`; LoRA/QLoRA wrap it with PEFT. Returns (model, tokenizer)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantize = cfg.method == "qlora"
    compute = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    model, tokenizer, _ = load_model(model_name, dtype=torch.float32, quantize_4bit=quantize, compute_dtype=compute,
                                   attn_implementation=cfg.attn_implementation)
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.method in ("lora", "qlora"):
        model = get_peft_model(model, _lora_config(cfg))
    model.config.use_cache = False
    if cfg.torch_compile:
        compile_decoder_layers(model)
    return model, tokenizer


def _refuse_compile_under_sharding() -> None:
    """Raise `CalltuneError` when `accelerate launch` runs DeepSpeed or FSDP (its ``ACCELERATE_USE_*`` variables)."""
    launcher = [name for name, env in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
                if os.environ.get(env, "").lower() in ("1", "true")]
    if launcher:
        raise CalltuneError(f"train.torch_compile: not supported under {launcher[0]}; compile in single-process or "
                            "DDP runs (recipes/accelerate/ddp.yaml), or set train.torch_compile: false")


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """`torch.compile` each decoder layer of `model` in place (regional compilation); returns how many.

    Inductor fuses each layer's elementwise work (RMSNorm, SiLU times the up projection, the rotary
    embedding, the attention mask, softmax and the bf16/fp32 casts autocast inserts) into generated
    kernels around the matmuls, forward and backward. ``dynamic=True``: packed batches change shape every
    step, and one symbolic-shape graph serves them all. `nn.Module.compile` leaves the parameter names
    alone, so checkpoints and the saved model are those of an uncompiled run. Under DeepSpeed or FSDP,
    which rewrite the layers' parameters, it is refused (known from the ``ACCELERATE_USE_DEEPSPEED`` /
    ``ACCELERATE_USE_FSDP`` variables `accelerate launch` sets).

    Raises:
        CalltuneError: the model has no ``layers`` list in its decoder, or DeepSpeed / FSDP runs it.
    """
    _refuse_compile_under_sharding()
    decoder, _ = causal_lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise CalltuneError(f"train.torch_compile: {type(decoder).__name__} has no list of decoder layers "
                            "(`.layers`) to compile; set train.torch_compile: false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def per_device_batch_size(cfg: TrainConfig, processes: int) -> int:
    """``cfg.batch_size`` (the micro-batch of all processes together) split evenly among `processes`.

    Raises:
        CalltuneError: the batch does not split evenly.
    """
    if cfg.batch_size % processes:
        raise CalltuneError(f"train.batch_size={cfg.batch_size} is the micro-batch of all {processes} processes "
                            f"together and must split evenly among them; set it to a multiple of {processes}")
    return cfg.batch_size // processes


def training_arguments(cfg: TrainConfig, output_dir: Path, **overrides) -> TrainingArguments:
    """The `TrainingArguments` a `TrainConfig` maps to (TensorBoard logs under ``output_dir/runs``).

    Each of the launcher's processes (`world_size`) gets ``cfg.batch_size / processes`` examples per
    micro-batch, so an optimizer step sees ``batch_size x grad_accum`` examples however many processes
    run. Checkpoints are full (model or adapter, optimizer, scheduler, RNG, trainer state).
    """
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=per_device_batch_size(cfg, world_size()),
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optim, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=1,
        report_to=["tensorboard"], seed=cfg.seed, data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
    )
    # transformers renamed gradient_checkpointing to activation_checkpointing; earlier 5.x know only the old name.
    fields = TrainingArguments.__dataclass_fields__
    kwargs["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = \
        cfg.gradient_checkpointing
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(model_name: str, examples: list[Example], fmt: PromptFormat, cfg: TrainConfig, output_dir: str | Path,
          rejects: Rejects | None = None, callbacks: list[TrainerCallback] | None = None,
          resume_from_checkpoint: str | Path | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Fine-tune `model_name` on `examples` rendered by `fmt`; save the model, tokenizer and format.

    The saved folder (`output_dir`) holds a full model (``full``) or a LoRA adapter (``lora``,
    ``qlora``) plus ``calltune_format.json`` and ``train_log.json``; it appears whole, by a rename, when
    training ends. Full checkpoints (weights or adapter, optimizer, scheduler, RNG and trainer state,
    which holds the data order's position) go to ``output_dir/checkpoints`` every ``cfg.save_steps``.
    The folder rules are `calltune.train.output.check_output_dir`'s: a fresh run needs an empty or new
    folder; `overwrite` deletes an earlier run's model and checkpoints first.

    `resume_from_checkpoint` continues an interrupted run: True takes the newest complete checkpoint
    of `output_dir`, a path takes that checkpoint folder (the fine-tuning jobs worker passes one).
    Training goes on from its step with its weights, optimizer, scheduler, RNG and data order, so it
    ends where an uninterrupted run would. Resuming a run whose model is already saved trains nothing
    and returns the saved result.

    Under a launcher every process calls `train` with the same arguments; only the main process
    writes files, and every process returns the same result.

    Raises:
        ValueError: no example survives rendering.
        CalltuneError: the output folder or checkpoint can't be used (`calltune.train.output.OutputDirError`,
            whose message says which flag to pass); ``cfg.batch_size`` does not split among the processes.
    """
    output_dir = Path(output_dir)
    if cfg.torch_compile:
        _refuse_compile_under_sharding()  # before the folder and the model are touched
    flush_denormals()
    args = training_arguments(cfg, output_dir / CHECKPOINTS)
    resume = bool(resume_from_checkpoint)
    # The main process checks and readies the folder while the others wait (a check of theirs could
    # race with the main process creating checkpoints/); a refusal there ends them all.
    with args.main_process_first(local=False, desc="output folder"):
        if args.process_index == 0:
            prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)
    if resume and is_finished(output_dir):
        return _saved_result(output_dir, examples, fmt, cfg, rejects)
    checkpoint = latest_checkpoint(output_dir) if resume_from_checkpoint is True else (resume_from_checkpoint or None)
    if checkpoint is not None and not (Path(checkpoint) / "trainer_state.json").exists():
        raise CalltuneError(f"checkpoint {checkpoint} holds no trainer_state.json: it is no complete Trainer "
                            "checkpoint; give a checkpoint-N folder the Trainer finished saving")
    torch.manual_seed(cfg.seed)  # the same initial LoRA weights in every process
    model, tokenizer = prepare_model(model_name, cfg)
    rows = tokenize_examples(examples, fmt, tokenizer, cfg.max_length, rejects=rejects, train_on=cfg.train_on)
    if not rows:
        raise CalltuneError(f"no training example survived rendering with format {fmt.name!r}; see the rejects file")
    trainer = CalltuneTrainer(model=model, args=args, train_dataset=_ListDataset(rows), processing_class=tokenizer,
                              data_collator=Collator(tokenizer.pad_token_id, packing=cfg.packing, pack_length=cfg.pack_length or cfg.max_length),
                              callbacks=[ReleaseFreedMemory(), *(callbacks or [])])
    if checkpoint is not None:
        history = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("log_history", [])
        trainer.tokens_before = max((h.get("tokens_seen", 0) for h in history), default=0)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    seconds = time.perf_counter() - start
    tokens = trainer.all_tokens_seen()
    trainer.model.config.use_cache = True
    stage = staging_dir(output_dir)
    # Every process takes part (ZeRO-3 and FSDP gather the sharded weights); the main process writes.
    trainer.save_model(str(stage))
    history = trainer.state.log_history
    if args.should_save:
        save_format(fmt, stage)
        (stage / LAST_WRITTEN).write_text(json.dumps(history, indent=1) + "\n")
        publish(stage, output_dir)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output_dir=output_dir, log_history=history, train_seconds=seconds,
                       tokens_seen=tokens, steps=out.global_step, train_examples=len(rows))


def _saved_result(output_dir: Path, examples: list[Example], fmt: PromptFormat, cfg: TrainConfig,
                  rejects: Rejects | None) -> TrainResult:
    """The `TrainResult` of a finished run in `output_dir`, from its ``train_log.json`` (examples re-rendered
    with its tokenizer, so `rejects` gets the same rows as in training)."""
    from calltune.models import load_tokenizer

    history = json.loads((output_dir / LAST_WRITTEN).read_text())
    rows = tokenize_examples(examples, fmt, load_tokenizer(str(output_dir)), cfg.max_length, rejects=rejects,
                             train_on=cfg.train_on)
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    return TrainResult(output_dir=output_dir, log_history=history,
                       train_seconds=float(summary.get("train_runtime", 0.0)), tokens_seen=max((h.get("tokens_seen", 0) for h in history), default=0),
                       steps=int(max((h.get("step", 0) for h in history), default=0)), train_examples=len(rows))


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base and save full HF safetensors that plain transformers loads.

    The tokenizer and prompt format are copied along.

    Raises:
        ValueError: `adapter_dir` holds no ``adapter_config.json``.
    """
    from calltune.formats import load_format
    from calltune.models import is_adapter

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not is_adapter(str(adapter_dir)):
        raise CalltuneError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter")
    model, tokenizer, _ = load_model(adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    fmt = load_format(adapter_dir)
    if fmt is not None:
        save_format(fmt, output_dir)
    return output_dir


def steps_for(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps a config takes on `n_examples` (max_steps, or epochs x batches)."""
    if cfg.max_steps:
        return cfg.max_steps
    return math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum * cfg.epochs)
