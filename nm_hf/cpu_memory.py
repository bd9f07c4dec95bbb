"""Keeping freed memory in the process on CPU runs with glibc.

glibc's malloc hands large freed blocks back to the operating system: blocks above its mmap threshold are
unmapped when freed and the top of the heap is trimmed, so the next training step's allocation of the
same size faults its pages in again (kernel time, zeroed pages). A sparse training step allocates more
short-lived tensors than a dense one (each layer's mask and masked weight), which changes where the
step's large tensors land: on the Multi30k recipe, each model in its own process, the SR-STE process
took thousands of minor page faults per forward where dense took almost none, and more process CPU per
step than the matmuls explain. With the freed memory kept (no mmap for large blocks, no trimming)
neither takes page faults after the first steps (docs/benchmarks.md, "Page faults: keep_freed_memory",
has the counts and the end-to-end pairs, `benchmarks/recipe_steps.py` measures them).

The settings are process-wide and keep the memory committed at its peak; the recipes apply them on CPU
runs (`--keep_freed_memory`, on by default). With another allocator preloaded (jemalloc, tcmalloc:
`malloc` is not glibc's), which reuses freed memory in its own way, nothing is changed and the call
says so (False), so a run's record does not claim a setting that had no effect.
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
    changed) where the C library is not glibc or another allocator's `malloc` is in use."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    process = ctypes.CDLL(None)  # the symbols this process resolves (an LD_PRELOAD library's first)
    if not _malloc_is_glibcs(process):
        return False
    mallopt = getattr(process, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def _malloc_is_glibcs(process: ctypes.CDLL) -> bool:
    """True when the `malloc` `process` calls is glibc's own (not one interposed by LD_PRELOAD)."""
    try:
        glibc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    address = ctypes.cast(process.malloc, ctypes.c_void_p).value
    return address == ctypes.cast(glibc.malloc, ctypes.c_void_p).value
