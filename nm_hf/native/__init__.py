"""Optional native CPU kernels for the training hot path: the N:M mask, `W * mask` and SR-STE's decay term.

The torch expressions these replace take several passes over the weights each (a comparison, an add
and a temporary per pair of mates; a bool-to-int conversion before the bit AND); `nm_kernels.c` does
each in one pass. It is plain C with no torch headers, built on first use with the system compiler
(`$CC`, else `cc`/`gcc`/`clang`; about a second) into the user cache (`$NM_HF_CACHE_DIR`, else
`$XDG_CACHE_HOME/nm_hf`, else `~/.cache/nm_hf`) and loaded with `ctypes`, which releases the GIL so
`nm_hf.masks` can run chunks on its thread pool. Where there is no compiler, the build fails, or
`NM_HF_NATIVE=0` is set, nothing changes: the torch path runs, with bit-identical results
(`tests/test_native.py` compares the two on the same inputs). `status()` says which path is in use.

Where the compiler takes `-fopenmp`, the kernels split large tensors over torch's own OpenMP threads
(torch's Linux CPU build has loaded libgomp, so no second thread pool competes with torch's; where another
runtime got loaded beside it, or in a forked child, they run on one thread);
`NM_HF_NATIVE_OPENMP=0` builds them without, and `nm_hf.masks` splits over its Python pool instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._files import atomic_write

__all__ = ["kernels", "status", "disabled", "splits_itself", "set_parallel_min", "SOURCE"]

logger = logging.getLogger(__name__)

#: the C source of the kernels (shipped with the package)
SOURCE = Path(__file__).with_name("nm_kernels.c")
# Tried in order: -fopenmp lets the kernels split over torch's OpenMP threads; the later sets are for compilers
# or targets without OpenMP or -march=native.
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"])
_COMMON_FLAGS = ["-fPIC", "-shared", "-std=c11"]

#: prefix of a build problem that may not recur (never remembered as a refusal)
_TRANSIENT = "transient: "

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, str] | None = None
_disabled = [0]  # depth of `disabled()` blocks
_openmp = [False]  # whether the loaded kernels split themselves over OpenMP threads
_forked = [False]  # whether this process is a fork() child of one that imported nm_hf
_parallel_min = [1 << 16]  # the requested split threshold (`set_parallel_min`)
_SERIAL = 1 << 62  # a threshold no tensor reaches
_OPENMP_RUNTIME = re.compile(r"/lib(gomp|omp|iomp5)[^/]*\.so[^/]*$")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "nm_mask_i16": [_ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int16, _ptr],
    "nm_mask_i32": [_ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int32, _ptr],
    "nm_mask_i64": [_ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int64, _ptr],
    "nm_mask_2of4_i32": [_ptr, _ptr, _i64, _ptr],
    "apply_mask_u16": [_ptr, _ptr, _ptr, _i64, _i64],
    "apply_mask_u32": [_ptr, _ptr, _ptr, _i64, _i64],
    "apply_mask_u64": [_ptr, _ptr, _ptr, _i64, _i64],
    "apply_mask_inplace_u16": [_ptr, _ptr, _i64],
    "apply_mask_inplace_u32": [_ptr, _ptr, _i64],
    "apply_mask_inplace_u64": [_ptr, _ptr, _i64],
    "add_pruned_f32": [_ptr, _ptr, _ptr, _i64, ctypes.c_float],
    "add_pruned_f64": [_ptr, _ptr, _ptr, _i64, ctypes.c_double],
    "masked_and_add_pruned_f32": [_ptr, _ptr, _ptr, _ptr, _i64, ctypes.c_float],
    "masked_and_add_pruned_f64": [_ptr, _ptr, _ptr, _ptr, _i64, ctypes.c_double],
    "add_pruned_t_f32": [_ptr, _ptr, _ptr, _i64, _i64, _i64, ctypes.c_float],
    "add_pruned_t_f64": [_ptr, _ptr, _ptr, _i64, _i64, _i64, ctypes.c_double],
    "pruned_nonzero_u16": [_ptr, _ptr, _i64, ctypes.c_uint16],
    "pruned_nonzero_u32": [_ptr, _ptr, _i64, ctypes.c_uint32],
    "pruned_nonzero_u64": [_ptr, _ptr, _i64, ctypes.c_uint64],
    "count_changed_u8": [_ptr, _ptr, _i64],
    "nm_openmp": [],
}
#: functions that return a value (the others return nothing)
_RESULT_TYPES = {"count_changed_u8": _i64, "pruned_nonzero_u16": _i64, "pruned_nonzero_u32": _i64, "pruned_nonzero_u64": _i64,
                 "nm_openmp": ctypes.c_int}


def _cache_dir() -> Path:
    explicit = os.environ.get("NM_HF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nm_hf"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile SOURCE into `target`; None on success, else the compiler's complaint."""
    result = subprocess.run([compiler, *flags, *_COMMON_FLAGS, "-o", str(target), str(SOURCE), "-lm"],
                            capture_output=True, text=True, timeout=120)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["failed"])[-1]


