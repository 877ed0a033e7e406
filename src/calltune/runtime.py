"""Process-wide CPU runtime settings: denormal flushing and glibc's allocator thresholds.

Owns `flush_denormals` (training and start-up), `keep_freed_memory` (generation), `malloc_trim`
(during training) and `release_freed_memory` (between pipeline stages). Light on purpose: the CLI calls these at start-up,
before the heavy training and inference modules are imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc():
    """glibc (loaded once), or None where glibc is not the C library (`mallopt`, `malloc_trim` missing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def flush_denormals() -> bool:
    """Make this thread, and the threads it starts later, treat denormal floats as zero (FTZ/DAZ).

    As training drives the loss down, softmax probabilities and gradients underflow into the
    denormal range, which x86 CPUs compute far slower than normal floats, so a run slows down as it
    learns (figures in docs/design.md). Values below 1.2e-38 (fp32 and bf16 share that range)
    become 0, far below anything that moves a weight update. `calltune` calls it at start-up,
    before PyTorch starts its worker threads (which copy the setting when they are created);
    `train` calls it again. Returns whether the CPU supports it.
    """
    return torch.set_flush_denormal(True)


KEEP_MMAP_THRESHOLD = 32 << 20  # bytes: glibc's own ceiling for its dynamic mmap threshold on 64-bit
KEEP_TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the heap's top before glibc returns it


def keep_freed_memory() -> bool:
    """Have glibc serve blocks up to 32 MiB from its heap and keep up to 1 GiB of freed memory mapped.

    Generation allocates and frees tensors of changing sizes at every step (scores, the slot cache
    when it is re-laid out); by default glibc maps many of them fresh with ``mmap`` and returns them
    on ``free``, so every new block is paid for again in page faults (figures in docs/design.md).
    The price is resident memory that stays mapped after it is freed, so `calltune eval`,
    `calltune serve` and the pipeline's last evaluation use it, and training does not. Fixing the
    thresholds turns off glibc's dynamic adjustment of them for the rest of the process. Returns
    False where glibc is not the C library (nothing is changed).
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))


def malloc_trim() -> bool:
    """Hand the memory freed inside glibc's heap back to the OS; False where glibc is not the C library."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def release_freed_memory() -> None:
    """Collect garbage and hand the memory PyTorch freed back to the OS (`malloc_trim`).

    `run_recipe` calls it between training and the tuned model's evaluation, so the evaluation does
    not start in a heap left fragmented by a training run. A no-op where glibc is not the C library.
    """
    gc.collect()
    malloc_trim()
