"""glibc allocator thresholds: minor page faults of a generation-like allocation pattern, with and
without `calltune.runtime.keep_freed_memory`.

Run:

    python benchmarks/glibc_page_faults.py [--repeats 3] [--rounds 30]

Owns the benchmark only: nothing in `calltune` imports it. Each trial is a fresh interpreter (the
thresholds are process-wide and cannot be reset) that allocates, writes and frees blocks of 1-6 MiB
while a 20-22 MiB block stays alive, `--rounds` times, as a decode loop's scores and caches do, and
prints the minor page faults (``ru_minflt``) of that loop. ``default`` leaves glibc's dynamic
thresholds alone; ``keep`` calls `keep_freed_memory` first. Settings alternate for `--repeats`
rounds; the minimum of each is reported (faults only go up with noise). Linux with glibc only.

Prints a markdown table and the ratio keep / default; `--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TRIAL = """
import resource, sys, torch
from calltune.runtime import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("glibc's mallopt is not available")
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(int(sys.argv[2])):
    big = torch.empty((20 + i % 3) << 20, dtype=torch.uint8).fill_(1)
    for n in (1, 3, 6, 2):
        torch.empty(n << 20, dtype=torch.uint8).fill_(1)
    del big
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def trial(mode: str, rounds: int) -> int:
    """Minor page faults of one fresh-interpreter trial in `mode` (``default`` or ``keep``)."""
    out = subprocess.run([sys.executable, "-c", TRIAL, mode, str(rounds)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="trials per setting, alternating")
    parser.add_argument("--rounds", type=int, default=30, help="allocation rounds per trial")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    faults: dict[str, list[int]] = {"default": [], "keep": []}
    for _ in range(args.repeats):
        for mode in faults:
            faults[mode].append(trial(mode, args.rounds))
    best = {mode: min(values) for mode, values in faults.items()}
    result = {"rounds": args.rounds, "faults": faults, "min": best, "keep_over_default": best["keep"] / best["default"]}
    print("| setting | minor page faults (min) | trials |\n| --- | ---: | --- |")
    for mode, values in faults.items():
        print(f"| {mode} | {best[mode]} | {', '.join(map(str, values))} |")
    print(f"\nkeep / default: {result['keep_over_default']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
