"""The C allocator's settings for the long-running processes (the server, processors).

glibc serves a large allocation (128 KiB and more by default) with its own ``mmap``, given
back to the system when freed; but each time such a block is freed it raises that threshold
to the block's size (up to 32 MiB), so after the first few large buffers (request bodies,
dataset export chunks, decoded image batches, tensors) every later one is cut from the
per-thread arenas instead. In a process whose many threads allocate and free such buffers in
turn, the arenas fragment and the resident size keeps climbing while the memory in use does
not: under bench/soak.py the server grew about 10 MiB a minute with the bytes in use flat
(glibc's ``mallinfo2``: in use constant, free space inside the arenas growing). Pinning the
threshold keeps large blocks in ``mmap``, returned whole when freed: under the same load the
free space inside the arenas then grew about a third as fast, and the processors' resident
size stayed flat instead of growing 5% in four minutes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["pin_mmap_threshold", "release_free_memory", "start_releasing_free_memory"]

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial value


RELEASE_EVERY_SECONDS = 30.0


def _libc_function(name: str):
    """``name`` from the C library this process runs on, or None off glibc/Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (which turns off its dynamic raise).
    Leaves an explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment alone. True when set;
    False on other platforms and C libraries."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def release_free_memory() -> bool:
    """Return the free pages inside glibc's arenas to the system (``malloc_trim(0)``). True
    when some memory was released; False when none was, or off glibc."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return malloc_trim(0) == 1


def start_releasing_free_memory(every: float = RELEASE_EVERY_SECONDS) -> threading.Event | None:
    """Call :func:`release_free_memory` every ``every`` seconds on a daemon thread for the
    life of the process. Returns the event that stops it (None off glibc)."""
    if _libc_function("malloc_trim") is None:
        return None
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            release_free_memory()

    threading.Thread(target=run, name="dicebox-release-free-memory", daemon=True).start()
    return stop
