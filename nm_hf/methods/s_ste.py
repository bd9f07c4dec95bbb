"""`s-ste` (Hu, Zhu, Chen, NeurIPS 2024, "S-STE: Continuous Pruning Function for Efficient 2:4 Sparse
Pre-training"): a continuous pruning function instead of a hard mask.

Forward weight: `beta * S(W)`. `S` soft-thresholds every group of m along the input dimension by
the magnitude `t` of its largest pruned entry: kept entries become `sign(w) * (|w| - t)`, pruned ones
0 (for 2:4: keep the top 2 and shrink them by the 3rd-largest magnitude), so the weight moves
continuously when two entries of a group swap ranks. `beta = <W, S(W)> / <S(W), S(W)>` (the least
squares scale bringing `S(W)` back to `W`'s size) is computed once per weight matrix, when the layer is
sparsified, and then kept fixed: one float for a linear or convolution weight, one per expert for a fused
expert tensor (`layer.expert_dim`, from the layer kind), so a MoE model gets the same betas whether its
experts are stored fused `[E, ., .]` or as separate linears. The weight gradient is straight-through: `dL/d(beta * S(W))` is
applied to `W` unchanged (no factor beta, no mask), as in the authors' code (2by4-pretrain:
`SoftThreshold.backward` returns the incoming gradient; `init_scale` runs once at model
construction and stores one scale per weight matrix as a buffer). There is no SR-STE-style decay.
"""

from __future__ import annotations

import math
import reprlib
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
        return soft_threshold(weight, mask, m, dim).mul_(scale)  # scale: a float, or per expert (broadcast)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _experts_of(layer) -> int | None:
    """Number of experts of a fused expert weight (its size along `layer.expert_dim`), None for one matrix."""
    dim = layer.expert_dim
    return None if dim is None else int(layer.weight.shape[dim])


def _scale_for(layer, weight: torch.Tensor) -> float | torch.Tensor:
    """The layer's beta for `weight` (the layer's weight, a shard of it or one in its layout): a float, or
    for expert weights a tensor of the per-expert betas shaped to broadcast along the expert dimension.

    The tensor is float32 (float64 for float64 weights), the precision a float scale multiplies with, so each
    expert's slice is scaled exactly as a separate linear with that expert's beta would be.
    """
    scale = layer.nm_method_state["scale"]
    if not isinstance(scale, list):
        return scale
    dim = layer.expert_dim % weight.ndim
    count = weight.shape[dim]
    offset = 0
    if count != len(scale):  # this rank's shard of the experts
        span = layer.weight_shard_range(dim)
        if len(span) != count or span.stop > len(scale):
            raise ValueError(f"method 's-ste': a weight with {count} experts along dim {dim} is neither the "
                             f"layer's ({len(scale)} experts) nor its shard")
        offset = span.start
    dtype = torch.promote_types(weight.dtype, torch.float32)
    key = (offset, count, dim, weight.ndim, dtype, weight.device)
    cached = layer.__dict__.get("_nm_method_cache")
    if cached is not None and cached[1] == key and cached[0] == scale:
        return cached[2]
    shape = [1] * weight.ndim
    shape[dim] = count
    tensor = torch.tensor(scale[offset:offset + count], dtype=dtype, device=weight.device).reshape(shape)
    layer._nm_method_cache = (list(scale), key, tensor)  # one host-to-device copy per change, not per forward
    return tensor


class SSTEMethod(SparsityMethod):
    name = "s-ste"
    summary = ("S-STE (Hu, Zhu, Chen, NeurIPS 2024): every group of m is soft-thresholded by its largest pruned "
               "magnitude and the result rescaled by a factor per weight matrix (per expert for fused expert "
               "weights) fixed when training starts; the gradient is straight-through.")

    @torch.no_grad()
    def prepare(self, layer) -> None:
        """beta from the weights at sparsify time, fixed from then on (the paper's `init_scale`): a float, or
        a list of one per expert for a fused expert weight (`layer.expert_dim`)."""
        weight = layer.weight.detach()
        shrunk = soft_threshold(weight, layer.current_mask(), layer.nm_m, layer.group_dim)
        dim = layer.expert_dim
        if dim is None:
            layer.nm_method_state["scale"] = least_squares_scale(weight, shrunk)
        else:
            layer.nm_method_state["scale"] = [least_squares_scale(weight.select(dim, e), shrunk.select(dim, e))
                                              for e in range(weight.shape[dim])]
        layer.forget_eval_weight()

    def forward_weight(self, layer, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _ScaledSoftThreshold.apply(weight, mask, _scale_for(layer, weight), layer.nm_m, layer.group_dim)

    @torch.no_grad()
    def bake(self, layer, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_threshold(weight, mask, layer.nm_m, layer.group_dim).mul_(_scale_for(layer, weight))

    def check_state(self, layer, state: Mapping[str, Any]) -> dict[str, Any]:
        """`{'scale': finite number}`, or for expert weights a list of one finite number per expert.

        A single number for an expert weight (states saved before betas were per expert, when one beta
        served all experts) is taken for every expert: the resumed run computes the forward it trained with.
        """
        experts = _experts_of(layer)
        scale = state.get("scale") if isinstance(state, Mapping) else None
        if isinstance(state, Mapping) and set(state) == {"scale"}:
            if _is_finite_number(scale):
                return {"scale": float(scale) if experts is None else [float(scale)] * experts}
            if experts is not None and isinstance(scale, (list, tuple)) and all(map(_is_finite_number, scale)):
                if len(scale) != experts:
                    raise ValueError(f"method 's-ste' needs one scale per expert: the layer has {experts} experts, "
                                     f"the state {len(scale)} scales")
                return {"scale": [float(v) for v in scale]}
        wanted = "finite number" if experts is None else f"finite number or list of {experts} finite numbers"
        raise ValueError(f"method 's-ste' needs its state as {{'scale': {wanted}}}, got {reprlib.repr(state)}")

    def extra_repr(self, layer) -> str:
        scale = layer.nm_method_state.get("scale", float("nan"))
        if not isinstance(scale, list):
            return f", scale={scale:.4g}"
        shown = ", ".join(f"{v:.4g}" for v in scale[:4]) + (", ..." if len(scale) > 4 else "")
        return f", scale per expert=[{shown}] ({len(scale)} experts)"
