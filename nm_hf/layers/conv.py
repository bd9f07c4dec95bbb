"""Convolutions: `SparseConv2d` / `SparseConv1d` (`nn.Conv2d` / `nn.Conv1d` with groups == 1).

The weight `[out, in, *kernel]` is N:M along the input channels (dim 1) at each kernel position, the
layout of the NM-sparsity code (NHWC) and of NVIDIA ASP (`[R*S*K, C]`). Like the 2-D kinds they own
the very same Parameters as the layer they replace (state-dict keys and layouts unchanged). The
forward is `F.conv*d(x, W', b)` with `W'` the method's forward weight (`W * mask` with the method's
gradient rule for STE / SR-STE / fixed, the method's own weight for S-STE and decaying-mask).
Grouped and depthwise convolutions are left dense: their input channels per group are few and no
N:M kernel runs them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import nm_mask_transposable
from .base import SparseLayerMixin

__all__ = ["SparseConv", "SparseConv1d", "SparseConv2d"]


class SparseConv(SparseLayerMixin):
    """Forward of a dense (groups == 1) convolution whose weight is N:M along the input channels (dim 1)."""

    group_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if "weight" in self.__dict__:  # the forward tensor, exposed while a module reading it runs: as is
            return self._conv_forward(x, weight, bias)
        if not self.is_masked:
            return self._conv_forward(x, weight, bias)
        if not self.training and not torch.is_grad_enabled():
            return self._conv_forward(x, self.cached_eval_weight(), bias)
        method = self.method
        if method.dense_training_forward(self):
            return self._conv_forward(x, weight, bias)
        if method.uses_step or self.nm_mask_interval > 1:
            self.warn_if_steps_uncounted()
        return self._conv_forward(x, method.forward_weight(self, weight, self.current_mask()), bias)

    def choose_mask(self, weight: torch.Tensor, want_masked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transposable masks tile the [out, in] matrix of every kernel position; else the default."""
        if not self.nm_transposable:
            return super().choose_mask(weight, want_masked)
        ranking = self.method.ranking_weight(self, weight).movedim((0, 1), (-2, -1))
        mask = nm_mask_transposable(ranking, self.nm_n, self.nm_m, dim=-1).movedim((-2, -1), (0, 1)).contiguous()
        return mask, None

    def extra_repr(self) -> str:
        return super().extra_repr() + self.nm_extra_repr()


def _build(layer: SparseConv, in_channels: int, groups: int, config: SparsityConfig | None) -> None:
    config = config or SparsityConfig()
    if groups != 1:
        raise ValueError(f"groups={groups}: only dense convolutions (groups=1) can be N:M sparse")
    if in_channels % config.m:
        raise ValueError(f"in_channels={in_channels} is not divisible by m={config.m}")
    layer.nm_setup(config)
    layer.method.prepare(layer)


class SparseConv2d(SparseConv, nn.Conv2d):
    """`nn.Conv2d` (groups=1) with an N:M mask along the input channels of every kernel position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *args, config: SparsityConfig | None = None,
                 **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        _build(self, in_channels, self.groups, config)


class SparseConv1d(SparseConv, nn.Conv1d):
    """`nn.Conv1d` (groups=1) with an N:M mask along the input channels of every kernel position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *args, config: SparsityConfig | None = None,
                 **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        _build(self, in_channels, self.groups, config)
