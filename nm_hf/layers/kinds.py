"""The layer-kind registry: which dense modules can become N:M, and which dimension is their input.

A `LayerKind` ties a dense module type to its sparse counterpart and says along which dimension of
the stored weight the N:M groups run (the input features: dim 1 of an `nn.Linear` weight [out, in],
dim 0 of a GPT-2 `Conv1D` weight [in, out]). Everything that needs "which dimension is the input"
(injection, reports, checkpoints, the CUDA path) asks this registry. Kinds whose target is not a
whole module (a 3-D expert parameter inside an experts module) subclass `LayerKind` and override
`matches` / `group_dim_of`; module-swap kinds set `sparse_class`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import SparseLayerMixin
from .linear import SparseConv1D, SparseLinear

__all__ = ["LayerKind", "register_layer_kind", "layer_kind_for", "layer_kind_of_sparse", "available_layer_kinds",
           "group_dim_of", "as_out_in", "family_kind"]


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer N:M can be applied to."""

    name: str
    #: the dense module type (exact type; see `plain_subclasses`)
    dense_class: type[nn.Module]
    #: the sparse module type swapped in (same Parameters), a subclass of `dense_class`
    sparse_class: type[nn.Module]
    #: dimension of the stored weight that holds the input features
    group_dim: int
    #: names of dense_class subclasses that only re-implement the same map (safe to convert)
    plain_subclasses: frozenset[str] = field(default_factory=frozenset)

    def matches(self, module: nn.Module) -> bool:
        """True if `module` is this kind's dense module (a plain one, not a subclass with its own behaviour)."""
        cls = type(module)
        return cls is self.dense_class or (isinstance(module, self.dense_class)
                                           and cls.__name__ in self.plain_subclasses)

    def is_family(self, module: nn.Module) -> bool:
        """True for any instance of the dense class (subclasses too): "a layer of this sort"."""
        return isinstance(module, self.dense_class)

    def input_features(self, module: nn.Module) -> int:
        return int(module.weight.shape[self.group_dim])

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight viewed as [out, in] (a view, no copy)."""
        return weight if self.group_dim == weight.ndim - 1 else weight.transpose(self.group_dim, -1)


_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind, *, replace: bool = False) -> LayerKind:
    """Add a layer kind (an existing name needs `replace=True`)."""
    if kind.name in _KINDS and not replace:
        raise ValueError(f"a layer kind named {kind.name!r} is already registered (pass replace=True)")
    if not issubclass(kind.sparse_class, SparseLayerMixin) or not issubclass(kind.sparse_class, kind.dense_class):
        raise TypeError(f"layer kind {kind.name!r}: sparse_class must subclass SparseLayerMixin and "
                        f"{kind.dense_class.__name__}")
    _KINDS[kind.name] = kind
    return kind


def available_layer_kinds() -> list[LayerKind]:
    return list(_KINDS.values())


def layer_kind_for(module: nn.Module) -> LayerKind | None:
    """The kind a dense `module` converts with, or None (not a plain convertible layer)."""
    if isinstance(module, SparseLayerMixin):
        return layer_kind_of_sparse(module)
    for kind in _KINDS.values():
        if kind.matches(module):
            return kind
    return None


def layer_kind_of_sparse(layer: SparseLayerMixin) -> LayerKind:
    for kind in _KINDS.values():
        if isinstance(layer, kind.sparse_class):
            return kind
    raise TypeError(f"{type(layer).__name__} is not a registered sparse layer kind")


def family_kind(module: nn.Module) -> LayerKind | None:
    """The kind whose dense class `module` is an instance of (subclasses included), or None."""
    for kind in _KINDS.values():
        if kind.is_family(module):
            return kind
    return None


def group_dim_of(module: nn.Module) -> int:
    """Input dimension of `module`'s weight; TypeError for modules of no registered kind."""
    kind = family_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a layer kind nm_hf knows "
                        f"({', '.join(k.dense_class.__name__ for k in _KINDS.values())})")
    return kind.group_dim


def as_out_in(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`module`'s weight (or `weight` in its layout) viewed as [out, in]."""
    kind = family_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a layer kind nm_hf knows")
    return kind.as_out_in(module.weight if weight is None else weight)


register_layer_kind(LayerKind("linear", nn.Linear, SparseLinear, group_dim=1,
                              plain_subclasses=frozenset({"FalconLinear"})))
register_layer_kind(LayerKind("conv1d-gpt2", Conv1D, SparseConv1D, group_dim=0))
