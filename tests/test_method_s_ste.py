"""S-STE: soft-thresholded forward weight, per-tensor scale fixed at sparsify time, straight-through gradient.

Every formula is checked against a reference written here with Python loops over the groups (the
paper's definition), not against the library's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.layers import SparseConv1D, SparseLinear
from nm_hf.masks import check_nm, nm_mask_transposable
from nm_hf.methods import get_method
from tiny_models import out_in, tiny_inputs, tiny_model, train_steps

IN, OUT = 16, 12
KINDS = ["linear", "conv1d"]


def make_layer(kind: str, n: int = 2, m: int = 4, seed: int = 0, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    config = SparsityConfig(n=n, m=m, method="s-ste", **cfg)
    if kind == "linear":
        layer = SparseLinear(IN, OUT, config=config)
    else:
        layer = SparseConv1D(OUT, IN, config=config)
        nn.init.normal_(layer.bias)
    with torch.no_grad():  # normal weights, set before the scale is taken again below
        layer.weight.normal_()
    layer.to(dtype)
    layer.method.prepare(layer)  # scale of these weights (sparsify does this once)
    return layer


def reference_soft_threshold(weight_out_in: torch.Tensor, n: int, m: int, keep: torch.Tensor | None = None):
    """Paper definition, group by group along dim 1: keep the n largest |w| (ties: lower index), shrink them
    by the largest pruned magnitude, pruned -> 0. `keep` overrides the kept set (e.g. a transposable mask)."""
    rows = weight_out_in.tolist()
    out = []
    for r, row in enumerate(rows):
        new = []
        for g in range(0, len(row), m):
            group = row[g:g + m]
            if keep is None:
                order = sorted(range(m), key=lambda i, grp=group: (-abs(grp[i]), i))
                kept = set(order[:n])
            else:
                kept = {i for i in range(m) if keep[r, g + i]}
            t = max(abs(group[i]) for i in range(m) if i not in kept)
            new += [math.copysign(max(abs(v) - t, 0.0), v) if i in kept else 0.0 for i, v in enumerate(group)]
        out.append(new)
    return torch.tensor(out, dtype=torch.float64)


def reference_scale(w: torch.Tensor, s: torch.Tensor) -> float:
    return float((w.double() * s).sum() / (s * s).sum())


def test_paper_example_2_4():
    """Keep the top 2 of a group of 4 and shrink them by the 3rd-largest magnitude."""
    layer = SparseLinear(4, 1, bias=False, config=SparsityConfig(method="s-ste"))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -2.0, 1.0, 0.1]]))
    layer.method.prepare(layer)
    s = torch.tensor([[0.0, -1.5, 0.5, 0.0]])
    beta = float((layer.weight.detach() * s).sum() / (s * s).sum())  # (3 + 0.5) / (2.25 + 0.25) = 1.4
    assert layer.nm_method_state["scale"] == pytest.approx(1.4)
    torch.testing.assert_close(layer.effective_weight(), beta * s)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_forward_and_gradients_match_the_reference(kind, n, m):
    layer = make_layer(kind, n, m)
    w = out_in(layer, layer.weight.detach())
    s = reference_soft_threshold(w, n, m)
    beta = reference_scale(w, s)
    assert layer.nm_method_state["scale"] == pytest.approx(beta, rel=1e-12)

    torch.manual_seed(1)
    x = torch.randn(5, IN, dtype=torch.float64)
    grad_out = torch.randn(5, OUT, dtype=torch.float64)
    used = (beta * s).requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    expected = F.linear(xr, used, b)
    expected.backward(grad_out)

    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    y.backward(grad_out)
    torch.testing.assert_close(y, expected.detach())
    torch.testing.assert_close(xl.grad, xr.grad)
    # straight-through: the gradient of beta * S(W) goes to W as it is (no factor beta, no mask)
    torch.testing.assert_close(out_in(layer, layer.weight.grad), used.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    # eval (no grad) computes with the same weight, which is N:M and what finalize writes
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), y.detach())
    baked = layer.effective_weight()
    torch.testing.assert_close(out_in(layer, baked), beta * s)
    assert check_nm(baked, n, m, dim=layer.group_dim)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_is_fixed_after_sparsify(kind):
    layer = make_layer(kind)
    beta = layer.nm_method_state["scale"]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(7, IN, dtype=torch.float64)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.nm_method_state["scale"] == beta  # not recomputed from the new weights
    w = out_in(layer, layer.weight.detach())
    s = reference_soft_threshold(w, 2, 4)
    assert reference_scale(w, s) != pytest.approx(beta)  # (it would differ by now)
    torch.testing.assert_close(out_in(layer, layer.effective_weight()), beta * s)


def test_all_zero_weight_has_scale_one():
    layer = SparseLinear(8, 4, config=SparsityConfig(method="s-ste"))
    with torch.no_grad():
        layer.weight.zero_()
    layer.method.prepare(layer)
    assert layer.nm_method_state["scale"] == 1.0
    assert torch.equal(layer.effective_weight(), torch.zeros(4, 8))


def test_bf16_forward_equals_bake():
    layer = make_layer("linear", dtype=torch.bfloat16)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        trained = layer(x)  # training mode: forward_weight
        layer.eval()
        assert torch.equal(layer(x), trained)  # eval: bake, the same bits


def test_with_a_transposable_mask_the_threshold_uses_that_mask():
    layer = make_layer("linear", transposable=True)
    w = layer.weight.detach()
    mask = nm_mask_transposable(w, 2, 4)
    assert torch.equal(layer.current_mask(), mask)
    groups, kept = w.abs().reshape(-1, 4), mask.reshape(-1, 4)
    threshold = torch.where(kept, 0, groups).amax(1, keepdim=True)
    assert (kept & (groups < threshold)).any()  # some kept entries lie below their group's threshold
    s = reference_soft_threshold(w, 2, 4, keep=mask)  # kept entries below the threshold clamp to 0
    torch.testing.assert_close(layer.effective_weight(), reference_scale(w, s) * s)


def test_sparsify_train_finalize_bakes_scaled_soft_threshold(tmp_path):
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="s-ste"))
    layers = dict(nm_hf.iter_sparse_layers(model))
    scales = {name: layer.nm_method_state["scale"] for name, layer in layers.items()}
    assert all(math.isfinite(v) and v > 1 for v in scales.values())  # shrinking makes S(W) smaller than W
    train_steps(model, 2, lr=0.01)
    expected = {name: out_in(layer, layer.weight.detach().double()) for name, layer in layers.items()}
    expected = {name: scales[name] * reference_soft_threshold(w, 2, 4) for name, w in expected.items()}
    nm_hf.finalize(model)
    for name, w in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight.detach().double(), w, rtol=1e-5, atol=1e-7)
    assert model.config.nm_sparsity["method"] == "s-ste"


def test_training_state_restores_the_scale():
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="s-ste"))
    with torch.no_grad():  # training moves the weights away from the ones the scale was taken from
        for p in model.parameters():
            p.mul_(1.5)
    state = nm_hf.sparse_training_state(model)
    resumed = tiny_model("llama")
    resumed.load_state_dict(model.state_dict())
    nm_hf.sparsify(resumed, SparsityConfig(method="s-ste"))  # scale of the loaded (moved) weights
    name = next(iter(state["layers"]))
    assert resumed.get_submodule(name).nm_method_state["scale"] != state["layers"][name]["method_state"]["scale"]
    nm_hf.load_sparse_training_state(resumed, state)
    inputs = tiny_inputs(model)
    model.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(**inputs).logits, model(**inputs).logits)


def test_state_is_checked_by_the_method():
    layer = make_layer("linear")
    method = get_method("s-ste")
    assert method.check_state(layer, {"scale": 2}) == {"scale": 2.0}
    for bad in ({}, {"scale": math.nan}, {"scale": "1"}, {"scale": 1.0, "other": 1}):
        with pytest.raises(ValueError, match="method 's-ste' needs its state"):
            method.check_state(layer, bad)


def test_no_decay_and_registered_flags():
    method = get_method("s-ste")
    assert not method.uses_decay and not method.fused_forward and method.recomputes_mask
    assert SparsityConfig(method="s-ste", decay=0.5).effective_decay == 0.0
