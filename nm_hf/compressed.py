"""Compressed N:M checkpoints: only the kept weights, plus a few bits per group saying where they sit.

Layout of a compressed directory (see docs/drafts/hub.md for the full description):

- `config.json`: the model config; its `nm_sparsity` record carries `"compressed": {"format":
  "nm-compressed", "version": 1, "file": "nm_compressed.safetensors"}`.
- `generation_config.json`, tokenizer files, ...: copied unchanged.
- `nm_compressed.safetensors`: for every targeted weight `W` (key `k`), two tensors:
    - `k + ".nm_values"`: the kept values, 1-D, dtype of `W`: group after group, ascending position
      inside a group. Groups are the runs of m along the layer's input dimension (`group_dim`),
      enumerated in row-major order of `W.movedim(group_dim, -1)`.
    - `k + ".nm_positions"`: 1-D uint8, the kept positions of every group as a rank in the
      combinatorial number system (`sum_j C(p_j, j+1)` for ascending positions p_0 < ... < p_{n-1},
      an integer in [0, C(m, n))), written with `bits = ceil(log2(C(m, n)))` bits per group into one
      little-endian bit stream (group g owns bits g*bits ... g*bits+bits-1; bit 0 is the lowest bit of
      byte 0); unused bits of the last byte are zero.
  Every other tensor is stored as is, under its own name. The safetensors metadata holds
  `nm_hf.format = "nm-compressed"`, `nm_hf.version` and `nm_hf.header`, a JSON object with n, m,
  bits and, per tensor, its shape, dtype, group_dim and the sha256 of its dense bytes (row-major,
  as the loader rebuilds them), so a corrupted or mismatched file is an error, never a wrong model.

For 2:4 fp16 weights a group of four (64 dense bits) costs two fp16 values and 3 position bits:
35/64 = 0.547 of the dense bytes (a 1-bit-per-weight bitmask would give 0.5625).

Which n positions a group keeps: its non-zero entries (numerically: -0.0 counts as zero); a group
with fewer than n non-zeros (a kept weight that is exactly 0) also keeps its lowest-index zeros.
Every stored value round-trips bit-exactly; the one thing not stored is the sign of the pruned
zeros, which come back as +0.0 (`-0.0 == 0.0`, so `torch.equal` holds and outputs are identical).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .record import CONFIG_KEY
from .report import SparsityReport, layer_sparsity

__all__ = [
    "CheckpointError",
    "save_compressed",
    "load_compressed",
    "load_compressed_state_dict",
    "compress_checkpoint",
    "decompress_checkpoint",
    "inspect_checkpoint",
    "compress_tensor",
    "decompress_tensor",
    "position_bits",
    "atomic_directory",
    "WEIGHTS_NAME",
]

FORMAT = "nm-compressed"
FORMAT_VERSION = 1
WEIGHTS_NAME = "nm_compressed.safetensors"
VALUES_SUFFIX = ".nm_values"
POSITIONS_SUFFIX = ".nm_positions"
META_FORMAT = "nm_hf.format"
META_VERSION = "nm_hf.version"
META_HEADER = "nm_hf.header"
#: key of the compressed marker inside the nm_sparsity record
COMPRESSED_KEY = "compressed"
#: keys of the record that describe a saved checkpoint rather than a SparsityConfig
RECORD_KEYS = ("targeted_modules", "ignored_modules", "conv1d_modules", "state", "sparsity", COMPRESSED_KEY)

#: model types that use GPT-2 `Conv1D` ([in, out] weights, groups along dim 0), and the names their
#: Conv1D layers have (their other linear layers, e.g. GPT2DoubleHeads' summary, are nn.Linear)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
CONV1D_LAYER_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})

#: files of a training output dir that never belong in a published checkpoint
_SKIP_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json")
_SKIP_PREFIXES = ("rng_state", "pytorch_model", "model.safetensors", "model-", "tf_model", "flax_model")
_DENSE_INDEX = "model.safetensors.index.json"
_DENSE_NAME = "model.safetensors"

# groups handled per vectorised step: bounds the temporaries (a few bytes per weight) for huge layers
_CHUNK_GROUPS = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or inconsistent with its config; nothing was loaded."""


# ----------------------------------------------------------------------------- position codes


