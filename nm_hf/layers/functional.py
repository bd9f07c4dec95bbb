"""The fused autograd function behind the masked 2-D layers of the `W * mask` methods.

y = x @ (W * mask)^T + b, with the weight gradient chosen by the method: dense (straight-through),
plus `decay * (1 - mask) * W` (SR-STE in gradient mode), or multiplied by the mask (pruned weights
frozen). The function saves the input, the dense weight (a Parameter, no copy) and the boolean mask,
not the masked weight, so activation memory matches a dense layer plus one byte per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import add_pruned_, apply_mask, apply_mask_, masked_and_add_pruned_

__all__ = ["apply_mask", "nm_linear"]  # apply_mask lives in nm_hf.masks (the methods use it too)


class _NMLinearFunction(torch.autograd.Function):
    """y = x @ (W * mask)^T + b with a straight-through / decayed / frozen weight gradient. W is [out, in]."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, freeze_pruned, masked):  # noqa: D401
        out = F.linear(x, apply_mask(weight, mask) if masked is None else masked, bias)
        ctx.weight_is_masked = masked is weight  # the weight is already N:M with +0.0 pruned entries
        # F.linear with a bias on a 3-D input returns a view of its 2-D result; callers may write into the
        # output in place (wav2vec2's SpecAugment), which autograd forbids on a view made inside a custom
        # Function: the same storage, not tracked as a view (always when compiling: `_is_view` is not traceable)
        if torch.compiler.is_compiling() or out._is_view():
            out = torch.ops.aten._unsafe_view(out, out.shape)
        ctx.save_for_backward(x, weight, mask)
        ctx.decay = decay
        ctx.freeze_pruned = freeze_pruned
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        masked = weight if ctx.weight_is_masked else None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            # A weight stored [in, out] (GPT-2 Conv1D) arrives as a transposed view: its gradient is made in the
            # stored layout (x^T @ grad_out, as Conv1D's own addmm does), so the passes below read all three
            # tensors contiguously instead of transposing on the fly
            stored_transposed = weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()
            if stored_transposed:
                grad_stored = flat_x.t().matmul(flat_grad)
                stored_weight, stored_mask, grad_w = weight.t(), mask.t(), grad_stored.t()
            else:
                grad_stored = grad_w = flat_grad.t().matmul(flat_x)
                stored_weight, stored_mask = weight, mask
            # grad_stored is this function's own new tensor (grad_w is it or its transpose): updated in place
            if ctx.freeze_pruned:
                apply_mask_(grad_stored, stored_mask)
            elif ctx.decay and ctx.needs_input_grad[0]:  # the decay term and grad_x's masked weight, one pass
                masked = masked_and_add_pruned_(grad_stored, stored_weight, stored_mask, ctx.decay)
                masked = masked.t() if stored_transposed else masked
            elif ctx.decay:  # + decay * (1 - mask) * W, as decay * (W - W*mask)
                add_pruned_(grad_stored, stored_weight, stored_mask, ctx.decay)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(apply_mask(weight, mask) if masked is None else masked)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def nm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    decay: float = 0.0,
    freeze_pruned: bool = False,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional N:M linear in nn.Linear layout (weight [out, in]); handles autocast like F.linear.

    `masked`: `apply_mask(weight, mask)` when the caller already has it (made with the mask in one pass),
    which saves the forward's own masking pass; it must be exactly that tensor. Pass `weight` itself when
    it already equals that bit for bit (pruned entries +0.0): then the backward does not mask it either.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):  # not on meta
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):  # `masked` is in the stored dtype
            return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned, None)
    return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned, masked)
