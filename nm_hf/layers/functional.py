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
    """y = x @ (W * mask)^T + b with a straight-through / decayed / frozen weight gradient. W is [out, in], or
    given as stored [in, out] with `stored_transposed` (its gradient then in that layout)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, freeze_pruned, masked, stored_transposed=False):  # noqa: D401
        # stored_transposed: weight, mask and masked come as stored [in, out] (GPT-2 Conv1D), not as [out, in] views
        masked_weight = apply_mask(weight, mask) if masked is None else masked
        out = F.linear(x, masked_weight.t() if stored_transposed else masked_weight, bias)
        ctx.weight_is_masked = masked is weight  # the weight is already N:M with +0.0 pruned entries
        ctx.stored_transposed = stored_transposed
        # F.linear with a bias on a 3-D input returns a view of its 2-D result; callers may write into the
        # output in place (wav2vec2's SpecAugment), which autograd forbids on a view made inside a custom
        # Function: the same storage, not tracked as a view (always when compiling: `_is_view` is not traceable).
        # In eager `detach()` gives that at a tenth of the cost of dispatching `_unsafe_view` through torch.ops
        if torch.compiler.is_compiling():
            out = torch.ops.aten._unsafe_view(out, out.shape)
        elif out._is_view():
            out = out.detach()
        ctx.save_for_backward(x, weight, mask)
        ctx.decay = decay
        ctx.freeze_pruned = freeze_pruned
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        # weight and mask given as stored [in, out] (`stored_transposed`), contiguous, and neither dimension 1 (whose
        # transpose would count as contiguous below): already the layout the gradient is made in
        given_stored = ctx.stored_transposed and weight.is_contiguous() and min(weight.shape) > 1
        if ctx.stored_transposed and not given_stored:  # any other stored weight: as its [out, in] view, below
            weight, mask = weight.t(), mask.t()
        masked = weight if ctx.weight_is_masked else None  # in the layout of `weight`
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            # A weight stored [in, out] (GPT-2 Conv1D; given so, or as a transposed view): its gradient is made in
            # the stored layout (x^T @ grad_out, as Conv1D's own addmm does), so the passes below read all three
            # tensors contiguously instead of transposing on the fly
            if given_stored:
                stored_weight, stored_mask, stored_transposed = weight, mask, True
            else:
                stored_weight = weight.t() if weight.dim() == 2 and not weight.is_contiguous() else None
                stored_transposed = stored_weight is not None and stored_weight.is_contiguous()
            if stored_transposed:
                grad_stored = flat_x.t().matmul(flat_grad)
                if given_stored:
                    grad_w = grad_stored
                else:
                    stored_mask, grad_w = mask.t(), grad_stored.t()
            else:
                grad_stored = grad_w = flat_grad.t().matmul(flat_x)
                stored_weight, stored_mask = weight, mask
            # grad_stored is this function's own new tensor (grad_w is it or its transpose): updated in place
            if ctx.freeze_pruned:
                apply_mask_(grad_stored, stored_mask)
            elif ctx.decay and ctx.needs_input_grad[0]:  # the decay term and grad_x's masked weight, one pass
                masked = masked_and_add_pruned_(grad_stored, stored_weight, stored_mask, ctx.decay)
                masked = masked.t() if stored_transposed and not given_stored else masked
            elif ctx.decay:  # + decay * (1 - mask) * W, as decay * (W - W*mask)
                add_pruned_(grad_stored, stored_weight, stored_mask, ctx.decay)
            if ctx.stored_transposed and not given_stored:
                grad_w = grad_w.t()  # the gradient of the stored weight the function was given
        if ctx.needs_input_grad[0]:
            if masked is None:
                masked = apply_mask(weight, mask)
            grad_x = grad_out.matmul(masked.t() if given_stored else masked)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def nm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    decay: float = 0.0,
    freeze_pruned: bool = False,
    masked: torch.Tensor | None = None,
    stored_transposed: bool = False,
) -> torch.Tensor:
    """Functional N:M linear in nn.Linear layout (weight [out, in]); handles autocast like F.linear.

    `masked`: `apply_mask(weight, mask)` when the caller already has it (made with the mask in one pass),
    which saves the forward's own masking pass; it must be exactly that tensor. Pass `weight` itself when
    it already equals that bit for bit (pruned entries +0.0): then the backward does not mask it either.

    `stored_transposed`: `weight`, `mask` and `masked` are given as stored [in, out] (GPT-2 `Conv1D`) rather
    than as their [out, in] transposes; the same results bit for bit, without a transposing view of the weight
    in the autograd graph.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):  # not on meta
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):  # `masked` is in the stored dtype
            return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned, None, stored_transposed)
    return _NMLinearFunction.apply(x, weight, bias, mask, decay, freeze_pruned, masked, stored_transposed)
