"""Which examples a dataset keeps and where they go: call categories, duplicate keys, the no-call
balance and the validation split.

Owns `call_category` / `is_multi_turn` / `count_categories`, `canonical_key` (dedupe),
`max_kept_no_call` (balance) and `split_validation`. Categories:

- ``no_call``: no assistant turn has tool calls;
- ``single_call``: exactly one assistant turn has calls, and it has exactly one;
- ``parallel_call``: some assistant turn has more than one call (BFCL's "parallel");
- ``sequential_call``: several assistant turns have calls, each exactly one (so that the four call
  categories are exclusive and sum to the number of examples);
- ``multi_turn``: more than one user turn or more than one assistant turn (overlaps the others).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from fractions import Fraction

from calltune.errors import CalltuneError
from calltune.schema import Example

CATEGORIES = ("no_call", "single_call", "parallel_call", "sequential_call", "multi_turn")


def call_category(example: Example) -> str:
    """``no_call``, ``single_call``, ``parallel_call`` or ``sequential_call`` (module docstring)."""
    counts = [len(m.tool_calls) for m in example.messages if m.role == "assistant" and m.tool_calls]
    if not counts:
        return "no_call"
    if max(counts) > 1:
        return "parallel_call"
    return "single_call" if len(counts) == 1 else "sequential_call"


def is_multi_turn(example: Example) -> bool:
    """More than one user turn or more than one assistant turn."""
    roles = Counter(m.role for m in example.messages)
    return roles["user"] > 1 or roles["assistant"] > 1


def count_categories(examples: list[Example]) -> dict[str, int]:
    """``{category: n}`` for every name in `CATEGORIES` (zeros included)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for example in examples:
        out[call_category(example)] += 1
        out["multi_turn"] += is_multi_turn(example)
    return out


def canonical_key(example: Example) -> str:
    """Canonical JSON of messages and tools (sorted keys): equal for duplicates, whatever their source/row."""
    return json.dumps({"messages": example.messages_as_dicts(), "tools": example.tools_as_dicts()},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def max_kept_no_call(n_call: int, n_no_call: int, fraction: float) -> int:
    """The largest n <= `n_no_call` with n / (n_call + n) <= `fraction`, i.e. n <= fraction * n_call / (1 - fraction).

    Computed in exact arithmetic on the decimal `fraction` as written (0.1 is 1/10, not the float).
    """
    share = Fraction(str(fraction))
    if share >= 1:
        return n_no_call
    return min(n_no_call, math.floor(share * n_call / (1 - share)))


def split_validation(examples: list[Example], fraction: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random `fraction` of `examples` for validation, as the hosted fine-tuning API
    (Scale LLM Engine) does when given no validation file ("LLM Engine will randomly split 10% of the
    data into a validation dataset").

    The validation size is ``round(n * fraction)`` (halves up), at most ``n - 1`` so training keeps at
    least one example. Both lists keep the input order. The same examples, fraction and seed give
    the same split.

    Raises:
        ValueError: `fraction` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise CalltuneError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_val = min(int(n * fraction + 0.5), max(n - 1, 0))
    val_ids = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in val_ids]
    val = [e for i, e in enumerate(examples) if i in val_ids]
    return train, val
