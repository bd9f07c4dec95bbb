"""Reading a saved checkpoint directory: config.json, dense weight files, the safetensors index, extra files.

Every file taken from a directory must resolve inside it: an index entry naming `../x` or an
absolute path, or a symlink pointing out of the directory, is refused with an error naming the
entry (a checkpoint is often uploaded or compressed afterwards, and must never pull in a file from
elsewhere). The one exception is a Hugging Face cache snapshot (`.../snapshots/<rev>/`, or a
subfolder of one), whose files are symlinks into the repository's own `blobs/` folder.

Files that describe training rather than the model (optimizer, scheduler and scaler state,
`training_args.bin`, RNG states, `trainer_state.json`, tracker state) are never copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..record import RecordError, record_group_dims, require_record

__all__ = [
    "CheckpointError",
    "first_few",
    "CONFIG_NAME",
    "DENSE_NAME",
    "DENSE_INDEX",
    "COMPRESSED_NAME",
    "TENSORBOARD_DIR",
    "checkpoint_dir",
    "dense_weight_files_and_index",
    "read_json",
    "read_config",
    "file_inside",
    "dense_weight_files",
    "open_safetensors",
    "read_dense_tensors",
    "is_training_state",
    "is_nm_hf_card",
    "stale_card",
    "checkpoint_group_dims",
    "CARD_NAME",
    "extra_files",
    "copy_extra_files",
    "refuse_overlap",
]

CONFIG_NAME = "config.json"
DENSE_NAME = "model.safetensors"
DENSE_INDEX = "model.safetensors.index.json"
#: the weights file of a compressed checkpoint (`nm_hf.checkpoint.compressed`)
COMPRESSED_NAME = "nm_compressed.safetensors"
#: the model card
CARD_NAME = "README.md"
#: the Trainer's TensorBoard logs (`output_dir/runs/<date>_<host>/events.out.tfevents.*`); the Hub
#: shows them in a "Training metrics" tab, so they travel with the model
TENSORBOARD_DIR = "runs"

#: training state: never part of a published or converted checkpoint
_TRAINING_FILES = frozenset({"optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin", "scaler.pt",
                             "training_args.bin", "trainer_state.json", "sparsity_tracker.pt"})
_TRAINING_PREFIXES = ("rng_state", "random_states", "optimizer", "scheduler", "pytorch_model_fsdp")
_TRAINING_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
#: weight files: the converters write their own
_WEIGHT_PREFIXES = ("pytorch_model", "model.safetensors", "model-", "tf_model", "flax_model")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or inconsistent with its config; nothing was loaded or written."""


def first_few(names: Sequence[str], limit: int = 5) -> str:
    """The first `limit` names and how many more, for a one-line error or summary."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path, checked to be an existing directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a saved model directory)")
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file otherwise."""
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


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json as a dict, its checked nm_sparsity record) of a checkpoint directory."""
    directory = checkpoint_dir(path)
    config = read_json(file_inside(directory, CONFIG_NAME, "the model config"), "the model config")
    record = require_record(config, where=directory / CONFIG_NAME, error=CheckpointError)
    return config, record


def checkpoint_group_dims(directory: Path, record: dict[str, Any], config: dict[str, Any]) -> dict[str, int]:
    """`record_group_dims` of a checkpoint's record; a malformed record is a CheckpointError naming its config.json."""
    try:
        return record_group_dims(record, config)
    except RecordError as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None


def _allowed_roots(directory: Path) -> list[Path]:
    root = directory.resolve()
    roots = [root]
    # a Hugging Face cache snapshot (`snapshots/<rev>/`, or a `subfolder=` inside one): files link to
    # the repository's `blobs/`
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            roots.append(folder.parent.parent / "blobs")
            break
    return roots


def file_inside(directory: Path, name: str | os.PathLike, what: str = "file") -> Path:
    """`directory / name`, refused unless `name` is relative, has no `..` and resolves inside `directory`.

    A missing file is returned as is (the caller reports it); symlinks are followed for the check.
    """
    relative = Path(name)
    if not str(name) or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{directory}: {what} {str(name)!r} is not a path inside the directory; refusing it")
    path = directory / relative
    resolved = path.resolve()
    if not any(resolved == root or root in resolved.parents for root in _allowed_roots(directory)):
        kind = "a symlink to" if path.is_symlink() or any(p.is_symlink() for p in path.parents) else "resolves to"
        raise CheckpointError(f"{directory}: {what} {str(name)!r} is {kind} {resolved}, outside the directory; "
                              "refusing to read it (replace it with a copy of the file)")
    return path


