"""`StepAdamW`: AdamW with STEP's AutoSwitch and frozen second moment (the optimizer of `method="step"`).

STEP (Lu et al., ICML 2023, "STEP: Learning N:M Structured Sparsity Masks from Scratch with
Precondition") trains in two phases. Precondition phase: plain AdamW on the dense model, while
AutoSwitch watches how much the second-moment estimate `v` of the masked weights still moves. After
optimizer step t it computes `Z_t = mean |v_t - v_{t-1}|` over every element of the masked weights,
and switches once the mean of the last `window` values of `Z` (fewer at the start) falls below
`switch_threshold`, but not before step `T_min` and at step `T_max` at the latest (by default 10% and
50% of `total_steps`). Mask-learning phase: the masked weights' `v` is frozen at its value at the switch
(with its bias correction of that step) and used as a fixed preconditioner, `m` keeps moving with the
(straight-through) gradients of the N:M forward pass. Parameters that are not masked keep plain AdamW.

Before the switch every step is exactly `torch.optim.AdamW`'s (no amsgrad): its fused kernel, as the Trainer's
default `adamw_torch_fused`, for plain CPU and CUDA tensors, its single-tensor form for others (FSDP2's DTensors).

The layers learn the phase through `on_phase(switch_step)`: called with None when the optimizer is
built, with t at the switch, and with the saved value by `load_state_dict`, so the model's forward
pass always follows the optimizer it trains with. `state_dict()` carries the AutoSwitch state, so a
resume (e.g. the Trainer's `optimizer.pt`) continues exactly.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as functional_adamw

__all__ = ["StepAdamW", "autoswitch_bounds", "autoswitch_window"]

#: key of the AutoSwitch state in `StepAdamW.state_dict()`
AUTOSWITCH_KEY = "autoswitch"


def autoswitch_window(beta2: float, window: int | None = None) -> int:
    """Steps AutoSwitch averages over: `window`, or `1 / (1 - beta2)` rounded (1000 for beta2 = 0.999)."""
    if window is not None:
        return window
    return max(1, round(1.0 / (1.0 - beta2)))


def autoswitch_bounds(total_steps: int | None, min_fraction: float, max_fraction: float) -> tuple[int, float]:
    """(T_min, T_max): the switch happens after step t only if `t >= T_min`, and at `t = T_max` at the latest.

    Both are the fractions of `total_steps` rounded to whole steps (T_max at least 1); without
    `total_steps` there is no clipping: `(0, inf)`.
    """
    if total_steps is None:
        return 0, math.inf
    return round(min_fraction * total_steps), max(1, round(max_fraction * total_steps))


def _main_process() -> bool:
    """False on the other ranks of a distributed run (their warnings would repeat the main one's)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _number(value: Any, what: str, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"StepAdamW: {what} must be a finite number {bound}, got {value!r}")
    return float(value)


def _whole(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"StepAdamW: {what} must be an integer >= {low}, got {value!r}")
    return value


def _fused_takes(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain CPU/CUDA floating tensors (a DTensor or
    another subclass goes through the single-tensor form)."""
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
               and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               and p.grad is not None and p.grad.stride() == p.stride() for p in params)  # the kernel walks memory


def _adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], steps_taken: list[int], *, lr: float, beta1: float, beta2: float,
           eps: float, weight_decay: float) -> None:
    """One plain AdamW step of these parameters through torch's functional AdamW (which counts the step)."""
    fused = _fused_takes(params)
    steps = [torch.full((), float(taken), dtype=torch.float32, device=p.device if fused else "cpu")  # no sync
             for taken, p in zip(steps_taken, params, strict=True)]
    functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False, fused=fused,
                            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                            maximize=False)


class StepAdamW(torch.optim.Optimizer):
    """AdamW whose masked weights switch to a frozen second moment when AutoSwitch says `v` has settled.

    Args:
        params: parameters or parameter groups, as for `torch.optim.AdamW`.
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay, per group as usual).
        total_steps: optimizer steps in the whole run; sets the clipping bounds (see module docstring).
            None: no clipping.
        switch_threshold: AutoSwitch switches once the windowed mean of `mean |v_t - v_{t-1}|` is below it.
        window: steps in AutoSwitch's window; None: `1 / (1 - beta2)`, with the beta2 of the param groups
            holding `masked_params` (a group's own betas, else `betas`; refused if those groups differ).
        min_switch_fraction, max_switch_fraction: the clipping bounds as fractions of `total_steps`.
        masked_params: the weights AutoSwitch watches and whose `v` is frozen (the sparse layers'
            weights); None: every parameter.
        on_phase: called with the switch step (None while dense) whenever the phase is set.

    With `method="step"`, `SparseTrainer` builds it for you; in a plain loop use
    `nm_hf.create_sparse_optimizer(model, lr=..., total_steps=...)`, which wires `masked_params` and
    `on_phase` to the model's sparse layers.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, total_steps: int | None = None,
                 switch_threshold: float = 1e-8, window: int | None = None, min_switch_fraction: float = 0.1,
                 max_switch_fraction: float = 0.5, masked_params: Iterable[torch.Tensor] | None = None,
                 on_phase: Callable[[int | None], None] | None = None) -> None:
        _number(lr, "lr", 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"StepAdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            _number(beta, f"betas[{i}]", 0.0, math.nextafter(1.0, 0.0))
        _number(eps, "eps", 0.0)
        _number(weight_decay, "weight_decay", 0.0)
        if total_steps is not None:
            _whole(total_steps, "total_steps", 1)
        _number(switch_threshold, "switch_threshold", 0.0)
        if window is not None:
            _whole(window, "window", 1)
        low = _number(min_switch_fraction, "min_switch_fraction", 0.0, 1.0)
        high = _number(max_switch_fraction, "max_switch_fraction", 0.0, 1.0, low_open=True)
        if low > high:
            raise ValueError(f"StepAdamW: min_switch_fraction ({low:g}) must be <= max_switch_fraction ({high:g})")
        if on_phase is not None and not callable(on_phase):
            raise TypeError(f"StepAdamW: on_phase must be callable, got {type(on_phase).__name__}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        own = {id(p) for group in self.param_groups for p in group["params"]}
        masked = own if masked_params is None else {id(p) for p in masked_params}
        if not masked <= own:
            raise ValueError("StepAdamW: masked_params must be parameters this optimizer updates")
        # by position: accelerate's FSDP2 `prepare` swaps each Parameter for its sharded one in place
        self._masked_slots = frozenset((g, i) for g, group in enumerate(self.param_groups)
                                       for i, p in enumerate(group["params"]) if id(p) in masked)
        self.total_steps = total_steps
        self.switch_threshold = float(switch_threshold)
        self.window = autoswitch_window(self._watched_beta2(float(betas[1]), window is not None), window)
        self.min_step, self.max_step = autoswitch_bounds(total_steps, low, high)
        self.on_phase = on_phase
        #: optimizer steps taken, the AutoSwitch values in the window, the step after which it switched
        self.steps = 0
        self.window_values: deque[float] = deque(maxlen=self.window)
        self.switch_step: int | None = None
        #: the threshold was already met at the step before `min_step` (the switch is then the clip's)
        self._met_before_min = False
        self._announce()

    # ------------------------------------------------------------------ AutoSwitch

    @property
    def masked_ids(self) -> frozenset[int]:
        """`id()` of the masked parameters the optimizer holds now (after any swap for sharded ones)."""
        return frozenset(id(self.param_groups[g]["params"][i]) for g, i in self._masked_slots)

    @property
    def switched(self) -> bool:
        """True once the masked weights train with the frozen second moment."""
        return self.switch_step is not None

    @property
    def autoswitch_statistic(self) -> float | None:
        """The mean of the window AutoSwitch compares with `switch_threshold` (None before the first step)."""
        return sum(self.window_values) / len(self.window_values) if self.window_values else None

    def _watched_beta2(self, default: float, window_given: bool) -> float:
        """The beta2 of the `v` AutoSwitch watches, for its window: the groups holding masked weights may carry
        their own betas (as in any AdamW), and their `v` moves with theirs, not the constructor's (`default`,
        used when no group holds a masked weight). Groups of masked weights with different beta2 have no
        window of their own to share: refused unless `window` is given."""
        watched: dict[float, list[int]] = {}
        for g, group in enumerate(self.param_groups):
            group_betas = group["betas"]
            if not isinstance(group_betas, (tuple, list)) or len(group_betas) != 2:
                raise ValueError(f"StepAdamW: param group {g}'s betas must be a pair (beta1, beta2), got "
                                 f"{group_betas!r}")
            for i, beta in enumerate(group_betas):
                _number(beta, f"param group {g}'s betas[{i}]", 0.0, math.nextafter(1.0, 0.0))
            if any((g, i) in self._masked_slots for i in range(len(group["params"]))):
                watched.setdefault(float(group_betas[1]), []).append(g)
        if len(watched) > 1 and not window_given:
            groups = "; ".join(f"param group{'s' if len(gs) > 1 else ''} {', '.join(map(str, gs))}: beta2 {b:g}"
                               for b, gs in watched.items())
            raise ValueError(f"StepAdamW: the masked weights' param groups have different beta2 ({groups}), so "
                             "AutoSwitch's window (1 / (1 - beta2)) is ambiguous: give them one beta2 or pass window=")
        return next(iter(watched), default)

    def _announce(self) -> None:
        if self.on_phase is not None:
            self.on_phase(self.switch_step)

    def _should_switch(self) -> bool:
        if self.steps >= self.max_step:
            return True
        statistic = self.autoswitch_statistic
        return self.steps >= self.min_step and statistic is not None and statistic < self.switch_threshold

    def _switch(self) -> None:
        """Freeze the masked weights' second moment (with the bias correction of their step count now)."""
        if self.steps == self.min_step < self.max_step and self._met_before_min and _main_process():
            # the threshold is absolute and `v` scales with the squared gradients: on a model whose gradients
            # are small it is met from the start, and the switch is then only the lower clip
            warnings.warn(f"StepAdamW: AutoSwitch's statistic was already below switch_threshold "
                          f"({self.switch_threshold:g}) before the first allowed step ({self.min_step}), so the "
                          "switch comes from min_switch_fraction, not from the second moment settling; a second "
                          "moment frozen during learning-rate warm-up gives some weights very large updates "
                          "(see the STEP section of docs/concepts.md)", UserWarning, stacklevel=3)
        self.switch_step = self.steps
        masked = self.masked_ids
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if id(p) in masked and state:  # never stepped: plain AdamW (nothing to freeze)
                    state["frozen_step"] = state["step"]
        self._announce()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step; before the switch, AutoSwitch measures the masked weights' change of `v`.

        The parameters still on plain AdamW go through `torch.optim.adamw.adamw`: torch's fused kernel
        where it takes them (as the Trainer's default `adamw_torch_fused`), else its single-tensor form.
        Only the masked weights after the switch take the frozen-`v` update below.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        watching = self.switch_step is None
        masked = self.masked_ids
        change: torch.Tensor | None = None
        count = 0
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            adamw: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])  # params, grads, m, v, steps taken
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("StepAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                frozen = state.get("frozen_step")
                if frozen is None:
                    if watching and id(p) in masked:
                        # |v_t - v_{t-1}| = (1 - beta2) * |g^2 - v_{t-1}|, before AdamW moves v
                        moved = (grad * grad - exp_avg_sq).abs_().sum(dtype=torch.float64) * (1 - beta2)
                        change = moved if change is None else change + moved.to(change.device)
                        count += p.numel()
                    for column, tensor in zip(adamw[:4], (p, grad, exp_avg, exp_avg_sq), strict=True):
                        column.append(tensor)
                    adamw[4].append(state["step"])
                    state["step"] += 1
                    continue
                state["step"] += 1
                step = state["step"]
                p.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** frozen)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
            if adamw[0]:
                _adamw(*adamw, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        if watching:
            if change is not None and count:
                if hasattr(change, "full_tensor"):  # DTensor (FSDP2): this rank's sum is a partial one
                    change = change.full_tensor()
                self.window_values.append(float(change) / count)
            if self.steps == self.min_step - 1:  # the last step the clip holds back
                statistic = self.autoswitch_statistic
                self._met_before_min = statistic is not None and statistic < self.switch_threshold
            if self._should_switch():
                self._switch()
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim.Optimizer.state_dict()` plus the AutoSwitch state (step count, window, switch step)."""
        state = super().state_dict()
        state[AUTOSWITCH_KEY] = {"steps": self.steps, "switch_step": self.switch_step,
                                 "window_values": list(self.window_values)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the layers are told the restored phase (`on_phase`)."""
        auto = state_dict.get(AUTOSWITCH_KEY) if isinstance(state_dict, dict) else None
        if not isinstance(auto, dict) or set(auto) != {"steps", "switch_step", "window_values"}:
            raise ValueError("StepAdamW.load_state_dict: the state has no valid 'autoswitch' entry (not saved by "
                             "StepAdamW?)")
        steps, switch_step, values = auto["steps"], auto["switch_step"], auto["window_values"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or (
                switch_step is not None and (isinstance(switch_step, bool) or not isinstance(switch_step, int)
                                             or not 0 <= switch_step <= steps)) \
                or not isinstance(values, (list, tuple)) or len(values) > self.window:
            raise ValueError(f"StepAdamW.load_state_dict: inconsistent autoswitch state {auto!r} (window "
                             f"{self.window})")
        super().load_state_dict({key: value for key, value in state_dict.items() if key != AUTOSWITCH_KEY})
        self.steps, self.switch_step = steps, switch_step
        self.window_values = deque((float(v) for v in values), maxlen=self.window)
        self._announce()
