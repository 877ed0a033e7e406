"""Process-wide runtime settings (`calltune.runtime`), each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from calltune.runtime import _libc

# Blocks of 1-22 MiB allocated, written and freed while a larger one stays alive, as a decode loop's
# scores and caches do; prints the minor page faults this costs.
FAULTS = """
import resource, sys, torch
from calltune.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):
    big = torch.empty((20 + i % 3) << 20, dtype=torch.uint8).fill_(1)
    for n in (1, 3, 6, 2):
        torch.empty(n << 20, dtype=torch.uint8).fill_(1)
    del big
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt is not available")
def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_in_new_ones():
    default = min(_faults("default") for _ in range(2))
    kept = min(_faults("keep") for _ in range(2))
    # Here by default ~32k faults of 4 KiB pages; kept 13k or (in some processes) 19k: the heap serves
    # the later rounds from memory it already holds.
    assert kept < 0.75 * default, (kept, default)
