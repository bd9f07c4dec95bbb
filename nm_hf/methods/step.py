"""`step` (Lu et al., ICML 2023, "STEP: Learning N:M Structured Sparsity Masks from Scratch with
Precondition"): dense AdamW until the second moment settles, then STE with that variance frozen.

Precondition phase: the forward pass is dense and the optimizer is plain AdamW. Its AutoSwitch
(`nm_hf.optim.StepAdamW`) watches `mean |v_t - v_{t-1}|` of the sparse layers' weights and ends the
phase when the mean over a window of `1 / (1 - beta2)` steps falls below `switch_threshold`, clipped
to [10%, 50%] of the run by default. Mask-learning phase: the forward pass uses `W * M` with the mask
recomputed from the dense weights like STE's, the gradient is straight-through, and the optimizer
divides by the second moment frozen at the switch. Outside training (eval, `finalize`, baked saves)
the layers compute with `W * M` in both phases, the N:M model that will be deployed.

The optimizer owns the phase: it tells the layers (`layer.nm_method_state["switch_step"]`: None while
dense, else the optimizer step after which it switched) when it is built, when it switches and when
its state is loaded. `SparseTrainer` builds it (`optimizer_class`, `optimizer_kwargs`); a plain loop
gets it from `nm_hf.create_sparse_optimizer(model, ...)`. With any other optimizer the layers stay dense
in training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..optim import StepAdamW
from .base import SparsityMethod

if TYPE_CHECKING:
    from ..layers.base import SparseLayerMixin

__all__ = ["STEPMethod"]


def _fraction(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


class STEPMethod(SparsityMethod):
    name = "step"
    summary = ("STEP (Lu et al., ICML 2023): dense AdamW until AutoSwitch finds that the second-moment estimate has "
               "settled, then the N:M mask is recomputed from the dense weights every step, the gradient is "
               "straight-through and the second moment stays frozen as a preconditioner.")
    arg_defaults = {"switch_threshold": 1e-8, "window": None, "min_switch_fraction": 0.1, "max_switch_fraction": 0.5}
    #: the optimizer this method trains with (SparseTrainer builds it with `optimizer_kwargs`)
    optimizer_class = StepAdamW

    def check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        args = super().check_args(args)
        threshold = args["switch_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"method 'step': switch_threshold must be a finite number >= 0, got {threshold!r}")
        window = args["window"]
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"method 'step': window must be an integer >= 1 (optimizer steps) or None "
                             f"(1 / (1 - beta2)), got {window!r}")
        low, high = args["min_switch_fraction"], args["max_switch_fraction"]
        for key in ("min_switch_fraction", "max_switch_fraction"):
            if not _fraction(args[key]):
                raise ValueError(f"method 'step': {key} must be a number in [0, 1] (a fraction of the run), "
                                 f"got {args[key]!r}")
        if high == 0 or low > high:
            raise ValueError(f"method 'step': need 0 <= min_switch_fraction <= max_switch_fraction and "
                             f"max_switch_fraction > 0, got {low!r} and {high!r}")
        return {**args, "switch_threshold": float(threshold), "min_switch_fraction": float(low),
                "max_switch_fraction": float(high)}

    def describe(self, record: Mapping[str, Any]) -> str:
        args = {**self.arg_defaults, **(record.get("method_args") or {})}
        window = args["window"] if args["window"] is not None else "1/(1-beta2)"
        return (f"{self.summary} AutoSwitch: threshold {args['switch_threshold']:g} on the mean change of the "
                f"second moment over {window} steps, switching between {args['min_switch_fraction']:.0%} and "
                f"{args['max_switch_fraction']:.0%} of training.")

    # ------------------------------------------------------------------ the optimizer

    def optimizer_kwargs(self, layers: Sequence[SparseLayerMixin]) -> dict[str, Any]:
        """Keyword arguments of `optimizer_class` beyond AdamW's: AutoSwitch settings and the layers' hook."""
        if not layers:
            raise ValueError("method 'step' needs the model's sparse layers to build its optimizer")
        layers = list(layers)
        args = layers[0].nm_method_args

        def on_phase(switch_step: int | None) -> None:
            for layer in layers:
                self.set_phase(layer, switch_step)

        return {"switch_threshold": args["switch_threshold"], "window": args["window"],
                "min_switch_fraction": args["min_switch_fraction"],
                "max_switch_fraction": args["max_switch_fraction"],
                "masked_params": [layer.weight for layer in layers], "on_phase": on_phase}

    @staticmethod
    def set_phase(layer: SparseLayerMixin, switch_step: int | None) -> None:
        """Dense training forward (None) or STE from the optimizer step `switch_step` on."""
        layer.nm_method_state["switch_step"] = switch_step
        layer.forget_eval_weight()

    # ------------------------------------------------------------------ layer hooks

    def prepare(self, layer: SparseLayerMixin) -> None:
        layer.nm_method_state["switch_step"] = None

    def dense_training_forward(self, layer: SparseLayerMixin) -> bool:
        # precondition phase: dense; then the default `W * mask`, straight-through (the layers' fused path)
        return layer.nm_method_state.get("switch_step") is None

    def check_state(self, layer: SparseLayerMixin, state: Mapping[str, Any]) -> dict[str, Any]:
        step = state.get("switch_step", "missing") if isinstance(state, Mapping) else "missing"
        if set(state) != {"switch_step"} or (step is not None and (isinstance(step, bool) or not isinstance(step, int)
                                                                  or step < 0)):
            raise ValueError(f"method 'step' needs its state as {{'switch_step': None or an integer >= 0}}, "
                             f"got {state!r}")
        return {"switch_step": step}

    def extra_repr(self, layer: SparseLayerMixin) -> str:
        step = layer.nm_method_state.get("switch_step")
        return ", dense phase" if step is None else f", mask phase since step {step}"
