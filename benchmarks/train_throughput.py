"""Training throughput: calltune's trainer against TRL's `SFTTrainer` at its defaults and at its best, on ViGGO.

Run:

    python benchmarks/train_throughput.py [--steps 5 --batch-size 16 --repeats 2 --rows STEPS*BATCH]
    python benchmarks/train_throughput.py --rows 32 --steps 3 --repeats 1 --configs full   # smoke run

A trial is a subprocess: model loading and start-up, then `--steps` optimizer steps; TRL at its defaults
is among the slowest trainers (gradient checkpointing); docs/benchmarks.md has the measured times of
full runs.

Owns the benchmark only: nothing in `calltune` imports it. For each config (full fine-tuning, LoRA)
it trains SmolLM2-135M-Instruct for the same number of optimizer steps at the same batch size and
max_length, on the same ViGGO rows rendered to the same chat messages (by default steps x batch
rows, so each trainer sees every row once, each in its own order), with calltune and with
TRL three times (defaults; at its best, packed and padded), alternating (calltune, calltune_compiled,
trl, trl_best, trl_best_padded, calltune, ...) for `--repeats` rounds. Every trial runs in its
own subprocess, which reports its own peak resident memory (``ru_maxrss``), so no trial inherits
another's heap.

calltune side (what `calltune.train.train` builds, minus saving the model): `prepare_model`,
`tokenize_examples`, `training_arguments` and `CalltuneTrainer` with `Collator` and the
`ReleaseFreedMemory` callback, at calltune's defaults: bf16 autocast over fp32 master weights, eager
attention, the LM head + cross-entropy only at trained (assistant) positions, batches in random order
packed padding-free into rows of at most max_length tokens, cosine schedule with 3% warm-up
(`TrainConfig` defaults). ``calltune_compiled`` is the same with ``train.torch_compile`` on
(`compile_decoder_layers`: inductor fuses the work between each layer's matmuls); its compilation
falls in the untimed warm-up step.

Packing: `TrainConfig.packing` defaults to True (and `group_by_length` to False), and this benchmark
runs calltune with it unless ``--calltune-packing off`` (then: right-padded batches in random order).
calltune packs a batch first-fit into rows of at most max_length tokens (`Collator`); why rows are
capped rather than one row per batch, and what padding costs, is in docs/design.md.

TRL side, the baseline a user would write: a `datasets.Dataset` with one conversational ``messages``
column, ``SFTTrainer(model=<folder>, args=SFTConfig(output_dir, per_device_train_batch_size,
max_steps, learning_rate, report_to=[], logging_steps=1, max_length), train_dataset, peft_config)``.
``use_cpu=True`` is added on a CPU-only machine because TRL's bf16 default otherwise stops with
"Your setup doesn't support bf16/gpu. You need to assign use_cpu" (transformers'
`TrainingArguments._validate_args`), which is what a user would then add. `max_length` is set to
ours so both see the same tokens (no ViGGO row reaches 256 tokens, so it truncates nothing either
way; the JSON records how many rows were truncated). Everything else is at TRL 1.16's defaults, read from the installed ``trl/trainer/{base_config,sft_config,sft_trainer,utils}.py``:

- ``bf16=None`` becomes True unless fp16 is set (`_BaseConfig.__post_init__`): bf16 autocast, CPU too.
- ``gradient_checkpointing=True`` (TRL overrides transformers' False): the forward runs twice.
- ``packing=False`` (``packing_strategy="bfd"`` unused), ``padding_free=False``: batches are right-padded
  to their longest row (``pad_to_multiple_of="auto"`` = no rounding off Neuron), in random order.
- ``assistant_only_loss=False``, ``completion_only_loss=None``: a ``messages`` dataset is "language
  modelling", so the loss covers every token (system, user and assistant), not only the answer.
- ``max_length=1024`` (overridden here, see above), ``learning_rate=2e-5`` (set to calltune's here),
  ``logging_steps=10`` (set to 1 here), ``lr_scheduler_type="linear"``, no warm-up, ``loss_type="nll"``.
- Model given as a path: loaded by `create_model_from_path` in float32 (``model_init_kwargs`` None ->
  ``dtype="float32"``) with no ``attn_implementation``, i.e. transformers' default, SDPA (recorded per
  trial as ``attn_implementation``).
- The loss goes through TRL's fused LM head (`add_fused_lm_head`): the head runs in tiles at every
  position whose label is not -100 (here: every real token but each row's first), also computing the
  entropy and top-1 accuracy it logs.

TRL at its best (``trl_best``, `TRL_BEST`): the same, with what TRL offers for this job turned on:
no gradient checkpointing, best-fit-decreasing packing (which makes its collator padding-free:
rows flattened into one sequence, kept apart by ``position_ids``, which transformers' SDPA and eager
masks honour), loss on the answer only (a prompt-completion dataset, ``completion_only_loss``), bf16
autocast over fp32 master weights, SDPA attention. Liger kernels are Triton (GPU) kernels and don't
run on this CPU. Since TRL packs the whole dataset before batching, a step of ``trl_best`` holds
``--batch-size`` packed rows: more tokens per step than the others, the same tokens/s measure.
``trl_best_padded`` (`TRL_BEST_PADDED`) is the same without packing: right-padded batches, which on a
CPU can beat padding-free ones (no variable-length attention kernel, so one flattened row of a whole
batch pays attention over its full length). TRL at its best, in the verdict, is the faster of the two
for each config.

What is measured, per trial:
- tokens/s: NON-PADDING input tokens of the rows the timed steps consumed (the sum of the real lengths
  of the rows handed to the collator, counted the same way for both trainers) divided by the wall time
  from the start of step ``--warmup + 1`` to the end of the last step (the first ``--warmup`` steps,
  which pay for lazy initialisation, are excluded).
- peak RSS (GB): the trial process's own ``ru_maxrss``, model loading included.
- the per-step training loss. The two trainers' losses are different quantities (calltune averages
  over answer tokens, TRL over all tokens) and see the rows in a different order, so only the shape of
  the curves is compared (Pearson correlation per step).
- model FLOP utilisation: training FLOPs = 6 x N_nonemb x tokens + 6 x N_head x head_positions, where
  N_nonemb are the decoder's non-embedding parameters (~106M), N_head = vocab x hidden (the tied LM
  head, 28M) and head_positions the positions where a trainer evaluates the head (calltune and trl_best:
  trained targets; trl: every non-pad position after the first of each row). Attention score FLOPs, gradient
  checkpointing's recomputation and the masked-out work of packed eager attention are not counted
  (they are hardware work, not model work). For LoRA the frozen weights need no weight gradient, so
  the real work is nearer 4N than 6N; the 6N convention is kept so the two configs share a scale.
  Divided by the machine's measured bf16 matmul throughput (2048 x 2048 x 2048 `torch.matmul`, best
  of several, measured before and after the trials; the higher is used).

Writes ``--out`` (JSON, default runs/bench/train_throughput.json) and a loss-curve PNG beside it.
The machine may be shared: every trial records the 1-minute load average at its start.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = REPO.parent / "shared" / "data" / "viggo" / "train.csv"
MODEL_ALIAS = "smollm2-135m-instruct"

# Learning rates and LoRA shape of the shipped recipes (recipes/viggo-full.yaml, viggo-lora.yaml),
# given to both trainers.
LEARNING_RATE = {"full": 2e-4, "lora": 1e-3}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


# TRL configured as well as TRL allows for this job on this machine: what differs from its defaults.
TRL_BEST = {
    "gradient_checkpointing": False,  # 135M parameters fit: no second forward
    "packing": True, "packing_strategy": "bfd",  # best-fit-decreasing packing, which makes batches padding-free
    "completion_only_loss": True,  # loss (and the LM head's fused loss) on the answer tokens only
    "bf16": True,  # bf16 autocast over fp32 master weights, as calltune
    "model_init_kwargs": {"attn_implementation": "sdpa"},  # the fastest here; packed rows stay apart by position_ids
    "dataloader_drop_last": False,
}
# The same without packing: right-padded batches, since on CPU (no variable-length attention kernel) a
# padding-free batch is one long row whose attention costs more than the padding it saves.
TRL_BEST_PADDED = {**TRL_BEST, "packing": False}
TRAINERS = ("calltune", "calltune_compiled", "trl", "trl_best", "trl_best_padded")
OURS = ("calltune", "calltune_compiled")  # calltune_compiled: the same with train.torch_compile
BEST = ("trl_best", "trl_best_padded")  # TRL at its best: the faster of these, per config


# --------------------------------------------------------------------------------------------------
# Child side: one training trial in this process.
# --------------------------------------------------------------------------------------------------

def _viggo_rows(train_csv: str, n: int, seed: int):
    """`n` ViGGO examples drawn at random (seeded) from the train file, and the viggo format."""
    from calltune.formats import get_format
    from calltune.sources import load_source

    examples = load_source("viggo", train_csv)
    picked = random.Random(seed).sample(examples, min(n, len(examples)))
    return picked, get_format("viggo")


class _CountingCollator:
    """Wraps a collator; records, per batch in the order batches are built, the real (non-padding)
    input tokens of its rows and the number of positions whose next-token label is trained."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.head_positions: list[int] = []

    def __call__(self, rows):
        batch = self.inner(rows)
        self.tokens.append(sum(len(r["input_ids"]) for r in rows))
        self.head_positions.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


