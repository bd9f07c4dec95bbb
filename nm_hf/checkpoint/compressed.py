"""Compressed N:M checkpoints: only the kept weights, plus a few bits per group saying where they sit.

Layout of a compressed directory (docs/checkpoints.md, "Compressed checkpoints"):

- `config.json`: the model config; its `nm_sparsity` record carries `group_dims` (the input
  dimension of every targeted weight) and `"compressed": {"format": "nm-compressed", "version": 1,
  "file": "nm_compressed.safetensors"}`. Records written before `group_dims` existed have
  `conv1d_modules` (or nothing, read by model type): `nm_hf.record.record_group_dims` reads them all.
- `generation_config.json`, tokenizer files, README.md, results, `runs/`, ...: copied unchanged (but a
  model card nm_hf wrote describes the other weights format and stays behind: `write_model_card` makes one).
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
  `nm_hf.format = "nm-compressed"`, `nm_hf.version` and `nm_hf.header`, a JSON object with n, m
  (1 <= n <= m <= 64), bits and, per tensor, its format ("nm" or "dense"), shape, dtype, group_dim
  (the dimension the groups run along, stored per tensor) and the sha256 of its dense bytes
  (row-major, as the loader rebuilds them), so a corrupted or mismatched file is an error, never a
  wrong model. The header is checked before anything is allocated from it: the pattern, every shape
  and every stored tensor's size must agree.

For 2:4 fp16 weights a group of four (64 dense bits) costs two fp16 values and 3 position bits:
35/64 = 0.547 of the dense bytes (a 1-bit-per-weight bitmask would give 0.5625).

Which n positions a group keeps: its non-zero entries (numerically: -0.0 counts as zero); a group
with fewer than n non-zeros (a kept weight that is exactly 0) also keeps its lowest-index zeros.
Every stored value round-trips bit-exactly; the one thing not stored is the sign of the pruned
zeros, which come back as +0.0 (`-0.0 == 0.0`, so `torch.equal` holds and outputs are identical).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .._files import atomic_directory, atomic_write_json
from ..injection import ignored_layers, is_sparsified, iter_sparse_layers, model_group_dims, unwrap_model
from ..methods import UnknownMethodError, get_method
from ..record import (
    CONFIG_KEY,
    is_compressed,
    record_parameters,
    record_weight_keys,
    require_record,
    training_state_hint,
    with_compressed_marker,
    without_compressed_marker,
    write_record,
)
from .codec import (
    HeaderEntry,
    check_entry,
    check_header,
    compress_tensor,
    decompress_tensor,
    dtype_name,
    position_bits,
    tensor_sha256,
)
from .directory import (
    COMPRESSED_NAME,
    CONFIG_NAME,
    DENSE_NAME,
    CheckpointError,
    checkpoint_dir,
    checkpoint_group_dims,
    copy_extra_files,
    file_inside,
    first_few,
    open_safetensors,
    read_config,
    read_dense_tensors,
    read_json,
    refuse_overlap,
    stale_card,
)
from .layout import record_layout, resolve_model_class

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "VALUES_SUFFIX",
    "POSITIONS_SUFFIX",
    "record_masks_forward",
    "finalized_record",
    "compress_state_dict",
    "write_compressed",
    "write_decompressed",
    "save_compressed",
    "write_compressed_model",
    "write_dense_model",
    "compress_checkpoint",
    "decompress_checkpoint",
    "read_header",
    "compressed_file",
    "stored_nm_bytes",
    "compressed_pattern",
    "check_compressed_record",
    "iter_compressed_tensors",
    "load_compressed_state_dict",
    "load_compressed",
    "resolve_model_class",
    "build_model",
]

FORMAT = "nm-compressed"
FORMAT_VERSION = 1
WEIGHTS_NAME = COMPRESSED_NAME
VALUES_SUFFIX = ".nm_values"
POSITIONS_SUFFIX = ".nm_positions"
META_FORMAT = "nm_hf.format"
META_VERSION = "nm_hf.version"
META_HEADER = "nm_hf.header"
#: safetensors dtype names of the position stream
_POSITIONS_DTYPE = "U8"


def _progress(iterable: Any, total: int, desc: str) -> Any:
    """A progress bar on a terminal only (`disable=None`): in a log file its `\\r` redraws garble the lines."""
    return tqdm(iterable, total=total, desc=desc, unit=" tensors", leave=False, disable=None)


def record_masks_forward(record: dict[str, Any]) -> bool:
    """Whether the record's method masks the forward pass (its saved weights are N:M); unknown methods do."""
    try:
        return get_method(str(record.get("method", "sr-ste"))).masks_forward
    except UnknownMethodError:
        return True


