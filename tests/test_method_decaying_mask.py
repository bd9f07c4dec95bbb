"""decaying-mask: the schedule, the forward weight and its gradient, exact N:M afterwards, the step counter."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.masks import nm_mask
from nm_hf.methods import get_method
from nm_hf.methods.decaying_mask import decay_factor
from tiny_models import out_in, random_sparse_layer, tiny_inputs, tiny_model, train_steps

IN, OUT = 16, 12
KINDS = ["linear", "conv1d"]
ARGS = {"decay_start": 10, "decay_steps": 100, "schedule": "linear"}


def make_layer(kind: str, seed: int = 0, **method_args):
    config = SparsityConfig(method="decaying-mask", method_args={**ARGS, **method_args})
    return random_sparse_layer(kind, config, IN, OUT, seed=seed)


@pytest.mark.parametrize(("step", "linear", "exponential"), [
    (0, 1.0, 1.0), (10, 1.0, 1.0), (35, 0.75, 0.01 ** 0.25), (60, 0.5, 0.1), (109, 0.01, 0.01 ** 0.99),
    (110, 0.0, 0.0), (500, 0.0, 0.0)])
def test_schedule_values(step, linear, exponential):
    assert decay_factor(step, 10, 100, "linear", 0.01) == pytest.approx(linear)
    assert decay_factor(step, 10, 100, "exponential", 0.01) == pytest.approx(exponential)


def reference(layer, alpha: float, x, grad_out):
    """W' = W * (M + alpha (1 - M)) as a function of a leaf W, through plain autograd."""
    w = out_in(layer, layer.weight.detach()).clone().requires_grad_(True)
    mask = nm_mask(w.detach(), 2, 4, dim=1)
    factor = mask.double() + alpha * (~mask).double()
    xr = x.clone().requires_grad_(True)
    y = F.linear(xr, w * factor, layer.bias.detach())
    y.backward(grad_out)
    return y.detach(), xr.grad, w.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", [0, 60, 109, 110, 300])
def test_forward_and_gradient_follow_the_factor(kind, step):
    layer = make_layer(kind)
    nm_hf.set_training_step(nn.Sequential(layer), step)
    alpha = decay_factor(step, **ARGS, end_factor=0.01)
    torch.manual_seed(1)
    x, grad_out = torch.randn(5, IN, dtype=torch.float64), torch.randn(5, OUT, dtype=torch.float64)
    expected_y, expected_gx, expected_gw = reference(layer, alpha, x, grad_out)
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    y.backward(grad_out)
    torch.testing.assert_close(y.detach(), expected_y)
    torch.testing.assert_close(xl.grad, expected_gx)
    # pruned weights get alpha times their gradient: none once the decay is over
    torch.testing.assert_close(out_in(layer, layer.weight.grad), expected_gw)
    if alpha == 0.0:
        assert (layer.weight.grad[~layer.current_mask()] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_eval_and_finalize_use_the_nm_weight(kind):
    layer = make_layer(kind)  # step 0: the training forward is still dense
    x = torch.randn(3, IN, dtype=torch.float64)
    masked = out_in(layer, layer.weight.detach() * layer.current_mask())
    assert not torch.allclose(layer(x), F.linear(x, masked, layer.bias))
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, masked, layer.bias))  # with grad enabled too
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, masked, layer.bias))
    assert torch.equal(layer.effective_weight(), layer.weight.detach() * layer.current_mask())


def test_after_optimizer_step_counts_and_set_training_step_restores():
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="decaying-mask", method_args={"decay_steps": 4}))
    layer = model.model.layers[0].mlp.up_proj
    method = get_method("decaying-mask")
    train_steps(model, 3, lr=0.01)
    assert nm_hf.injection.training_step(model) == 3 and method.factor(layer) == pytest.approx(0.25)
    train_steps(model, 1, lr=0.01)
    assert method.factor(layer) == 0.0
    nm_hf.set_training_step(model, 2)
    assert all(lay.nm_step == 2 for _, lay in nm_hf.iter_sparse_layers(model))
    assert method.factor(layer) == pytest.approx(0.5)
    assert nm_hf.sparse_training_state(model)["step"] == 2
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="step must be an integer >= 0"):
            nm_hf.set_training_step(model, bad)
    with pytest.raises(ValueError, match="no sparse layers"):
        nm_hf.set_training_step(tiny_model("llama"), 1)


def test_a_resumed_run_matches_an_uninterrupted_one():
    config = SparsityConfig(method="decaying-mask", method_args={"decay_steps": 6, "schedule": "exponential"})
    torch.manual_seed(0)
    straight = tiny_model("llama")
    resumed = tiny_model("llama")
    resumed.load_state_dict(straight.state_dict())
    nm_hf.sparsify(straight, config)
    nm_hf.sparsify(resumed, config)
    train_steps(straight, 3, lr=0.01)
    train_steps(resumed, 3, lr=0.01)
    # "resume": a fresh process knows the weights and the step only
    fresh = tiny_model("llama")
    fresh.load_state_dict(resumed.state_dict())
    nm_hf.sparsify(fresh, config)
    nm_hf.set_training_step(fresh, 3)
    torch.manual_seed(5)
    inputs = tiny_inputs(straight)
    fresh.train()
    straight.train()
    torch.testing.assert_close(fresh(**inputs).logits, straight(**inputs).logits, rtol=0, atol=0)


def test_missing_after_optimizer_step_warns_once():
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="decaying-mask"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, 4, lr=0.01, call_hook=False)
    messages = [str(w.message) for w in caught if "after_optimizer_step" in str(w.message)]
    assert messages and "decaying-mask" in messages[0]
    assert len(messages) == len(list(nm_hf.iter_sparse_layers(model)))  # once per layer, not per step


@pytest.mark.parametrize(("args", "match"), [
    ({"decay_steps": 0}, "decay_steps must be an integer >= 1"),
    ({"decay_steps": 2.5}, "decay_steps must be an integer >= 1"),
    ({"decay_start": -1}, "decay_start must be an integer >= 0"),
    ({"schedule": "cosine"}, "schedule must be one of linear, exponential"),
    ({"end_factor": 0.0}, r"end_factor must be a number in \(0, 1\)"),
    ({"end_factor": math.nan}, r"end_factor must be a number in \(0, 1\)"),
    ({"decay_step": 5}, "did you mean 'decay_steps'"),
])
def test_method_args_are_checked(args, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(method="decaying-mask", method_args=args)


def test_defaults_recorded_and_described():
    config = SparsityConfig(method="decaying-mask")
    assert config.method_args == {"decay_start": 0, "decay_steps": 1000, "schedule": "linear", "end_factor": 0.01}
    assert SparsityConfig.from_dict(config.to_dict()) == config
    text = get_method("decaying-mask").describe(config.to_dict())
    assert "from step 0 to step 1000" in text


def test_no_warning_for_steps_of_another_model():
    first, second = tiny_model("llama"), tiny_model("llama")
    for model in (first, second):
        nm_hf.sparsify(model, SparsityConfig(method="decaying-mask"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(first, 3, lr=0.01)  # the second model's layers see these steps before their own first one
        train_steps(second, 3, lr=0.01)
