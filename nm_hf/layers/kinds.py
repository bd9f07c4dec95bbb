"""The layer-kind registry: which dense modules can become N:M, and which dimension is their input.

A `LayerKind` ties a dense module type to its sparse counterpart and says along which dimension of
the stored weight the N:M groups run (the input features: dim 1 of an `nn.Linear` weight [out, in],
dim 0 of a GPT-2 `Conv1D` weight [in, out]). Everything that needs "which dimension is the input"
(injection, reports, checkpoints, the CUDA path) asks this registry. Kinds whose target is not a
whole module (a 3-D expert parameter inside an experts module) subclass `LayerKind` and override
`matches` / `group_dim_of`; module-swap kinds set `sparse_class`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import SparseLayerMixin
from .conv import SparseConv1d, SparseConv2d
from .experts import (
    ExpertWeight,
    SparseExpertsMixin,
    expert_parameters,
    expert_rows,
    experts_transposed,
    sparse_experts_class,
    stacked_layout,
)
from .linear import SparseConv1D, SparseLinear

__all__ = ["LayerKind", "ConvKind", "ExpertsKind", "Target", "iter_targets", "sparse_layers_of",
           "register_layer_kind", "layer_kind_for", "layer_kind_of_sparse", "available_layer_kinds",
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
    #: selected by `target_modules="all-linear"` (False: only by "all" or by name, e.g. convolutions)
    linear: bool = True

    def matches(self, module: nn.Module) -> bool:
        """True if `module` is this kind's dense module (a plain one, not a subclass with its own behaviour)."""
        cls = type(module)
        return (cls is self.dense_class or (isinstance(module, self.dense_class)
                                            and cls.__name__ in self.plain_subclasses)) and self.refusal(module) is None

    def refusal(self, module: nn.Module) -> str | None:
        """Why a module of this kind's class cannot be made N:M (None: it can, as far as its form goes)."""
        return None

    def is_family(self, module: nn.Module) -> bool:
        """True for any instance of the dense class (subclasses too): "a layer of this sort"."""
        return isinstance(module, self.dense_class)

    #: the targets are Parameters of a module (named `<module>.<parameter>`), not the module itself
    parameter_targets: ClassVar[bool] = False

    def target_parameters(self, module: nn.Module) -> list[str]:
        """Names of the targetable Parameters of a family module (parameter kinds; module kinds: none)."""
        return []

    def weight_of(self, module: nn.Module, parameter: str | None = None) -> torch.Tensor:
        """The targeted weight: the module's `weight`, or its Parameter `parameter` (parameter kinds)."""
        return module.weight if parameter is None else module._parameters[parameter]

    def group_dim_for(self, module: nn.Module, parameter: str | None = None) -> int:
        """Dimension of the targeted weight that holds the input features."""
        return self.group_dim

    def input_features(self, module: nn.Module, parameter: str | None = None) -> int:
        return int(self.weight_of(module, parameter).shape[self.group_dim_for(module, parameter)])

    def output_features(self, module: nn.Module, parameter: str | None = None) -> int:
        return int(self.weight_of(module, parameter).shape[self.output_dim_for(module, parameter)])

    def output_dim_for(self, module: nn.Module, parameter: str | None = None) -> int:
        """Dimension of the targeted weight that holds the output features (the other side of a
        transposable mask's m x m blocks)."""
        return 1 - self.group_dim_for(module, parameter)

    def expert_dim_for(self, module: nn.Module, parameter: str | None = None) -> int | None:
        """Dimension of the targeted weight that indexes experts (a stack of one weight matrix per expert),
        or None: the weight is one matrix (a linear's, a convolution's kernel)."""
        return None

    def convert(self, module: nn.Module, parameter: str | None, config: Any) -> SparseLayerMixin:
        """Make the target sparse in place (same Parameters) and return its sparse layer (not yet prepared)."""
        dense_class = type(module)
        module.__class__ = self.sparse_class
        module._nm_dense_class = dense_class
        module.nm_setup(config)
        return module

    def restore(self, layer: SparseLayerMixin) -> None:
        """Undo `convert`: the layer's module computes densely with its plain class again."""
        dense_class = layer.__dict__.get("_nm_dense_class") or self.dense_class
        layer.nm_teardown()
        layer.__class__ = dense_class

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight viewed as [out, in] (a view, no copy)."""
        return weight if self.group_dim == weight.ndim - 1 else weight.transpose(self.group_dim, -1)


@dataclass(frozen=True)
class ConvKind(LayerKind):
    """`nn.Conv1d` / `nn.Conv2d`: only dense convolutions (groups == 1) convert; N:M along input channels."""

    linear: bool = False

    def output_dim_for(self, module: nn.Module, parameter: str | None = None) -> int:
        return 0  # [out_channels, in_channels, *kernel]

    def refusal(self, module: nn.Module) -> str | None:
        groups = getattr(module, "groups", 1)
        if groups != 1:
            what = "depthwise" if groups == getattr(module, "in_channels", None) else "grouped"
            return (f"a {what} convolution (groups={groups}): only dense convolutions (groups=1) can be N:M "
                    "along their input channels; grouped and depthwise convolutions stay dense")
        return None


@dataclass(frozen=True)
class ExpertsKind(LayerKind):
    """The expert Parameters of a mixture-of-experts experts module (`nm_hf.layers.experts`).

    Targets are Parameters (`<experts module>.gate_up_proj`, ...), N:M per expert along the input
    dimension: dim 2 of `[E, out, in]`, dim 1 of `[E, in, out]` (transposed layouts); dim 0 indexes the
    experts (`expert_dim_for`). Stacked layouts (`experts.STACKED_EXPERTS`, DBRX's `experts.mlp.w1` `[E * ffn, hidden]`)
    give each Parameter's input dim; there no dim indexes the experts (each owns a run of rows of dim 0), and
    sizes along dim 0 are per expert (`input_features`, `output_features`), so groups of m stay inside one expert.
    """

    parameter_targets: ClassVar[bool] = True

    def is_family(self, module: nn.Module) -> bool:
        return bool(expert_parameters(module))

    def matches(self, module: nn.Module) -> bool:
        return self.is_family(module) and self.refusal(module) is None

    def refusal(self, module: nn.Module) -> str | None:
        if stacked_layout(module) is not None:
            return None if expert_rows(module) else (f"an experts module ({type(module).__name__}) whose expert "
                                                     "weights do not have the same rows per expert")
        if experts_transposed(module) is None:
            return (f"an experts module ({type(module).__name__}) whose layout nm_hf cannot tell ([E, out, in] or "
                    "[E, in, out]: not decorated with transformers' use_experts_implementation)")
        return None

    def target_parameters(self, module: nn.Module) -> list[str]:
        return expert_parameters(module)

    def weight_of(self, module: nn.Module, parameter: str | None = None) -> torch.Tensor:
        return module.get_parameter(parameter)  # a dotted path for stacked layouts (DBRX's `mlp.w1`)

    def group_dim_for(self, module: nn.Module, parameter: str | None = None) -> int:
        layout = stacked_layout(module)
        if layout is not None:
            if parameter not in layout:
                dims = ", ".join(f"{path}: {dim}" for path, dim in layout.items())
                raise TypeError(f"{type(module).__name__}: its expert weights have input dims of their own ({dims}); "
                                "ask for one Parameter")
            return layout[parameter]
        return 1 if experts_transposed(module) else 2

    def output_dim_for(self, module: nn.Module, parameter: str | None = None) -> int:
        matrix_dims = 1 if stacked_layout(module) is not None else 3  # [E * rows, cols] / [E, ., .]
        return matrix_dims - self.group_dim_for(module, parameter)

    def expert_dim_for(self, module: nn.Module, parameter: str | None = None) -> int | None:
        return None if stacked_layout(module) is not None else 0  # [E, out, in] and [E, in, out] alike

    def _per_expert(self, module: nn.Module, parameter: str | None, dim: int) -> int:
        """Size along `dim` of one expert's matrix (a stacked layout's dim 0 holds every expert's rows)."""
        size = int(self.weight_of(module, parameter).shape[dim])
        return size // module.num_experts if dim == 0 and stacked_layout(module) is not None else size

    def input_features(self, module: nn.Module, parameter: str | None = None) -> int:
        return self._per_expert(module, parameter, self.group_dim_for(module, parameter))

    def output_features(self, module: nn.Module, parameter: str | None = None) -> int:
        return self._per_expert(module, parameter, self.output_dim_for(module, parameter))

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        raise TypeError("expert weights are 3-D; there is no single [out, in] matrix")

    def convert(self, module: nn.Module, parameter: str | None, config: Any) -> SparseLayerMixin:
        if not isinstance(module, SparseExpertsMixin):  # the module whose forward reads the expert weights
            group_dims = {name: self.group_dim_for(module, name) for name in expert_parameters(module)}
            dense_class = type(module)
            module.__class__ = sparse_experts_class(dense_class)
            module._nm_dense_class = dense_class
            module._nm_group_dims = group_dims
            module.nm_parts = {}
        layer = ExpertWeight(module, parameter, module._nm_group_dims[parameter],
                             self.expert_dim_for(module, parameter))
        layer.nm_setup(config)
        module.nm_parts[parameter] = layer
        return layer

    def restore(self, layer: SparseLayerMixin) -> None:
        module = layer.owner
        layer.nm_teardown()
        module.nm_parts.pop(layer.parameter, None)
        if not module.nm_parts:
            module.__class__ = module.__dict__.pop("_nm_dense_class")
            for name in ("nm_parts", "_nm_group_dims"):
                module.__dict__.pop(name, None)


_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind, *, replace: bool = False) -> LayerKind:
    """Add a layer kind (an existing name needs `replace=True`)."""
    if kind.name in _KINDS and not replace:
        raise ValueError(f"a layer kind named {kind.name!r} is already registered (pass replace=True)")
    if not issubclass(kind.sparse_class, SparseLayerMixin) or not (
            kind.parameter_targets or issubclass(kind.sparse_class, kind.dense_class)):
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


