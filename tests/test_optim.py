"""nm_hf.optim.StepAdamW: AdamW before the switch, AutoSwitch against an independent computation on synthetic
gradient traces, the frozen second moment after it, state_dict round trips and argument checks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from nm_hf.optim import StepAdamW, autoswitch_bounds, autoswitch_window


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 12, generator=g)), torch.nn.Parameter(torch.randn(12, generator=g))]


def _grads(step: int, shapes, scale: float = 1.0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return [scale * torch.randn(shape, generator=g) for shape in shapes]


def _run(optimizer: torch.optim.Optimizer, params, steps, start: int = 0, scale=lambda t: 1.0) -> None:
    for t in range(start + 1, start + steps + 1):
        for p, grad in zip(params, _grads(t, [p.shape for p in params], scale(t)), strict=True):
            p.grad = grad
        optimizer.step()


def test_window_and_bounds():
    assert autoswitch_window(0.999) == 1000 and autoswitch_window(0.99) == 100 and autoswitch_window(0.9, 7) == 7
    assert autoswitch_bounds(1000, 0.1, 0.5) == (100, 500)
    assert autoswitch_bounds(7, 0.1, 0.5) == (1, 4)
    assert autoswitch_bounds(10, 0.0, 0.01) == (0, 1)  # T_max at least one step
    assert autoswitch_bounds(None, 0.1, 0.5) == (0, math.inf)


def test_before_the_switch_it_is_torch_adamw_bit_for_bit():
    ours, theirs = _params(), _params()
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    step = StepAdamW(groups(ours), lr=0.01, betas=(0.8, 0.95), eps=1e-6, switch_threshold=0.0, total_steps=100)
    # torch's fused kernel, as the Trainer's default optimizer (adamw_torch_fused) that the other methods train with
    adamw = torch.optim.AdamW(groups(theirs), lr=0.01, betas=(0.8, 0.95), eps=1e-6, fused=True)
    _run(step, ours, 20)
    _run(adamw, theirs, 20)
    assert step.switch_step is None
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(step.state[a]["exp_avg_sq"], adamw.state[b]["exp_avg_sq"])


def reference_switch(shapes, steps: int, beta2: float, window: int, threshold: float, t_min: int, t_max: float,
                     scale) -> tuple[int | None, list[float]]:
    """AutoSwitch from its definition, in float64: v_t explicitly, Z_t = mean |v_t - v_{t-1}| over every element."""
    v = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    zs, means = [], []
    for t in range(1, steps + 1):
        new = [beta2 * vi + (1 - beta2) * g.double() ** 2 for vi, g in zip(v, _grads(t, shapes, scale(t)), strict=True)]
        zs.append(float(sum((n - o).abs().sum() for n, o in zip(new, v, strict=True))) / sum(x.numel() for x in v))
        v = new
        means.append(sum(zs[-window:]) / len(zs[-window:]))
        if t >= t_max or (t >= t_min and means[-1] < threshold):
            return t, means
    return None, means


def decaying(t: int) -> float:
    return math.exp(-t / 15)


@pytest.mark.parametrize("target", [20, 30, 42])  # 20: crossing the threshold exactly at T_min
def test_autoswitch_switches_where_an_independent_computation_says(target):
    shapes = [p.shape for p in _params()]
    beta2, total = 0.9, 200
    window = autoswitch_window(beta2)
    _, means = reference_switch(shapes, total, beta2, window, -1.0, 0, math.inf, decaying)
    # a threshold between the window means of steps target-1 and target: the first step below it is `target`
    assert all(a > b for a, b in zip(means[19:target], means[20:target], strict=False))
    threshold = math.sqrt(means[target - 2] * means[target - 1])
    assert means[target - 1] < 0.999 * threshold < threshold / 0.999 < means[target - 2]  # not a float tie
    expected, _ = reference_switch(shapes, total, beta2, window, threshold, 20, 100, decaying)
    assert expected == target

    params = _params()
    calls = []
    optimizer = StepAdamW(params, lr=0.01, betas=(0.9, beta2), total_steps=total, switch_threshold=threshold,
                          on_phase=calls.append)
    assert (optimizer.min_step, optimizer.max_step, optimizer.window) == (20, 100, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(optimizer, params, target + 5, scale=decaying)
    assert optimizer.switch_step == target and optimizer.switched
    assert not [w for w in caught if "AutoSwitch" in str(w.message)]  # the statistic decided, not the clip
    assert calls == [None, target]  # told when built, then at the switch
    assert optimizer.autoswitch_statistic == pytest.approx(means[target - 1], rel=1e-4)


@pytest.mark.parametrize("threshold, expected", [(1e9, 20), (0.0, 100)])
def test_autoswitch_is_clipped_to_the_bounds(threshold, expected):
    shapes = [p.shape for p in _params()]
    reference, _ = reference_switch(shapes, 200, 0.9, 10, threshold, 20, 100, decaying)
    params = _params()
    optimizer = StepAdamW(params, betas=(0.9, 0.9), total_steps=200, switch_threshold=threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(optimizer, params, 120, scale=decaying)
    assert optimizer.switch_step == reference == expected
    # a threshold met at the first allowed step says so: the switch is the clip, not v settling
    messages = [str(w.message) for w in caught if "AutoSwitch" in str(w.message)]
    if expected == 20:
        assert len(messages) == 1 and "already below switch_threshold (1e+09) before the first allowed step (20)" \
            in messages[0]
    else:
        assert messages == []


def test_after_the_switch_the_masked_second_moment_is_frozen():
    params = _params()
    masked, plain = params
    beta1, beta2, lr, eps = 0.9, 0.99, 0.01, 1e-8
    optimizer = StepAdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, total_steps=10,
                          max_switch_fraction=0.5, masked_params=[masked])
    _run(optimizer, params, 5)
    assert optimizer.switch_step == 5
    frozen = optimizer.state[masked]["exp_avg_sq"].clone()
    plain_v = optimizer.state[plain]["exp_avg_sq"].clone()
    # one more step, by hand: m moves, v stays at step 5's value with step 5's bias correction
    grads = _grads(6, [p.shape for p in params])
    m = optimizer.state[masked]["exp_avg"] * beta1 + (1 - beta1) * grads[0]
    expected = masked.detach() - lr / (1 - beta1 ** 6) * m / ((frozen / (1 - beta2 ** 5)).sqrt() + eps)
    _run(optimizer, params, 1, start=5)
    assert torch.equal(optimizer.state[masked]["exp_avg_sq"], frozen)
    assert not torch.equal(optimizer.state[plain]["exp_avg_sq"], plain_v)  # the unmasked one keeps AdamW
    torch.testing.assert_close(masked.detach(), expected, rtol=1e-6, atol=1e-7)
    assert optimizer.state[masked]["frozen_step"] == 5 and "frozen_step" not in optimizer.state[plain]


@pytest.mark.parametrize("save_at", [3, 8])  # before and after the switch (at 5)
def test_state_dict_round_trip_continues_exactly(save_at):
    params = _params()
    optimizer = StepAdamW(params, lr=0.01, betas=(0.9, 0.9), total_steps=10, window=4)
    _run(optimizer, params, save_at)
    saved_params = copy.deepcopy(params)
    saved = copy.deepcopy(optimizer.state_dict())
    _run(optimizer, params, 12 - save_at, start=save_at)

    calls = []
    restored = StepAdamW(saved_params, lr=0.01, betas=(0.9, 0.9), total_steps=10, window=4, on_phase=calls.append)
    restored.load_state_dict(saved)
    assert calls == [None, None if save_at < 5 else 5]
    _run(restored, saved_params, 12 - save_at, start=save_at)
    assert restored.switch_step == optimizer.switch_step == 5
    assert list(restored.window_values) == list(optimizer.window_values)
    for a, b in zip(params, saved_params, strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_a_foreign_state():
    params = _params()
    adamw = torch.optim.AdamW(params)
    optimizer = StepAdamW(params)
    with pytest.raises(ValueError, match="no valid 'autoswitch' entry"):
        optimizer.load_state_dict(adamw.state_dict())
    state = optimizer.state_dict()
    state["autoswitch"]["switch_step"] = 5  # after more steps than were taken
    with pytest.raises(ValueError, match="inconsistent autoswitch state"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1}, "lr must be a finite number >= 0"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\] must be"),
    ({"betas": 0.9}, "betas must be a pair"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"switch_threshold": math.nan}, "switch_threshold must be a finite number"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"max_switch_fraction": 0.0}, "max_switch_fraction must be a finite number > 0"),
    ({"min_switch_fraction": 0.6}, r"min_switch_fraction \(0.6\) must be <= max_switch_fraction \(0.5\)"),
    ({"masked_params": [torch.nn.Parameter(torch.zeros(2))]}, "masked_params must be parameters this optimizer"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        StepAdamW(_params(), **kwargs)
    assert "\n" not in str(info.value)


def test_a_gradient_laid_out_unlike_its_parameter_is_applied_to_the_right_weights():
    """The fused kernel walks memory in order: a gradient with other strides goes through the single-tensor form."""
    p = torch.randn(16, 8).t().clone(memory_format=torch.preserve_format).requires_grad_()
    q = p.detach().clone().requires_grad_()
    p.grad = torch.randn(8, 16)  # contiguous, unlike p
    q.grad = p.grad.clone()
    StepAdamW([p], lr=0.1, switch_threshold=0.0, total_steps=100).step()
    torch.optim.AdamW([q], lr=0.1, foreach=False).step()
    assert torch.equal(p.detach(), q.detach())


def test_the_window_follows_the_beta2_of_the_masked_weights_groups():
    """A group's own betas set its `v`'s speed, so AutoSwitch's window is that group's 1 / (1 - beta2), not the
    constructor's: the same run switches where an optimizer built with that beta2 does."""
    threshold, total = 1e-3, 200
    reference_params, params = _params(), _params()
    reference = StepAdamW(reference_params, betas=(0.9, 0.9), total_steps=total, switch_threshold=threshold)
    grouped = StepAdamW([{"params": params, "betas": (0.9, 0.9)}], total_steps=total, switch_threshold=threshold)
    assert grouped.window == reference.window == 10
    _run(reference, reference_params, 120, scale=decaying)
    _run(grouped, params, 120, scale=decaying)
    assert grouped.switch_step == reference.switch_step is not None
    assert grouped.switch_step < reference.max_step  # the statistic decided, not the clip
    # only the groups holding masked weights count
    plain = StepAdamW([{"params": params[:1], "betas": (0.9, 0.99)}, {"params": params[1:], "betas": (0.9, 0.9)}],
                      masked_params=params[:1])
    assert plain.window == 100


def test_masked_weights_groups_with_different_beta2_need_a_window():
    params = _params()
    groups = [{"params": params[:1], "betas": (0.9, 0.99)}, {"params": params[1:]}]
    with pytest.raises(ValueError, match=r"param group 0: beta2 0.99; param group 1: beta2 0.999.*pass window=") as info:
        StepAdamW(groups)
    assert "\n" not in str(info.value)
    assert StepAdamW(groups, window=50).window == 50
    with pytest.raises(ValueError, match=r"param group 1's betas\[1\] must be"):
        StepAdamW([{"params": params[:1]}, {"params": params[1:], "betas": (0.9, 1.0)}])
