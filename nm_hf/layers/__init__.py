"""Sparse layers and the layer-kind registry (see `kinds` for "which dimension is the input")."""

from .base import SparseLayerMixin, add_mask_listener, mark_weights_updated, optimizer_steps
from .conv import SparseConv, SparseConv1d, SparseConv2d
from .experts import ExpertWeight, SparseExpertsMixin
from .functional import apply_mask, nm_linear
from .kinds import (
    ConvKind,
    ExpertsKind,
    LayerKind,
    Target,
    as_out_in,
    available_layer_kinds,
    family_kind,
    group_dim_of,
    iter_targets,
    layer_kind_for,
    layer_kind_of_sparse,
    register_layer_kind,
    sparse_layers_of,
)
from .linear import Sparse2DLayer, SparseConv1D, SparseLinear

__all__ = [
    "ConvKind",
    "ExpertWeight",
    "ExpertsKind",
    "SparseExpertsMixin",
    "LayerKind",
    "SparseConv",
    "SparseConv1d",
    "SparseConv2d",
    "Sparse2DLayer",
    "SparseConv1D",
    "SparseLayerMixin",
    "SparseLinear",
    "Target",
    "add_mask_listener",
    "apply_mask",
    "as_out_in",
    "available_layer_kinds",
    "family_kind",
    "group_dim_of",
    "iter_targets",
    "layer_kind_for",
    "layer_kind_of_sparse",
    "mark_weights_updated",
    "nm_linear",
    "optimizer_steps",
    "register_layer_kind",
    "sparse_layers_of",
]
