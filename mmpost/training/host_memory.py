"""Freed CPU memory kept for the next step's tensors (``train.keep_freed_memory``).

On a CPU, torch takes tensor memory from the C library's ``malloc``. glibc serves every block of 32 MiB or more
with a fresh ``mmap`` and unmaps it when it is freed, and gives the top of its heap back to the system too. A
training step allocates and frees the same large tensors every time (activations, the LM head's chunk of logits,
the embedding's gradient), so every step faults the same memory in again page by page, each page zeroed by the
kernel. On 2 CPU cores that was a fifth of an sft step's time: ``tools/bench.py --ab train.keep_freed_memory=false``
on the LLaVA-shaped peer model with long-tailed lengths gave 539 tokens/s kept against 426 released (1.25x, 3
pairs), 6.25 against 7.83 s per step, peak RSS 3.47 against 3.46 GiB. Telling malloc to serve large
blocks from its heap and never to trim it lets the next step reuse the memory as it is; the process's memory
stays at its peak, which a training step reaches every step anyway.

This is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc preloaded; glibc does it with two
``mallopt`` calls, so nothing has to be installed or preloaded.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("mmpost")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Asks glibc's ``malloc`` to serve large blocks from its heap (no ``mmap``) and never to trim the heap, for
    this process and the data workers it forks later. Returns whether it applied: False off Linux or with
    another C library."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt(M_TRIM_THRESHOLD, -1) disables trimming (mallopt(3)); both return 1 on success
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    if applied:
        log.debug("train.keep_freed_memory: malloc keeps freed memory for the next steps")
    return applied
