"""The two 2-D layer kinds: `SparseLinear` (an `nn.Linear`) and `SparseConv1D` (a GPT-2 `Conv1D`).

They own the very same `weight`/`bias` Parameters as the layer they replace (no wrapper, no
`base_layer`), so state-dict keys and layouts are unchanged and tied weights stay tied. The dense
weight is what the optimizer updates; the forward pass uses `weight * mask` through the fused
`nm_linear`, or the method's own `forward_weight` for methods that define one (e.g. S-STE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import SparsityConfig
from .base import SparseLayerMixin
from .functional import nm_linear

__all__ = ["SparseLinear", "SparseConv1D", "Sparse2DLayer"]


class Sparse2DLayer(SparseLayerMixin):
    """Forward of a 2-D weight used as `F.linear(x, W_[out, in], b)`, stored [out, in] or [in, out]."""

    def _linear_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.group_dim == 1 else tensor.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if "weight" in self.__dict__:  # the forward tensor, exposed while a module reading it runs: as is
            return F.linear(x, self._linear_layout(weight), bias)
        method = self.method  # `is_masked` is `method.masks_forward`: the method is looked up once per call
        if not method.masks_forward:
            return F.linear(x, self._linear_layout(weight), bias)
        if not self.training and not torch.is_grad_enabled():
            return F.linear(x, self._linear_layout(self.cached_eval_weight()), bias)
        if method.dense_training_forward(self):
            return F.linear(x, self._linear_layout(weight), bias)
        if method.fused_forward:
            if self.nm_mask_interval > 1:
                self.warn_if_steps_uncounted()
            mask, masked = self.current_mask_and_masked()
            # weight, mask and masked go in their stored layout (`weight` itself, when already masked, as such:
            # backward skips masking too); a Conv1D's [in, out] is transposed inside the function
            return nm_linear(x, weight, bias, mask, decay=method.gradient_decay(self),
                             freeze_pruned=method.freezes_pruned(self), masked=masked,
                             stored_transposed=self.group_dim != 1)
        if method.uses_step or self.nm_mask_interval > 1:
            self.warn_if_steps_uncounted()
        return F.linear(x, self._linear_layout(method.forward_weight(self, weight, self.current_mask())), bias)


def _build(layer: Sparse2DLayer, config: SparsityConfig | None) -> None:
    layer.nm_setup(config or SparsityConfig())
    layer.method.prepare(layer)


class SparseLinear(Sparse2DLayer, nn.Linear):
    """`nn.Linear` whose forward uses an N:M mask along the input dimension (dim 1 of `weight`)."""

    group_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: SparsityConfig | None = None) -> None:
        m = (config or SparsityConfig()).m
        if in_features % m:
            raise ValueError(f"in_features={in_features} is not divisible by m={m}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _build(self, config)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.nm_extra_repr()


class SparseConv1D(Sparse2DLayer, Conv1D):
    """GPT-2 `Conv1D` (weight stored [in, out]) with an N:M mask along dim 0, its input dimension."""

    group_dim = 0

    def __init__(self, nf: int, nx: int, *, config: SparsityConfig | None = None) -> None:
        m = (config or SparsityConfig()).m
        if nx % m:
            raise ValueError(f"nx={nx} (input features) is not divisible by m={m}")
        super().__init__(nf, nx)
        _build(self, config)

    def __repr__(self) -> str:
        return f"SparseConv1D(nf={self.nf}, nx={self.nx}{self.nm_extra_repr()})"
