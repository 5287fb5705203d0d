"""Keep freed host memory for reuse instead of returning it to the operating system.

glibc's ``malloc`` serves large blocks with ``mmap`` and gives them back with ``munmap`` when
freed, and trims the heap's top as soon as more than 128 KiB is free there. A training step
on the CPU frees and allocates tensors of tens of MB many times a second, so each new
tensor starts on fresh pages, and the kernel zeroes and maps every 4 KiB page on first
touch. Measured on the 2-core development VM (``examples/cryoem.py --structure 1ol5 --epochs
8``): 4.4 million page faults, 15 s of system time and 57 s wall with glibc's defaults;
0.96 million, 4 s and 47 s with the settings below.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): larger blocks are
#: still mapped and unmapped.
MMAP_THRESHOLD = 32 << 20


def reuse_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Make glibc keep up to ``trim_threshold`` bytes of freed heap (default 1 GiB) and serve
    blocks of up to 32 MiB from the heap, for this process. Returns False, and changes
    nothing, where the C library is not glibc. A process-wide setting: the command lines
    call it, the library does not."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = 2**31 - 1  # mallopt takes an int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok &= mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold), limit))
    ok &= mallopt(_M_TOP_PAD, min(int(top_pad), limit))
    return bool(ok)


__all__ = ["MMAP_THRESHOLD", "reuse_freed_memory"]