def position_bits(n: int, m: int) -> int:
    """Bits that encode one group's choice of n kept positions out of m: ceil(log2(C(m, n)))."""
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 1 <= n <= m:
        raise ValueError(f"need integers 1 <= n <= m, got n={n!r}, m={m!r}")
    bits = (math.comb(m, n) - 1).bit_length()
    if bits > 62:
        raise ValueError(f"{n}:{m} has C({m},{n}) = {math.comb(m, n)} position choices per group; "
                         "more than 62 bits per group is not supported")
    return bits


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
    for start in range(0, codes.shape[0], _CHUNK_GROUPS):  # chunk boundaries are byte aligned (x8 groups)
        chunk = codes[start:start + _CHUNK_GROUPS]
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
    for start in range(0, groups, _CHUNK_GROUPS):
        count = min(_CHUNK_GROUPS, groups - start)
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


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
    for start in range(0, groups.shape[0], _CHUNK_GROUPS):
        chunk = groups[start:start + _CHUNK_GROUPS]
        chunk_codes, counts = _group_codes(chunk, n, m)
        over = chunk_codes < 0
        if violations or bool(over.any()):
            violations += int(over.sum())
            worst = max(worst, int(counts.max()))
            continue
        values.append(chunk.gather(1, decode_positions(chunk_codes, n, m)).reshape(-1))
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
        "dtype": _dtype_name(weight.dtype),
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
    dense = torch.zeros(groups, m, dtype=values.dtype)
    kept = values.view(groups, n)
    for start in range(0, groups, _CHUNK_GROUPS):
        stop = min(groups, start + _CHUNK_GROUPS)
        dense[start:stop].scatter_(1, decode_positions(codes[start:stop], n, m), kept[start:stop])
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(group_dim))
    return dense.reshape(moved_shape).movedim(-1, group_dim).contiguous()


# ----------------------------------------------------------------------------- checkpoint directories


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to `target`; on success it becomes `target` by a rename.

    An exception (or a kill) inside the block leaves `target` as it was: the staging directory is
    removed (or, after a kill, left under a hidden `.NAME.tmp-*` name that no loader looks at).
    A non-empty existing `target` is refused unless `overwrite`, and then replaced as a whole.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True (--overwrite) "
                                  "to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        for path in staging.iterdir():
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "replaced")
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)  # onto a missing or empty directory: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read {what}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a saved model directory)")
    return path


def read_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """(config.json as a dict, its nm_sparsity record) of a checkpoint directory."""
    directory = _checkpoint_dir(path)
    config = _read_json(directory / "config.json", "the model config")
    record = config.get(CONFIG_KEY)
    if not isinstance(record, dict):
        raise CheckpointError(f"{directory / 'config.json'} has no '{CONFIG_KEY}' record: the model was not "
                              "saved by nm_hf (nm_hf.sparsify, nm_hf.finalize, then save_pretrained)")
    for key in ("n", "m", "targeted_modules"):
        if key not in record:
            raise CheckpointError(f"{directory / 'config.json'}: the '{CONFIG_KEY}' record has no {key!r}")
    return config, record


def is_compressed(record: dict) -> bool:
    return isinstance(record.get(COMPRESSED_KEY), dict)


def _model_types(config: dict) -> set[str]:
    """model_type of a config and of its sub-configs (encoder/decoder/text_config ...)."""
    types = {config.get("model_type")}
    types |= {v.get("model_type") for v in config.values() if isinstance(v, dict)}
    return {t for t in types if isinstance(t, str)}


def record_group_dims(record: dict, config: dict) -> dict[str, int]:
    """Group dim of each targeted layer's weight: 0 for GPT-2 Conv1D ([in, out]), 1 for nn.Linear.

    Uses the record's `conv1d_modules` when present. Older records: in gpt2-family models (by
    model_type, sub-configs included) the layers named c_attn/q_attn/c_proj/c_fc are Conv1D.
    """
    targeted = list(record["targeted_modules"])
    if isinstance(record.get("conv1d_modules"), list):
        conv1d = set(record["conv1d_modules"])
        return {name: 0 if name in conv1d else 1 for name in targeted}
    if not _model_types(config) & CONV1D_MODEL_TYPES:
        return dict.fromkeys(targeted, 1)
    return {name: 0 if name.rsplit(".", 1)[-1] in CONV1D_LAYER_NAMES else 1 for name in targeted}


