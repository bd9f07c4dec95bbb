"""Reload saved sparse models for more training (`load_sparse`) and publish them (`push_to_hub`).

A finalized model saved with `save_pretrained` is a plain transformers checkpoint whose config.json
carries the `nm_sparsity` record (pattern, method, targeted layers, measured sparsity).
`load_sparse` loads it with transformers, checks that the stored weights obey the stored pattern
and re-patches the recorded layers with `sparsify`, so SR-STE training can go on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compressed import (
    RECORD_KEYS,
    CheckpointError,
    _checkpoint_dir,
    _copy_extra_files,
    _dense_weight_files,
    _model_class,
    _read_json,
    _write_json_atomic,
    atomic_directory,
    compress_checkpoint,
    decompress_checkpoint,
    is_compressed,
    load_compressed,
    read_config,
    save_compressed,
)
from .config import SparsityConfig
from .injection import ignored_layers, is_sparsified, iter_sparse_layers, sparsify
from .injection import model_group_dims as layer_group_dims
from .masks import nm_group_counts
from .record import CONFIG_KEY

__all__ = ["load_sparse", "restore_sparsity", "push_to_hub", "prepare_upload", "sparsity_record",
           "model_group_dims"]

#: from_pretrained keyword arguments that also apply to fetching config.json / files from the Hub
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
              "trust_remote_code", "proxies")


def model_group_dims(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Dimension of each named layer's weight that holds its input features (1: nn.Linear, 0: Conv1D)."""
    modules = dict(model.named_modules())
    dims: dict[str, int] = {}
    for name in names:
        module = modules.get(name)
        if isinstance(module, Conv1D):
            dims[name] = 0
        elif isinstance(module, nn.Linear):
            dims[name] = 1
        else:
            kind = type(module).__name__ if module is not None else "missing"
            raise CheckpointError(f"layer {name!r} from the sparsity record is {kind} in "
                                  f"{type(model).__name__}, not an nn.Linear/Conv1D")
    return dims


def sparsity_record(model: nn.Module, *, require_finalized: bool = True) -> dict[str, Any]:
    """The model's `nm_sparsity` record, completed with `conv1d_modules` and `ignored_modules`.

    `ignored_modules`: linear layers left dense; `conv1d_modules`: targeted layers stored [in, out]
    (GPT-2 Conv1D, N:M groups along dim 0). Both are computed from the model when the record lacks
    them. With `require_finalized`, a model that still has live sparse layers is refused: its
    weights are the dense training weights, not the N:M ones.
    """
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(record, dict):
        raise CheckpointError(f"{type(model).__name__} has no '{CONFIG_KEY}' record in its config: "
                              "sparsify it (nm_hf.sparsify), train, then nm_hf.finalize(model)")
    if require_finalized and is_sparsified(model):
        first = next(iter_sparse_layers(model))[0]
        raise CheckpointError(f"{type(model).__name__} still has live sparse layers (e.g. {first!r}); call "
                              "nm_hf.finalize(model) first so the saved weights are the N:M ones")
    targets = record.get("targeted_modules", [])
    return {"ignored_modules": ignored_layers(model, targets), "group_dims": layer_group_dims(model, targets),
            **record}


