"""`decaying-mask`: pruned weights fade out of the forward pass over a schedule, then exact N:M.

"Pruning mask decay" (Kao et al., 2022, "Training Recipe for N:M Structured Sparsity with Decaying
Pruning Mask") and MDGF, mask-decay gradient flow (Bambhaniya et al., 2024, "Progressive Gradient
Flow for Robust N:M Sparsity Training in Transformers"). The training forward pass uses
`W * (M + alpha * (1 - M))`: kept weights as they are, pruned weights scaled by `alpha`, which goes
from 1 (dense) to 0 (exact N:M) between `decay_start` and `decay_start + decay_steps` optimizer steps.
The mask `M` is re-chosen from the dense weights like STE's. The weight gradient is that of this
forward (pruned weights receive `alpha` times their gradient), so the gradient flow towards pruned
weights shrinks with the same schedule, which is the point of the method; once alpha is 0 pruned
weights get no gradient.

Outside training (eval mode, `finalize`, baked saves) the layer computes with `W * M`: the N:M model
it will be deployed as. Steps are the layer's `nm_step`, counted by `nm_hf.after_optimizer_step`
(restore it on resume with `nm_hf.set_training_step`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import SparsityMethod

__all__ = ["DecayingMaskMethod", "SCHEDULES", "decay_factor"]

SCHEDULES = ("linear", "exponential")


def decay_factor(step: int, decay_start: int, decay_steps: int, schedule: str, end_factor: float) -> float:
    """alpha after `step` optimizer steps: 1 before `decay_start`, 0 from `decay_start + decay_steps` on.

    In between, with `p = (step - decay_start) / decay_steps`: "linear" is `1 - p`; "exponential" is
    `end_factor ** p`, an exponential decay that reaches `end_factor` at the end of the window (then 0).
    """
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / decay_steps
    if progress >= 1.0:
        return 0.0
    return 1.0 - progress if schedule == "linear" else end_factor ** progress


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DecayingMaskMethod(SparsityMethod):
    name = "decaying-mask"
    summary = ("Decaying mask (Kao et al., 2022; Bambhaniya et al., 2024): the N:M mask is recomputed from the dense "
               "weights every step and the pruned weights enter the forward pass scaled by a factor that decays "
               "from 1 to 0 over a set number of steps, after which the forward pass is exactly N:M.")
    arg_defaults = {"decay_start": 0, "decay_steps": 1000, "schedule": "linear", "end_factor": 0.01}
    uses_step = True

    def check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        args = super().check_args(args)
        if not _whole(args["decay_start"]) or args["decay_start"] < 0:
            raise ValueError(f"method 'decaying-mask': decay_start must be an integer >= 0 (an optimizer step), "
                             f"got {args['decay_start']!r}")
        if not _whole(args["decay_steps"]) or args["decay_steps"] < 1:
            raise ValueError(f"method 'decaying-mask': decay_steps must be an integer >= 1, got {args['decay_steps']!r}")
        if args["schedule"] not in SCHEDULES:
            raise ValueError(f"method 'decaying-mask': schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{args['schedule']!r}")
        end = args["end_factor"]
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not (0 < end < 1) or not math.isfinite(end):
            raise ValueError(f"method 'decaying-mask': end_factor must be a number in (0, 1), got {end!r}")
        return {**args, "end_factor": float(end)}

    def describe(self, record: Mapping[str, Any]) -> str:
        args = {**self.arg_defaults, **(record.get("method_args") or {})}
        start, steps = args["decay_start"], args["decay_steps"]
        return (f"{self.summary} Schedule: {args['schedule']}, from step {start} to step {start + steps}.")

    @torch.compiler.disable
    def factor(self, layer) -> float:
        """alpha for the layer's next forward (after `layer.nm_step` counted optimizer steps)."""
        args = layer.nm_method_args
        return decay_factor(layer.nm_step, args["decay_start"], args["decay_steps"], args["schedule"],
                            args["end_factor"])

    def forward_weight(self, layer, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        alpha = self.factor(layer) if layer.training else 0.0
        if alpha >= 1.0:
            return weight
        if alpha <= 0.0:
            return torch.where(mask, weight, 0)  # gradient: mask * dL/dW'
        with torch.no_grad():
            scale = torch.where(mask, 1.0, alpha).to(weight.dtype)
        return weight * scale  # gradient: scale * dL/dW'

    def extra_repr(self, layer) -> str:
        return f", alpha={self.factor(layer):.4g} (step {layer.nm_step})"