def _dense_weight_files(directory: Path) -> list[Path]:
    index = directory / _DENSE_INDEX
    if index.exists():
        weight_map = _read_json(index, "the safetensors index").get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / _DENSE_NAME).exists():
        files = [directory / _DENSE_NAME]
    else:
        found = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in (".bin", ".safetensors"))
        hint = f" (found {', '.join(found)})" if found else ""
        raise CheckpointError(f"{directory}: no {_DENSE_NAME} or {_DENSE_INDEX}{hint}")
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{directory}: {path.name} is listed in {_DENSE_INDEX} but missing")
    return files


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as err:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({err}); truncated or corrupted?") from err


def _read_dense_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _dense_weight_files(directory):
        with _open_safetensors(path) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def _copy_extra_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config, card, plot, results: every top-level file but weights/training state."""
    for path in src.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        name = path.name
        if name in ("config.json", WEIGHTS_NAME, _DENSE_INDEX) or name in _SKIP_FILES:
            continue
        if name.startswith(_SKIP_PREFIXES) or name.endswith((".pt", ".pth", ".ckpt")):
            continue
        shutil.copy2(path, dst / name)


def _compress_tensors(tensors: dict[str, torch.Tensor], record: dict, group_dims: dict[str, int],
                      where: str) -> tuple[dict[str, torch.Tensor], dict]:
    n, m = int(record["n"]), int(record["m"])
    if record.get("method") == "dense":
        raise CheckpointError(f"{where}: the model was trained with method='dense' (no N:M mask), so its "
                              "weights are not N:M sparse and cannot be stored compressed")
    targeted = {f"{name}.weight": name for name in record["targeted_modules"]}
    missing = [key for key in targeted if key not in tensors]
    if missing:
        raise CheckpointError(f"{where}: targeted weights missing from the checkpoint: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    problems: list[str] = []
    for key, tensor in tqdm(tensors.items(), desc="Compressing", unit="tensor", leave=False):
        if key in targeted:
            try:
                values, packed, entry = compress_tensor(tensor, n, m, group_dims[targeted[key]], name=key)
            except ValueError as err:
                problems.append(str(err))
                continue
            out[key + VALUES_SUFFIX], out[key + POSITIONS_SUFFIX] = values, packed
            entries[key] = entry
        else:
            out[key] = tensor.contiguous()
            entries[key] = {"format": "dense", "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                            "sha256": tensor_sha256(tensor)}
    if problems:
        state = record.get("state")
        hint = (" (the record says state='training': save after nm_hf.finalize(model))"
                if state == "training" else "")
        raise CheckpointError(f"{where}: cannot compress, weights do not obey the {n}:{m} pattern{hint}:\n  - "
                              + "\n  - ".join(problems))
    header = {"version": FORMAT_VERSION, "n": n, "m": m, "bits": position_bits(n, m), "tensors": entries}
    return out, header


def _compressed_record(record: dict) -> dict:
    return {**record, COMPRESSED_KEY: {"format": FORMAT, "version": FORMAT_VERSION, "file": WEIGHTS_NAME}}


def _write_compressed(src: Path, dst: Path, config: dict, record: dict, group_dims: dict[str, int]) -> None:
    tensors = _read_dense_tensors(src)
    out, header = _compress_tensors(tensors, record, group_dims, str(src))
    metadata = {"format": "pt", META_FORMAT: FORMAT, META_VERSION: str(FORMAT_VERSION),
                META_HEADER: json.dumps(header, sort_keys=True)}
    save_file(out, str(dst / WEIGHTS_NAME), metadata=metadata)
    _copy_extra_files(src, dst)
    _write_json_atomic(dst / "config.json", {**config, CONFIG_KEY: _compressed_record(record)})


def compress_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                        group_dims: dict[str, int] | None = None) -> Path:
    """Write the compressed form of the saved (finalized) checkpoint `src` to the new directory `dst`.

    Everything is read and checked before `dst` appears (staging directory + rename).
    """
    src = _checkpoint_dir(src)
    config, record = read_config(src)
    if is_compressed(record):
        raise CheckpointError(f"{src} is already compressed")
    group_dims = group_dims or record_group_dims(record, config)
    with atomic_directory(dst, overwrite) as stage:
        _write_compressed(src, stage, config, record, group_dims)
    return Path(dst)


def _header_of(path: Path, handle: Any) -> dict:
    metadata = handle.metadata() or {}
    if metadata.get(META_FORMAT) != FORMAT:
        raise CheckpointError(f"{path} is not an nm_hf compressed checkpoint (no '{META_FORMAT}' metadata)")
    if metadata.get(META_VERSION) != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: compressed format version {metadata.get(META_VERSION)!r} is not "
                              f"supported (this nm_hf reads version {FORMAT_VERSION})")
    try:
        header = json.loads(metadata[META_HEADER])
        n, m, bits, entries = int(header["n"]), int(header["m"]), int(header["bits"]), header["tensors"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the '{META_HEADER}' metadata is missing or malformed ({err!r})") from None
    if not isinstance(entries, dict) or bits != position_bits(n, m):
        raise CheckpointError(f"{path}: inconsistent header (n={n}, m={m}, bits={bits})")
    return header


def _compressed_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected an nm_hf compressed checkpoint)")
    return path


def iter_compressed_tensors(path: str | os.PathLike, keys: list[str] | None = None
                            ) -> Iterator[tuple[str, torch.Tensor, dict, dict]]:
    """(name, dense tensor, header entry, header) for every tensor of a compressed file, verified."""
    path = _compressed_file(path)
    with _open_safetensors(path) as handle:
        header = _header_of(path, handle)
        n, m, entries = header["n"], header["m"], header["tensors"]
        stored = set(handle.keys())
        expected = set()
        for key, entry in entries.items():
            expected |= {key + VALUES_SUFFIX, key + POSITIONS_SUFFIX} if entry.get("format") == "nm" else {key}
        if stored != expected:
            extra, missing = sorted(stored - expected), sorted(expected - stored)
            raise CheckpointError(f"{path}: tensors do not match the header (missing: {missing[:5]}, "
                                  f"unexpected: {extra[:5]})")
        for key in keys if keys is not None else list(entries):
            entry = entries[key]
            try:
                shape, dtype = tuple(int(s) for s in entry["shape"]), _dtype_from_name(entry["dtype"])
                if entry.get("format") == "nm":
                    values = handle.get_tensor(key + VALUES_SUFFIX)
                    if values.dtype != dtype:
                        raise ValueError(f"values are {values.dtype}, header says {dtype}")
                    tensor = decompress_tensor(values, handle.get_tensor(key + POSITIONS_SUFFIX), n, m, shape,
                                               int(entry["group_dim"]), name=key)
                elif entry.get("format") == "dense":
                    tensor = handle.get_tensor(key)
                    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                        raise ValueError(f"stored {tensor.dtype} {list(tensor.shape)}, header says "
                                         f"{dtype} {list(shape)}")
                else:
                    raise ValueError(f"unknown tensor format {entry.get('format')!r}")
            except SafetensorError as err:
                raise CheckpointError(f"{path}: cannot read tensor {key!r}: {err}") from err
            except CheckpointError:
                raise
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
                raise CheckpointError(f"{path}: tensor {key!r} is corrupted or inconsistent: {err}") from err
            if tensor_sha256(tensor) != entry.get("sha256"):
                raise CheckpointError(f"{path}: checksum mismatch for tensor {key!r}: the file is corrupted")
            yield key, tensor, entry, header


def load_compressed_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dense state dict (the tensors a normal checkpoint would hold) of a compressed file or directory.

    Every tensor is checked against the shapes, dtypes and sha256 sums in the header.
    """
    return {key: tensor for key, tensor, _, _ in
            tqdm(iter_compressed_tensors(path), desc="Decompressing", unit="tensor", leave=False)}


