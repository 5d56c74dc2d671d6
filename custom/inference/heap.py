# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Keep freed memory in the process heap while a slide is inferred, so activations do not page-fault.

PyTorch's CPU allocator has no cache: every activation is a fresh ``malloc`` and every release a ``free``. glibc serves
a block of 32 MiB or more (an 8 x 16 x 256 x 256 float map: DWS-MIL's first block at batch 8) with a fresh ``mmap``
and unmaps it on release (smaller ones return to the OS when the heap top is trimmed), so the kernel faults in and
zeroes every page of every such map again at each layer of each batch. On the 2-core CPU of the benchmarks that was
more than half of the network's time (``bench_infer.py``; bundle/docs/README.md). While :func:`heap_reuse` is active
glibc takes every block from the heap (``M_MMAP_MAX`` 0) and keeps freed memory there (``M_TRIM_THRESHOLD`` 1 GiB),
so the next batch reuses pages already mapped. On leaving, the retained memory is handed back (``malloc_trim``) and
glibc is left where its own dynamic threshold goes after large blocks have been freed (the dynamic adjustment itself
cannot be turned back on once ``mallopt`` is called): blocks under 32 MiB from the heap, more than 64 MiB free at its
top returned to the OS, larger blocks mapped. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["heap_reuse", "glibc"]

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
# what glibc's dynamic threshold reaches after freeing large blocks (DEFAULT_MMAP_THRESHOLD_MAX on 64 bits, trim at
# twice the mmap threshold), and its default count of mapped blocks
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 32 * 1024 * 1024, 64 * 1024 * 1024, 65536
KEEP_BYTES = 1 << 30

_lock = threading.Lock()
_active = 0


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (which has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def heap_reuse(enabled: bool = True) -> Iterator[bool]:
    """While active (nested or from several threads: until the last one leaves), freed memory stays in the heap;
    yields whether it is in effect (False when not ``enabled`` or the C library is not glibc)."""
    global _active
    libc = glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        applied = _active > 0 or bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
        _active += applied
    if not applied:
        logger.info("mallopt refused the heap settings; memory is allocated as usual")
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)
