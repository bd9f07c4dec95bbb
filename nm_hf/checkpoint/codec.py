"""The compressed format's codec: position codes, tensor compression and checksums (no file I/O).

A group is m consecutive weights along a tensor's input dimension (`group_dim`); groups are
enumerated in row-major order of `W.movedim(group_dim, -1)`. A group's n kept positions
p_0 < ... < p_{n-1} are encoded as their rank in the combinatorial number system,
`sum_j C(p_j, j+1)`, an integer in [0, C(m, n)), written with `bits = ceil(log2(C(m, n)))` bits per
group into one little-endian bit stream. The file layout around these tensors is described in
`nm_hf.checkpoint.compressed`.

`check_header` / `check_entry` validate what a file's header claims (pattern, shapes, dtypes,
group dims) before anything is allocated from it: a crafted header cannot make the loader build
huge tables or tensors.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_M",
    "MAX_NDIM",
    "position_bits",
    "encode_positions",
    "decode_positions",
    "pack_codes",
    "unpack_codes",
    "tensor_sha256",
    "dtype_name",
    "dtype_from_name",
    "compress_tensor",
    "decompress_tensor",
    "check_header",
    "check_entry",
    "HeaderEntry",
]

#: largest group size the format stores (C(64, 32) < 2**61: every code fits an int64)
MAX_M = 64
#: most dimensions a stored tensor may claim
MAX_NDIM = 8

# groups handled per vectorised step: bounds the temporaries (a few bytes per weight) for huge layers
CHUNK_GROUPS = 1 << 20


# ----------------------------------------------------------------------------- position codes


def position_bits(n: int, m: int) -> int:
    """Bits that encode one group's choice of n kept positions out of m: ceil(log2(C(m, n)))."""
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 1 <= n <= m:
        raise ValueError(f"need integers 1 <= n <= m, got n={n!r}, m={m!r}")
    if m > MAX_M:
        raise ValueError(f"{n}:{m}: the compressed format stores groups of at most m={MAX_M} weights")
    return (math.comb(m, n) - 1).bit_length()


def _binom_table(m: int, n: int) -> torch.Tensor:
    """table[p, k] = C(p, k) for 0 <= p <= m, 0 <= k <= n (int64)."""
    return torch.tensor([[math.comb(p, k) for k in range(n + 1)] for p in range(m + 1)], dtype=torch.int64)


#: up to this m, groups are handled through lookup tables indexed by the group's m-bit occupancy mask
_TABLE_MAX_M = 16


