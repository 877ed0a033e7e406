"""Fine-tuning: full, LoRA and QLoRA, through the transformers `Trainer` and PEFT.

Owns tokenising examples with a prompt format (`tokenize_examples`), the batch collator (padded or
padding-free packed), `CalltuneTrainer` (the `Trainer` with a loss computed only where labels are
trained and a tokens/s log) and `train`, which runs a `TrainConfig` and saves the result in HF format
with its prompt format.

Speed on CPU comes from: bf16 autocast (Trainer ``bf16=True``), padding-free packing of each (random)
batch into rows of at most max_length tokens so little is spent on padding (or, with packing off,
batches grouped by length), and the LM head + cross-entropy evaluated only at trained positions (for a
135M model with a 49k vocabulary the head is a fifth of the FLOPs per token).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from calltune.formats import FormatError, PromptFormat, save_format
from calltune.models import load_model
from calltune.runtime import flush_denormals, malloc_trim
from calltune.schema import Example
from calltune.sources.base import Rejects
from calltune.train.config import TrainConfig

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


class CalltuneTrainer(Trainer):
    """`transformers.Trainer` with `selected_loss` and a tokens/s figure in every log line."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0  # non-padding input tokens
        self._t0 = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        real = inputs.pop("num_tokens", None)  # packed batches say how many tokens are not fill
        self.tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(real)
        # accelerate autocasts `model.forward`; selected_loss calls the decoder and head directly.
        with self.accelerator.autocast():
            loss_sum, n = selected_loss(model, inputs)
        if num_items_in_batch is None:
            denominator = max(n, 1) * self.args.gradient_accumulation_steps
        else:
            denominator = max(int(num_items_in_batch), 1)
        loss = loss_sum / denominator
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            logs["tokens_per_s"] = round(self.tokens_seen / max(elapsed, 1e-9), 1)
            logs["tokens_seen"] = self.tokens_seen
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
    return model, tokenizer


def training_arguments(cfg: TrainConfig, output_dir: Path, **overrides) -> TrainingArguments:
    """The `TrainingArguments` a `TrainConfig` maps to (TensorBoard logs under ``output_dir/logs``)."""
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optim, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=1,
        report_to=["tensorboard"], seed=cfg.seed, data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        activation_checkpointing=cfg.gradient_checkpointing, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=True,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(model_name: str, examples: list[Example], fmt: PromptFormat, cfg: TrainConfig, output_dir: str | Path,
          rejects: Rejects | None = None, callbacks: list[TrainerCallback] | None = None,
          resume_from_checkpoint: str | Path | None = None) -> TrainResult:
    """Fine-tune `model_name` on `examples` rendered by `fmt`; save the model, tokenizer and format.

    The saved folder (`output_dir`) holds a full model (``full``) or a LoRA adapter (``lora``,
    ``qlora``) plus ``calltune_format.json``; checkpoints go to ``output_dir/checkpoints``.
    `resume_from_checkpoint` (one of those checkpoint folders) continues from its step with its
    weights; the optimizer starts afresh, as checkpoints hold the model only (``save_only_model``).

    Raises:
        ValueError: no example survives rendering.
    """
    output_dir = Path(output_dir)
    flush_denormals()
    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(model_name, cfg)
    rows = tokenize_examples(examples, fmt, tokenizer, cfg.max_length, rejects=rejects, train_on=cfg.train_on)
    if not rows:
        raise ValueError(f"no training example survived rendering with format {fmt.name!r}; see the rejects file")
    args = training_arguments(cfg, output_dir / "checkpoints")
    trainer = CalltuneTrainer(model=model, args=args, train_dataset=_ListDataset(rows),
                              data_collator=Collator(tokenizer.pad_token_id, packing=cfg.packing, pack_length=cfg.pack_length or cfg.max_length),
                              callbacks=[ReleaseFreedMemory(), *(callbacks or [])])
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
    seconds = time.perf_counter() - start
    model = trainer.model
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    save_format(fmt, output_dir)
    history = trainer.state.log_history
    (output_dir / "train_log.json").write_text(json.dumps(history, indent=1) + "\n")
    return TrainResult(output_dir=output_dir, log_history=history, train_seconds=seconds,
                       tokens_seen=trainer.tokens_seen, steps=out.global_step, train_examples=len(rows))


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
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter")
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
