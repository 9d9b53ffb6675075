"""Host memory: keep freed blocks in the process instead of handing them back to the OS.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MB) with ``mmap`` and
returns them with ``munmap`` when freed, and trims the top of its heap as it shrinks. A meta-step
allocates and frees the same activations every step, so the OS maps, zeroes and faults in hundreds
of megabytes of fresh pages each time, a large share of a MAML step's time (``docs/performance.md``).
This is the effect jemalloc or tcmalloc (``LD_PRELOAD``) have, set from inside the process so that
``metarun`` gets it without a wrapper. The price is that the process keeps its peak footprint, as it
would with those allocators.
"""

from __future__ import annotations

import ctypes

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap, which is never trimmed
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds; False (and nothing changed) where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, libc's among them: no library search
    except (OSError, TypeError, AttributeError):  # Windows (no process handle), macOS and musl (no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
