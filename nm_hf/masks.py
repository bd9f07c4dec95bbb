"""N:M masks: which n of every m consecutive weights survive.

`nm_mask` is on the hot path of every SR-STE training step (the mask is recomputed from the dense
weights after each optimizer update), so it avoids `topk`/`argsort`. Each element's rank inside its
group is counted from the m*(m-1)/2 pairwise comparisons of integer magnitude keys, in cache-sized
chunks that run on a small thread pool on CPU. On CPU, `nm_mask`, `apply_mask` and `add_pruned_`
use the one-pass C kernels of `nm_hf.native` when they could be built (same results, bit for bit),
else these torch expressions. `benchmarks/mask_speed.py` measures both.

`nm_mask_transposable` (Hu et al., ICML 2024) makes every m x m block N:M along its rows and its
columns, so the transposed weight used in the backward pass is N:M too. It enumerates the valid
block patterns once and scores every block against all of them with one matrix product.

Ordering rules (also what the tests pin down):
- magnitude |w| decides; among equal magnitudes the lower index wins (so -0.0 and 0.0 tie);
- NaN ranks above every number, +-inf above every finite number: a NaN weight is kept, so it shows
  up in the output instead of being silently hidden by the mask.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .native import kernels, splits_itself

__all__ = ["apply_mask", "apply_mask_", "add_pruned_", "count_changed", "masked_and_add_pruned_", "pruned_nonzero", "nm_mask", "nm_mask_and_apply", "nm_mask_transposable", "transposable_patterns", "check_transposable", "check_nm",
           "nm_group_counts", "magnitude_key", "TRANSPOSABLE_PATTERNS"]

# Pairwise counting costs m*(m-1)/2 comparisons per group: fine up to m=16, topk is cheaper beyond.
_MAX_PAIRWISE_M = 16
# Elements per chunk: about 2 MiB of int32 keys, so a chunk's temporaries stay in L2/L3.
_CHUNK_ELEMENTS = 1 << 19
# Native kernels built without OpenMP make one pass without temporaries: split only tensors big enough to pay
# for the Python pool's dispatch, in one piece per worker. Below 2M elements a split does not pay inside a step:
# the weights come from memory there and the pass is bandwidth-bound (docs/benchmarks.md, "Performance
# issue measurements"; `train_step.py --profile` times the kernels inside real steps).
_NATIVE_SPLIT_ELEMENTS = 1 << 21
#: exact types the native kernels take (subclasses such as DTensor or FakeTensor go the torch way)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reset_pool_after_fork() -> None:
    global _pool
    _pool = None  # threads do not survive fork(); a child builds its own pool on first use


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="nm_mask")
        return _pool


def _workers() -> int:
    return max(1, min(4, torch.get_num_threads()))


def _native_ready(*tensors: torch.Tensor) -> bool:
    """True when the native kernels are loaded and can take these tensors as flat buffers (not while
    torch.compile traces: it gets the torch expressions, which give the same bits)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # a plain loop: this runs several times per layer and step
        if type(t) not in _PLAIN_TYPES or not t.is_cpu or not t.is_contiguous() or not t.numel():
            return False
    return kernels() is not None


def _splitting_kernel(name: str):
    """The native kernel `name`, for a call that splits itself over OpenMP threads: `torch.get_num_threads()`
    (through `_workers`) first gives a new thread torch's OpenMP thread count."""
    _workers()
    return getattr(kernels(), name)


