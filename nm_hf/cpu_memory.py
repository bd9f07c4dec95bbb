"""Keeping freed memory in the process on CPU runs with glibc.

glibc's malloc hands large freed blocks back to the operating system: blocks above its mmap threshold are
unmapped when freed and the top of the heap is trimmed, so the next training step's allocation of the
same size faults its pages in again (kernel time, zeroed pages). A sparse training step allocates more
short-lived tensors than a dense one (each layer's mask and masked weight), which changes where the
step's large tensors land: on the Multi30k recipe the SR-STE process took ~10k minor page faults per
forward against ~0 for dense, and ~5-8% more process CPU per step. With the freed memory kept (no mmap
for large blocks, no trimming) both took no page faults and the gap shrank to about 1% (docs/benchmarks.md,
"Page faults").

The settings are process-wide and keep the memory committed at its peak; the recipes apply them on CPU
runs (`--keep_freed_memory`, on by default). Other allocators (jemalloc, tcmalloc) reuse freed memory
on their own; there this is a no-op apart from the glibc check.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse by this process: large blocks come from the heap
    instead of their own mappings (`M_MMAP_MAX` 0) and the heap is never trimmed (`M_TRIM_THRESHOLD` at
    its maximum). Affects the whole process from now on. Returns True when applied, False (nothing
    changed) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