def _resolve_names(model: nn.Module, names: list[str], where: str) -> list[str]:
    """Map recorded layer names onto `model`, allowing for a base-model prefix added or dropped."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved, missing = [], []
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        hit = next((c for c in candidates if c in modules), None)
        if hit is None:
            missing.append(name)
        else:
            resolved.append(hit)
    if missing:
        archs = getattr(getattr(model, "config", None), "architectures", None)
        raise CheckpointError(f"{where}: {len(missing)} layers of the sparsity record are not in "
                              f"{type(model).__name__} (e.g. {missing[0]!r}); load it with the class it was "
                              f"saved from ({', '.join(archs or ['see config.json architectures'])})")
    return resolved


@torch.no_grad()
def _pattern_problems(model: nn.Module, names: list[str], n: int, m: int) -> list[str]:
    modules = dict(model.named_modules())
    dims = model_group_dims(model, names)
    problems = []
    for name in names:
        weight, dim = modules[name].weight, dims[name]
        if weight.shape[dim] % m:
            problems.append(f"layer {name!r}: {weight.shape[dim]} input features are not divisible by m={m}")
            continue
        counts = nm_group_counts(weight.detach(), m, dim=dim)
        bad = int((counts > n).sum())
        if bad:
            problems.append(f"layer {name!r}: {bad} of {counts.numel()} groups of {m} have more than {n} "
                            f"non-zero weights (up to {int(counts.max())})")
    return problems


def restore_sparsity(model: nn.Module, *, where: str | None = None) -> nn.Module:
    """Re-patch the layers named in `model.config.nm_sparsity` (a plainly loaded sparse model), in place.

    The stored weights must obey the stored pattern (checked for every layer before anything is
    patched). Afterwards every layer's `current_mask()` keeps all non-zero weights; a group with fewer
    than n non-zeros (a kept weight that is exactly 0) also keeps its lowest-index zeros, which is
    what `nm_mask`'s tie rule gives: the forward pass is unchanged and SR-STE may grow them again.
    """
    where = where or type(model).__name__
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: config.json has no '{CONFIG_KEY}' record: the model was not saved by "
                              "nm_hf (nm_hf.sparsify, train, nm_hf.finalize, then save_pretrained)")
    for key in ("n", "m", "targeted_modules"):
        if key not in record:
            raise CheckpointError(f"{where}: the '{CONFIG_KEY}' record has no {key!r}")
    if is_sparsified(model):
        raise CheckpointError(f"{where}: {type(model).__name__} already has sparse layers")
    n, m = int(record["n"]), int(record["m"])
    names = _resolve_names(model, list(record["targeted_modules"]), where)
    if record.get("method") != "dense":
        problems = _pattern_problems(model, names, n, m)
        if problems:
            hint = ("\nThe record says state='training': this checkpoint holds the dense training weights "
                    "(saved before nm_hf.finalize), which only the training run itself can resume."
                    if record.get("state") == "training" else "")
            raise CheckpointError(f"{where}: the stored weights do not obey the stored {n}:{m} pattern "
                                  f"(nothing was patched):\n  - " + "\n  - ".join(problems) + hint)
    settings = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    settings.update(target_modules=names, exclude_modules=None)
    sparsify(model, SparsityConfig.from_dict(settings))
    new_record = getattr(model.config, CONFIG_KEY)
    # keep the selectors the user trained with; targeted_modules holds the resolved names
    new_record["target_modules"] = record.get("target_modules", new_record["target_modules"])
    new_record["exclude_modules"] = record.get("exclude_modules")
    for name, layer in iter_sparse_layers(model):
        if not layer.is_masked:
            continue
        dropped = int(((layer.weight.detach() != 0) & ~layer.current_mask()).sum())
        if dropped:  # cannot happen for weights that passed the check above; never train on a wrong mask
            raise RuntimeError(f"{where}: the re-computed mask of {name!r} drops {dropped} non-zero weights")
    return model


def _local_snapshot(path_or_model_id: str, hub_kwargs: dict[str, Any]) -> Path:
    """The local directory of a compressed checkpoint, downloading its files from the Hub if needed."""
    if Path(path_or_model_id).is_dir():
        return Path(path_or_model_id) / hub_kwargs.get("subfolder", "")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from .compressed import WEIGHTS_NAME

    kwargs = {k: hub_kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                         "subfolder") if k in hub_kwargs}
    local = Path(hf_hub_download(path_or_model_id, WEIGHTS_NAME, **kwargs)).parent
    hf_hub_download(path_or_model_id, "config.json", **kwargs)
    try:
        hf_hub_download(path_or_model_id, "generation_config.json", **kwargs)
    except EntryNotFoundError:
        pass
    return local


def load_sparse(path_or_model_id: str | os.PathLike, model_class: Any = None, **from_pretrained_kwargs: Any
                ) -> nn.Module:
    """Load a sparse model saved by nm_hf (normal or compressed, local or on the Hub), ready to train on.

    `model_class` defaults to the class in config.json's `architectures` (AutoModel if unknown);
    keyword arguments go to `from_pretrained`. The layers in the record are re-patched with
    `sparsify` (see `restore_sparsity`). Raises `CheckpointError` when config.json has no
    nm_sparsity record or the weights break the stored N:M pattern (naming the layers).
    Do not pass `device_map`: accelerate's dispatch hooks stop `sparsify`; move the model with `.to()`.
    """
    from transformers import AutoConfig

    source = os.fspath(path_or_model_id)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    config = AutoConfig.from_pretrained(source, **hub_kwargs)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict):
        raise CheckpointError(f"{source}: config.json has no '{CONFIG_KEY}' record: the model was not saved by "
                              "nm_hf (nm_hf.sparsify, train, nm_hf.finalize, then save_pretrained)")
    if is_compressed(record):
        local = _local_snapshot(source, hub_kwargs)
        rest = {k: v for k, v in from_pretrained_kwargs.items() if k not in HUB_KWARGS}
        model = load_compressed(local, model_class, **rest)
    else:
        model = _model_class(config, model_class).from_pretrained(source, **from_pretrained_kwargs)
    return restore_sparsity(model, where=source)


# ----------------------------------------------------------------------------- publishing


def _copy_checkpoint(src: Path, dst: Path) -> None:
    for path in _dense_weight_files(src):
        shutil.copy2(path, dst / path.name)
    index = src / "model.safetensors.index.json"
    if index.exists():
        shutil.copy2(index, dst / index.name)
    shutil.copy2(src / "config.json", dst / "config.json")
    _copy_extra_files(src, dst)


def prepare_upload(
    model_or_dir: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    compressed: bool = False,
    results: dict | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    model_card: bool = True,
    dataset_name: str | None = None,
    task: str | None = None,
    command: str | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Build the folder `push_to_hub` uploads: weights (normal or compressed), tokenizer, results, card.

    From a model: it must be finalized. From a directory: its weights, config, tokenizer files, plot,
    results and history are taken (optimizer/scheduler state and sub-folders are left out) and
    converted to the requested format.
    """
    out = Path(out_dir)
    model = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        src = _checkpoint_dir(model_or_dir)
        _, record = read_config(src)
        if compressed and not is_compressed(record):
            compress_checkpoint(src, out)
        elif not compressed and is_compressed(record):
            decompress_checkpoint(src, out)
        else:
            with atomic_directory(out) as stage:
                _copy_checkpoint(src, stage)
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        record = sparsity_record(model)
        if compressed:
            save_compressed(model, out)
        else:
            with atomic_directory(out) as stage:
                model.save_pretrained(stage)
                config = _read_json(stage / "config.json", "the model config")
                _write_json_atomic(stage / "config.json", {**config, CONFIG_KEY: record})
    else:
        raise TypeError(f"model_or_dir must be a model or a directory, got {type(model_or_dir).__name__}")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for path in extra_files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"extra file {path} does not exist")
        shutil.copy2(path, out / path.name)
    if results:
        merged = {}
        if (out / "results.json").exists():
            merged = _read_json(out / "results.json", "results")
        merged.update(results)
        _write_json_atomic(out / "results.json", merged)
    if model_card:
        from .card import write_model_card

        write_model_card(out, model=model, results=results, dataset_name=dataset_name, task=task,
                         command=command, base_model=base_model, repo_id=repo_id)
    return out


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool = False,
    compressed: bool = False,
    commit_message: str | None = None,
    results: dict | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    model_card: bool = True,
    dataset_name: str | None = None,
    task: str | None = None,
    command: str | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> Any:
    """Upload a finalized sparse model (or a saved directory) with its tokenizer, card, plot and results.

    Everything is staged in a temporary folder first (`prepare_upload`), then sent in one commit with
    `HfApi(endpoint, token).create_repo(exist_ok=True)` + `upload_folder`. `compressed=True` uploads
    the compressed format (load it with `nm_hf.load_sparse`/`load_compressed`). Returns the
    `huggingface_hub.CommitInfo`. `endpoint` overrides HF_ENDPOINT (e.g. a private Hub).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="nm_hf_push_") as tmp:
        stage = prepare_upload(model_or_dir, Path(tmp) / "upload", tokenizer=tokenizer, compressed=compressed,
                               results=results, extra_files=extra_files, model_card=model_card,
                               dataset_name=dataset_name, task=task, command=command, base_model=base_model,
                               repo_id=repo_id)
        record = _read_json(stage / "config.json", "the model config")[CONFIG_KEY]
        message = commit_message or (f"Upload {record['n']}:{record['m']} sparse model with nm_hf"
                                     + (" (compressed)" if compressed else ""))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model",
                                 commit_message=message, revision=revision, create_pr=create_pr)