# ----------------------------------------------------------------------------- writing


def finalized_record(model: nn.Module) -> tuple[dict[str, Any], dict[str, int]]:
    """(record, group dims) of a finalized model, ready to save; refuses models still training.

    The group dims come from the layer-kind registry (the live model is the authority) and are
    written into the record; `ignored_modules` is completed for records that lack it.
    """
    inner = unwrap_model(model)
    record = require_record(inner, error=CheckpointError)
    if is_sparsified(inner):
        first = next(iter_sparse_layers(inner))[0]
        raise CheckpointError(f"{type(inner).__name__} still has live sparse layers (e.g. {first!r}); call "
                              "nm_hf.finalize(model) first so the saved weights are the N:M ones")
    targets = list(record["targeted_modules"])
    try:
        dims = model_group_dims(inner, targets)
    except ValueError as err:
        raise CheckpointError(f"{type(inner).__name__}: the sparsity record does not fit the model: {err}") from None
    record = {**record, "group_dims": dims}
    if not isinstance(record.get("ignored_modules"), list):
        record["ignored_modules"] = ignored_layers(inner, targets)
    return record, dims


def compress_state_dict(tensors: dict[str, torch.Tensor], record: dict[str, Any], group_dims: dict[str, int],
                        where: str, layout: dict[str, dict[str, int | None]] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors to store, header) for a dense state dict whose targeted weights obey the record's pattern.

    `layout` (`nm_hf.checkpoint.layout.record_layout`) says under which keys and along which
    dimension each target lies in `tensors`; by default every target under its own state-dict key.
    """
    n, m = int(record["n"]), int(record["m"])
    if not record_masks_forward(record):
        raise CheckpointError(f"{where}: the model was trained with method={record.get('method')!r} (no N:M "
                              "mask), so its weights are not N:M sparse and cannot be stored compressed")
    layout = layout if layout is not None else record_layout(record, group_dims, set(tensors))
    missing = [key for name, key in record_weight_keys(record).items() if not layout.get(name)]
    if missing:
        raise CheckpointError(f"{where}: targeted weights missing from the checkpoint: {first_few(missing)}")
    targeted = {key: dim for keys in layout.values() for key, dim in keys.items()}
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}  # key -> why it cannot be stored N:M
    for key, tensor in _progress(tensors.items(), len(tensors), "Compressing"):
        if key in targeted:
            if targeted[key] is None:
                problems[key] = (f"{key}: saved in a layout whose rows do not hold whole groups of {m} "
                                 "(the model's save conversion mixes them)")
                continue
            try:
                values, packed, entry = compress_tensor(tensor, n, m, targeted[key], name=key)
            except ValueError as err:
                problems[key] = str(err)
                continue
            out[key + VALUES_SUFFIX], out[key + POSITIONS_SUFFIX] = values, packed
            entries[key] = entry
        else:
            out[key] = tensor.contiguous()
            entries[key] = {"format": "dense", "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
                            "sha256": tensor_sha256(tensor)}
    if problems:
        # the first line is the whole story (what `nm-hf compress` prints): how many, the first few names
        bad = list(problems)
        shown = first_few(bad)
        hint = training_state_hint(record)
        hint = f"; {hint}" if hint else ""
        raise CheckpointError(f"{where}: cannot compress, {len(bad)} of {len(targeted)} targeted weights do not "
                              f"obey the {n}:{m} pattern: {shown}{hint}\n  - " + "\n  - ".join(problems.values()))
    header = {"version": FORMAT_VERSION, "n": n, "m": m, "bits": position_bits(n, m), "tensors": entries}
    return out, header


def _marker() -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "file": WEIGHTS_NAME}


def write_compressed(src: Path, stage: Path, config: dict[str, Any], record: dict[str, Any],
                     group_dims: dict[str, int], model: nn.Module | None = None, skip: Iterable[str] = ()) -> None:
    """Write the compressed form of the normal checkpoint in `src` into the (staging) directory `stage`.

    Targets saved in another layout than in memory (per-expert matrices of fused experts) are found
    with `model` (the live model that was saved) or else a meta skeleton of `src`'s config.json.
    """
    tensors = read_dense_tensors(src)
    layout = record_layout(record, group_dims, set(tensors), model=model, directory=src)
    out, header = compress_state_dict(tensors, record, group_dims, str(src), layout)
    metadata = {"format": "pt", META_FORMAT: FORMAT, META_VERSION: str(FORMAT_VERSION),
                META_HEADER: json.dumps(header, sort_keys=True)}
    save_file(out, str(stage / WEIGHTS_NAME), metadata=metadata)
    copy_extra_files(src, stage, skip)
    saved = with_compressed_marker({**record, "group_dims": dict(group_dims)}, _marker())
    atomic_write_json(stage / CONFIG_NAME, {**config, CONFIG_KEY: saved}, sort_keys=True)


def write_decompressed(src: Path, stage: Path, config: dict[str, Any], record: dict[str, Any],
                       skip: Iterable[str] = ()) -> None:
    """Write a normal transformers checkpoint of the compressed checkpoint `src` into `stage`."""
    check_compressed_record(src, record)  # else the dense copy would carry a record that lies about its weights
    state_dict = load_compressed_state_dict(src)
    save_file(state_dict, str(stage / DENSE_NAME), metadata={"format": "pt"})
    copy_extra_files(src, stage, skip)
    atomic_write_json(stage / CONFIG_NAME, {**config, CONFIG_KEY: without_compressed_marker(record)},
                      sort_keys=True)


def compress_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                        group_dims: dict[str, int] | None = None) -> Path:
    """Write the compressed form of the saved (finalized) checkpoint `src` to the new directory `dst`.

    Everything is read and checked before `dst` appears (staging directory + rename); `dst` may not
    be `src` or contain it.
    """
    src = checkpoint_dir(src)
    config, record = read_config(src)
    if is_compressed(record):
        raise CheckpointError(f"{src} is already compressed")
    refuse_overlap(src, dst)
    group_dims = group_dims or checkpoint_group_dims(src, record, config)
    with atomic_directory(dst, overwrite) as stage:
        write_compressed(src, stage, config, record, group_dims, skip=stale_card(src))
    return Path(dst)


def decompress_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a normal transformers checkpoint (model.safetensors + config.json) from a compressed one."""
    src = checkpoint_dir(src)
    config, record = read_config(src)
    if not is_compressed(record):
        raise CheckpointError(f"{src} is not compressed (no 'compressed' marker in its '{CONFIG_KEY}' record)")
    refuse_overlap(src, dst)
    with atomic_directory(dst, overwrite) as stage:
        write_decompressed(src, stage, config, record, skip=stale_card(src))
    return Path(dst)


