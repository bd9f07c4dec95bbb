"""Deterministic, order-independent train/validation/test splitting, and the splits every loader returns.

Splits are decided by a stable hash (MD5) of a key string (e.g. the source sentence), never by Python's
``hash`` (salted per process) or by file order, so the same data always gives the same splits on every
machine, and rows that share a key (the same source sentence with two translations) land in the same
split, which avoids leaking evaluation sentences into training.

The loaders (text, translation) share the rest of the split handling through this module: a Hub
dataset's split names (`hub_splits`), the validation/test splits carved out of train when the source
has none (`complete_splits`) and the ``max_*_samples`` limits (`truncate_splits`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import datasets

SplitSize = int | float

SPLITS = ("train", "validation", "test")
#: split names of Hub datasets read as "validation"
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
#: a carved split without a given size: this fraction of the training rows, at most DEFAULT_CARVE_MAX rows
DEFAULT_CARVE_FRACTION = 0.05
DEFAULT_CARVE_MAX = 2000


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


def linked_keys(sources: Sequence[str], targets: Sequence[str]) -> list[str]:
    """A carving key for each sentence pair such that pairs sharing a source *or* a target sentence, directly
    or through a chain of pairs, share it: the smallest source sentence of their group.

    Keyed by the source alone, two sources with one translation ("to feel well" and "to feel good" ->
    "sich gut fühlen") could land in train and test, and the model would have seen the test target. A
    pair whose group has one source sentence keeps that sentence as its key. Independent of row order.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        root = node
        while parent.get(root, root) != root:
            root = parent[root]
        while node != root:
            parent[node], node = root, parent[node]
        return root

    for source, target in zip(sources, targets, strict=True):
        a, b = find("s\0" + source), find("t\0" + target)
        if a != b:  # the smaller node becomes the root, so a root is its group's smallest node: a source
            parent[max(a, b)] = min(a, b)
    return [find("s\0" + source)[2:] for source in sources]


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


def truncate(ds: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows of a `datasets.Dataset` (all of them for None); a negative limit is an error."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 0:
        raise ValueError(f"max samples must be >= 0, got {limit}")
    return ds.select(range(limit))


def truncate_splits(splits: Mapping[str, datasets.Dataset], limits: Mapping[str, int | None]) -> datasets.DatasetDict:
    """train/validation/test, each cut to its first `limits[name]` rows (None: all of them)."""
    return datasets.DatasetDict({name: truncate(splits[name], limits[name]) for name in SPLITS})


def carve_size(size: SplitSize | None, n: int, name: str) -> int:
    """Rows to carve out of `n` training rows for a split of `size` (see `resolve_size`); None: 5 percent,
    at most 2,000 (`DEFAULT_CARVE_FRACTION`, `DEFAULT_CARVE_MAX`)."""
    if size is None:
        return min(DEFAULT_CARVE_MAX, resolve_size(DEFAULT_CARVE_FRACTION, n, name))
    return resolve_size(size, n, name)


def complete_splits(
    splits: dict[str, datasets.Dataset],
    keys: Callable[[datasets.Dataset], Sequence[str]],
    validation_size: SplitSize | None,
    test_size: SplitSize | None,
) -> datasets.DatasetDict:
    """train/validation/test, the missing validation/test splits carved out of train by the hash of
    `keys(train)` (one key per row: rows with equal keys stay in one split)."""
    missing = [name for name in ("validation", "test") if name not in splits]
    if missing:
        train = splits["train"]
        n = len(train)
        wanted = {
            "test": carve_size(test_size, n, "test_size") if "test" in missing else 0,
            "validation": carve_size(validation_size, n, "validation_size") if "validation" in missing else 0,
        }
        rest, carved = hash_split(keys(train), wanted)
        for name in missing:
            splits[name] = train.select(carved[name])
        splits["train"] = train.select(rest)
    return datasets.DatasetDict({name: splits[name] for name in SPLITS})


def hub_splits(
    raw: datasets.DatasetDict,
    dataset_name: str,
    normalise: Callable[[str, datasets.Dataset], datasets.Dataset],
) -> dict[str, datasets.Dataset]:
    """The train/validation/test splits of a loaded Hub dataset, each as `normalise(name, split)` returns it.

    Split names in `SPLIT_ALIASES` are read as "validation"; other names (e.g. "unsupervised") are left
    out; a dataset without a train split is refused (`ValueError` naming `--dataset_name`).
    """
    splits: dict[str, datasets.Dataset] = {}
    for name, ds in raw.items():
        name = SPLIT_ALIASES.get(name, name)
        if name in SPLITS:
            splits[name] = normalise(name, ds)
    if "train" not in splits:
        raise ValueError(f"--dataset_name {dataset_name}: no 'train' split (splits found: {list(raw)})")
    return splits