def _native_split(total: int, call, unit: int = 1) -> None:
    """Run `call(start, count)` over [0, total) units of `unit` elements: in one piece, or one per worker.

    Kernels built with OpenMP split themselves over torch's own threads, so they get one piece.
    """
    workers = _workers()
    if workers == 1 or total * unit < _NATIVE_SPLIT_ELEMENTS or splits_itself():
        call(0, total)
        return
    per = -(-total // workers)
    # the first piece on this thread (it would only wait otherwise), the others on the pool
    futures = [_thread_pool().submit(call, start, min(per, total - start)) for start in range(per, total, per)]
    call(0, min(per, total))
    for future in futures:
        future.result()


_KEY_DTYPES = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def magnitude_key(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer view of `weight` and the bit mask that clears the sign.

    For IEEE floats with the sign bit cleared, integer order equals magnitude order, with inf above
    every finite value and NaN above inf. Comparing these integers is exact (no rounding) and well
    defined for NaN, which float comparisons are not.
    """
    if not weight.dtype.is_floating_point:
        raise TypeError(f"nm_mask needs a floating-point tensor, got {weight.dtype}")
    if weight.dtype not in _KEY_DTYPES:  # float8 and friends: float32 keeps their order exactly
        weight = weight.float()
    int_dtype, sign_clear = _KEY_DTYPES[weight.dtype]
    return weight.contiguous().view(int_dtype), sign_clear


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def apply_mask(weight: torch.Tensor, mask: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """`weight` where `mask` (keep=True) or where not `mask` (keep=False), exact +0.0 elsewhere.

    Done on the bits (AND with all-ones/all-zeros words): on CPU this runs at a few elementwise passes,
    where `torch.where`/`masked_fill` with a bool mask cost 10-16. A pruned inf becomes 0, not NaN.
    """
    int_dtype = _INT_VIEW.get(weight.dtype)
    if weight.ndim == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        return apply_mask(weight.t(), mask.t(), keep).t()  # Conv1D weights arrive transposed
    if int_dtype is None or not weight.is_contiguous() or not mask.is_contiguous():
        return torch.where(mask, weight, 0) if keep else torch.where(mask, 0, weight)
    if mask.dtype == torch.bool and mask.shape == weight.shape and _native_ready(weight, mask):
        out = torch.empty(weight.shape, dtype=weight.dtype)
        function = getattr(kernels(), f"apply_mask_u{weight.element_size() * 8}")
        size = weight.element_size()
        w, bits, o = weight.data_ptr(), mask.data_ptr(), out.data_ptr()
        _native_split(weight.numel(), lambda s, c: function(w + s * size, bits + s, o + s * size, c, int(keep)))
        return out
    bits = mask.to(int_dtype)
    bits = bits.neg_() if keep else bits.sub_(1)  # -1 (all ones) where the value stays
    return weight.view(int_dtype).bitwise_and(bits).view(weight.dtype)


def apply_mask_(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`apply_mask(tensor, mask)` written into `tensor` (bit for bit: +0.0 where not `mask`); returns it."""
    if (tensor.dtype in _INT_VIEW and mask.dtype == torch.bool and mask.shape == tensor.shape
            and _native_ready(tensor, mask)):
        function = getattr(kernels(), f"apply_mask_inplace_u{tensor.element_size() * 8}")
        size, t, bits = tensor.element_size(), tensor.data_ptr(), mask.data_ptr()
        _native_split(tensor.numel(), lambda s, c: function(t + s * size, bits + s, c))
        return tensor
    return tensor.masked_fill_(~mask, 0)


def _decay_kernel_fits(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> bool:
    """Dtypes and shapes the native decay-term kernels take (f32/f64, one dtype, a bool mask, one shape)."""
    return (grad.dtype in (torch.float32, torch.float64) and weight.dtype == grad.dtype and mask.dtype == torch.bool
            and grad.shape == weight.shape == mask.shape)


def add_pruned_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """`grad += alpha * (weight - weight * mask)` in place (SR-STE's decay on the pruned weights); returns `grad`.

    Computed as `grad.add_(weight - apply_mask(weight, mask), alpha=alpha)` (a kept inf or NaN weight
    gives NaN, as that expression does), in one pass where the native kernels apply.
    """
    fits = _decay_kernel_fits(grad, weight, mask)
    size, suffix = grad.element_size(), "f32" if grad.dtype == torch.float32 else "f64"
    if fits and _native_ready(grad, weight, mask):
        function = getattr(kernels(), f"add_pruned_{suffix}")
        g, w, bits = grad.data_ptr(), weight.data_ptr(), mask.data_ptr()
        _native_split(grad.numel(), lambda s, c: function(g + s * size, w + s * size, bits + s, c, alpha))
        return grad
    if fits and grad.ndim == 2 and _native_ready(grad, weight.t(), mask.t()):  # stored transposed (GPT-2 Conv1D)
        function = getattr(kernels(), f"add_pruned_t_{suffix}")
        rows, cols = grad.shape
        g, w, bits = grad.data_ptr(), weight.data_ptr(), mask.data_ptr()
        # split over blocks of grad rows: they are columns of the stored weight and mask
        _native_split(rows, lambda s, c: function(g + s * cols * size, w + s * size, bits + s, c, cols, rows, alpha),
                      unit=cols)
        return grad
    if torch.compiler.is_compiling():
        # traced: inductor's addmm fusion (torch 2.13, fx_passes/post_grad.py) turns `add(mm, term, alpha=a)`
        # into `addmm(term, ...)` and drops the alpha, so the term is scaled before the add (may differ from
        # eager by an ulp)
        return grad.add_((weight - apply_mask(weight, mask)).mul(alpha))
    return grad.add_(weight - apply_mask(weight, mask), alpha=alpha)


def masked_and_add_pruned_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, alpha: float
                           ) -> torch.Tensor:
    """`add_pruned_(grad, weight, mask, alpha)` and returns `apply_mask(weight, mask)`, bit for bit.

    One read of the weight and mask with the native kernels (SR-STE's backward needs both).
    """
    if _decay_kernel_fits(grad, weight, mask) and _native_ready(grad, weight, mask):
        size, suffix = grad.element_size(), "f32" if grad.dtype == torch.float32 else "f64"
        function = getattr(kernels(), f"masked_and_add_pruned_{suffix}")
        masked = torch.empty(weight.shape, dtype=weight.dtype)
        w, bits, out, g = weight.data_ptr(), mask.data_ptr(), masked.data_ptr(), grad.data_ptr()
        _native_split(grad.numel(), lambda s, c: function(w + s * size, bits + s, out + s * size, g + s * size, c,
                                                          alpha))
        return masked
    add_pruned_(grad, weight, mask, alpha)
    return apply_mask(weight, mask)


def pruned_nonzero(weight: torch.Tensor, mask: torch.Tensor, *, signed_zeros: bool = False) -> bool:
    """True when any entry of `weight` outside `mask` is non-zero (NaN counts as non-zero; -0.0 as zero,
    unless `signed_zeros`: then False means `weight` equals `apply_mask(weight, mask)` bit for bit).

    One read of both on CPU with the native kernels (a fixed mask checks this instead of re-ranking).
    """
    if weight.ndim == 2 and not weight.is_contiguous() and weight.t().is_contiguous() and mask.t().is_contiguous():
        return pruned_nonzero(weight.t(), mask.t(), signed_zeros=signed_zeros)  # Conv1D weights arrive transposed
    key = _KEY_DTYPES.get(weight.dtype)
    if (key is not None and mask.dtype == torch.bool and mask.shape == weight.shape
            and _native_ready(weight, mask)):
        bits = weight.element_size() * 8
        function = _splitting_kernel(f"pruned_nonzero_u{bits}")
        tested = (1 << bits) - 1 if signed_zeros else key[1]  # every bit, or all but the sign bit
        return bool(function(weight.data_ptr(), mask.data_ptr(), weight.numel(), tested))
    pruned = apply_mask(weight, mask, keep=False)
    if signed_zeros and pruned.is_floating_point():  # on the bits: only +0.0 is all zeros (no signbit for float8)
        return bool(pruned.view(_SAME_SIZE_INT[pruned.element_size()]).ne(0).any())
    return bool(pruned.ne(0).any())


def count_changed(mask: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """How many entries of two same-shaped boolean masks differ, as a 0-dim int64 tensor on their device.

    One read of both on CPU with the native kernels (the tracker's flip count); elsewhere
    `count_nonzero(mask ^ previous)`, which stays on the device (no synchronisation).
    """
    counted = count_changed_native(mask, previous)
    return torch.count_nonzero(mask ^ previous) if counted is None else torch.tensor(counted)


def count_changed_native(mask: torch.Tensor, previous: torch.Tensor) -> int | None:
    """`count_changed` as a Python int where the native kernel takes the two masks (CPU), else None (the
    caller counts on the device); the same checks. For callers that add the count to a tensor anyway."""
    if mask.dtype != torch.bool or previous.dtype != torch.bool or mask.shape != previous.shape:
        raise ValueError(f"count_changed: needs two boolean masks of one shape, got {mask.dtype} "
                         f"{tuple(mask.shape)} and {previous.dtype} {tuple(previous.shape)}")
    if _native_ready(mask, previous):
        return _splitting_kernel("count_changed_u8")(mask.data_ptr(), previous.data_ptr(), mask.numel())
    return None


def _check_nm(n: int, m: int) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise TypeError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if m < 1 or n < 1 or n > m:
        raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")


def _rank_chunk(raw: torch.Tensor, out: torch.Tensor, sign_clear: int, n: int, m: int) -> None:
    """Fill `out` ([r, m, inner] bool) for the keys in `raw` ([r, m, inner])."""
    key = raw & sign_clear
    cols = [key[:, i] for i in range(m)]
    # wins[i]: how many later mates i beats (ties go to the lower index);
    # lost_early[i]: how many earlier mates beat i.
    wins = [None] * m
    lost_early = [None] * m
    for i in range(m):
        for j in range(i + 1, m):
            i_beats_j = torch.ge(cols[i], cols[j]).view(torch.uint8)
            wins[i] = i_beats_j if wins[i] is None else wins[i] + i_beats_j
            lost_early[j] = i_beats_j if lost_early[j] is None else lost_early[j] + i_beats_j
    # Beaten by = lost_early[i] + (later mates - wins[i]); kept iff beaten by fewer than n:
    #   lost_early[i] + (m - 1 - i) < n + wins[i]
    for i in range(m):
        lhs = lost_early[i] if lost_early[i] is not None else None
        rhs_const = n - (m - 1 - i)
        if lhs is None and wins[i] is None:  # m == 1 cannot happen here (n < m)
            out[:, i].fill_(rhs_const > 0)
        elif lhs is None:  # i == 0: kept iff wins >= (m - 1) - n + 1
            torch.ge(wins[i], (m - n), out=out[:, i])
        elif wins[i] is None:  # i == m-1: kept iff beaten by earlier mates fewer than n
            torch.lt(lhs, n, out=out[:, i])
        elif rhs_const == 0:
            torch.lt(lhs, wins[i], out=out[:, i])
        elif rhs_const > 0:
            torch.lt(lhs, wins[i] + rhs_const, out=out[:, i])
        else:
            torch.lt(lhs - rhs_const, wins[i], out=out[:, i])


def _rank_chunk_in_mode(inference: bool, *args) -> None:
    with torch.inference_mode(inference), torch.no_grad():
        _rank_chunk(*args)


_NATIVE_KEYS = {torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


def _native_mask(raw: torch.Tensor, out: torch.Tensor, sign_clear: int, n: int, m: int, rows: int,
                 inner: int, masked: torch.Tensor | None = None) -> None:
    """`_rank_chunk` over all rows with the native kernel (2:4 on contiguous groups has its own); with
    `masked` (contiguous, like `raw`) it also writes the masked keys there in the same pass."""
    library, size, group = kernels(), raw.element_size(), m * inner
    keys, bits = raw.data_ptr(), out.data_ptr()
    dest = None if masked is None else masked.data_ptr()

    def at(s: int) -> int | None:  # the masked buffer from element s on
        return None if dest is None else dest + s * size

    if (n, m, inner) == (2, 4, 1) and raw.dtype == torch.int32:
        function = library.nm_mask_2of4_i32
        _native_split(rows, lambda s, c: function(keys + s * 4 * size, bits + s * 4, c, at(s * 4)), unit=4)
        return
    function = getattr(library, f"nm_mask_{_NATIVE_KEYS[raw.dtype]}")
    _native_split(rows, lambda s, c: function(keys + s * group * size, bits + s * group, c, m, inner, n, sign_clear,
                                              at(s * group)), unit=group)


def _topk_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Reference/fallback path for large m: same ordering rules, through a stable sort of the keys."""
    raw, sign_clear = magnitude_key(weight.movedim(dim, -1))
    key = (raw & sign_clear).to(torch.int64).reshape(-1, m)
    # stable descending sort: equal keys keep index order, so the lower index wins ties
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros(key.shape, dtype=torch.bool, device=key.device).scatter_(1, order, True)
    return mask.reshape(raw.shape).movedim(-1, dim)


# Masks are chosen outside compiled graphs (torch.compile breaks the graph here): integer bit views and the
# native kernels' raw pointers have no symbolic form, and a mask is computed once per weight update anyway.
@torch.compiler.disable
def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask keeping the `n` largest-magnitude entries of every `m` consecutive ones along `dim`.

    Groups are formed along `dim` (the input dimension of a layer is what sparse tensor cores
    need: dim 1 of an `nn.Linear` weight, dim 0 of a GPT-2 `Conv1D` weight). Ties go to the lower
    index; NaN ranks above inf (see the module docstring). Works for any float dtype and device.
    """
    return _choose_mask(weight, n, m, dim, with_masked=False)[0]


@torch.compiler.disable
def nm_mask_and_apply(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """`(nm_mask(weight, n, m, dim), apply_mask(weight, that mask))`, bit for bit.

    Where the native kernels apply, both come from one read of the weight (a training forward that
    re-chooses its mask needs both; the weights then come from memory, not cache).
    """
    mask, masked = _choose_mask(weight, n, m, dim, with_masked=True)
    return mask, (apply_mask(weight, mask) if masked is None else masked)


def _choose_mask(weight: torch.Tensor, n: int, m: int, dim: int, with_masked: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask, and with `with_masked` the masked weight where the native kernel made it (else None)."""
    _check_nm(n, m)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim == 0:
        raise ValueError("nm_mask needs a tensor with at least one dimension")
    d = dim % weight.ndim if -weight.ndim <= dim < weight.ndim else None
    if d is None:
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(weight.shape)}")
    size = weight.shape[d]
    if size % m:
        raise ValueError(
            f"size {size} along dim {dim} (shape {tuple(weight.shape)}) is not divisible by m={m}"
        )
    if n == m:
        if not weight.dtype.is_floating_point:
            raise TypeError(f"nm_mask needs a floating-point tensor, got {weight.dtype}")
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device), None
    if m > _MAX_PAIRWISE_M:
        return _topk_mask(weight, n, m, d), None

    raw, sign_clear = magnitude_key(weight)
    outer = math.prod(weight.shape[:d])
    inner = math.prod(weight.shape[d + 1:])
    rows = outer * (size // m)
    if rows and inner and raw.dtype in _NATIVE_KEYS and _native_ready(raw):
        # the kernels see flat buffers: mask and masked weight are made in the weight's shape and dtype (no views
        # to build per call; this runs in every training forward of every layer)
        out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        # float8 and friends are ranked on float32 keys: their masked weight cannot come from those keys
        keys_are_weights = raw.element_size() == weight.element_size()
        masked = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                  if with_masked and keys_are_weights else None)
        _native_mask(raw, out, sign_clear, n, m, rows, inner, masked)
        return out, masked
    raw = raw.reshape(rows, m, inner)
    out = torch.empty(raw.shape, dtype=torch.bool, device=weight.device)
    if rows == 0 or inner == 0:
        return out.reshape(weight.shape), None

    chunk_rows = max(1, _CHUNK_ELEMENTS // (m * inner))
    if weight.device.type != "cpu" or rows <= chunk_rows:
        _rank_chunk(raw, out, sign_clear, n, m)
    else:
        # grad/inference mode is thread-local: run the workers in the caller's mode
        inference = torch.is_inference_mode_enabled()
        starts = range(0, rows, chunk_rows)
        futures = [
            _thread_pool().submit(
                _rank_chunk_in_mode, inference, raw[s:s + chunk_rows], out[s:s + chunk_rows], sign_clear, n, m
            )
            for s in starts
        ]
        for f in futures:
            f.result()
    return out.reshape(weight.shape), None


# --------------------------------------------------------------------------- transposable masks

#: n:m patterns `nm_mask_transposable` supports besides n == m (2:4 has 90 block patterns; 2:8 has ~10**11)
TRANSPOSABLE_PATTERNS = ((1, 2), (1, 4), (2, 4), (3, 4))
# Block scores per chunk: on CPU about 2**18 (1 MiB of float32) stay in cache between the product and
# the max; on accelerators chunks only bound the memory of the scores (64 MiB).
_SCORES_PER_CHUNK = 1 << 18
_SCORES_PER_CHUNK_DEVICE = 1 << 24
# Chunks holding NaN/inf are scored again in float64 with (finite cap, inf, NaN) magnitudes such that
# one NaN outweighs 16 infs and one inf 16 finite values, no sum overflows, and the steps stay within
# the 46 bits the packed scores resolve (so a NaN does not hide the infs next to it).
_NONFINITE_SCALE = {torch.float32: (2.0 ** 128, 2.0 ** 136, 2.0 ** 144),
                    torch.float64: (2.0 ** 1000, 2.0 ** 1008, 2.0 ** 1016)}
#: an integer as wide as m bools: a block row of the chosen pattern is copied as one word
_WORD = {2: torch.int16, 4: torch.int32}
#: bit patterns of +inf: integer-viewed scores at or above it are inf or NaN
_INF_BITS = {torch.int32: 0x7F800000, torch.int64: 0x7FF0000000000000}


def check_transposable(n: int, m: int) -> None:
    """ValueError unless `nm_mask_transposable` supports n:m (1:2, 1:4, 2:4, 3:4, or n == m)."""
    _check_nm(n, m)
    if n != m and (n, m) not in TRANSPOSABLE_PATTERNS:
        supported = ", ".join(f"{a}:{b}" for a, b in TRANSPOSABLE_PATTERNS)
        raise ValueError(f"transposable masks support {supported} (and n == m); got {n}:{m}: its {m}x{m} block "
                         "patterns cannot be enumerated cheaply")


@functools.cache
def transposable_patterns(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 pattern with exactly n ones per row and per column, flattened row-major: bool [P, m*m].

    Ordered by the rows' choices (row 0's column set first, each in `itertools.combinations` order);
    2:4 has 90. These are the patterns Hu et al. (ICML 2024) search, and N:M hardware formats store
    exactly n per group. Patterns with fewer than n in some row or column are not considered: a few
    of them cannot be completed to one of these (for 2:4, rows {0,1}, {0,2}, {1,2} leave row 3 only
    column 3) and can keep more magnitude in rare blocks.
    """
    check_transposable(n, m)
    found = []
    for rows in itertools.product(itertools.combinations(range(m), n), repeat=m):
        counts = [0] * m
        for chosen in rows:
            for column in chosen:
                counts[column] += 1
        if all(count == n for count in counts):
            found.append([column in chosen for chosen in rows for column in range(m)])
    return torch.tensor(found, dtype=torch.bool)


@functools.cache
def _pattern_tables(n: int, m: int, dtype: torch.dtype, device: torch.device,
                    transposed: bool) -> tuple[torch.Tensor, ...]:
    """(patterns as scores table [P, m*m], patterns as words [P, m], index codes [P, 1], bits kept)."""
    patterns = transposable_patterns(n, m)
    count = patterns.shape[0]
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
    # Scores are >= 0 or NaN: viewed as integers with the sign bit cleared they order like the floats.
    # Their low 7 bits are replaced by (127 - pattern index), so one integer max gives the best pattern
    # and, among scores equal to within those bits, the first one.
    keep_bits = 0x7FFFFF80 if int_dtype == torch.int32 else 0x7FFFFFFFFFFFFF80
    codes = (127 - torch.arange(count, dtype=int_dtype, device=device)).reshape(count, 1)
    layout = patterns.reshape(count, m, m)
    if transposed:  # blocks read from a weight stored [cols, rows]: pattern p, transposed, keeps index p
        layout = layout.transpose(1, 2)
    layout = layout.contiguous()
    words = layout.view(_WORD[m]).reshape(count, m)
    return (layout.reshape(count, m * m).to(device=device, dtype=dtype), words.to(device), codes,
            torch.tensor(keep_bits, dtype=int_dtype, device=device))


def _best_patterns(blocks: torch.Tensor, out: torch.Tensor, n: int, m: int, score_dtype: torch.dtype,
                   transposed: bool) -> None:
    """Pattern of every block of `blocks` ([m, m, block rows, block cols] view) into `out` ([rows, cols, m] words).

    A few block rows at a time, so the magnitudes and the scores stay in cache.
    """
    with torch.autocast(blocks.device.type, enabled=False):  # scores must stay in score_dtype (bit tricks)
        _best_patterns_exact(blocks, out, n, m, score_dtype, transposed)


def _best_patterns_exact(blocks: torch.Tensor, out: torch.Tensor, n: int, m: int, score_dtype: torch.dtype,
                         transposed: bool) -> None:
    table, words, codes, keep_bits = _pattern_tables(n, m, score_dtype, blocks.device, transposed)
    int_dtype = codes.dtype
    per_row = max(1, blocks.shape[3])
    per_chunk = _SCORES_PER_CHUNK if blocks.device.type == "cpu" else _SCORES_PER_CHUNK_DEVICE
    step = max(1, per_chunk // (table.shape[0] * per_row))
    buffer = torch.empty((m, m, min(step, blocks.shape[2]), blocks.shape[3]), dtype=score_dtype,
                         device=blocks.device)
    for start in range(0, blocks.shape[2], step):
        part = blocks[:, :, start:start + step]
        magnitudes = buffer[:, :, :part.shape[2]]
        if part.dtype == score_dtype:
            torch.abs(part, out=magnitudes)
        else:  # 16-bit and float8 weights are scored in float32
            magnitudes.copy_(part).abs_()
        magnitudes = magnitudes.view(m * m, -1)
        packed = (table @ magnitudes).view(int_dtype).bitwise_and_(keep_bits).bitwise_or_(codes).amax(0)
        if bool(packed.max() >= _INF_BITS[int_dtype]):  # NaN/inf in this chunk (or an overflow): redo it
            table64, _, codes64, keep64 = _pattern_tables(n, m, torch.float64, blocks.device, transposed)
            packed = (table64 @ _sanitised(magnitudes)).view(torch.int64).bitwise_and_(keep64)
            packed = packed.bitwise_or_(codes64).amax(0)
        index = packed.bitwise_and_(127).neg_().add_(127)
        torch.index_select(words, 0, index, out=out[start:start + step].view(-1, m))


def _sanitised(magnitudes: torch.Tensor) -> torch.Tensor:
    """float64 magnitudes where one NaN outweighs m*m infs and one inf outweighs m*m finite values."""
    cap, inf_value, nan_value = _NONFINITE_SCALE[magnitudes.dtype]
    wide = magnitudes.double()
    clean = torch.where(torch.isinf(wide), inf_value, wide.clamp(max=cap))
    return torch.where(torch.isnan(wide), nan_value, clean)


def _best_patterns_in_mode(inference: bool, *args) -> None:
    with torch.inference_mode(inference), torch.no_grad():
        _best_patterns(*args)


@torch.compiler.disable
def nm_mask_transposable(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask whose every m x m block keeps at most `n` entries in each row and each column.

    With such a mask the transposed weight (used for the input gradient) is N:M too (Hu et al., ICML
    2024). The blocks tile the last two dimensions (leading ones are a batch of matrices), `dim` (one
    of the last two) is the group dimension, and both sizes must be divisible by m. Every block gets
    the pattern with exactly n per row and column (`transposable_patterns`) that keeps the most
    magnitude. Scores are float sums; patterns within about 2**-17 of each other (relative; 2**-46 for
    float64 weights) tie and the first in enumeration order wins. NaN counts above inf and inf above
    any number (a pattern covering more NaN, then more inf, wins). A matrix and its transpose get
    transposed masks. Supported: 1:2, 1:4, 2:4, 3:4 and n == m; others raise ValueError.
    """
    _check_nm(n, m)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"nm_mask_transposable needs a floating-point tensor, got {weight.dtype}")
    if weight.ndim < 2:
        raise ValueError(f"nm_mask_transposable needs a matrix (or a batch of them), got shape {tuple(weight.shape)}")
    if not -weight.ndim <= dim < weight.ndim:
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(weight.shape)}")
    d = dim % weight.ndim
    if d < weight.ndim - 2:
        raise ValueError(f"nm_mask_transposable: dim={dim} must be one of the last two dimensions (the blocks tile "
                         f"them), got shape {tuple(weight.shape)}")
    check_transposable(n, m)
    for which in (-2, -1):
        if weight.shape[which] % m:
            raise ValueError(f"size {weight.shape[which]} along dim {weight.ndim + which} (shape "
                             f"{tuple(weight.shape)}) is not divisible by m={m}: transposable blocks are {m}x{m}")
    if n == m:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if weight.is_meta:
        return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)

    # Blocks are read in the stored layout (fast, rows of the storage); when the groups run along dim -2
    # the weight is the transpose of the [rows, cols] matrix the patterns are written for, so the tables
    # are transposed instead (the valid patterns are closed under transposition).
    transposed = d != weight.ndim - 1
    rows, cols = weight.shape[-2:]
    batch = math.prod(weight.shape[:-2])
    block_rows, block_cols = batch * (rows // m), cols // m
    # [m (row in block), m (col in block), block row, block col]: a view of the weight (if contiguous)
    blocks = weight.reshape(batch * (rows // m), m, block_cols, m).permute(1, 3, 0, 2)
    score_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # out[block row, block col, i]: row i of the block's chosen pattern (stored layout) as one word
    out = torch.empty((block_rows, block_cols, m), dtype=_WORD[m], device=weight.device)
    workers = max(1, min(4, torch.get_num_threads())) if weight.device.type == "cpu" else 1
    if workers == 1 or block_rows * block_cols * m * m < 2 * _CHUNK_ELEMENTS:
        _best_patterns(blocks, out, n, m, score_dtype, transposed)
    else:  # grad/inference mode is thread-local: run the workers in the caller's mode
        inference = torch.is_inference_mode_enabled()
        per = -(-block_rows // workers)
        futures = [_thread_pool().submit(_best_patterns_in_mode, inference, blocks[:, :, s:s + per], out[s:s + per],
                                         n, m, score_dtype, transposed) for s in range(0, block_rows, per)]
        for future in futures:
            future.result()
    # [block row, i, block col] of words is the stored layout, m bools per word
    words = out.permute(0, 2, 1).reshape(block_rows, m * block_cols)
    return words.view(torch.bool).reshape(weight.shape)


def nm_group_counts(weight: torch.Tensor, m: int, dim: int = -1) -> torch.Tensor:
    """Number of non-zero entries in every group of `m` along `dim` (groups flattened)."""
    d = dim % weight.ndim
    if weight.shape[d] % m:
        raise ValueError(f"size {weight.shape[d]} along dim {dim} is not divisible by m={m}")
    nz = (weight != 0).movedim(d, -1)
    return nz.reshape(-1, m).sum(dim=1)


def check_nm(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """True if every group of `m` along `dim` has at most `n` non-zero entries."""
    _check_nm(n, m)
    if weight.shape[dim % weight.ndim] % m:
        return False
    return bool((nm_group_counts(weight, m, dim) <= n).all())
