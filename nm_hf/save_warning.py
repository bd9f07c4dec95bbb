"""A warning when a model with live sparse layers is saved with dense weights outside nm_hf's own save paths.

`sparsify` leaves the dense training weights in the model (SR-STE and STE need the pruned values to
keep training), so a plain `model.save_pretrained(dir)` or a plain `Trainer.save_model(dir)` writes
them with a `"training"` record: a plain reload is dense and `nm-hf inspect` reports the pattern as
violated. The N:M weights come from `nm_hf.finalize(model)` before saving, or from the `save_model`
of `SparseTrainer` / `SparseTrainerMixin`, which bakes the masks into the files it writes.

How it is detected: importing nm_hf wraps `transformers.PreTrainedModel.save_pretrained` once (like
the optimizer post-hook of `nm_hf.layers`, a process-wide hook: nm_hf cannot put a per-model hook into
transformers' save path). The wrapper calls the original unchanged; afterwards, if the saved model has
sparse layers whose method masks the forward pass and whose written weight (the `state_dict` passed
in, else the layer's own) breaks the layer's N:M pattern, it emits one `DenseSaveWarning` for that
save. Models without sparse layers cost one walk over their modules. Saves inside
`dense_save_intended()` (the checkpoints nm_hf's Trainer writes to resume from) do not warn; baked
saves do not need to (their weights obey the pattern), nor do finalized models (no sparse layers).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .injection import iter_sparse_layers
from .masks import check_nm
from .record import STATE_TRAINING, weight_key

__all__ = ["DenseSaveWarning", "dense_save_intended", "dense_layers"]


class DenseSaveWarning(UserWarning):
    """A sparse model was saved with its dense training weights (not N:M) by a save path outside nm_hf."""


_INTENDED: contextvars.ContextVar[bool] = contextvars.ContextVar("nm_hf_dense_save_intended", default=False)


@contextmanager
def dense_save_intended() -> Iterator[None]:
    """Saves inside this block write dense training weights on purpose (checkpoints to resume from): no warning."""
    token = _INTENDED.set(True)
    try:
        yield
    finally:
        _INTENDED.reset(token)


@torch.no_grad()
def dense_layers(model: nn.Module, state_dict: Mapping[str, Any] | None = None) -> tuple[list[str], int]:
    """(names of the masked sparse layers whose weight breaks their N:M pattern, number of masked sparse layers).

    The weight checked is `state_dict[<layer>.weight]` when a state dict is given (layers it lacks are
    not written, so not counted), else the layer's own weight.
    """
    dense, total = [], 0
    for name, layer in iter_sparse_layers(model):
        if not layer.is_masked:  # e.g. method "dense": dense weights are what it trains
            continue
        weight = layer.weight if state_dict is None else state_dict.get(weight_key(name, layer.is_parameter_target))
        if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.dtype.is_floating_point:
            continue
        total += 1
        # the layer's own group dimension (set by its layer kind): the one its masks run along
        if not check_nm(weight.detach(), layer.nm_n, layer.nm_m, dim=layer.group_dim):
            dense.append(name)
    return dense, total


def _message(model: nn.Module, directory: Any, dense: list[str], total: int) -> str:
    layer = dict(iter_sparse_layers(model))[dense[0]]
    return (f"nm_hf: {type(model).__name__} was saved to {os.fspath(directory)} with its dense training weights: "
            f"{len(dense)} of {total} sparse layers (e.g. {dense[0]!r}) break the {layer.nm_n}:{layer.nm_m} pattern "
            f"and config.json records state {STATE_TRAINING!r}, so a plain from_pretrained reload is dense. For N:M "
            "weights call nm_hf.finalize(model) before saving, or train and save with nm_hf.trainer.SparseTrainer "
            "(or SparseTrainerMixin on your Trainer class), whose save_model bakes the masks in")


def _wrap(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        dense: list[str] = []
        total = 0
        # an adapter-only save (transformers' own PEFT integration) writes no base weights
        if not _INTENDED.get() and not getattr(self, "_hf_peft_config_loaded", False):
            try:
                bound = signature.bind(self, save_directory, *args, **kwargs)
            except TypeError:
                bound = None  # the original raises the right error
            if bound is not None and bound.arguments.get("is_main_process", True):
                dense, total = dense_layers(self, bound.arguments.get("state_dict"))
        result = original(self, save_directory, *args, **kwargs)
        if dense:
            warnings.warn(_message(self, save_directory, dense, total), DenseSaveWarning, stacklevel=2)
        return result

    save_pretrained._nm_hf_save_warning = True
    return save_pretrained


def install() -> None:
    """Wrap `PreTrainedModel.save_pretrained` (once; importing this module does it)."""
    if not getattr(PreTrainedModel.save_pretrained, "_nm_hf_save_warning", False):
        PreTrainedModel.save_pretrained = _wrap(PreTrainedModel.save_pretrained)


install()
