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
        return layer.nm_method_args["strength"] * layer.nm_decay_scale


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


def test_the_beyond_sr_ste_methods_are_registered():
    assert {"s-ste", "decaying-mask"} <= set(available_methods())
    fused = {name: get_method(name).fused_forward for name in available_methods()}
    assert fused["sr-ste"] and fused["ste"] and fused["fixed"] and fused["dense"] and fused["step"]
    assert not fused["s-ste"] and not fused["decaying-mask"]
    assert get_method("decaying-mask").uses_step and not get_method("sr-ste").uses_step


@pytest.mark.parametrize("method", ["sr-ste", "ste", "fixed"])
def test_default_forward_weight_is_the_fused_maths(method):
    """`SparsityMethod.forward_weight` (unused by the layers for these methods) equals the fused nm_linear."""
    from nm_hf.layers import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear(16, 8, config=nm_hf.SparsityConfig(method=method, decay=0.3)).double()
    x, grad_out = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    layer(x).backward(grad_out)
    fused_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    weight = layer.method.forward_weight(layer, layer.weight, layer.current_mask())
    torch.nn.functional.linear(x, weight, layer.bias).backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, fused_grad)
    assert torch.equal(weight.detach(), layer.effective_weight())


def test_old_methods_never_call_forward_weight(monkeypatch):
    """The `W * mask` methods keep the fused path (performance): forward_weight is not called, and STEP's
    dense phase computes no mask at all."""
    def refuse(*args, **kwargs):
        raise AssertionError("forward_weight called on the fused path")

    monkeypatch.setattr(SparsityMethod, "forward_weight", refuse)
    for method in ("sr-ste", "ste", "fixed", "dense", "step"):
        model = tiny_model("llama")
        nm_hf.sparsify(model, nm_hf.SparsityConfig(method=method, target_modules=["q_proj"]))
        layers = [layer for _, layer in nm_hf.injection.iter_sparse_layers(model)]
        if method == "step":  # dense phase first: no mask computed
            model(**tiny_inputs(model)).logits.sum().backward()
            assert all(layer.cached_mask() is None for layer in layers)
            for layer in layers:
                get_method("step").set_phase(layer, 0)
        model(**tiny_inputs(model)).logits.sum().backward()
        assert all(layer.cached_mask() is not None for layer in layers) or method == "dense", method


class DoubledWeight(SparsityMethod):
    """A toy method with its own forward weight: 2 * W * mask, gradient 2 * dL/dW' * mask."""

    name = "test-doubled"
    summary = "toy"

    def forward_weight(self, layer, weight, mask):
        return 2 * torch.where(mask, weight, 0)

    @torch.no_grad()
    def bake(self, layer, weight, mask):
        return 2 * torch.where(mask, weight, 0)


@pytest.fixture
def doubled():
    register_method(DoubledWeight())
    yield
    _REGISTRY.pop(DoubledWeight.name, None)


def test_a_method_with_its_own_forward_weight(doubled, tmp_path):
    model = tiny_model("llama")
    reference = tiny_model("llama")
    reference.load_state_dict(model.state_dict())
    nm_hf.sparsify(model, nm_hf.SparsityConfig(method="test-doubled", target_modules=["up_proj"]))
    layer = model.model.layers[0].mlp.up_proj
    mask = layer.current_mask()
    inputs = tiny_inputs(model)
    model(**inputs).logits.sum().backward()
    ref_layer = reference.model.layers[0].mlp.up_proj
    for ref, sparse in zip(reference.model.layers, model.model.layers, strict=True):
        with torch.no_grad():
            ref.mlp.up_proj.weight.copy_(2 * sparse.mlp.up_proj.weight * sparse.mlp.up_proj.current_mask())
    reference(**inputs).logits.sum().backward()
    torch.testing.assert_close(layer.weight.grad, 2 * ref_layer.weight.grad * mask)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    nm_hf.finalize(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, ref_layer.weight)
