"""The `augment:` section of a recipe: one block per augmentation rule, plus the mix of original examples.

Light on purpose (pydantic only): `calltune validate` and the CLI read it without importing torch.
What each rule does is in `calltune.augment.rules`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calltune.sources.bfcl import NO_CALL_REPLY


def _ordered(rule, low: str, high: str):
    """`rule` if ``rule.<high> >= rule.<low>``; else ValueError naming both."""
    if getattr(rule, high) < getattr(rule, low):
        raise ValueError(f"{high} ({getattr(rule, high)}) is below {low} ({getattr(rule, low)})")
    return rule


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(0, ge=0, description="new examples this rule makes (0: off)")


class IrrelevanceRule(_Rule):
    """A request with the tools it needs removed becomes a no-call example (Hammer, xLAM irrelevance sets)."""

    borrow: float = Field(0.5, ge=0, le=1, description="share of the new examples whose tools are borrowed from an "
                                                       "unrelated example instead of the request's other tools")
    reply: str = Field(NO_CALL_REPLY, description="the assistant's no-call answer")


class ParallelRule(_Rule):
    """2-4 single-call requests joined into one request answered by their calls in parallel."""

    min_calls: int = Field(2, ge=2, description="fewest requests joined")
    max_calls: int = Field(4, ge=2, description="most requests joined")

    @model_validator(mode="after")
    def _order(self) -> "ParallelRule":
        return _ordered(self, "min_calls", "max_calls")


class DistractorRule(_Rule):
    """Tools from other examples added to a tool list, in shuffled order."""

    min_tools: int = Field(1, ge=1, description="fewest tools added")
    max_tools: int = Field(3, ge=1, description="most tools added")

    @model_validator(mode="after")
    def _order(self) -> "DistractorRule":
        return _ordered(self, "min_tools", "max_tools")


BreakKind = Literal["wrong_type", "missing_required", "unknown_argument"]


class SelfCorrectionRule(_Rule):
    """A broken call, the schema check's error as a tool result, then the corrected call (the only one trained)."""

    kinds: list[BreakKind] = Field(["wrong_type", "missing_required", "unknown_argument"],
                                   description="how calls are broken, chosen at random among those that apply")


class AugmentConfig(BaseModel):
    """Which rules run and how many examples each makes; `mix` and `max_tools` shape the original examples.

    Order: `max_tools` trims every example's tool list, `mix` samples the originals kept for training,
    then each rule draws its source examples from all the (trimmed) examples and adds its new ones
    (their tool lists trimmed to `max_tools` too).
    """

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, description="seed of every random choice of this stage")
    max_tools: int | None = Field(None, ge=1, description="keep at most N tools per example: the called ones plus a "
                                                          "seeded choice of the others (long tool lists cost tokens)")
    mix: dict[str, int] = Field(default_factory=dict, description="keep at most N original examples of a group "
                                "(a BFCL category such as live_multiple, else no_call / single_call / parallel_call / "
                                "sequential_call), a seeded choice; groups not named are kept whole")
    irrelevance: IrrelevanceRule = Field(default_factory=IrrelevanceRule)
    parallel: ParallelRule = Field(default_factory=ParallelRule)
    parallel_multiple: ParallelRule = Field(default_factory=ParallelRule)
    distractors: DistractorRule = Field(default_factory=DistractorRule)
    self_correction: SelfCorrectionRule = Field(default_factory=SelfCorrectionRule)
    answer_after_results: _Rule = Field(default_factory=_Rule)
