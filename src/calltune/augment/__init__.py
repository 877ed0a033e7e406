"""Data augmentation: the stage between cleaning and rendering that makes new tool-calling examples.

Owns `AugmentConfig` (the recipe's ``augment:`` section), `augment` (the rules, in
`calltune.augment.rules`) and `augment_command`, the body of ``calltune data augment``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calltune.augment.config import AugmentConfig
from calltune.augment.rules import RULES, AugmentResult, augment


def augment_command(input: str | Path, output: str | Path, cfg: AugmentConfig, source: str | None = None,
                    rejects_path: str | Path | None = None) -> dict[str, Any]:
    """Body of ``calltune data augment``: read `input`, augment, write originals + new examples as canonical JSONL.

    `source` None reads `input` as canonical JSONL (what ``calltune data clean`` writes); otherwise
    through that dataset adapter. With `rejects_path`, rows the source or a rule rejected are written there.

    Returns:
        The `augment` report plus the paths written.

    Raises:
        ValueError: unknown source name. SourceError: the input is not what the source expects.
    """
    from calltune.sources import Rejects, load_source
    from calltune.sources.canonical_jsonl import read_jsonl, write_jsonl

    rejects = Rejects(Path(rejects_path) if rejects_path else None)
    examples = read_jsonl(input) if source is None else load_source(source, str(input), rejects=rejects)
    result = augment(examples, cfg, rejects)
    report: dict[str, Any] = {**result.report, "output_path": str(write_jsonl(result.examples, output))}
    if rejects_path:
        report["rejects"] = str(rejects.write())
    return report


__all__ = ["RULES", "AugmentConfig", "AugmentResult", "augment", "augment_command"]
