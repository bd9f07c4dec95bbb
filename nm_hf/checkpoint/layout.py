"""Where the targeted weights of a model lie in its saved files, and along which dimension their groups run.

transformers 5 `save_pretrained` writes some weights in the layout of the original checkpoints
(`revert_weight_conversion`): a fused mixture-of-experts Parameter `experts.gate_up_proj` [E, 2I, H]
is saved as per-expert matrices `experts.{e}.gate_proj.weight` / `up_proj.weight` (Mixtral:
`block_sparse_moe.experts.{e}.w1.weight` / `w3.weight`), and fused again on load. The record names
the in-memory targets; this module finds their keys on disk by running the model's own reverse
conversion on a probe tensor (each entry holds its index along the target's input dimension, an
expanded view: no memory) and reading, in every tensor that comes out, the dimension the index
runs along. A key counts as N:M on disk when the index runs along one dimension in whole groups of
m; anything else (a conversion that mixes groups) gets `None` and is stored or checked as dense.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..record import record_weight_keys

__all__ = ["saved_layout", "probe_dim", "skeleton", "record_layout", "resolve_model_class"]


def resolve_model_class(config: Any, model_class: Any = None) -> Any:
    """`model_class`, else the first class of config.json's `architectures` transformers knows, else AutoModel."""
    import transformers

    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModel


def probe_dim(tensor: torch.Tensor, m: int) -> int | None:
    """The dimension a probe index runs along in `tensor`, in whole groups of m; None if it does not."""
    if tensor.ndim == 0:
        return None
    varying = [d for d in range(tensor.ndim) if tensor.shape[d] > 1 and tensor.stride(d) != 0]
    if len(varying) > 1:  # a copy was made: compare (views of the expanded probe skip this)
        varying = [d for d in varying if _varies(tensor, d)]
    if len(varying) != 1:
        return None
    dim = varying[0]
    line = _line(tensor, dim)
    if line.numel() % m:
        return None
    groups = line.reshape(-1, m)
    steps = torch.arange(m, dtype=line.dtype).expand_as(groups)
    if not bool((groups[:, 0] % m == 0).all()) or not torch.equal(groups - groups[:, :1], steps):
        return None
    return dim


def _line(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    index = [0] * tensor.ndim
    index[dim] = slice(None)
    return tensor[tuple(index)]


def _varies(tensor: torch.Tensor, dim: int) -> bool:
    return not torch.equal(tensor, tensor.narrow(dim, 0, 1).expand_as(tensor))


def saved_layout(model: nn.Module, targets: dict[str, tuple[str, int]], m: int) -> dict[str, dict[str, int | None]]:
    """`{target name: {key on disk: group dim or None}}` for `targets` = `{name: (state-dict key, group dim)}`.

    `model` may be a meta-device skeleton: only shapes and the conversion mapping are used. Models
    without a conversion (and non-transformers modules) save every key as it is.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: no conversions at save time
        revert_weight_conversion, PreTrainedModel = None, None
    state = dict(model.named_parameters(remove_duplicate=False))
    layout: dict[str, dict[str, int | None]] = {}
    for name, (key, dim) in targets.items():
        if revert_weight_conversion is None or not isinstance(model, PreTrainedModel) or key not in state:
            layout[name] = {key: dim}
            continue
        shape = tuple(state[key].shape)
        view = [1] * len(shape)
        view[dim] = shape[dim]
        probe = torch.arange(shape[dim], dtype=torch.int32).reshape(view).expand(shape)
        reverted = revert_weight_conversion(model, {key: probe})
        layout[name] = {out_key: (dim if out_key == key and tensor is probe else probe_dim(tensor, m))
                        for out_key, tensor in reverted.items()}
    return layout


def skeleton(directory: str | os.PathLike) -> nn.Module | None:
    """The model of a checkpoint's config.json built on the meta device (no memory), or None if it cannot be."""
    from transformers import AutoConfig, PreTrainedModel

    try:
        config = AutoConfig.from_pretrained(directory)
        cls = resolve_model_class(config)
        with torch.device("meta"):
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                return cls(config)
            return cls.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, ImportError):
        return None


def record_layout(record: Mapping[str, Any], group_dims: Mapping[str, int], keys: set[str],
                  model: nn.Module | None = None, directory: str | os.PathLike | None = None
                  ) -> dict[str, dict[str, int | None]]:
    """`{target name: {key on disk: group dim or None}}` of a record's targets in a checkpoint holding `keys`.

    A target whose state-dict key is among `keys` is stored as it is; the others (saved in another
    layout, e.g. per-expert matrices) are found with `saved_layout` on `model`, else on a meta
    skeleton of `directory`'s config.json. Targets found nowhere map to `{}`.
    """
    weight_keys = record_weight_keys(record)
    layout = {name: {key: int(group_dims[name])} for name, key in weight_keys.items() if key in keys}
    rest = {name: (key, int(group_dims[name])) for name, key in weight_keys.items() if name not in layout}
    if rest:
        if model is None and directory is not None:
            model = skeleton(directory)
        found = saved_layout(model, rest, int(record["m"])) if model is not None else {}
        for name in rest:
            layout[name] = {k: d for k, d in found.get(name, {}).items() if k in keys}
    return {name: layout[name] for name in weight_keys}