def _built_file(compiler: str, flags: list[str], cached: Path, scratch: Path) -> tuple[Path, str]:
    """(the library file, "") after compiling it into the cache, or (_, the compiler's complaint).

    A read-only cache leaves the build in `scratch`, which the caller loads before removing it.
    """
    built = scratch / "nm_kernels.so"
    try:
        problem = _compile(compiler, flags, built) or ""
    except (OSError, subprocess.SubprocessError) as err:  # a timeout or a failed start: may not recur
        return built, f"{_TRANSIENT}{err}"
    if problem:
        return built, problem
    content = built.read_bytes()
    try:
        atomic_write(cached, lambda handle: handle.write(content), fsync=False)
    except OSError:
        return built, ""
    return cached, ""


def _file_identity(program: str) -> str:
    """Size and modification time of the program's file: a compiler upgraded in place changes the cache key."""
    try:
        info = Path(shutil.which(program) or program).resolve().stat()
    except OSError:
        return ""
    return f"{info.st_size}:{info.st_mtime_ns}"


def _remember_failures(failed: list[tuple[Path, str]]) -> None:
    """Mark flag sets that failed before one built (a compiler without OpenMP, say), so that later processes
    do not try them again: each try is a compiler run at import. A compiler that built nothing is not marked
    (it may be fixed); deleting the cache directory makes every set be tried again."""
    for marker, problem in failed:
        try:
            atomic_write(marker, lambda handle, text=problem: handle.write(text.encode()), fsync=False)
        except OSError:  # a read-only cache: the next process tries again
            return


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NM_HF_NATIVE", "1").strip() == "0":
        return None, "disabled (NM_HF_NATIVE=0)"
    compiler = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if not compiler:
        return None, "unavailable: no C compiler found (set CC)"
    source = SOURCE.read_bytes()
    problem = "no flags tried"
    openmp = os.environ.get("NM_HF_NATIVE_OPENMP", "1").strip() != "0"
    failed: list[tuple[Path, str]] = []  # (marker, complaint) of the flag sets the compiler refused
    skipped: list[str] = []  # flag sets not tried: refused in an earlier process
    compiler_identity = [compiler, _file_identity(compiler)]  # computed once: the same for every flag set
    target = [platform.machine(), _cpu_flags()]
    for flags in _FLAG_SETS:
        if "-fopenmp" in flags and not openmp:
            continue
        fingerprint = "\0".join([*compiler_identity, *flags, *target]).encode()
        key = hashlib.sha256(source + b"\0" + fingerprint).hexdigest()[:16]
        cached = _cache_dir() / f"nm_kernels-{key}.so"
        marker = cached.with_suffix(".failed")
        if not cached.is_file() and marker.is_file():  # refused before, while later flags built
            skipped.append(" ".join(flags))
            problem = f"refused before ({marker})"
            continue
        with tempfile.TemporaryDirectory(prefix="nm_hf_native_") as scratch:
            path, problem = (cached, "") if cached.is_file() else _built_file(compiler, flags, cached, Path(scratch))
            if problem:
                if not problem.startswith(_TRANSIENT):
                    failed.append((marker, problem))
                continue
            try:
                library = ctypes.CDLL(str(path))  # stays mapped after a scratch file goes
            except OSError as err:
                problem = str(err)
                continue
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, _RESULT_TYPES.get(name)
        _openmp[0] = bool(library.nm_openmp())
        note = ""
        if _openmp[0] and not _one_openmp_runtime():
            _openmp[0], note = False, "; OpenMP splits off: not the one OpenMP runtime torch uses"
        _apply_parallel_min(library)
        _remember_failures(failed)
        if skipped:
            note += f"; not tried again, refused before: {', '.join(skipped)} (markers in {_cache_dir()})"
        return library, f"native kernels ({compiler} {' '.join(flags)}, {path}{note})"
    return None, f"unavailable: the C compiler failed ({problem})"


