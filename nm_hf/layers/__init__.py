"""Sparse layers and the layer-kind registry (see `kinds` for "which dimension is the input")."""

from .base import SparseLayerMixin, mark_weights_updated, optimizer_steps
from .functional import apply_mask, nm_linear
from .kinds import (
    LayerKind,
    as_out_in,
    available_layer_kinds,
    family_kind,
    group_dim_of,
    layer_kind_for,
    layer_kind_of_sparse,
    register_layer_kind,
)
from .linear import Sparse2DLayer, SparseConv1D, SparseLinear

__all__ = [
    "LayerKind",
    "Sparse2DLayer",
    "SparseConv1D",
    "SparseLayerMixin",
    "SparseLinear",
    "apply_mask",
    "as_out_in",
    "available_layer_kinds",
    "family_kind",
    "group_dim_of",
    "layer_kind_for",
    "layer_kind_of_sparse",
    "mark_weights_updated",
    "nm_linear",
    "optimizer_steps",
    "register_layer_kind",
]