@functools.lru_cache(maxsize=16)
def _tables(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables for m <= 16, indexed by a group's occupancy mask (bit i set = entry i non-zero).

    - code_of_mask[mask]: code of the n kept positions (the non-zeros, topped up with the lowest-index
      zeros), or -1 when the mask has more than n bits set (pattern violated);
    - positions_of_code[code]: the n kept positions, ascending ([C(m, n), n]);
    - count_of_mask[mask]: number of non-zeros.
    """
    count_of_mask = np.zeros(1 << m, dtype=np.int64)
    for i in range(m):
        count_of_mask += (np.arange(1 << m) >> i) & 1
    positions_of_code = np.empty((math.comb(m, n), n), dtype=np.int64)
    for pos in itertools.combinations(range(m), n):
        positions_of_code[sum(math.comb(p, j + 1) for j, p in enumerate(pos))] = pos
    code_of_mask = np.full(1 << m, -1, dtype=np.int64)
    for mask in np.nonzero(count_of_mask <= n)[0].tolist():
        keep, missing = [], n - int(count_of_mask[mask])
        for p in range(m):  # the non-zeros, plus the lowest-index zeros until there are n
            if mask >> p & 1:
                keep.append(p)
            elif missing:
                keep.append(p)
                missing -= 1
        code_of_mask[mask] = sum(math.comb(p, j + 1) for j, p in enumerate(keep))
    return code_of_mask, positions_of_code, count_of_mask


def _occupancy_masks(nonzero: torch.Tensor) -> np.ndarray:
    """[G, m] bool -> [G] occupancy masks (bit i set = entry i non-zero), m <= 16."""
    m = nonzero.shape[1]
    bit_values = (1 << np.arange(m)).astype(np.uint8 if m <= 8 else np.uint16)
    return nonzero.numpy().view(np.uint8) @ bit_values


def encode_positions(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Code of every row's kept-position set ([G, m] bool, exactly n True per row) -> int64 [G].

    Combinatorial number system: the j-th kept position p (0-based j, ascending) contributes
    C(p, j+1); the codes of n-of-m choices are exactly 0 .. C(m, n) - 1.
    """
    table = _binom_table(m, n)
    rank_in_row = keep.cumsum(1)  # j+1 at the j-th kept position
    positions = torch.arange(m).expand_as(rank_in_row)
    contrib = table[positions, rank_in_row.clamp_(max=n)]
    return (contrib * keep).sum(1)


def decode_positions(codes: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of `encode_positions` for codes in [0, C(m, n)): [G] int64 -> [G, n] ascending positions.

    Greedy decoding, one vectorised step per kept position (a loop over n, never over groups): the
    largest p with C(p, k) <= remainder is the k-th kept position.
    """
    if m <= _TABLE_MAX_M:
        return torch.from_numpy(_tables(n, m)[1][codes.numpy()])
    table = _binom_table(m, n)
    positions = torch.empty(codes.shape[0], n, dtype=torch.int64)
    remainder = codes.clone()
    for k in range(n, 0, -1):
        column = table[:m, k].contiguous()  # non-decreasing in p
        pos = torch.searchsorted(column, remainder, right=True) - 1
        positions[:, k - 1] = pos
        remainder -= column[pos]
    return positions


def _group_codes(groups: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [G], non-zero counts [G]) of a [G, m] chunk; codes are -1 where a group has > n non-zeros."""
    nonzero = groups != 0  # numerically: -0.0 is a zero; NaN and inf are kept values
    if m <= _TABLE_MAX_M:
        code_of_mask, _, count_of_mask = _tables(n, m)
        masks = _occupancy_masks(nonzero)
        return torch.from_numpy(code_of_mask[masks]), torch.from_numpy(count_of_mask[masks])
    counts = nonzero.sum(1)
    zero_rank = (~nonzero).cumsum(1)  # top up with the lowest-index zeros
    keep = nonzero | (~nonzero & (zero_rank <= (n - counts).clamp(min=0).unsqueeze(1)))
    codes = encode_positions(keep, n, m)
    codes[counts > n] = -1
    return codes, counts


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [G] codes of `bits` bits each into a little-endian bit stream (uint8, ceil(G*bits/8) bytes)."""
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    codes = codes.to(_code_dtype(bits))
    shifts = torch.arange(bits, dtype=codes.dtype)
    out = []
    for start in range(0, codes.shape[0], CHUNK_GROUPS):  # chunk boundaries are byte aligned (x8 groups)
        chunk = codes[start:start + CHUNK_GROUPS]
        bit_array = ((chunk.unsqueeze(1) >> shifts) & 1).to(torch.uint8).numpy()
        out.append(np.packbits(bit_array.reshape(-1), bitorder="little"))
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [ceil(groups*bits/8)] uint8 -> [groups] int64. Checks the padding bits."""
    expected = (groups * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != expected:
        raise ValueError(f"expected {expected} packed uint8 bytes for {groups} groups of {bits} bits, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if bits == 0:
        return torch.zeros(groups, dtype=torch.int64)
    raw = packed.numpy()
    total_bits = groups * bits
    if total_bits % 8 and raw[-1] >> (total_bits % 8):
        raise ValueError("non-zero padding bits after the last group")
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64)
    out = []
    for start in range(0, groups, CHUNK_GROUPS):
        count = min(CHUNK_GROUPS, groups - start)
        first_byte = start * bits // 8  # start is a multiple of 8 groups: byte aligned
        nbytes = (count * bits + 7) // 8
        bit_array = np.unpackbits(raw[first_byte:first_byte + nbytes], count=count * bits, bitorder="little")
        chunk = torch.from_numpy(bit_array.reshape(count, bits).astype(np.int64))
        out.append(chunk @ weights)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# ----------------------------------------------------------------------------- tensors


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major, native little-endian layout)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256()
    if flat.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


#: integer dtype of each element size: values are moved as raw bits (gather/scatter on floats may rewrite a
#: NaN's payload, e.g. bfloat16 on CPU, and are not implemented for float8)
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` viewed as integers of the same size (its exact bits)."""
    return tensor.view(_BITS_DTYPE[tensor.element_size()])


def _grouped(weight: torch.Tensor, m: int, group_dim: int, name: str) -> torch.Tensor:
    if weight.ndim == 0 or not -weight.ndim <= group_dim < weight.ndim:
        raise ValueError(f"{name}: group_dim={group_dim} does not fit a tensor of shape {tuple(weight.shape)}")
    if weight.shape[group_dim] % m:
        raise ValueError(f"{name}: size {weight.shape[group_dim]} along dim {group_dim} "
                         f"(shape {tuple(weight.shape)}) is not divisible by m={m}")
    return weight.movedim(group_dim, -1).contiguous().reshape(-1, m)


@torch.no_grad()
def compress_tensor(weight: torch.Tensor, n: int, m: int, group_dim: int, name: str = "weight"
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(values, packed positions, header entry) of an N:M weight; ValueError if a group has > n non-zeros.

    The header entry's sha256 is taken on the tensor the loader will rebuild (pruned -0.0 comes back
    as +0.0); rebuilding it here also re-checks the encoding before anything is written.
    """
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name}: N:M compression needs a floating-point tensor, got {weight.dtype}")
    weight = weight.detach().cpu()
    groups = _grouped(weight, m, group_dim, name)
    bits = position_bits(n, m)
    values, codes = [], []
    violations = worst = 0
    for start in range(0, groups.shape[0], CHUNK_GROUPS):
        chunk = groups[start:start + CHUNK_GROUPS]
        chunk_codes, counts = _group_codes(chunk, n, m)
        over = chunk_codes < 0
        if violations or bool(over.any()):
            violations += int(over.sum())
            worst = max(worst, int(counts.max()))
            continue
        values.append(_bits(chunk).gather(1, decode_positions(chunk_codes, n, m)).reshape(-1).view(weight.dtype))
        codes.append(chunk_codes)
    if violations:
        raise ValueError(f"{name}: {violations} of {groups.shape[0]} groups of {m} have more than {n} "
                         f"non-zero weights (up to {worst}); the tensor is not {n}:{m} sparse")
    values_t = torch.cat(values) if values else torch.zeros(0, dtype=weight.dtype)
    packed = pack_codes(torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int64), bits)
    rebuilt = decompress_tensor(values_t, packed, n, m, tuple(weight.shape), group_dim, name)
    entry = {
        "format": "nm",
        "shape": list(weight.shape),
        "dtype": dtype_name(weight.dtype),
        "group_dim": group_dim % weight.ndim,
        "sha256": tensor_sha256(rebuilt),
    }
    return values_t, packed, entry


@torch.no_grad()
def decompress_tensor(values: torch.Tensor, packed: torch.Tensor, n: int, m: int, shape: tuple[int, ...],
                      group_dim: int, name: str = "weight") -> torch.Tensor:
    """Rebuild the dense tensor of `shape` from `compress_tensor`'s values and packed positions."""
    numel = math.prod(shape)
    if not shape or shape[group_dim] % m:
        raise ValueError(f"{name}: shape {list(shape)} cannot hold groups of {m} along dim {group_dim}")
    groups = numel // m
    if values.ndim != 1 or values.numel() != groups * n:
        raise ValueError(f"{name}: expected {groups * n} kept values for shape {list(shape)} at {n}:{m}, "
                         f"got a tensor of shape {tuple(values.shape)}")
    codes = unpack_codes(packed, groups, position_bits(n, m))
    if groups and int(codes.max()) >= math.comb(m, n):
        bad = int((codes >= math.comb(m, n)).sum())
        raise ValueError(f"{name}: {bad} position codes out of range (>= C({m},{n}) = {math.comb(m, n)})")
    dense = torch.zeros(groups, m, dtype=_BITS_DTYPE[values.element_size()])  # all-zero bits: +0.0
    kept = _bits(values).view(groups, n)
    for start in range(0, groups, CHUNK_GROUPS):
        stop = min(groups, start + CHUNK_GROUPS)
        dense[start:stop].scatter_(1, decode_positions(codes[start:stop], n, m), kept[start:stop])
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(group_dim))
    return dense.view(values.dtype).reshape(moved_shape).movedim(-1, group_dim).contiguous()




# ----------------------------------------------------------------------------- header checks


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it, checked for consistency."""

    key: str
    #: "nm" (values + positions) or "dense" (stored as is)
    format: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: input dimension of an "nm" tensor (None for "dense")
    group_dim: int | None
    sha256: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def check_header(header: Any) -> tuple[int, int, int, dict[str, Any]]:
    """(n, m, bits, tensors) of a decoded `nm_hf.header`, checked before anything is allocated from it.

    ValueError when a field is missing, of the wrong type, or out of range (1 <= n <= m <= MAX_M,
    bits = ceil(log2(C(m, n)))).
    """
    if not isinstance(header, Mapping):
        raise ValueError(f"the header is a {type(header).__name__}, not a JSON object")
    missing = [k for k in ("n", "m", "bits", "tensors") if k not in header]
    if missing:
        raise ValueError(f"malformed header: no {', '.join(missing)}")
    n, m, bits = (_int(header[k], k) for k in ("n", "m", "bits"))
    if not 1 <= n <= m <= MAX_M:
        raise ValueError(f"inconsistent header (n={n}, m={m}): need 1 <= n <= m <= {MAX_M}")
    if bits != position_bits(n, m):
        raise ValueError(f"inconsistent header (n={n}, m={m}, bits={bits}): {n}:{m} needs "
                         f"{position_bits(n, m)} bits per group")
    if not isinstance(header["tensors"], Mapping):
        raise ValueError("inconsistent header: 'tensors' is not a JSON object")
    return n, m, bits, dict(header["tensors"])


def check_entry(key: str, entry: Any, m: int) -> HeaderEntry:
    """The header entry of tensor `key`, checked: format, shape (non-negative ints), dtype, group_dim."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"tensor {key!r}: header entry is not a JSON object")
    fmt = entry.get("format")
    if fmt not in ("nm", "dense"):
        raise ValueError(f"tensor {key!r}: unknown tensor format {fmt!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    shape_t = tuple(_int(s, f"tensor {key!r}: a size") for s in shape)
    if any(s < 0 for s in shape_t):
        raise ValueError(f"tensor {key!r}: negative size in shape {list(shape_t)}")
    dtype = dtype_from_name(entry.get("dtype"))
    sha = entry.get("sha256")
    if not isinstance(sha, str):
        raise ValueError(f"tensor {key!r}: no sha256 in its header entry")
    group_dim = None
    if fmt == "nm":
        group_dim = _int(entry.get("group_dim"), f"tensor {key!r}: group_dim")
        if not shape_t or not 0 <= group_dim < len(shape_t):
            raise ValueError(f"tensor {key!r}: group_dim={group_dim} does not fit shape {list(shape_t)}")
        if shape_t[group_dim] % m:
            raise ValueError(f"tensor {key!r}: shape {list(shape_t)} cannot hold groups of {m} along "
                             f"dim {group_dim}")
        if not dtype.is_floating_point:
            raise ValueError(f"tensor {key!r}: N:M tensors are floating point, header says {dtype}")
    return HeaderEntry(key, fmt, shape_t, dtype, group_dim, sha)