@dataclass(frozen=True)
class Target:
    """One weight a config can target: a module's `weight`, or a Parameter of a parameter kind's module."""

    #: targeted name (the record's): the module name, or `<module>.<parameter>`
    name: str
    kind: LayerKind
    #: the module that owns the weight
    module: nn.Module
    module_name: str
    #: the Parameter's name in `module` (parameter kinds), else None (the module's `weight`)
    parameter: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.kind.weight_of(self.module, self.parameter)

    @property
    def group_dim(self) -> int:
        return self.kind.group_dim_for(self.module, self.parameter)

    @property
    def input_features(self) -> int:
        return self.kind.input_features(self.module, self.parameter)

    @property
    def output_features(self) -> int:
        return self.kind.output_features(self.module, self.parameter)

    @property
    def refusal(self) -> str | None:
        """Why it cannot convert as far as its form goes (a grouped conv, an unknown expert layout), or None."""
        return self.kind.refusal(self.module)

    @property
    def convertible(self) -> bool:
        """A plain layer of its kind (not a subclass with its own behaviour, no refusal)."""
        return self.kind.matches(self.module) or isinstance(self.module, SparseLayerMixin) \
            or bool(getattr(self.module, "nm_parts", None))


def iter_targets(model: nn.Module) -> Iterator[Target]:
    """Every weight of a registered kind in `model` (sparse ones and non-convertible family members too)."""
    for name, module in model.named_modules():
        if not name:
            continue
        kind = family_kind(module)
        if kind is None:
            continue
        if kind.parameter_targets:
            for parameter in kind.target_parameters(module):
                yield Target(f"{name}.{parameter}", kind, module, name, parameter)
        else:
            yield Target(name, kind, module, name)


