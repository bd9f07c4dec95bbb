"""N:M masks: which n of every m consecutive weights survive.

`nm_mask` is on the hot path of every SR-STE training step (the mask is recomputed from the dense
weights after each optimizer update), so it avoids `topk`/`argsort`. Each element's rank inside its
group is counted from the m*(m-1)/2 pairwise comparisons of integer magnitude keys, in cache-sized
chunks that run on a small thread pool on CPU. `benchmarks/mask_speed.py` measures it.

Ordering rules (also what the tests pin down):
- magnitude |w| decides; among equal magnitudes the lower index wins (so -0.0 and 0.0 tie);
- NaN ranks above every number, +-inf above every finite number: a NaN weight is kept, so it shows
  up in the output instead of being silently hidden by the mask.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["nm_mask", "check_nm", "nm_group_counts", "magnitude_key"]

# Pairwise counting costs m*(m-1)/2 comparisons per group: fine up to m=16, topk is cheaper beyond.
_MAX_PAIRWISE_M = 16
# Elements per chunk: about 2 MiB of int32 keys, so a chunk's temporaries stay in L2/L3.
_CHUNK_ELEMENTS = 1 << 19

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
            _pool = ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads())),
                                       thread_name_prefix="nm_mask")
        return _pool


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


def _topk_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Reference/fallback path for large m: same ordering rules, through a stable sort of the keys."""
    raw, sign_clear = magnitude_key(weight.movedim(dim, -1))
    key = (raw & sign_clear).to(torch.int64).reshape(-1, m)
    # stable descending sort: equal keys keep index order, so the lower index wins ties
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros(key.shape, dtype=torch.bool, device=key.device).scatter_(1, order, True)
    return mask.reshape(raw.shape).movedim(-1, dim)


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask keeping the `n` largest-magnitude entries of every `m` consecutive ones along `dim`.

    Groups are formed along `dim` (the input dimension of a layer is what sparse tensor cores
    need: dim 1 of an `nn.Linear` weight, dim 0 of a GPT-2 `Conv1D` weight). Ties go to the lower
    index; NaN ranks above inf (see the module docstring). Works for any float dtype and device.
    """
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
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if m > _MAX_PAIRWISE_M:
        return _topk_mask(weight, n, m, d)

    raw, sign_clear = magnitude_key(weight)
    outer = math.prod(weight.shape[:d])
    inner = math.prod(weight.shape[d + 1:])
    rows = outer * (size // m)
    raw = raw.reshape(rows, m, inner)
    out = torch.empty(raw.shape, dtype=torch.bool, device=weight.device)
    if rows == 0 or inner == 0:
        return out.reshape(weight.shape)

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
    return out.reshape(weight.shape)


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
