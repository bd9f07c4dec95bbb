"""Deterministic, order-independent train/validation/test splitting.

Splits are decided by a stable hash (MD5) of a key string (e.g. the source sentence), never by Python's
``hash`` (salted per process) or by file order, so the same data always gives the same splits on every
machine, and rows that share a key (the same source sentence with two translations) land in the same
split, which avoids leaking evaluation sentences into training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SplitSize = int | float


def stable_hash(text: str) -> int:
    """64-bit integer from the MD5 of ``text``: identical across processes, platforms and Python versions."""
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "big")


def resolve_size(size: SplitSize | None, n: int, name: str) -> int:
    """Turn an absolute count (int) or a fraction of ``n`` (float in [0, 1)) into a row count.

    A positive fraction of a non-empty set gives at least one row, so tiny data sets still get an
    evaluation split.
    """
    if size is None:
        return 0
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise TypeError(f"{name} must be an int (rows) or a float (fraction), got {size!r}")
    if size < 0:
        raise ValueError(f"{name} must be >= 0, got {size!r}")
    if isinstance(size, float):
        if size >= 1.0:
            raise ValueError(
                f"{name} as a fraction must be in [0, 1), got {size!r}; pass an int for a row count"
            )
        if size == 0.0 or n == 0:
            return 0
        return max(1, int(round(size * n)))
    return min(size, n)


def hash_split(keys: Sequence[str], sizes: dict[str, int]) -> tuple[list[int], dict[str, list[int]]]:
    """Carve splits of (about) ``sizes[name]`` rows out of ``keys`` by hash order.

    Keys are visited in (hash, key) order and whole groups of equal keys are given to the first split
    in ``sizes`` (dict order) that still needs rows, so a split can exceed its size by the size of one
    group. Returns ``(rest, {name: indices})``; every index list is in the original (ascending) order.
    At least one row is always left in ``rest`` when ``keys`` is not empty.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups, key=lambda k: (stable_hash(k), k))
    n = len(keys)
    out: dict[str, list[int]] = {name: [] for name in sizes}
    names = [name for name, size in sizes.items() if size > 0]
    taken = 0
    pos = 0
    for name in names:
        while len(out[name]) < sizes[name] and pos < len(ordered):
            group = groups[ordered[pos]]
            if taken + len(group) >= n:  # never empty the remaining (training) split
                break
            out[name].extend(group)
            taken += len(group)
            pos += 1
    rest = [i for key in ordered[pos:] for i in groups[key]]
    return sorted(rest), {name: sorted(idx) for name, idx in out.items()}


def truncate(ds, limit: int | None):
    """The first `limit` rows of a `datasets.Dataset` (all of them for None); a negative limit is an error."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 0:
        raise ValueError(f"max samples must be >= 0, got {limit}")
    return ds.select(range(limit))