def _timer_callback(counter: _CountingCollator, warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step, and of steps warmup+1 .. last together (seconds)."""

        def __init__(self):
            self.t_start = self.t_end = self._t = None
            self.step_seconds: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            # Batches built before training (none expected) must not shift the per-step token counts.
            counter.tokens.clear()
            counter.head_positions.clear()

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()
            if state.global_step == warmup:
                self.t_start = self._t

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - self._t)
            self.t_end = now

    return StepTimer()


def _param_counts(model) -> dict[str, int]:
    """Non-embedding decoder parameters and LM-head parameters of the (possibly PEFT-wrapped) model."""
    from calltune.train.trainer import causal_lm_parts

    decoder, head = causal_lm_parts(model)
    embed = decoder.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()}
    # LoRA adapter weights are left out: N counts the base model's forward matmuls.
    nonemb = sum(p.numel() for n, p in decoder.named_parameters() if id(p) not in embed_ids and "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"nonembedding": nonemb, "head": head.weight.numel(), "trainable": trainable}


def run_calltune(spec: dict, out_dir: Path):
    import torch

    from calltune.models import resolve_model
    from calltune.train import TrainConfig
    from calltune.train.trainer import (CalltuneTrainer, Collator, ReleaseFreedMemory, _ListDataset, prepare_model,
                                        tokenize_examples, training_arguments)

    examples, fmt = _viggo_rows(spec["train_csv"], spec["rows"], spec["seed"])
    settings = {**spec.get("calltune_set", {}), "torch_compile": spec["trainer"] == "calltune_compiled"}
    cfg = TrainConfig(method=spec["method"], max_steps=spec["steps"], batch_size=spec["batch_size"],
                      learning_rate=LEARNING_RATE[spec["method"]], max_length=spec["max_length"],
                      packing=spec["calltune_packing"], logging_steps=1, **settings,
                      lora={"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                            "target_modules": LORA["target_modules"]})
    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(resolve_model(MODEL_ALIAS), cfg)
    rows = tokenize_examples(examples, fmt, tokenizer, cfg.max_length, train_on=cfg.train_on)
    full_lengths = [len(fmt.render(ex, tokenizer)[0]) for ex in examples]
    args = training_arguments(cfg, out_dir, report_to=[], save_strategy="no", disable_tqdm=True)
    counter = _CountingCollator(Collator(tokenizer.pad_token_id, packing=cfg.packing, pack_length=cfg.max_length))
    timer = _timer_callback(counter, spec["warmup"])
    trainer = CalltuneTrainer(model=model, args=args, train_dataset=_ListDataset(rows), data_collator=counter,
                              callbacks=[ReleaseFreedMemory(), timer])
    info = {"attn_implementation": model.config._attn_implementation, "packing": cfg.packing,
            "truncated_rows": sum(n > cfg.max_length for n in full_lengths), **_param_counts(model)}
    return trainer, counter, timer, info


def run_trl(spec: dict, out_dir: Path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from calltune.models import load_tokenizer, resolve_model

    best = spec["trainer"] in BEST
    examples, fmt = _viggo_rows(spec["train_csv"], spec["rows"], spec["seed"])
    messages = []
    for ex in examples:
        # The same chat dicts calltune's viggo format feeds the chat template (tools: none for viggo).
        chat, tools = fmt.to_chat(ex.messages, ex.tools_as_dicts())
        assert tools is None, "the viggo format renders no tools"
        assert chat[-1]["role"] == "assistant"
        # TRL at its best trains on the answer only: a prompt-completion dataset (completion_only_loss).
        messages.append({"prompt": chat[:-1], "completion": chat[-1:]} if best else {"messages": chat})
    path = resolve_model(MODEL_ALIAS)
    peft_config = None
    if spec["method"] == "lora":
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=spec["batch_size"],
                     max_steps=spec["steps"], learning_rate=LEARNING_RATE[spec["method"]], report_to=[],
                     logging_steps=1, max_length=spec["max_length"], disable_tqdm=True,
                     # TRL's bf16=True default refuses to start on a machine without a bf16 GPU unless
                     # use_cpu is set ("Your setup doesn't support bf16/gpu. You need to assign use_cpu").
                     use_cpu=not torch.cuda.is_available(),
                     **({"trl_best": TRL_BEST, "trl_best_padded": TRL_BEST_PADDED}.get(spec["trainer"], {})))
    trainer = SFTTrainer(model=path, args=args, train_dataset=Dataset.from_list(messages), peft_config=peft_config)
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # read when `train()` builds the dataloader
    timer = _timer_callback(counter, spec["warmup"])
    trainer.add_callback(timer)
    tokenizer = load_tokenizer(path)
    untruncated = [tokenizer(tokenizer.apply_chat_template(m.get("messages") or m["prompt"] + m["completion"],
                                                           tokenize=False),
                             add_special_tokens=False)["input_ids"] for m in messages]
    info = {"attn_implementation": trainer.model.config._attn_implementation,
            "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16, "packing": args.packing,
            "packing_strategy": args.packing_strategy if args.packing else None,
            "padding_free": trainer.padding_free, "assistant_only_loss": args.assistant_only_loss,
            "completion_only_loss": trainer.completion_only_loss,
            "truncated_rows": sum(len(ids) > spec["max_length"] for ids in untruncated),
            **_param_counts(trainer.model)}
    return trainer, counter, timer, info


def child(spec: dict, result_path: Path) -> None:
    """Run one trial and write its measurements to `result_path` (JSON)."""
    import resource

    t_process = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="calltune-bench-") as tmp:
        runner = run_calltune if spec["trainer"] in OURS else run_trl
        trainer, counter, timer, info = runner(spec, Path(tmp))
        setup_s = time.perf_counter() - t_process
        out = trainer.train()
    steps, warmup = out.global_step, spec["warmup"]
    if timer.t_start is None or steps <= warmup:
        raise SystemExit(f"only {steps} steps ran; need more than --warmup {warmup}")
    seconds = timer.t_end - timer.t_start
    tokens = sum(counter.tokens[warmup:steps])
    head_positions = sum(counter.head_positions[warmup:steps])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trl_tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    result = {
        **spec, **info, "steps_run": steps, "timed_steps": steps - warmup, "timed_seconds": seconds,
        "timed_tokens": tokens, "timed_head_positions": head_positions, "tokens_per_s": tokens / seconds,
        "tokens_per_step": counter.tokens[:steps], "step_seconds": timer.step_seconds, "losses": losses,
        "setup_seconds": setup_s, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "load_avg_1min_at_start": load, "torch_threads": __import__("torch").get_num_threads(),
    }
    if trl_tokens:  # TRL's own running count of attention-mask tokens: a cross-check of `tokens_per_step`
        result["trl_num_tokens_logged"] = trl_tokens[-1]
    result_path.write_text(json.dumps(result, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Parent side: matmul peak, the alternating trials, and the report.
# --------------------------------------------------------------------------------------------------

def matmul_gflops(n: int = 2048, repeats: int = 5, per_repeat: int = 4) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in bf16 and fp32, all threads."""
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up: kernel selection, page faults
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(per_repeat):
                torch.matmul(a, b)
            best = max(best, 2 * n ** 3 * per_repeat / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


def run_trial(spec: dict, log_dir: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    log = log_dir / f"{spec['method']}-{spec['trainer']}-{spec['repeat']}.log"
    cmd = [sys.executable, __file__, "--_child", json.dumps(spec), "--_result", str(result_path)]
    t = time.perf_counter()
    with log.open("w") as stream:
        proc = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"trial {spec} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["process_seconds"] = time.perf_counter() - t
    return result


def pearson(a: list[float], b: list[float]) -> float | None:
    n = min(len(a), len(b))
    if n < 3:
        return None
    a, b = a[:n], b[:n]
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else None


def model_flops(trial: dict) -> float:
    """Training FLOPs of the timed steps: 6 N per token for the decoder, 6 N_head per head position."""
    return 6 * trial["nonembedding"] * trial["timed_tokens"] + 6 * trial["head"] * trial["timed_head_positions"]


def summarise(trials: list[dict], peak_gflops: float) -> dict:
    summary = {}
    for method in sorted({t["method"] for t in trials}):
        entry = {}
        for trainer in TRAINERS:
            ts = [t for t in trials if t["method"] == method and t["trainer"] == trainer]
            if not ts:
                continue
            tps = [t["tokens_per_s"] for t in ts]
            flops_per_s = [model_flops(t) / t["timed_seconds"] for t in ts]
            entry[trainer] = {
                "tokens_per_s_median": statistics.median(tps), "tokens_per_s_trials": tps,
                "peak_rss_gb_max": max(t["peak_rss_gb"] for t in ts),
                "peak_rss_gb_trials": [t["peak_rss_gb"] for t in ts],
                "model_gflops_per_s_median": statistics.median(flops_per_s) / 1e9,
                "mfu_median": statistics.median(flops_per_s) / (peak_gflops * 1e9),
                "losses_first_trial": ts[0]["losses"],
                "attn_implementation": ts[0]["attn_implementation"],
            }
        present = [t for t in BEST if t in entry]
        if present:  # TRL at its best: its faster configuration here
            entry["trl_fastest_best"] = max(present, key=lambda t: entry[t]["tokens_per_s_median"])
        for ours in OURS:
            for peer in ("trl", *BEST):
                if ours in entry and peer in entry:
                    c, r = entry[ours], entry[peer]
                    entry[f"tokens_per_s_ratio_{ours}_over_{peer}"] = c["tokens_per_s_median"] / r["tokens_per_s_median"]
                    entry[f"peak_rss_ratio_{ours}_over_{peer}"] = c["peak_rss_gb_max"] / r["peak_rss_gb_max"]
                    entry[f"loss_curve_correlation_{ours}_{peer}"] = pearson(c["losses_first_trial"],
                                                                             r["losses_first_trial"])
        summary[method] = entry
    return summary


def plot_losses(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.5), squeeze=False)
    for ax, (method, entry) in zip(axes[0], summary.items()):
        for trainer, style in (("calltune", "-o"), ("calltune_compiled", "-x"), ("trl", "-s"), ("trl_best", "-^"),
                               ("trl_best_padded", "-v")):
            if trainer in entry:
                losses = entry[trainer]["losses_first_trial"]
                ax.plot(range(1, len(losses) + 1), losses, style, label=trainer, markersize=3)
        ax.set_title(f"{method}: loss per step (first trial)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (calltune, trl_best*: answer tokens; trl: all)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(summary: dict, peak: dict, args) -> str:
    lines = [
        f"Model {MODEL_ALIAS}, {args.rows} ViGGO rows, batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.steps} steps ({args.warmup} warm-up step(s) untimed), {args.repeats} repeat(s); "
        f"calltune packing {args.calltune_packing}"
        f"{''.join(f', {x}' for x in args.calltune_set)}; load avg {os.getloadavg()[0]:.2f} at the end.",
        f"Measured matmul peak (2048^3): bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s.",
        "",
        "| config | trainer | attention | tokens/s (median, non-padding) | tokens/s trials | peak RSS GB "
        "| model GFLOP/s | share of bf16 matmul peak | loss first -> last |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for method, entry in summary.items():
        for trainer in TRAINERS:
            if trainer not in entry:
                continue
            e = entry[trainer]
            trials = ", ".join(f"{x:.0f}" for x in e["tokens_per_s_trials"])
            losses = e["losses_first_trial"]
            lines.append(f"| {method} | {trainer} | {e['attn_implementation']} | {e['tokens_per_s_median']:.0f} "
                         f"| {trials} | {e['peak_rss_gb_max']:.2f} | {e['model_gflops_per_s_median']:.1f} "
                         f"| {e['mfu_median']:.1%} | {losses[0]:.3f} -> {losses[-1]:.3f} |")
    lines += ["", "| config | calltune trainer | against | tokens/s calltune / it | peak RSS calltune / it "
                  "| loss-curve correlation |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    for method, entry in summary.items():
        for ours in OURS:
            for peer in ("trl", *BEST):
                if f"tokens_per_s_ratio_{ours}_over_{peer}" in entry:
                    corr = entry[f"loss_curve_correlation_{ours}_{peer}"]
                    lines.append(f"| {method} | {ours} | {peer} | {entry[f'tokens_per_s_ratio_{ours}_over_{peer}']:.2f}x "
                                 f"| {entry[f'peak_rss_ratio_{ours}_over_{peer}']:.2f}x "
                                 f"| {'n/a' if corr is None else f'{corr:.2f}'} |")
    lines += ["", verdict(summary)]
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """What the figures say against TRL at its best: the 1.3x bar calltune's own trainer must clear to be
    kept, the 10% within which it should be built on SFTTrainer instead, and the 55% share of peak."""
    out = []
    for method, entry in summary.items():
        best = entry.get("trl_fastest_best")
        for ours in OURS:
            ratio = entry.get(f"tokens_per_s_ratio_{ours}_over_{best}")
            if ratio is not None:
                call = ("calltune's trainer stays (>= 1.3x)" if ratio >= 1.3 else
                        "within 10%: build on SFTTrainer" if ratio < 1.1 else "ahead, short of the 1.3x bar")
                out.append(f"{method}: {ours} / {best} (TRL's faster best configuration) {ratio:.2f}x -> {call}")
            if ours in entry:
                out.append(f"{method}: {ours} at {entry[ours]['mfu_median']:.1%} of the bf16 matmul peak "
                           "(target for full: 55%)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per trial")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--rows", type=int, default=None,
                        help="ViGGO train rows given to both trainers (default: steps x batch size, one epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (every trainer) per config")
    parser.add_argument("--configs", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--trainers", default=",".join(TRAINERS),
                        help="comma-separated: calltune, calltune_compiled (train.torch_compile), trl (TRL's "
                             "defaults), trl_best (TRL_BEST), trl_best_padded (TRL_BEST_PADDED)")
    parser.add_argument("--calltune-packing", choices=("on", "off"), default="on",
                        help="calltune with padding-free packing into rows of max_length (on, TrainConfig's "
                             "default) or with right-padded batches (off)")
    parser.add_argument("--calltune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig field for calltune's trials (repeatable; YAML values), e.g. "
                             "optim=adamw_torch_fused")
    parser.add_argument("--train", default=str(DEFAULT_TRAIN), help="ViGGO train.csv")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    parser.add_argument("--out", default="runs/bench/train_throughput.json")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child(json.loads(args._child), Path(args._result))
        return
    if args.rows is None:
        args.rows = args.steps * args.batch_size
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(LEARNING_RATE))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choices: full, lora")

    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not trainers or set(trainers) - set(TRAINERS):
        parser.error(f"--trainers {args.trainers!r}: choices are {', '.join(TRAINERS)}")
    import yaml

    calltune_set = {}
    for item in args.calltune_set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--calltune-set takes KEY=VALUE, got {item!r}")
        calltune_set[key] = yaml.safe_load(value)
    if "torch_compile" in calltune_set:
        parser.error("--calltune-set torch_compile would compile both calltune rows; add the calltune_compiled "
                     "trainer (--trainers) instead")
    # A SIGTERM (e.g. from `timeout`) unwinds through subprocess.run, which then kills the running trial.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / f"{out.stem}_logs"
    log_dir.mkdir(exist_ok=True)
    from calltune.models import resolve_model

    resolve_model(MODEL_ALIAS)  # dequantise once here, not inside a timed child

    started = time.perf_counter()
    peak_before = matmul_gflops()
    print(f"matmul peak before: bf16 {peak_before['bf16']:.0f} GFLOP/s, fp32 {peak_before['fp32']:.0f} GFLOP/s",
          flush=True)
    trials = []
    for repeat in range(args.repeats):
        for method in configs:
            for trainer in trainers:
                spec = {"trainer": trainer, "method": method, "repeat": repeat, "steps": args.steps,
                        "warmup": args.warmup, "rows": args.rows, "batch_size": args.batch_size,
                        "max_length": args.max_length, "seed": args.seed, "train_csv": args.train,
                        "calltune_packing": args.calltune_packing == "on", "calltune_set": calltune_set}
                result = run_trial(spec, log_dir)
                trials.append(result)
                print(f"[{time.perf_counter() - started:6.0f} s] {method:4s} {trainer:15s} repeat {repeat}: "
                      f"{result['tokens_per_s']:6.1f} tokens/s over {result['timed_steps']} steps "
                      f"({result['timed_tokens']} tokens, {result['timed_seconds']:.1f} s), "
                      f"peak RSS {result['peak_rss_gb']:.2f} GB, setup {result['setup_seconds']:.1f} s, "
                      f"load avg {result['load_avg_1min_at_start']:.2f}", flush=True)
    peak_after = matmul_gflops()
    print(f"matmul peak after:  bf16 {peak_after['bf16']:.0f} GFLOP/s, fp32 {peak_after['fp32']:.0f} GFLOP/s",
          flush=True)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}

    summary = summarise(trials, peak["bf16"])
    print()
    for method, entry in summary.items():
        for trainer in TRAINERS:
            if trainer in entry:
                losses = entry[trainer]["losses_first_trial"]
                idx = sorted({0, len(losses) // 3, 2 * len(losses) // 3, len(losses) - 1})
                points = ", ".join(f"step {i + 1}: {losses[i]:.3f}" for i in idx)
                print(f"{method} {trainer} loss: {points}")
    png = out.with_name(out.stem + "_loss.png")
    plot_losses(summary, png)
    table = report(summary, peak, args)
    print()
    print(table)
    print(f"\nloss curves: {png}\nper-trial logs: {log_dir}\ntotal {time.perf_counter() - started:.0f} s")
    out.write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "matmul_gflops": {"before": peak_before, "after": peak_after, "peak_used": peak},
        "lora": LORA, "learning_rate": LEARNING_RATE, "summary": summary, "trials": trials,
        "table_markdown": table,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