def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch path). Built and loaded once per process."""
    global _loaded
    if _disabled[0]:
        return None
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
                logger.info("nm_hf: %s", _loaded[1])
    return _loaded[0]


def splits_itself() -> bool:
    """True when the loaded kernels split large tensors over torch's OpenMP threads themselves.

    Then `nm_hf.masks` calls them in one piece; otherwise it splits large tensors over its own thread pool.
    """
    library = kernels()
    return library is not None and _openmp[0]


def set_parallel_min(elements: int) -> int:
    """Elements a kernel must cover before it splits over OpenMP threads; returns the previous setting.

    For measurements (`benchmarks/train_step.py --native_parallel_min`). It has no effect where the kernels
    do not split themselves (`splits_itself()` is False) or in a forked child, which stays on one thread.
    """
    if isinstance(elements, bool) or not isinstance(elements, int) or not 1 <= elements < 1 << 63:
        raise ValueError(f"set_parallel_min: elements must be an integer in [1, 2**63), got {elements!r}")
    previous, _parallel_min[0] = _parallel_min[0], elements
    library = kernels()
    if library is not None:
        _apply_parallel_min(library)
    return previous


def _one_openmp_runtime() -> bool:
    """True when exactly one OpenMP runtime is mapped into this process (Linux only: elsewhere, False).

    The kernels' parallel regions then run on torch's own threads, sized by `torch.set_num_threads`. A
    second runtime (clang's libomp beside torch's libgomp) would keep its own spinning pool beside torch's.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            runtimes = {line.split()[-1] for line in maps if _OPENMP_RUNTIME.search(line.rstrip())}
    except OSError:
        return False
    return len(runtimes) == 1


def _apply_parallel_min(library: ctypes.CDLL) -> None:
    serial = _forked[0] or not _openmp[0]
    ctypes.c_int64.in_dll(library, "nm_parallel_min").value = _SERIAL if serial else _parallel_min[0]


def _serial_after_fork() -> None:
    # GNU libgomp's threads do not survive fork(), and a forked child's first parallel region waits for them
    # forever (torch's own ops too: its DataLoader workers run one thread): the child's kernels run serially,
    # whether they were loaded before the fork or are loaded in the child.
    _forked[0] = True
    if _loaded is not None and _loaded[0] is not None:
        _apply_parallel_min(_loaded[0])


os.register_at_fork(after_in_child=_serial_after_fork)


def status() -> str:
    """Which implementation the hot path uses, and why (for benchmarks and bug reports)."""
    if _disabled[0]:
        return "torch expressions (inside nm_hf.native.disabled())"
    kernels()
    return _loaded[1]


@contextmanager
def disabled() -> Iterator[None]:
    """Use the torch expressions inside the block (process-wide): to compare the two paths."""
    with _lock:
        _disabled[0] += 1
    try:
        yield
    finally:
        with _lock:
            _disabled[0] -= 1
