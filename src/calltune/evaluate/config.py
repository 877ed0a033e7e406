"""The `eval:` section of a recipe. Light on purpose (pydantic only), so recipes load without torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """How to evaluate: generation settings and how much of the eval split to use."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(32, ge=1, description="prompts generated together")
    workers: int | None = Field(None, ge=1, description="decoders run in parallel threads, sharing batch_size "
                                                        "(default: calltune.infer.generate's choice)")
    max_new_tokens: int = Field(128, ge=1, description="generation budget per example")
    base: bool = Field(True, description="also evaluate the base model, for the report's comparison")
    constrained: bool = Field(False, description="constrained decoding (calltune.infer.constrained): each call "
                                                 "names an offered tool with schema-valid arguments")
