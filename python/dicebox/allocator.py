"""The C allocator's settings for the long-running processes (the server, processors).

glibc serves a large allocation (128 KiB and more by default) with its own ``mmap``, given
back to the system when freed; but each time such a block is freed it raises that threshold
to the block's size (up to 32 MiB), so after the first few large buffers (request bodies,
dataset export chunks, decoded image batches, tensors) every later one is cut from the
per-thread arenas instead. In a process whose many threads allocate and free such buffers in
turn, the arenas fragment and the resident size keeps climbing while the memory in use does
not: under bench/soak.py the server grew about 10 MiB a minute with the bytes in use flat
(glibc's ``mallinfo2``: in use constant, free space inside the arenas growing). Pinning the
threshold keeps large blocks in ``mmap``, returned whole when freed. It is pinned at 32 KiB,
below glibc's initial 128 KiB, because the blocks that pin arena pages longest are a loaded
model's tensors (a dense layer of 16-64 units on a 24 x 24 image is 36-147 KiB), which live
in the classifier's cache for seconds to minutes among short-lived request buffers: with 128
KiB the server still grew about 2 MiB a minute under the soak's model-cache churn, with 32
KiB it stayed flat (an mmap per block of 32 KiB or more costs far less than the work such a
block is allocated for).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["pin_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 10


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (which turns off its dynamic raise).
    Leaves an explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment alone. True when set;
    False on other platforms and C libraries."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
