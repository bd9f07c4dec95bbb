"""`s-ste` (Hu, Zhu, Chen, NeurIPS 2024, "S-STE: Continuous Pruning Function for Efficient 2:4 Sparse
Pre-training"): a continuous pruning function instead of a hard mask.

Forward weight: `beta * S(W)`. `S` soft-thresholds every group of m along the input dimension by
the magnitude `t` of its largest pruned entry: kept entries become `sign(w) * (|w| - t)`, pruned ones
0 (for 2:4: keep the top 2 and shrink them by the 3rd-largest magnitude), so the weight moves
continuously when two entries of a group swap ranks. `beta = <W, S(W)> / <S(W), S(W)>` (the least
squares scale bringing `S(W)` back to `W`'s size) is computed per tensor once, when the layer is
sparsified, and then kept fixed. The weight gradient is straight-through: `dL/d(beta * S(W))` is
applied to `W` unchanged (no factor beta, no mask), as in the authors' code (2by4-pretrain:
`SoftThreshold.backward` returns the incoming gradient; `init_scale` runs once at model
construction and stores the scale as a buffer). There is no SR-STE-style decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..masks import apply_mask
from .base import SparsityMethod

__all__ = ["SSTEMethod", "soft_threshold", "least_squares_scale"]


def soft_threshold(weight: torch.Tensor, mask: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """`S(W)`: every group of `m` along `dim` shrunk by the largest magnitude `mask` prunes in it.

    Kept entries become `sign(w) * max(|w| - t, 0)` (with a magnitude mask `|w| >= t` already, so the
    clamp only matters for masks chosen otherwise, e.g. transposable ones); pruned entries are +0.0.
    """
    d = dim % weight.ndim
    grouped = (*weight.shape[:d], weight.shape[d] // m, m, *weight.shape[d + 1:])
    magnitude = weight.abs()
    threshold = apply_mask(magnitude, mask, keep=False).reshape(grouped).amax(dim=d + 1, keepdim=True)
    shrunk = (magnitude.reshape(grouped) - threshold).clamp_min_(0).reshape(weight.shape)
    return apply_mask(torch.copysign(shrunk, weight), mask)


def least_squares_scale(weight: torch.Tensor, shrunk: torch.Tensor) -> float:
    """`<W, S> / <S, S>` in float64; 1.0 when `S` is all zeros (nothing to rescale)."""
    w, s = weight.detach().double().reshape(-1), shrunk.detach().double().reshape(-1)
    norm = float(torch.dot(s, s))
    if norm == 0.0 or not math.isfinite(norm):
        return 1.0
    scale = float(torch.dot(w, s)) / norm
    return scale if math.isfinite(scale) else 1.0


class _ScaledSoftThreshold(torch.autograd.Function):
    """beta * S(W) forward, straight-through backward (the gradient passes to W unchanged)."""

    @staticmethod
    def forward(ctx, weight, mask, scale, m, dim):  # noqa: D401
        return soft_threshold(weight, mask, m, dim).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class SSTEMethod(SparsityMethod):
    name = "s-ste"
    summary = ("S-STE (Hu, Zhu, Chen, NeurIPS 2024): every group of m is soft-thresholded by its largest pruned "
               "magnitude and the result rescaled by a per-tensor factor fixed when training starts; the "
               "gradient is straight-through.")

    @torch.no_grad()
    def prepare(self, layer) -> None:
        """beta from the weights at sparsify time, fixed from then on (the paper's `init_scale`)."""
        weight = layer.weight.detach()
        shrunk = soft_threshold(weight, layer.current_mask(), layer.nm_m, layer.group_dim)
        layer.nm_method_state["scale"] = least_squares_scale(weight, shrunk)
        layer.forget_eval_weight()

    def forward_weight(self, layer, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _ScaledSoftThreshold.apply(weight, mask, layer.nm_method_state["scale"], layer.nm_m, layer.group_dim)

    @torch.no_grad()
    def bake(self, layer, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_threshold(weight, mask, layer.nm_m, layer.group_dim).mul_(layer.nm_method_state["scale"])

    def check_state(self, layer, state: Mapping[str, Any]) -> dict[str, Any]:
        scale = state.get("scale") if isinstance(state, Mapping) else None
        if set(state) != {"scale"} or isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale):
            raise ValueError(f"method 's-ste' needs its state as {{'scale': finite number}}, got {state!r}")
        return {"scale": float(scale)}

    def extra_repr(self, layer) -> str:
        return f", scale={layer.nm_method_state.get('scale', float('nan')):.4g}"
