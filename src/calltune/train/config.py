"""Training configuration: the `train:` section of a recipe, one field per knob, each with its help.

Field names follow the libraries (TRL `SFTConfig`, PEFT `LoraConfig`) and the published recipes calltune
reproduces (the Levanter ViGGO tutorial, the Phi-3 QLoRA recipe on xLAM-60k), so a recipe reads like them.
"""

from __future__ import annotations

from typing import Literal

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
    batch_size: int = Field(16, ge=1, description="examples per optimizer step (per device)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
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
    lora: LoraSettings = Field(default_factory=LoraSettings)
    seed: int = 0
    logging_steps: int = Field(10, ge=1, description="log loss and tokens/s every N steps")
    save_steps: int = Field(500, ge=1, description="checkpoint every N steps (the last one is kept)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.method == "qlora" and self.mixed_precision == "no":
            raise ValueError("qlora computes in bf16 or fp16: set mixed_precision to bf16 or fp16")
        return self
