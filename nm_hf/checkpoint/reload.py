"""Reload saved sparse models for more training: `load_sparse` and `restore_sparsity`.

A finalized model saved with `save_pretrained` is a plain transformers checkpoint whose config.json
carries the `nm_sparsity` record. `load_sparse` loads it (normal or compressed, local or on the
Hub), checks that the stored weights obey the stored pattern and re-patches the recorded layers
with `sparsify`, so SR-STE training can go on.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..injection import IGNORED_DECAY_WARNING, is_sparsified, iter_sparse_layers, sparsify
from ..layers import iter_targets
from ..masks import nm_group_counts
from ..record import (
    STATE_TRAINING,
    config_from_record,
    is_compressed,
    read_record,
    require_record,
    write_record,
)
from .compressed import WEIGHTS_NAME, load_compressed, record_masks_forward, resolve_model_class
from .directory import CheckpointError, checkpoint_dir

__all__ = ["load_sparse", "restore_sparsity", "HUB_KWARGS", "looks_like_local_path"]

#: from_pretrained keyword arguments that also apply to fetching config.json / files from the Hub
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
              "trust_remote_code", "proxies")


def _resolve_names(model: nn.Module, names: list[str], where: str) -> list[str]:
    """Map recorded layer names onto `model`, allowing for a base-model prefix added or dropped."""
    modules = {**dict(model.named_modules()), **{target.name: target for target in iter_targets(model)}}
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
def _pattern_problems(model: nn.Module, names: list[str], n: int, m: int, where: str) -> list[str]:
    targets = {target.name: target for target in iter_targets(model)}
    problems = []
    for name in names:
        if name not in targets:
            raise CheckpointError(f"{where}: layer {name!r} of the sparsity record is a "
                                  f"{type(dict(model.named_modules()).get(name)).__name__}, not a layer kind nm_hf knows")
        dim = targets[name].group_dim
        weight = targets[name].weight
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
    record = require_record(model, where=where, error=CheckpointError)
    if is_sparsified(model):
        raise CheckpointError(f"{where}: {type(model).__name__} already has sparse layers")
    n, m = int(record["n"]), int(record["m"])
    names = _resolve_names(model, list(record["targeted_modules"]), where)
    try:
        config = config_from_record(record)
    except ValueError as err:
        raise CheckpointError(f"{where}: the 'nm_sparsity' record holds settings this nm_hf cannot use: {err}") from None
    if record_masks_forward(record):
        problems = _pattern_problems(model, names, n, m, where)
        if problems:
            hint = ("\nThe record says state='training': this checkpoint holds the dense training weights "
                    "(saved before nm_hf.finalize), which only the training run itself can resume."
                    if record.get("state") == STATE_TRAINING else "")
            raise CheckpointError(f"{where}: the stored weights do not obey the stored {n}:{m} pattern "
                                  f"(nothing was patched):\n  - " + "\n  - ".join(problems) + hint)
    with warnings.catch_warnings():  # the run that saved this record was told about an ignored decay already
        warnings.filterwarnings("ignore", message=re.escape(IGNORED_DECAY_WARNING), category=UserWarning)
        sparsify(model, dataclasses.replace(config, target_modules=tuple(names), exclude_modules=None))
    # keep the selectors the user trained with; targeted_modules holds the resolved names
    new_record = dict(read_record(model) or {})
    new_record["target_modules"] = record.get("target_modules", new_record.get("target_modules"))
    new_record["exclude_modules"] = record.get("exclude_modules")
    write_record(model, new_record)
    for name, layer in iter_sparse_layers(model):
        if not layer.is_masked:
            continue
        dropped = int(((layer.weight.detach() != 0) & ~layer.current_mask()).sum())
        if dropped:  # cannot happen for weights that passed the check above; never train on a wrong mask
            raise RuntimeError(f"{where}: the re-computed mask of {name!r} drops {dropped} non-zero weights")
    return model


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """True when `source` is meant as a local directory rather than a Hub id ("name" or "namespace/name")."""
    if not isinstance(source, str):
        return True  # a Path object
    return (os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1
            or "\\" in source or (os.sep != "/" and os.sep in source))


def _local_snapshot(path_or_model_id: str, hub_kwargs: dict[str, Any]) -> Path:
    """The local directory of a compressed checkpoint, downloading its files from the Hub if needed."""
    if Path(path_or_model_id).is_dir():
        return Path(path_or_model_id) / hub_kwargs.get("subfolder", "")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

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
    `sparsify` (see `restore_sparsity`). Raises `CheckpointError` when a local directory is missing,
    config.json has no nm_sparsity record or the weights break the stored N:M pattern (naming the layers).
    Do not pass `device_map`: accelerate's dispatch hooks stop `sparsify`; move the model with `.to()`.

    "Ready to train" is a new run from these N:M weights, not a continuation, because a saved model holds
    only the baked weights: the eval forward is the saved model's (the training forward too where it was
    exactly N:M, i.e. not during `decaying-mask`'s decay or STEP's dense phase), but the method state
    starts afresh, as after any `sparsify`. The step counter is 0 (the
    `decaying-mask` schedule and `mask_update_interval` restart; `nm_hf.set_training_step` sets it),
    S-STE's scale is 1 (the saved weights already carry the old one), STEP starts in its dense phase (a
    new `StepAdamW` switches again), and the pruned weights' training values are gone (zeros), as is the
    optimizer state. To continue a run exactly, resume the Trainer from a checkpoint
    (`resume_from_checkpoint`: dense weights, optimizer, `sparse_training_state.pt`); a plain loop saves
    the dense weights and `nm_hf.sparse_training_state(model)` and restores them with
    `nm_hf.load_sparse_training_state`.
    """
    from transformers import AutoConfig

    if looks_like_local_path(path_or_model_id):
        checkpoint_dir(path_or_model_id)  # "no such directory" rather than a Hub repo-id error
    source = os.fspath(path_or_model_id)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        if os.path.exists(source):
            raise
        # "runs/x" (one slash, missing) is a valid Hub id too: say that no local directory has the name either,
        # instead of transformers' bare "couldn't connect" / "not a valid model identifier"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{source}: no such local directory, and loading it as a Hub repo id failed: "
                              f"{first}") from err
    record = require_record(config, where=source, error=CheckpointError)
    if is_compressed(record):
        local = _local_snapshot(source, hub_kwargs)
        rest = {k: v for k, v in from_pretrained_kwargs.items() if k not in HUB_KWARGS}
        model = load_compressed(local, model_class, **rest)
    else:
        model = resolve_model_class(config, model_class).from_pretrained(source, **from_pretrained_kwargs)
    return restore_sparsity(model, where=source)