def save_compressed(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a finalized sparse model in the compressed format (see the module docstring).

    The model goes through its own `save_pretrained` into a staging directory (so transformers
    decides which tensors are saved and under which names), its targeted weights are compressed,
    and the staging directory is renamed to `save_directory`: an interrupted save leaves nothing.
    """
    record, group_dims = finalized_record(model)
    with atomic_directory(save_directory, overwrite) as stage:
        write_compressed_model(model, stage, record, group_dims)
    return Path(save_directory)


def write_compressed_model(model: nn.Module, stage: Path, record: dict[str, Any], group_dims: dict[str, int]) -> None:
    """Write a finalized model's compressed checkpoint into the (staging) directory `stage`.

    `record` and `group_dims` come from `finalized_record(model)`.
    """
    dense = stage / ".dense"
    unwrap_model(model).save_pretrained(dense)
    config = read_json(dense / CONFIG_NAME, "the model config")
    write_compressed(dense, stage, config, record, group_dims, model=unwrap_model(model))
    shutil.rmtree(dense)


def write_dense_model(model: nn.Module, stage: Path, record: dict[str, Any]) -> None:
    """`save_pretrained` of a finalized model into `stage`, config.json carrying the completed `record`."""
    unwrap_model(model).save_pretrained(stage)
    config = read_json(stage / CONFIG_NAME, "the model config")
    atomic_write_json(stage / CONFIG_NAME, {**config, CONFIG_KEY: record}, sort_keys=True)


# ----------------------------------------------------------------------------- reading


def compressed_file(path: str | os.PathLike) -> Path:
    """The compressed weights file of a directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = file_inside(path, WEIGHTS_NAME, "weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected an nm_hf compressed checkpoint)")
    return path


def stored_nm_bytes(path: str | os.PathLike) -> int:
    """Bytes of the kept values and position codes in a compressed checkpoint (what the N:M weights cost stored;
    the dense tensors beside them are not counted)."""
    stored = 0
    with open_safetensors(compressed_file(path)) as handle:
        for key in handle.keys():
            if key.endswith((VALUES_SUFFIX, POSITIONS_SUFFIX)):
                tensor = handle.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
    return stored


def read_header(path: Path, handle: Any) -> tuple[int, int, int, dict[str, HeaderEntry]]:
    """(n, m, bits, entries) of an open compressed file, every entry checked against the stored tensors.

    Nothing is allocated from the header's claims: shapes must agree with the stored tensors' sizes
    (kept values = numel * n / m, position bytes = ceil(groups * bits / 8)) before any tensor is read.
    """
    metadata = handle.metadata() or {}
    if metadata.get(META_FORMAT) != FORMAT:
        raise CheckpointError(f"{path} is not an nm_hf compressed checkpoint (no '{META_FORMAT}' metadata)")
    if metadata.get(META_VERSION) != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: compressed format version {metadata.get(META_VERSION)!r} is not "
                              f"supported (this nm_hf reads version {FORMAT_VERSION})")
    try:
        n, m, bits, raw = check_header(json.loads(metadata[META_HEADER]))
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: the '{META_HEADER}' metadata is missing or malformed ({err!r})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    stored = set(handle.keys())
    expected: set[str] = set()
    for key, entry in raw.items():
        fmt = entry.get("format") if isinstance(entry, dict) else None
        expected |= {key + VALUES_SUFFIX, key + POSITIONS_SUFFIX} if fmt == "nm" else {key}
    if stored != expected:
        extra, missing = sorted(stored - expected), sorted(expected - stored)
        raise CheckpointError(f"{path}: tensors do not match the header (missing: {missing[:5]}, "
                              f"unexpected: {extra[:5]})")
    entries: dict[str, HeaderEntry] = {}
    for key, raw_entry in raw.items():
        try:
            entry = check_entry(key, raw_entry, m)
            if entry.format == "nm":
                groups = entry.numel // m
                values = handle.get_slice(key + VALUES_SUFFIX)
                positions = handle.get_slice(key + POSITIONS_SUFFIX)
                if list(values.get_shape()) != [groups * n]:
                    raise ValueError(f"expected {groups * n} kept values for shape {list(entry.shape)} at "
                                     f"{n}:{m}, the file holds shape {values.get_shape()}")
                if positions.get_dtype() != _POSITIONS_DTYPE or \
                        list(positions.get_shape()) != [(groups * bits + 7) // 8]:
                    raise ValueError(f"expected {(groups * bits + 7) // 8} packed uint8 bytes for {groups} "
                                     f"groups of {bits} bits, the file holds {positions.get_dtype()} "
                                     f"{positions.get_shape()}")
            elif list(handle.get_slice(key).get_shape()) != list(entry.shape):
                raise ValueError(f"stored shape {handle.get_slice(key).get_shape()}, header says "
                                 f"{list(entry.shape)}")
        except ValueError as err:
            message = str(err)
            prefix = "" if message.startswith("tensor ") else f"tensor {key!r} is corrupted or inconsistent: "
            raise CheckpointError(f"{path}: {prefix}{message}") from None
        entries[key] = entry
    return n, m, bits, entries


def iter_compressed_tensors(path: str | os.PathLike, keys: list[str] | None = None
                            ) -> Iterator[tuple[str, torch.Tensor, HeaderEntry]]:
    """(name, dense tensor, header entry) for every tensor of a compressed file (or `keys`), verified."""
    path = compressed_file(path)
    with open_safetensors(path) as handle:
        n, m, _, entries = read_header(path, handle)
        unknown = [k for k in keys or [] if k not in entries]
        if unknown:
            raise CheckpointError(f"{path}: no tensor {unknown[0]!r} in the file")
        for key in keys if keys is not None else list(entries):
            entry = entries[key]
            try:
                if entry.format == "nm":
                    values = handle.get_tensor(key + VALUES_SUFFIX)
                    if values.dtype != entry.dtype:
                        raise ValueError(f"values are {values.dtype}, header says {entry.dtype}")
                    tensor = decompress_tensor(values, handle.get_tensor(key + POSITIONS_SUFFIX), n, m,
                                               entry.shape, entry.group_dim, name=key)
                else:
                    tensor = handle.get_tensor(key)
                    if tensor.dtype != entry.dtype:
                        raise ValueError(f"stored {tensor.dtype} {list(tensor.shape)}, header says "
                                         f"{entry.dtype} {list(entry.shape)}")
            except SafetensorError as err:
                raise CheckpointError(f"{path}: cannot read tensor {key!r}: {err}") from err
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
                raise CheckpointError(f"{path}: tensor {key!r} is corrupted or inconsistent: {err}") from err
            if tensor_sha256(tensor) != entry.sha256:
                raise CheckpointError(f"{path}: checksum mismatch for tensor {key!r}: the file is corrupted")
            yield key, tensor, entry


def compressed_pattern(path: str | os.PathLike) -> tuple[int, int]:
    """(n, m) of a compressed file, read from its checked header."""
    path = compressed_file(path)
    with open_safetensors(path) as handle:
        n, m, _, _ = read_header(path, handle)
    return n, m


def check_compressed_record(directory: Path, record: dict[str, Any]) -> None:
    """Refuse a compressed directory whose config.json record does not describe its file: another N:M pattern,
    or a targeted layer whose `<name>.weight` the file does not store N:M. (Expert Parameters are not checked
    here: save_pretrained may write them as per-expert matrices under other names.)"""
    path = compressed_file(directory)
    with open_safetensors(path) as handle:
        n, m, _, entries = read_header(path, handle)
    if (n, m) != (int(record["n"]), int(record["m"])):
        raise CheckpointError(f"{directory}: weights are {n}:{m} but config.json says {record['n']}:{record['m']}")
    stored = {key for key, entry in entries.items() if entry.group_dim is not None}
    parameters = record_parameters(record)
    for name, key in record_weight_keys(record).items():
        if key not in stored and name not in parameters:
            how = "stores it dense" if key in entries else "has no such weight"
            raise CheckpointError(f"{directory}: the record targets {key!r} but the compressed file {how}: "
                                  "config.json does not match the weights")


def load_compressed_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dense state dict (the tensors a normal checkpoint would hold) of a compressed file or directory.

    Every tensor is checked against the shapes, dtypes and sha256 sums in the header.
    """
    path = compressed_file(path)
    with open_safetensors(path) as handle:
        total = len(read_header(path, handle)[3])
    return {key: tensor for key, tensor, _ in _progress(iter_compressed_tensors(path), total, "Decompressing")}


# ----------------------------------------------------------------------------- building the model


def build_model(cls: Any, config: Any, state_dict: dict[str, torch.Tensor], where: str | os.PathLike,
                **from_pretrained_kwargs: Any) -> nn.Module:
    """`cls` built from `config` with the weights of `state_dict`; an Auto class builds its concrete class.

    Every weight of the model must be in `state_dict` with the right shape. Extra tensors are an
    error for the class config.json names; for another class (a base model, an Auto fallback) they
    are the parts it does not have (e.g. the head) and are left out with a warning.
    """
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        # an Auto class: find the concrete class it builds for this config on the meta device (no memory)
        try:
            with torch.device("meta"):
                cls = type(cls.from_config(copy.deepcopy(config)))
        except (ValueError, KeyError, AttributeError) as err:
            name = getattr(cls, "__name__", repr(cls))
            raise CheckpointError(f"{where}: {name} cannot build a model from config.json: {err}") from None
    from_pretrained_kwargs.pop("output_loading_info", None)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                          **from_pretrained_kwargs)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{where}: the weights do not fit {cls.__name__} built from config.json: "
                              f"{err}") from err
    native = cls.__name__ in (getattr(config, "architectures", None) or [])
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v
                and (native or k != "unexpected_keys")}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{where}: the weights do not match {cls.__name__} built from config.json: "
                              f"{problems or info['error_msgs']}")
    if info.get("unexpected_keys"):
        left = sorted(info["unexpected_keys"])
        warnings.warn(f"{where}: {cls.__name__} has no place for {len(left)} stored tensors (e.g. {left[0]!r}); "
                      "they were left out", UserWarning, stacklevel=3)
    return model


def load_compressed(path: str | os.PathLike, model_class: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Rebuild the model of a compressed directory from its config.json and verified weights.

    `model_class` defaults to the class named in config.json's `architectures` (else AutoModel);
    Auto classes (`AutoModelForCausalLM`, ...) work too. The returned model has plain layers (as after
    `finalize`); `nm_hf.load_sparse` re-patches them.
    """
    from transformers import AutoConfig, GenerationConfig

    directory = checkpoint_dir(path)
    _, record = read_config(directory)
    if not is_compressed(record):
        raise CheckpointError(f"{directory} is not compressed (no 'compressed' marker in its '{CONFIG_KEY}' "
                              "record); load it with from_pretrained or nm_hf.load_sparse")
    check_compressed_record(directory, record)
    config = AutoConfig.from_pretrained(directory)
    state_dict = load_compressed_state_dict(directory)
    model = build_model(resolve_model_class(config, model_class), config, state_dict, directory,
                        **from_pretrained_kwargs)
    write_record(model, without_compressed_marker(require_record(model, where=directory, error=CheckpointError)))
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
