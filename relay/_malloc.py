"""Big buffers go back to the operating system when freed.

glibc serves an allocation above its mmap threshold (128 KiB at first) with its own
mapping, returned on free. But it raises the threshold to the size of each such block
freed, up to 32 MiB, so after the first 1 MB message every later one is carved from the
heap, which seldom shrinks: a process that once held many big messages at the same time
keeps that memory. A fixed threshold keeps big buffers in their own mappings.
"""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_M_ARENA_MAX = -8
BIG_BUFFER = 256 * 1024


def return_big_buffers() -> None:
    """Fix glibc's mmap threshold at BIG_BUFFER; nothing elsewhere (not glibc, not Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, BIG_BUFFER)


def limit_arenas(count: int) -> None:
    """At most `count` glibc malloc arenas. Each thread that allocates may otherwise get an
    arena of its own, and each reserves 64 MiB of address space: under an address-space
    limit (RLIMIT_AS), reservations rather than use would exhaust it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, count)