def _model_class(config: Any, model_class: Any = None) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_compressed(path: str | os.PathLike, model_class: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Rebuild the model of a compressed directory: config -> `from_pretrained(None, config, state_dict)`.

    `model_class` defaults to the class named in config.json's `architectures` (else AutoModel).
    The returned model has plain layers (as after `finalize`); `nm_hf.load_sparse` re-patches them.
    """
    from transformers import AutoConfig, GenerationConfig

    directory = _checkpoint_dir(path)
    _, record = read_config(directory)
    if not is_compressed(record):
        raise CheckpointError(f"{directory} is not compressed (no '{COMPRESSED_KEY}' marker in its "
                              f"'{CONFIG_KEY}' record); load it with from_pretrained or nm_hf.load_sparse")
    config = AutoConfig.from_pretrained(directory)
    state_dict = load_compressed_state_dict(directory)
    with _open_safetensors(_compressed_file(directory)) as handle:
        header = _header_of(directory, handle)
    if (header["n"], header["m"]) != (record["n"], record["m"]):
        raise CheckpointError(f"{directory}: weights are {header['n']}:{header['m']} but config.json says "
                              f"{record['n']}:{record['m']}")
    cls = _model_class(config, model_class)
    from_pretrained_kwargs.pop("output_loading_info", None)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                          **from_pretrained_kwargs)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{directory}: the weights do not fit {cls.__name__} built from config.json: "
                              f"{err}") from err
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{directory}: the weights do not match {cls.__name__} built from config.json: "
                              f"{problems or info['error_msgs']}")
    stored = dict(getattr(model.config, CONFIG_KEY))
    stored.pop(COMPRESSED_KEY, None)
    setattr(model.config, CONFIG_KEY, stored)
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def decompress_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a normal transformers checkpoint (model.safetensors + config.json) from a compressed one."""
    src = _checkpoint_dir(src)
    config, record = read_config(src)
    if not is_compressed(record):
        raise CheckpointError(f"{src} is not compressed (no '{COMPRESSED_KEY}' marker in its record)")
    state_dict = load_compressed_state_dict(src)
    with atomic_directory(dst, overwrite) as stage:
        save_file(state_dict, str(stage / _DENSE_NAME), metadata={"format": "pt"})
        _copy_extra_files(src, stage)
        plain = {k: v for k, v in record.items() if k != COMPRESSED_KEY}
        _write_json_atomic(stage / "config.json", {**config, CONFIG_KEY: plain})
    return Path(dst)


def save_compressed(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a finalized sparse model in the compressed format (see the module docstring).

    The model goes through its own `save_pretrained` into a staging directory (so transformers
    decides which tensors are saved and under which names), its targeted weights are compressed,
    and the staging directory is renamed to `save_directory`: an interrupted save leaves nothing.
    """
    from .hub import model_group_dims, sparsity_record

    record = sparsity_record(model)  # raises if the model was never sparsified or is still training
    group_dims = model_group_dims(model, record["targeted_modules"])
    with atomic_directory(save_directory, overwrite) as stage:
        dense = stage / ".dense"
        model.save_pretrained(dense)
        config = _read_json(dense / "config.json", "the model config")
        _write_compressed(dense, stage, config, record, group_dims)
        shutil.rmtree(dense)
    return Path(save_directory)


def inspect_checkpoint(path: str | os.PathLike) -> tuple[SparsityReport, dict]:
    """Per-layer sparsity of a saved model read straight from its files (no model is built).

    Works on normal and compressed directories; returns the report and the nm_sparsity record.
    """
    directory = _checkpoint_dir(path)
    config, record = read_config(directory)
    n, m = int(record["n"]), int(record["m"])
    report = SparsityReport()
    if is_compressed(record):
        keys = [f"{name}.weight" for name in record["targeted_modules"]]
        with _open_safetensors(_compressed_file(directory)) as handle:
            entries = _header_of(directory, handle)["tensors"]
        missing = [k for k in keys if k not in entries]
        if missing:
            raise CheckpointError(f"{directory}: targeted weights missing from {WEIGHTS_NAME}: {missing[:5]}")
        for key, tensor, entry, _ in iter_compressed_tensors(directory, keys):
            report.layers.append(layer_sparsity(key.removesuffix(".weight"), tensor, n, m,
                                                int(entry.get("group_dim", 1))))
        return report, record
    group_dims = record_group_dims(record, config)
    files = _dense_weight_files(directory)
    located: dict[str, Path] = {}
    for path_ in files:
        with _open_safetensors(path_) as handle:
            located.update(dict.fromkeys(handle.keys(), path_))
    for name in record["targeted_modules"]:
        key = f"{name}.weight"
        if key not in located:
            raise CheckpointError(f"{directory}: targeted weight {key!r} is not in the checkpoint files")
        with _open_safetensors(located[key]) as handle:
            tensor = handle.get_tensor(key)
        report.layers.append(layer_sparsity(name, tensor, n, m, group_dims[name]))
    return report, record
