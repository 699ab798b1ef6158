"""Keep freed memory in the process instead of handing it back to the OS.

A KV stream allocates and frees a megabyte-sized buffer per chunk on both ends
(gRPC's message, the parsed payload). glibc serves such sizes with fresh mmaps or
trims the heap top after each free, so every chunk faults its pages in again:
measured on the receiving worker, page faults and zeroing were ~40% of its CPU at
0.6 GB/s. Raising the mmap and trim thresholds makes glibc reuse those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Apply the thresholds (glibc only; elsewhere a no-op). Returns whether applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, 64 << 20)))
    if not ok:
        log.warning("mallopt refused the KV stream's memory thresholds")
    return ok
