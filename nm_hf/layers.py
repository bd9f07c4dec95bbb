"""Sparse drop-in layers: `SparseLinear` (an `nn.Linear`) and `SparseConv1D` (a GPT-2 `Conv1D`).

They own the very same `weight`/`bias` Parameters as the layer they replace (no wrapper, no
`base_layer`), so state-dict keys and layouts are unchanged and tied weights stay tied. The dense
weight is what the optimizer updates; the forward pass uses `weight * mask`.

Backward (one autograd function for every method, written in nn.Linear layout):
- input gradient through the masked weight;
- weight gradient dense (straight-through) plus `decay * (1 - mask) * W` for SR-STE in "gradient"
  decay mode; multiplied by the mask for "fixed" (pruned weights get no gradient).
The function saves the input, the dense weight (a Parameter, no copy) and the boolean mask, not the
masked weight, so activation memory matches a dense layer plus one byte per weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from .config import SparsityConfig
from .masks import nm_mask

__all__ = ["SparseLinear", "SparseConv1D", "SparseLayerMixin", "nm_linear", "mark_weights_updated"]

#: attribute set on the weight Parameter of every sparse layer
_SPARSE_WEIGHT_FLAG = "_nm_sparse"


def mark_weights_updated(layers: Iterable[SparseLayerMixin]) -> None:
    """Invalidate the cached masks of `layers` by bumping their weights' autograd version counter.

    The layers cache `current_mask()` on `weight._version`. Fused optimizer kernels (torch's
    `AdamW(fused=True)`, the Trainer's default "adamw_torch_fused") write the weights without bumping
    it; every torch optimizer is covered by the step hook below, so call this only after writing the
    weights some other way (e.g. through `.data`).
    """
    for layer in layers:
        increment_version(layer.weight)


def _bump_sparse_weights_after_step(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if getattr(param, _SPARSE_WEIGHT_FLAG, False):
                increment_version(param)


# Global: runs after `step()` of every torch.optim.Optimizer (wrapped ones included, e.g. accelerate's).
register_optimizer_step_post_hook(_bump_sparse_weights_after_step)


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def _apply_mask(weight: torch.Tensor, mask: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """`weight` where `mask` (keep=True) or where not `mask` (keep=False), exact +0.0 elsewhere.

    Done on the bits (AND with all-ones/all-zeros words): on CPU this runs at a few elementwise passes,
    where `torch.where`/`masked_fill` with a bool mask cost 10-16. A pruned inf becomes 0, not NaN.
    """
    int_dtype = _INT_VIEW.get(weight.dtype)
    if weight.ndim == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        return _apply_mask(weight.t(), mask.t(), keep).t()  # Conv1D weights arrive transposed
    if int_dtype is None or not weight.is_contiguous() or not mask.is_contiguous():
        return torch.where(mask, weight, 0) if keep else torch.where(mask, 0, weight)
    bits = mask.to(int_dtype)
    bits = bits.neg_() if keep else bits.sub_(1)  # -1 (all ones) where the value stays
    return weight.view(int_dtype).bitwise_and(bits).view(weight.dtype)


class _NMLinearFunction(torch.autograd.Function):
    """y = x @ (W * mask)^T + b with an SR-STE/STE/fixed weight gradient. W is [out, in]."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, freeze_pruned):  # noqa: D401
        out = F.linear(x, _apply_mask(weight, mask), bias)
        ctx.save_for_backward(x, weight, mask)
        ctx.decay = decay
        ctx.freeze_pruned = freeze_pruned
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        masked_weight = _apply_mask(weight, mask) if ctx.needs_input_grad[0] or ctx.decay else None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(masked_weight)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat_grad.t().matmul(x.reshape(-1, x.shape[-1]))
            if ctx.freeze_pruned:
                grad_w = _apply_mask(grad_w, mask)
            elif ctx.decay:
                # (1 - mask) * W, exactly: W - W*mask is W where pruned and 0 where kept
                grad_w.add_(weight - masked_weight, alpha=ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def nm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    decay: float = 0.0,
    freeze_pruned: bool = False,
) -> torch.Tensor:
    """Functional N:M linear in nn.Linear layout (weight [out, in]); handles autocast like F.linear."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):
            return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned)
    return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned)


class SparseLayerMixin:
    """N:M state and mask bookkeeping shared by the sparse layer classes.

    The mask is cached against the weight's version counter: an optimizer step or `load_state_dict`
    invalidates it, repeated forwards with unchanged weights (eval, gradient accumulation, the
    tracker computing the mask right after a step) reuse it.
    """

    #: dimension of `weight` that holds the layer's input features (groups of m run along it)
    group_dim: int = 1
    nm_n: int
    nm_m: int
    nm_method: str
    nm_decay: float
    nm_decay_mode: str
    #: multiplies the gradient-mode decay; SparseTrainer sets 1/gradient_accumulation_steps
    nm_decay_scale: float

    def _nm_setup(self, config: SparsityConfig) -> None:
        self.nm_n, self.nm_m = config.n, config.m
        self.nm_method = config.method
        self.nm_decay = config.effective_decay
        self.nm_decay_mode = config.decay_mode
        self.nm_decay_scale = 1.0
        self._nm_mask_cache: torch.Tensor | None = None
        self._nm_mask_key: tuple | None = None
        self._nm_eval_weight: torch.Tensor | None = None
        self._nm_eval_key: tuple | None = None
        setattr(self.weight, _SPARSE_WEIGHT_FLAG, True)

    @torch.no_grad()
    def _nm_prune_now(self) -> None:
        """Method "fixed": zero the pruned weights once, so the mask recomputed later stays this one."""
        if self.nm_method == "fixed":
            self.weight.masked_fill_(~self.current_mask(), 0)
            self.restamp_mask()

    def _nm_teardown(self) -> None:
        self.weight.__dict__.pop(_SPARSE_WEIGHT_FLAG, None)
        for name in ("nm_n", "nm_m", "nm_method", "nm_decay", "nm_decay_mode", "nm_decay_scale",
                     "_nm_mask_cache", "_nm_mask_key", "_nm_eval_weight", "_nm_eval_key", "_nm_dense_class"):
            self.__dict__.pop(name, None)

    def _weight_key(self) -> tuple | None:
        w = self.weight
        if w.is_inference():  # no version counter: in-place changes cannot be seen, never reuse
            return None
        return (w._version, w.data_ptr(), w.device, w.dtype, tuple(w.shape))

    @property
    def pattern(self) -> str:
        return f"{self.nm_n}:{self.nm_m}"

    @property
    def is_masked(self) -> bool:
        """False for method "dense": patched for bookkeeping, but the forward is dense."""
        return self.nm_method != "dense"

    def current_mask(self) -> torch.Tensor:
        """N:M mask of the current weights (for "dense": the mask it would have)."""
        key = self._weight_key()
        if key is None or self._nm_mask_key != key or self._nm_mask_cache is None:
            # never cache an inference tensor: a later training forward could not save it for backward
            with torch.inference_mode(False):
                self._nm_mask_cache = nm_mask(self._ranking_weight(), self.nm_n, self.nm_m, dim=self.group_dim)
            self._nm_mask_key = key
        return self._nm_mask_cache

    def _ranking_weight(self) -> torch.Tensor:
        """What the mask ranks: the weight; for "fixed", with ties broken towards the previous mask.

        A "fixed" layer's pruned weights are exact zeros that never change, so its recomputed mask
        can only move when a kept weight lands exactly on 0.0 and ties with them (the lower index
        would win). Ranking the previously kept weights one ulp higher keeps the mask frozen then,
        while weights loaded from elsewhere (zeros in other places) still decide the mask.
        """
        weight = self.weight.detach()
        previous = self._nm_mask_cache
        if (self.nm_method != "fixed" or previous is None or previous.shape != weight.shape
                or previous.device != weight.device):
            return weight
        magnitude = weight.abs()
        return torch.where(previous, torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)), magnitude)

    def restamp_mask(self) -> None:
        """Declare the cached mask still valid after an in-place change that cannot alter it."""
        if self._nm_mask_cache is not None and self._nm_mask_key is not None:
            self._nm_mask_key = self._weight_key()

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (`weight * mask`), detached."""
        if not self.is_masked:
            return self.weight.detach()
        return _apply_mask(self.weight.detach(), self.current_mask())

    def _cached_eval_weight(self) -> torch.Tensor:
        key = self._weight_key()
        if key is None or self._nm_eval_key != key or self._nm_eval_weight is None:
            self._nm_eval_weight = self.effective_weight()
            self._nm_eval_key = key
        return self._nm_eval_weight

    def train(self, mode: bool = True):
        if mode:  # the eval cache would only go stale and hold memory
            self._nm_eval_weight, self._nm_eval_key = None, None
        return super().train(mode)

    def _linear_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.group_dim == 1 else tensor.t()

    def _nm_forward_2d_layout(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not self.is_masked:
            return F.linear(x, self._linear_layout(weight), bias)
        if not self.training and not torch.is_grad_enabled():
            return F.linear(x, self._linear_layout(self._cached_eval_weight()), bias)
        mask = self.current_mask()
        gradient_decay = self.nm_decay * self.nm_decay_scale if self.nm_decay_mode == "gradient" else 0.0
        return nm_linear(
            x,
            self._linear_layout(weight),
            bias,
            self._linear_layout(mask),
            decay=gradient_decay,
            freeze_pruned=self.nm_method == "fixed",
        )

    def nm_extra_repr(self) -> str:
        extra = f", n:m={self.pattern}, method={self.nm_method}"
        if self.nm_method == "sr-ste":
            extra += f", decay={self.nm_decay:g} ({self.nm_decay_mode})"
        return extra


class SparseLinear(SparseLayerMixin, nn.Linear):
    """`nn.Linear` whose forward uses an N:M mask along the input dimension (dim 1 of `weight`)."""

    group_dim = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        config: SparsityConfig | None = None,
    ) -> None:
        config = config or SparsityConfig()
        if in_features % config.m:
            raise ValueError(f"in_features={in_features} is not divisible by m={config.m}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._nm_setup(config)
        self._nm_prune_now()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._nm_forward_2d_layout(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.nm_extra_repr()


class SparseConv1D(SparseLayerMixin, Conv1D):
    """GPT-2 `Conv1D` (weight stored [in, out]) with an N:M mask along dim 0, its input dimension."""

    group_dim = 0

    def __init__(self, nf: int, nx: int, *, config: SparsityConfig | None = None) -> None:
        config = config or SparsityConfig()
        if nx % config.m:
            raise ValueError(f"nx={nx} (input features) is not divisible by m={config.m}")
        super().__init__(nf, nx)
        self._nm_setup(config)
        self._nm_prune_now()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._nm_forward_2d_layout(x)

    def __repr__(self) -> str:
        return f"SparseConv1D(nf={self.nf}, nx={self.nx}{self.nm_extra_repr()})"


#: the dense class each sparse class replaces, and back
SPARSE_CLASS_FOR = {nn.Linear: SparseLinear, Conv1D: SparseConv1D}
DENSE_CLASS_FOR = {SparseLinear: nn.Linear, SparseConv1D: Conv1D}