def sparse_layers_of(name: str, module: nn.Module) -> Iterator[tuple[str, SparseLayerMixin]]:
    """(targeted name, sparse layer) of one module: itself, or the sparse Parameters it owns (`nm_parts`)."""
    if isinstance(module, SparseLayerMixin):
        yield name, module
        return
    parts = module.__dict__.get("nm_parts")
    if parts:
        for parameter, layer in parts.items():
            yield f"{name}.{parameter}" if name else parameter, layer


def group_dim_of(module: nn.Module | SparseLayerMixin) -> int:
    """Input dimension of `module`'s weight (an experts module's 3-D expert weights, an `ExpertWeight`'s
    tensor: 2 for `[E, out, in]`, 1 for `[E, in, out]`, its own for a stacked layout's); TypeError for modules
    of no registered kind."""
    if isinstance(module, SparseLayerMixin) and module.is_parameter_target:
        return module.group_dim  # an ExpertWeight: not a module, its owner's layout fixed it at sparsify time
    kind = family_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a layer kind nm_hf knows "
                        f"({', '.join(k.name for k in _KINDS.values())})")
    return kind.group_dim_for(module)


def as_out_in(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`module`'s weight (or `weight` in its layout) viewed as [out, in]."""
    kind = family_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a layer kind nm_hf knows")
    return kind.as_out_in(module.weight if weight is None else weight)


register_layer_kind(LayerKind("linear", nn.Linear, SparseLinear, group_dim=1,
                              plain_subclasses=frozenset({"FalconLinear"})))
register_layer_kind(LayerKind("conv1d-gpt2", Conv1D, SparseConv1D, group_dim=0))
register_layer_kind(ConvKind("conv2d", nn.Conv2d, SparseConv2d, group_dim=1))
register_layer_kind(ConvKind("conv1d", nn.Conv1d, SparseConv1d, group_dim=1))
register_layer_kind(ExpertsKind("experts", nn.Module, ExpertWeight, group_dim=-1))
