"""The method registry: registration, lookup, and a new method added without touching other modules."""

from __future__ import annotations

import pytest
import torch

import nm_hf
from nm_hf.methods import SparsityMethod, available_methods, get_method, register_method
from nm_hf.methods.base import _REGISTRY
from tiny_models import tiny_inputs, tiny_model


def test_the_four_methods_are_registered():
    assert {"sr-ste", "ste", "fixed", "dense"} <= set(available_methods())
    assert get_method("dense").masks_forward is False
    assert get_method("sr-ste").uses_decay and not get_method("ste").uses_decay


def test_unknown_method_name():
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("nope")


def test_duplicate_registration_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("ste"))
    with pytest.raises(TypeError):
        register_method("ste")


class HalfDecay(SparsityMethod):
    """A toy method: STE plus a constant gradient decay on pruned weights, with one argument."""

    name = "test-half-decay"
    summary = "toy"
    arg_defaults = {"strength": 0.5}

    def gradient_decay(self, layer) -> float:
        return layer.nm_method_args["strength"]


@pytest.fixture
def half_decay():
    register_method(HalfDecay())
    yield
    _REGISTRY.pop(HalfDecay.name, None)


def test_a_new_method_is_one_class_and_one_register_call(half_decay):
    config = nm_hf.SparsityConfig(method="test-half-decay", method_args={"strength": 2.0}, target_modules=["q_proj"])
    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    out = model(**tiny_inputs(model)).logits.sum()
    out.backward()
    # reference: the straight-through gradient plus 2.0 * (1 - mask) * W
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    sparse_only = nm_hf.SparsityConfig(method="ste", target_modules=["q_proj"])
    ref_model = tiny_model("llama")
    nm_hf.sparsify(ref_model, sparse_only)
    ref_model(**tiny_inputs(ref_model)).logits.sum().backward()
    ref_layer = ref_model.model.layers[0].self_attn.q_proj
    mask = ref_layer.current_mask()
    expected = ref_layer.weight.grad + 2.0 * ref_layer.weight.detach() * ~mask
    torch.testing.assert_close(grad, expected)
    assert model.config.nm_sparsity["method_args"] == {"strength": 2.0}
    with pytest.raises(ValueError, match="did you mean 'strength'"):
        nm_hf.SparsityConfig(method="test-half-decay", method_args={"strenght": 1})