def dense_weight_files_and_index(directory: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors files of a normal checkpoint (model.safetensors, else the shards its index lists), and the
    index's weight_map when the shards are what is read (None for model.safetensors).

    model.safetensors comes first, as in transformers' `from_pretrained`: an unsharded save into a folder
    that held a sharded one leaves the old index behind (its shards are deleted)."""
    index = directory / DENSE_INDEX
    weight_map = None
    if (directory / DENSE_NAME).exists():
        files = [file_inside(directory, DENSE_NAME, "weights file")]
    elif index.exists():
        weight_map = read_json(file_inside(directory, DENSE_INDEX, "index"), "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        names = sorted(set(map(str, weight_map.values())))
        files = [file_inside(directory, name, f"{DENSE_INDEX} entry") for name in names]
    else:
        found = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in (".bin", ".safetensors"))
        hint = f" (found {', '.join(found)})" if found else ""
        raise CheckpointError(f"{directory}: no {DENSE_NAME} or {DENSE_INDEX}{hint}")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{directory}: {path.name} is listed in {DENSE_INDEX} but missing")
    return files, weight_map


def dense_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a normal checkpoint (model.safetensors, else the shards its index lists)."""
    return dense_weight_files_and_index(directory)[0]


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open(path)`; a truncated or corrupted file is a CheckpointError naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as err:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({err}); truncated or corrupted?") from err


def read_dense_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a normal checkpoint, by state-dict key."""
    tensors: dict[str, torch.Tensor] = {}
    files, weight_map = dense_weight_files_and_index(directory)
    for path in files:
        with open_safetensors(path) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    if weight_map is not None:  # a shard that lost a tensor would give a checkpoint without it
        missing = [key for key in weight_map if key not in tensors]
        if missing:
            raise CheckpointError(f"{directory / DENSE_INDEX}: tensor {missing[0]!r} is listed in "
                                  f"{weight_map[missing[0]]} but no weight file holds it"
                                  + (f" ({len(missing)} such tensors)" if len(missing) > 1 else ""))
    return tensors


def is_training_state(name: str) -> bool:
    """True for files that describe training (optimizer, scheduler, RNG, trainer args), not the model."""
    return (name in _TRAINING_FILES or name.startswith(_TRAINING_PREFIXES)
            or name.endswith(_TRAINING_SUFFIXES))


def is_nm_hf_card(path: Path) -> bool:
    """Whether `path` is a model card `nm_hf.card.write_model_card` wrote (its metadata tags `nm_hf`):
    it describes one weights format, so a conversion to the other leaves it behind."""
    from huggingface_hub import metadata_load

    try:
        path = file_inside(path.parent, path.name, "model card")  # never read a file from elsewhere
        tags = (metadata_load(path) or {}).get("tags") if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):  # CheckpointError included: extra_files reports it
        return False
    return isinstance(tags, list) and "nm_hf" in tags and "nm-sparsity" in tags


def stale_card(src: Path) -> set[str]:
    """{README.md} when `src` holds a model card nm_hf wrote for its weights format (wrong after a conversion:
    its usage snippet and "weights format"), else nothing: a card written by hand travels unchanged."""
    return {CARD_NAME} if is_nm_hf_card(src / CARD_NAME) else set()


def extra_files(src: Path, skip: Iterable[str] = ()) -> list[str]:
    """Relative paths of the files that travel with a checkpoint: tokenizer, generation config, card,
    plot, results, history and the TensorBoard `runs/` folder; weights, index, config.json, training
    state, hidden files and other sub-folders stay behind. Each one is checked to resolve inside `src`.
    """
    skipped = {CONFIG_NAME, DENSE_INDEX, COMPRESSED_NAME, *skip}
    found: list[str] = []
    for path in sorted(src.iterdir()):
        name = path.name
        if name.startswith(".") or name in skipped:
            continue
        if path.is_dir() and not path.is_symlink():
            if name == TENSORBOARD_DIR:
                found += [str(p.relative_to(src)) for p in sorted(path.rglob("*"))
                          if not any(part.startswith(".") for part in p.relative_to(src).parts)
                          and (p.is_file() or p.is_symlink())]
            continue
        if is_training_state(name) or name.startswith(_WEIGHT_PREFIXES):
            continue
        if path.is_file() or path.is_symlink():
            found.append(name)
    for name in found:
        resolved = file_inside(src, name, "file")
        if not resolved.is_file():
            raise CheckpointError(f"{src}: {name!r} is a broken symlink or not a regular file; refusing it")
    return found


def copy_extra_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `extra_files(src)` into `dst` (file contents, never symlinks); returns the relative paths copied."""
    names = extra_files(src, skip)
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)
        shutil.copystat(src / name, target)
    return names


def refuse_overlap(src: Path, dst: str | os.PathLike, what: str = "the output") -> None:
    """Refuse an output directory that is the input or contains it (replacing it would delete the input)."""
    source, target = src.resolve(), Path(dst).resolve()
    if target == source or target in source.parents:
        raise CheckpointError(f"{dst}: {what} would replace the input {src} (it is the input directory or "
                              "contains it); choose another output directory")
