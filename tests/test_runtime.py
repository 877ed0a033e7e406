"""Process-wide runtime settings (`calltune.runtime`), each checked in a fresh interpreter.

What the glibc thresholds save in page faults is measured by benchmarks/glibc_page_faults.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from calltune.runtime import KEEP_MMAP_THRESHOLD, _libc

# Reads glibc's own accounting (mallinfo2) around one malloc/free of argv[1] bytes, after
# keep_freed_memory when argv[2] is "keep": prints whether the block was mmapped, and whether
# freeing it shrank the heap.
SETTINGS = """
import ctypes, sys
from calltune.runtime import _libc, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _libc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[2] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(int(sys.argv[1]))
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(held.hblks - before.hblks, int(after.arena < held.arena))
"""


def _malloc(size: int, mode: str = "keep") -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SETTINGS, str(size), mode], capture_output=True, text=True, check=True)
    mapped, shrank = map(int, out.stdout.split())
    return mapped, shrank


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)")
def test_keep_freed_memory_serves_blocks_up_to_32_mib_from_the_heap_and_keeps_them():
    # By default glibc mmaps a 16 MiB block; with the mmap threshold alone it comes from the heap but
    # freeing it shrinks the heap; with the trim threshold too, the heap keeps it.
    assert _malloc(KEEP_MMAP_THRESHOLD // 2) == (0, 0)
    assert _malloc(2 * KEEP_MMAP_THRESHOLD)[0] == 1  # above the threshold: still mmapped
