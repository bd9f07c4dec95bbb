"""The autograd function behind every masked 2-D layer, and bit-level masking.

y = x @ (W * mask)^T + b, with the weight gradient chosen by the method: dense (straight-through),
plus `decay * (1 - mask) * W` (SR-STE in gradient mode), or multiplied by the mask (pruned weights
frozen). The function saves the input, the dense weight (a Parameter, no copy) and the boolean mask,
not the masked weight, so activation memory matches a dense layer plus one byte per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["apply_mask", "nm_linear"]

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def apply_mask(weight: torch.Tensor, mask: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """`weight` where `mask` (keep=True) or where not `mask` (keep=False), exact +0.0 elsewhere.

    Done on the bits (AND with all-ones/all-zeros words): on CPU this runs at a few elementwise passes,
    where `torch.where`/`masked_fill` with a bool mask cost 10-16. A pruned inf becomes 0, not NaN.
    """
    int_dtype = _INT_VIEW.get(weight.dtype)
    if weight.ndim == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        return apply_mask(weight.t(), mask.t(), keep).t()  # Conv1D weights arrive transposed
    if int_dtype is None or not weight.is_contiguous() or not mask.is_contiguous():
        return torch.where(mask, weight, 0) if keep else torch.where(mask, 0, weight)
    bits = mask.to(int_dtype)
    bits = bits.neg_() if keep else bits.sub_(1)  # -1 (all ones) where the value stays
    return weight.view(int_dtype).bitwise_and(bits).view(weight.dtype)


class _NMLinearFunction(torch.autograd.Function):
    """y = x @ (W * mask)^T + b with a straight-through / decayed / frozen weight gradient. W is [out, in]."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, freeze_pruned):  # noqa: D401
        out = F.linear(x, apply_mask(weight, mask), bias)
        ctx.save_for_backward(x, weight, mask)
        ctx.decay = decay
        ctx.freeze_pruned = freeze_pruned
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        masked_weight = apply_mask(weight, mask) if ctx.needs_input_grad[0] or ctx.decay else None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(masked_weight)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat_grad.t().matmul(x.reshape(-1, x.shape[-1]))
            if ctx.freeze_pruned:
                grad_w = apply_mask(grad_w, mask)
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
