"""The `eval:` section of a recipe. Light on purpose (pydantic only), so recipes load without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from calltune.evaluate.tasks import TASKS, unknown_task


class EvalConfig(BaseModel):
    """How to evaluate: what to score, generation settings and how much of the eval split to use."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, description="what to score: viggo, toolcall or bfcl (calltune.evaluate.tasks; "
                                               "default: viggo for the viggo format, bfcl for BFCL examples, "
                                               "else toolcall)")
    engine: Literal["auto", "calltune", "vllm"] = Field(
        "auto", description="what generates: vLLM's offline engine (calltune.infer.vllm_engine; needs vLLM "
                            "installed), calltune's own batched decoder, or auto: vLLM when it is installed and "
                            "decoding is unconstrained, else calltune's")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split across (vllm engine only)")
    batch_size: int = Field(32, ge=1, description="prompts generated together")
    workers: int | None = Field(None, ge=1, description="decoders run in parallel threads, sharing batch_size "
                                                        "(default: calltune.infer.generate's choice)")
    max_new_tokens: int = Field(128, ge=1, description="generation budget per example")
    base: bool = Field(True, description="also evaluate the base model, for the report's comparison")
    constrained: bool = Field(False, description="constrained decoding (calltune.infer.constrained): each call "
                                                 "names an offered tool with schema-valid arguments")

    @model_validator(mode="after")
    def _engine_supports(self) -> "EvalConfig":
        if self.engine == "vllm" and self.constrained:
            raise PydanticCustomError("engine_constrained", "constrained decoding runs on the calltune engine only; "
                                      "drop constrained or use engine calltune")
        return self

    def resolved_engine(self) -> Literal["calltune", "vllm"]:
        """The engine that generates: `engine`, with ``auto`` resolved to ``vllm`` when vLLM is importable and
        `constrained` is off (vLLM's engine generated faster than calltune's decoder in the generation
        benchmark, docs/benchmarks.md), else ``calltune``."""
        if self.engine != "auto":
            return self.engine
        from importlib.util import find_spec

        return "vllm" if not self.constrained and find_spec("vllm") is not None else "calltune"

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in TASKS:
            raise PydanticCustomError("unknown_task", unknown_task(task))
        return task
