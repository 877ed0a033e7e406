"""Training configuration: the `train:` section of a recipe, one field per knob, each with its help.

Field names follow the libraries (TRL `SFTConfig`, PEFT `LoraConfig`) and the published recipes calltune
reproduces (the Levanter ViGGO tutorial, the Phi-3 QLoRA recipe on xLAM-60k), so a recipe reads like them.

Also owns `check_accelerate_config`, the check of an ``accelerate launch --config_file`` (the files in
``recipes/accelerate/``) that ``calltune validate --accelerate-config`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraSettings(BaseModel):
    """LoRA adapter settings (Hu et al. 2021; PEFT `LoraConfig`)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' for every projection layer")


class TrainConfig(BaseModel):
    """How to fine-tune. `method` is ``full``, ``lora`` or ``qlora`` (4-bit NF4 base + LoRA)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["full", "lora", "qlora"] = Field("lora", description="full fine-tuning, LoRA, or QLoRA")
    epochs: float = Field(1.0, gt=0, description="passes over the training set (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch, all processes together (each of N "
                                                  "processes takes batch_size / N); an optimizer step sees "
                                                  "batch_size x grad_accum examples")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps of linear warm-up")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: linear, cosine, constant, ...")
    optim: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, adamw_8bit, ...)")
    max_length: int = Field(1024, ge=16, description="longer examples are truncated to this many tokens")
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16", description="autocast dtype; bf16 runs on CPUs with AVX-512 BF16 / AMX and on GPUs")
    packing: bool = Field(True, description="padding-free packing: a batch's examples are packed into rows of "
                                            "pack_length tokens, kept apart by position_ids restarting at 0")
    pack_length: int | None = Field(None, ge=16, description="packed row length in tokens (default max_length; a "
                                                             "longer example gets a row of its own); shorter rows "
                                                             "have smaller attention score matrices")
    group_by_length: bool = Field(False, description="batch examples of similar length: less padding when packing "
                                                     "is off, but less varied batches (worse on ViGGO)")
    train_on: Literal["all", "last"] = Field("all", description="train every assistant turn, or only the last")
    attn_implementation: str = Field(
        "eager", description="attention kernel (a transformers name): eager is faster than sdpa on CPU for "
                             "short sequences; sdpa for long ones, whose eager score matrices grow quadratically")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    torch_compile: bool = Field(False, description="torch.compile each decoder layer (regional compilation): "
                                                   "fused kernels for the norms, activations, rotary embedding and "
                                                   "attention softmax; the first step pays the compilation (needs a "
                                                   "C++ compiler on CPU, Triton on GPU); one process or DDP")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    seed: int = 0
    logging_steps: int = Field(10, ge=1, description="log loss and tokens/s every N steps")
    save_steps: int = Field(500, ge=1, description="checkpoint every N steps (weights, optimizer, scheduler, RNG; "
                                                   "the newest is kept; --resume continues from it)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.method == "qlora" and self.mixed_precision == "no":
            raise ValueError("qlora computes in bf16 or fp16: set mixed_precision to bf16 or fp16")
        return self


# accelerate's ``distributed_type`` values that train data-parallel (or alone); the others are for TPUs,
# Megatron-LM or other accelerators' multi-device modes, which calltune does not configure.
ACCELERATE_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU",
                    "MULTI_HPU", "MULTI_MUSA", "MULTI_SDAA", "MULTI_NEURON")


def check_accelerate_config(path: str | Path, method: str | None = None, torch_compile: bool = False) -> list[str]:
    """Problems of an accelerate config file (``accelerate launch --config_file PATH``), one line each,
    naming the field (not the file).

    Checks that it parses as a YAML (or JSON) mapping; `distributed_type` names one of `ACCELERATE_TYPES`;
    `num_processes` and `num_machines` are positive integers; `mixed_precision` is no, fp16, bf16 or fp8;
    DeepSpeed names a ZeRO stage 0-3 (or a ``deepspeed_config_file`` that exists) and, at stage 3, sets
    ``zero3_save_16bit_model: true``; FSDP sets ``fsdp_state_dict_type: FULL_STATE_DICT``. The last two
    make the Trainer gather one consolidated model or adapter when it saves; without them it saves
    shards calltune can't load. With `method` ``qlora``, ZeRO-3 and FSDP are refused (sharding a 4-bit
    base needs a quantisation storage type calltune does not set); with `torch_compile`, DeepSpeed and
    FSDP are refused (`calltune.train.trainer.compile_decoder_layers` compiles for one process or DDP).
    Field names are accelerate's (``accelerate config`` writes them).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        return [f"can't be read ({err.strerror if isinstance(err, OSError) and err.strerror else err})"]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return ["not valid YAML" + (f" (line {mark.line + 1})" if mark else "")]
    if not isinstance(data, dict):
        return ["expected a mapping of accelerate settings (see recipes/accelerate/ddp.yaml)"]
    problems = []
    kind = data.get("distributed_type")
    if kind not in ACCELERATE_TYPES:
        problems.append(f"distributed_type: {kind!r} is not one of {', '.join(ACCELERATE_TYPES)}")
    for key in ("num_processes", "num_machines"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{key}: expected a positive integer, got {value!r}")
    if data.get("mixed_precision") not in (None, "no", "fp16", "bf16", "fp8"):
        problems.append(f"mixed_precision: {data['mixed_precision']!r} is not one of no, fp16, bf16, fp8")
    sharded = False
    if kind == "DEEPSPEED":
        ds: dict[str, Any] = data.get("deepspeed_config") or {}
        if not isinstance(ds, dict):
            return problems + ["deepspeed_config: expected a mapping"]
        config_file = ds.get("deepspeed_config_file")
        if config_file:
            if not Path(config_file).exists():  # accelerate reads it relative to the working directory
                problems.append(f"deepspeed_config.deepspeed_config_file: {config_file!r} not found")
        elif ds.get("zero_stage") not in (0, 1, 2, 3):
            problems.append(f"deepspeed_config.zero_stage: expected 0, 1, 2 or 3, got {ds.get('zero_stage')!r}")
        elif ds.get("zero_stage") == 3:
            sharded = True
            if ds.get("zero3_save_16bit_model") is not True:
                problems.append("deepspeed_config.zero3_save_16bit_model: set it to true, so the final "
                                "model (or adapter) is saved as one consolidated file rather than ZeRO shards")
    if kind == "FSDP":
        fsdp: dict[str, Any] = data.get("fsdp_config") or {}
        if not isinstance(fsdp, dict):
            return problems + ["fsdp_config: expected a mapping"]
        sharded = True
        if fsdp.get("fsdp_state_dict_type") != "FULL_STATE_DICT":
            got = fsdp.get("fsdp_state_dict_type")
            problems.append(f"fsdp_config.fsdp_state_dict_type: set it to FULL_STATE_DICT, so the final model (or "
                            f"adapter) is saved whole, not as shards (got {got!r})")
    if torch_compile and kind in ("DEEPSPEED", "FSDP"):
        problems.append(f"train.torch_compile is not supported under {kind}; use recipes/accelerate/ddp.yaml or "
                        "set train.torch_compile: false")
    if sharded and method == "qlora":
        problems.append(f"{kind} shards the model, which calltune does not support for train.method qlora; "
                        "use recipes/accelerate/ddp.yaml or deepspeed_zero2.yaml")
    return problems
