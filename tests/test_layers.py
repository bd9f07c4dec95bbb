"""SparseLinear / SparseConv1D: forward and weight gradients against the formulas of every method."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import nm_hf.layers
from nm_hf.config import SparsityConfig
from nm_hf.injection import apply_decoupled_decay
from nm_hf.layers import SparseConv1D, SparseLinear, mark_weights_updated, nm_linear
from nm_hf.masks import apply_mask, nm_mask

IN, OUT = 16, 12
DECAY = 0.3  # large, so that a missing or doubled decay term is far outside the tolerances


def make_layer(kind: str, method: str, n: int = 2, m: int = 4, dtype=torch.float64, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    config = SparsityConfig(n=n, m=m, method=method, decay=DECAY, **cfg)
    if kind == "linear":
        layer = SparseLinear(IN, OUT, config=config)
    else:
        layer = SparseConv1D(OUT, IN, config=config)
        nn.init.normal_(layer.weight)  # Conv1D initialises weights at std 0.02 and bias at 0
        nn.init.normal_(layer.bias)
    return layer.to(dtype)


def linear_layout(layer, tensor):
    """[out, in] view of a weight-shaped tensor (Conv1D stores [in, out])."""
    return tensor if isinstance(layer, nn.Linear) else tensor.t()


def reference(layer, x: torch.Tensor, grad_out: torch.Tensor, masked: bool = True):
    """Output and gradients of a plain F.linear on the (masked) weight, as leaf tensors."""
    weight = linear_layout(layer, layer.weight.detach())
    mask = nm_mask(weight, layer.nm_n, layer.nm_m, dim=1)
    w_used = (weight * mask if masked else weight).clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = F.linear(xr, w_used, b)
    y.backward(grad_out)
    return y.detach(), xr.grad, linear_layout(layer, w_used.grad), b.grad, linear_layout(layer, mask)


def run(layer, x: torch.Tensor, grad_out: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    y = layer(xr)
    y.backward(grad_out)
    return y.detach(), xr.grad, layer.weight.grad, layer.bias.grad


KINDS = ["linear", "conv1d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["sr-ste", "ste", "fixed", "dense"])
@pytest.mark.parametrize("x_shape", [(5, IN), (2, 3, IN)])
def test_forward_and_gradients_match_formula(kind, method, x_shape):
    layer = make_layer(kind, method)
    layer.train()
    x = torch.randn(x_shape, dtype=torch.float64)
    grad_out = torch.randn(*x_shape[:-1], OUT, dtype=torch.float64)
    y, gx, gw, gb = run(layer, x, grad_out)
    ry, rgx, rgw_masked, rgb, mask = reference(layer, x, grad_out, masked=method != "dense")
    w = layer.weight.detach()

    assert torch.allclose(y, ry, rtol=0, atol=1e-12)
    assert torch.allclose(gx, rgx, rtol=0, atol=1e-12)
    assert torch.allclose(gb, rgb, rtol=0, atol=1e-12)
    # the mask runs along the input dimension: dim 1 of a Linear weight, dim 0 of a Conv1D weight
    assert torch.equal(layer.current_mask(), mask)
    assert torch.equal(mask.sum(dim=layer.group_dim), torch.full((OUT,), IN // 2))
    expected = {
        # straight-through: the gradient w.r.t. the masked weight, applied to every dense weight
        "sr-ste": rgw_masked + w * ~mask * DECAY,
        "ste": rgw_masked,
        "fixed": rgw_masked * mask,
        "dense": rgw_masked,  # reference() used the unmasked weight here
    }[method]
    assert torch.allclose(gw, expected, rtol=0, atol=1e-12)
    if method in ("sr-ste", "ste"):
        assert (gw[~mask] != 0).all(), "pruned weights must receive the dense (straight-through) gradient"
    if method == "fixed":
        assert (gw[~mask] == 0).all()
    if method == "dense":
        assert torch.equal(layer.effective_weight(), w)
    else:
        assert torch.equal(layer.effective_weight(), w * mask)


@pytest.mark.parametrize("kind", KINDS)
def test_decay_scale_scales_the_decay(kind):
    layer = make_layer(kind, "sr-ste")
    x, grad_out = torch.randn(4, IN, dtype=torch.float64), torch.randn(4, OUT, dtype=torch.float64)
    _, _, rgw, _, mask = reference(layer, x, grad_out)
    w = layer.weight.detach()
    for scale in (0.25, 0.0, 3.0):
        layer.nm_decay_scale = scale
        _, _, gw, _ = run(layer, x, grad_out)
        assert torch.allclose(gw, rgw + w * ~mask * (scale * DECAY), rtol=0, atol=1e-12), scale


@pytest.mark.parametrize("kind", KINDS)
def test_decoupled_decay(kind):
    layer = make_layer(kind, "sr-ste", decay_mode="decoupled")
    x, grad_out = torch.randn(4, IN, dtype=torch.float64), torch.randn(4, OUT, dtype=torch.float64)
    _, _, rgw, _, mask = reference(layer, x, grad_out)
    _, _, gw, _ = run(layer, x, grad_out)
    assert torch.allclose(gw, rgw, rtol=0, atol=1e-12), "decoupled mode must add nothing in backward"

    model = nn.Sequential(layer, make_layer(kind, "ste", seed=1), make_layer(kind, "fixed", seed=2))
    before = [p.detach().clone() for p in model.parameters()]
    lr = 0.05
    assert apply_decoupled_decay(model, lr) == 1  # only the SR-STE layer in decoupled mode
    expected = before[0] - before[0] * ~mask * (lr * DECAY)
    assert torch.allclose(layer.weight.detach(), expected, rtol=0, atol=1e-15)
    assert not torch.equal(layer.weight.detach(), before[0])
    for p, old in zip(list(model.parameters())[1:], before[1:], strict=True):
        assert torch.equal(p.detach(), old)
    # shrinking pruned weights cannot change the mask: the cached one must still be right
    assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_mask_stays_frozen_when_a_kept_weight_reaches_zero(kind):
    layer = make_layer(kind, "fixed", dtype=torch.float32)
    layer.method.prepare(layer)  # make_layer re-initialises Conv1D weights after the layer pruned them
    frozen = layer.current_mask().clone()
    assert torch.equal(layer.weight.detach() != 0, frozen)  # pruned weights are exact zeros
    # zero the kept weight of a group whose pruned zeros come first (ranks tie; the lower index would win)
    grouped = linear_layout(layer, frozen).reshape(OUT, IN // 4, 4)
    row, group = next((r, g) for r in range(OUT) for g in range(IN // 4) if not grouped[r, g, 0])
    kept = int(grouped[row, group].nonzero()[0])
    with torch.no_grad():
        linear_layout(layer, layer.weight)[row, group * 4 + kept] = 0.0
    assert torch.equal(layer.current_mask(), frozen)
    # weights loaded from elsewhere, pruned in other places, still decide the mask
    other = make_layer(kind, "fixed", dtype=torch.float32, seed=7)
    other.method.prepare(other)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.current_mask(), other.current_mask())
    assert not torch.equal(layer.current_mask(), frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_mask_shortcut_chooses_what_ranking_chooses(kind):
    """The fixed method skips ranking while every pruned weight is ±0.0: the mask must be the ranked one."""
    layer = make_layer(kind, "fixed", dtype=torch.float32)
    layer.method.prepare(layer)

    def ranked() -> torch.Tensor:
        ranking = layer.method.ranking_weight(layer, layer.weight.detach())
        return nm_mask(ranking, 2, 4, dim=layer.group_dim)

    frozen = layer.current_mask()
    pruned = linear_layout(layer, ~frozen).nonzero()
    with torch.no_grad():
        layer.weight.mul_(0.5)  # a training-like change: pruned weights stay zero
        linear_layout(layer, layer.weight)[tuple(pruned[0])] = -0.0
    assert layer.current_mask() is frozen  # the shortcut: the same tensor, not re-ranked
    assert torch.equal(frozen, ranked())
    with torch.no_grad():  # a pruned weight grows larger than every kept one: ranking moves the mask
        linear_layout(layer, layer.weight)[tuple(pruned[1])] = 1e3
    moved = layer.current_mask()
    assert moved is not frozen and torch.equal(moved, ranked()) and not torch.equal(moved, frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_layer_uses_its_pruned_weight_unmasked_with_the_same_bits(kind, monkeypatch):
    """Pruned weights at +0.0 make the weight its own masked copy: forward and backward skip masking it,
    and outputs and gradients keep the bits of `F.linear` on `W * mask`. A pruned -0.0 takes the masking
    path (masking writes +0.0 there)."""
    layer = make_layer(kind, "fixed", dtype=torch.float32)
    layer.method.prepare(layer)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    masking = []
    real_apply_mask = nm_hf.layers.functional.apply_mask
    monkeypatch.setattr(nm_hf.layers.functional, "apply_mask",
                        lambda *a, **k: masking.append(1) or real_apply_mask(*a, **k))
    x, grad_out = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    for step in range(4):  # step 0 reuses the mask cached at sparsify time and masks as before
        if step == 3:  # a pruned -0.0: the same mask, masked on the way
            with torch.no_grad():
                layer.weight[~layer.current_mask()] = -0.0
        expected = reference(layer, x, grad_out)
        masking.clear()
        y, gx, gw, gb = run(layer, x, grad_out)
        assert bool(masking) == (step in (0, 3)), step
        assert torch.equal(y, expected[0]) and torch.equal(gx, expected[1]), step
        assert torch.equal(gw, expected[2] * expected[4]) and torch.equal(gb, expected[3]), step
        optimizer.step()
        assert torch.equal(layer.weight.detach() != 0, layer.current_mask()), "pruned weights stay +0.0"


def test_unchanged_mask_hook_may_return_a_bare_mask(monkeypatch):
    """The hook's first form (a mask, no claim that the weight is already masked) still works: masked path."""
    from nm_hf.methods.fixed import FixedMethod

    previous_form = FixedMethod.unchanged_mask
    monkeypatch.setattr(FixedMethod, "unchanged_mask",
                        lambda self, layer, weight: (previous_form(self, layer, weight) or (None,))[0])
    layer = make_layer("linear", "fixed", dtype=torch.float32)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a new weight version: the hook runs on the next forward
    x, grad_out = torch.randn(3, IN), torch.randn(3, OUT)
    expected = reference(layer, x, grad_out)
    y, gx, gw, _ = run(layer, x, grad_out)
    assert torch.equal(y, expected[0]) and torch.equal(gx, expected[1])
    assert torch.equal(gw, expected[2] * expected[4])


def test_gradient_mode_layers_ignore_apply_decoupled_decay():
    layer = make_layer("linear", "sr-ste")  # decay_mode="gradient"
    before = layer.weight.detach().clone()
    assert apply_decoupled_decay(nn.Sequential(layer), lr=0.1) == 0
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["sr-ste", "ste", "fixed", "dense"])
def test_autocast_bf16_on_cpu(kind, method):
    layer = make_layer(kind, method, dtype=torch.float32)
    x = torch.randn(3, 5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    w = linear_layout(layer, layer.weight.detach())
    w_used = w * nm_mask(w, 2, 4) if method != "dense" else w
    expected = F.linear(x.bfloat16(), w_used.bfloat16(), layer.bias.detach().bfloat16())
    torch.testing.assert_close(y, expected)
    y.float().pow(2).sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["sr-ste", "fixed"])
def test_forward_and_backward_on_the_meta_device(kind, method):
    """Shape probes (torch.func, memory estimators) run a model on meta tensors: no data, same shapes."""
    layer = make_layer(kind, method, dtype=torch.float32).to("meta")
    x = torch.empty(3, 5, IN, device="meta", requires_grad=True)
    y = layer(x)
    assert y.is_meta and y.shape == (3, 5, layer.weight.numel() // IN)
    y.sum().backward()
    assert x.grad.is_meta and layer.weight.grad.is_meta and layer.weight.grad.shape == layer.weight.shape


def _count_mask_calls(monkeypatch) -> list:
    """Counts the layers' mask rankings (`nm_mask`, or `nm_mask_and_apply` in a training forward)."""
    calls = []

    def counting(real):
        def call(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        return call

    for name in ("nm_mask", "nm_mask_and_apply"):
        monkeypatch.setattr(nm_hf.layers.base, name, counting(getattr(nm_hf.layers.base, name)))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_eval_does_not_recompute_the_mask(kind, monkeypatch):
    layer = make_layer(kind, "sr-ste", dtype=torch.float32)
    calls = _count_mask_calls(monkeypatch)
    x = torch.randn(4, IN)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        for _ in range(4):
            assert torch.equal(layer(x), first)
    assert len(calls) == 1
    layer(x)  # eval with grad enabled: same weights, same cached mask
    assert len(calls) == 1

    with torch.no_grad():  # an in-place change bumps the weight's version: the mask must follow
        layer.weight.mul_(torch.rand_like(layer.weight) + 0.5)
        changed = layer(x)
    assert len(calls) == 2
    w = linear_layout(layer, layer.weight.detach())
    assert torch.allclose(changed, F.linear(x, w * nm_mask(w, 2, 4), layer.bias.detach()))

    layer.load_state_dict({"weight": torch.randn_like(layer.weight), "bias": layer.bias.detach()})
    with torch.no_grad():
        layer(x)
    assert len(calls) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_mask_follows_optimizer_steps(kind, monkeypatch):
    layer = make_layer(kind, "ste", dtype=torch.float32)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    calls = _count_mask_calls(monkeypatch)
    x = torch.randn(8, IN)
    masks = []
    for _ in range(4):
        layer(x).pow(2).sum().backward()  # forward uses the mask of the current weights ...
        masks.append(layer.current_mask().clone())
        w = linear_layout(layer, layer.weight.detach())
        assert torch.equal(linear_layout(layer, masks[-1]), nm_mask(w, 2, 4))
        layer(x)  # ... a second forward with the same weights (gradient accumulation) reuses it
        opt.step()
        opt.zero_grad()
    assert len(calls) == 4
    assert any(not torch.equal(masks[0], mk) for mk in masks[1:]), "lr too small: the mask never changed"


@pytest.mark.parametrize("kind", KINDS)
def test_mask_follows_fused_optimizer_steps(kind):
    """Fused kernels write the weights without bumping weight._version (the mask cache key)."""
    layer = make_layer(kind, "ste", dtype=torch.float32)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(32, IN)
    masks = []
    for _ in range(5):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        w = layer.weight.detach()
        masks.append(nm_mask(w, 2, 4, dim=layer.group_dim))
        assert torch.equal(layer.current_mask(), masks[-1])
    assert any(not torch.equal(masks[0], mk) for mk in masks[1:]), "lr too small: the mask never changed"


def test_writes_through_data_need_mark_weights_updated():
    layer = make_layer("linear", "ste", dtype=torch.float32)
    stale = layer.current_mask().clone()
    layer.weight.data.copy_(torch.randn_like(layer.weight))  # .data does not bump the version counter
    fresh = nm_mask(layer.weight.detach(), 2, 4)
    assert not torch.equal(fresh, stale)
    mark_weights_updated([layer])
    assert torch.equal(layer.current_mask(), fresh)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_entries_are_exact_positive_zeros(kind):
    """Masking gives +0.0 where pruned, also for negative and infinite pruned weights (inf * 0 is NaN)."""
    layer = make_layer(kind, "sr-ste", dtype=torch.float32)
    with torch.no_grad():
        w = linear_layout(layer, layer.weight)
        w[0, :4] = torch.tensor([float("inf"), -float("inf"), float("inf"), -5.0])  # 2:4 prunes one inf
        w[1, :4] = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    mask = layer.current_mask()
    eff = linear_layout(layer, layer.effective_weight())
    assert not eff.isnan().any()
    pruned = eff[~linear_layout(layer, mask)]
    assert (pruned == 0).all() and not torch.signbit(pruned).any()
    assert eff[0, :4].tolist() == [float("inf"), -float("inf"), 0.0, 0.0]
    assert eff[1, :4].tolist() == [0.0, 0.0, -3.0, -4.0]
    finite = torch.randn(3, IN)
    with torch.no_grad():
        w[0, :4] = 7.0  # finite weights again: the forward matches the dense product on the masked weight
        expected = F.linear(finite, linear_layout(layer, layer.effective_weight()), layer.bias)
        assert torch.isfinite(layer(finite)).all() and torch.allclose(layer(finite), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_training_after_inference_mode_evaluation(kind):
    layer = make_layer(kind, "sr-ste", dtype=torch.float32)
    x = torch.randn(4, IN)
    layer.eval()
    with torch.inference_mode():
        evaluated = layer(x)
    layer.train()
    y = layer(x)  # same weights: the cached mask is reused
    y.sum().backward()
    assert torch.allclose(y.detach(), evaluated)
    assert layer.weight.grad is not None


def test_layer_built_under_inference_mode():
    with torch.inference_mode():
        layer = make_layer("linear", "sr-ste", dtype=torch.float32).eval()
        x = torch.randn(2, IN)
        w = layer.weight
        first = layer(x)
        assert torch.allclose(first, F.linear(x, torch.where(nm_mask(w, 2, 4), w, 0), layer.bias))
        w.neg_().add_(torch.randn_like(w))  # in place, invisible to a version-counter key
        second = layer(x)
        assert torch.allclose(second, F.linear(x, torch.where(nm_mask(w, 2, 4), w, 0), layer.bias))


def test_gradcheck_input_and_bias_float64():
    torch.manual_seed(0)
    for layer in (make_layer("linear", "sr-ste"), make_layer("conv1d", "sr-ste")):
        x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda inp, lay=layer: lay(inp), (x,))
    # nm_linear with a given mask: input and bias gradients are exact, and with freeze_pruned the
    # weight gradient is the true derivative of x @ (W * mask)^T
    w = torch.randn(OUT, IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w.detach(), 2, 4)
    assert torch.autograd.gradcheck(lambda xx, ww, bb: nm_linear(xx, ww, bb, mask, freeze_pruned=True), (x, w, b))
    assert torch.autograd.gradcheck(lambda xx, bb: nm_linear(xx, w, bb, mask, decay=0.5), (x, b))


@pytest.mark.parametrize("shape", [(16, 12), (8, 1), (12, 8, "non-contiguous")])
@pytest.mark.parametrize("variant", ["decay", "freeze", "straight", "masked given", "weight is masked"])
def test_nm_linear_stored_transposed_is_the_transposed_call_bit_for_bit(shape, variant):
    """`stored_transposed=True` (weight, mask and masked given as stored [in, out], as SparseConv1D passes them)
    gives the output and every gradient of the call on their [out, in] views, bit for bit (the weight's
    gradient in the stored layout), also where the stored weight is not contiguous or has a dimension of 1."""
    torch.manual_seed(0)
    stored = torch.randn(shape[0], shape[1])
    if len(shape) == 3:
        stored = stored.t().contiguous().t()
    mask = nm_mask(stored, 2, 4, dim=0)
    if variant == "weight is masked":
        stored = apply_mask(stored, mask)
    x = torch.randn(3, 5, shape[0])
    bias = torch.randn(shape[1])
    decay = 0.5 if variant == "decay" else 0.0
    results = []
    for given_stored in (False, True):
        w = stored.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        xx = x.clone().requires_grad_()
        m = mask if given_stored else mask.t()
        weight = w if given_stored else w.t()
        masked = None
        if variant == "masked given":
            masked = apply_mask(w.detach(), mask)
            masked = masked if given_stored else masked.t()
        elif variant == "weight is masked":
            masked = weight
        y = nm_linear(xx, weight, b, m, decay=decay, freeze_pruned=variant == "freeze", masked=masked,
                      stored_transposed=given_stored)
        y.pow(2).sum().backward()
        results.append([y.detach(), xx.grad, w.grad, b.grad])
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("n, m", [(1, 4), (4, 8), (1, 2), (2, 8)])
def test_other_patterns(n, m):
    layer = make_layer("linear", "sr-ste", n=n, m=m)
    x = torch.randn(4, IN, dtype=torch.float64)
    mask = layer.current_mask()
    assert torch.equal(mask.reshape(OUT, IN // m, m).sum(-1), torch.full((OUT, IN // m), n))
    assert torch.allclose(layer(x), F.linear(x, layer.weight * mask, layer.bias))


def test_same_parameters_and_state_dict_keys_as_dense_layers():
    assert set(SparseLinear(IN, OUT).state_dict()) == set(nn.Linear(IN, OUT).state_dict()) == {"weight", "bias"}
    assert SparseConv1D(OUT, IN).weight.shape == Conv1D(OUT, IN).weight.shape == (IN, OUT)
    assert set(SparseConv1D(OUT, IN).state_dict()) == set(Conv1D(OUT, IN).state_dict())
    assert SparseLinear(IN, OUT, bias=False).bias is None
    x = torch.randn(2, IN)
    layer = SparseLinear(IN, OUT, bias=False, config=SparsityConfig(method="ste"))
    assert torch.allclose(layer(x), x @ (layer.weight * layer.current_mask()).t())
    assert "n:m=2:4" in repr(layer) and "n:m=2:4" in repr(SparseConv1D(OUT, IN))


def test_input_size_not_divisible_by_m():
    with pytest.raises(ValueError, match="in_features=6 is not divisible by m=4"):
        SparseLinear(6, 4)
    with pytest.raises(ValueError, match="nx=6 .*not divisible by m=4"):
        SparseConv1D(4, 6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_training_under_torch_compile_matches_eager(one_thread, model_type):
    """Masks are recomputed in the compiled forward (a graph break at each layer's mask lookup); the linear
    map and its backward are traced with the torch expressions; training matches eager."""
    import copy

    import nm_hf
    from tiny_models import tiny_inputs, tiny_model

    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model_type == "gpt2" else {}
    base = tiny_model(model_type, **no_dropout)
    nm_hf.sparsify(base, SparsityConfig(method="sr-ste", decay=0.5))
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base).train()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        batch = tiny_inputs(model)
        losses = []
        for _ in range(3):
            loss = forward(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            nm_hf.after_optimizer_step(model, 0.05)
            losses.append(loss.item())
        masks = [layer.current_mask().clone() for _, layer in nm_hf.iter_sparse_layers(model)]
        runs.append((losses, masks))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))



@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_sr_ste_decay_term_survives_inductor(one_thread, kind, input_grad):
    """Inductor's addmm fusion drops the alpha of `add(mm, term, alpha=decay)` (torch 2.13): the traced
    backward must not express the decay term that way, or the term comes out 1/decay times too large."""
    import copy

    import nm_hf

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16))
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", decay=0.5))
    x = torch.randn(4, 16, requires_grad=input_grad)
    grads = []
    for compiled in (False, True):
        twin = copy.deepcopy(model).train()
        forward = torch.compile(twin, backend="inductor") if compiled else twin
        forward(x).square().sum().backward()
        grads.append(twin[0].weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_compiled_forward_breaks_its_graph_only_at_the_mask_lookups(one_thread, model_type):
    """Each break splits the compiled model (no fusion across it). Only each layer's mask lookup may break,
    which breaks the frames around it too (at most two breaks per layer here); the linear map, its backward
    and SR-STE's decay term are traced. (Before: 37 breaks for GPT-2's 8 sparse layers, 32 for Llama's 14.)"""
    import nm_hf
    from tiny_models import tiny_inputs, tiny_model

    def breaks(model) -> int:
        batch = tiny_inputs(model)
        return torch._dynamo.explain(model)(**batch, labels=batch["input_ids"]).graph_break_count

    model = tiny_model(model_type).train()
    dense = breaks(model)
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", decay=0.5))
    layers = len(list(nm_hf.iter_sparse_layers(model)))
    assert breaks(model) <= dense + 2 * layers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("write", ["data", "numpy"])
def test_a_write_the_mask_key_cannot_see_never_makes_the_fixed_forward_dense(kind, write):
    """Pruned entries written without a version bump (`.data`, numpy; FSDP2 refills its all-gathered tensor the
    same way) leave the mask stale as before, but the forward still computes with `W * mask`, never W."""
    layer = make_layer(kind, "fixed", dtype=torch.float32)
    layer.method.prepare(layer)  # make_layer re-initialises Conv1D weights after sparsify
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x, grad_out = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    for _ in range(2):
        run(layer, x, grad_out)
        optimizer.step()
    run(layer, x, grad_out)
    assert layer._nm_weight_is_masked  # the weight is its own masked copy
    mask = layer.cached_mask()
    with torch.no_grad():
        if write == "data":
            layer.weight.data.masked_fill_(~mask, 1.0)
        else:
            target = layer.weight.detach().numpy()
            target[~mask.numpy()] = 1.0
    y = run(layer, x, grad_out)[0]
    w = linear_layout(layer, layer.weight.detach())
    assert torch.equal(y, F.linear(x, w * linear_layout(layer, mask), layer.bias.detach()))


def test_a_float8_fixed_layer_still_finds_its_mask():
    layer = make_layer("linear", "fixed", dtype=torch.float32).to(torch.float8_e4m3fn)
    assert torch.equal(layer.current_mask(), layer.cached_mask())
    assert layer.effective_weight().dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("method", ["ste", "fixed"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_new_weight_tensor_at_a_freed_ones_address_misses_the_caches(method, mode):
    """`torch.func.functional_call` with a fresh weight per call: the allocator hands each new tensor the address of
    the one freed after the previous call, at the same version (0); the mask and eval-weight caches must not hit."""
    from torch.func import functional_call

    layer = make_layer("linear", method, dtype=torch.float32).train(mode == "train")
    x = torch.randn(3, IN)
    for seed in range(6):
        weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = functional_call(layer, {"weight": weight, "bias": layer.bias.detach()}, (x,))
        masked = weight * nm_mask(weight, layer.nm_n, layer.nm_m, dim=1)
        assert torch.allclose(y, F.linear(x, masked, layer.bias.detach()), atol=1e-6), seed
        del weight, y


def test_mask_lookups_of_a_fixed_layer_do_not_reread_its_weight(monkeypatch):
    """The tracker's and PEFT's `current_mask()` on a cache hit return the cached mask without the one-read
    check the forward needs before it uses the weight unmasked; the forward still checks."""
    layer = make_layer("linear", "fixed", dtype=torch.float32)
    x = torch.randn(3, IN)
    layer(x)  # first forward: chooses the mask; the weight is not yet masked
    with torch.no_grad():
        layer.weight.mul_(layer.current_mask())  # now its own masked copy (pruned entries +0.0)
    layer(x)
    reads = []
    real = nm_hf.layers.base.pruned_nonzero
    monkeypatch.setattr(nm_hf.layers.base, "pruned_nonzero", lambda *a, **k: reads.append(1) or real(*a, **k))
    mask = layer.current_mask()
    assert torch.equal(mask, layer.cached_mask()) and reads == []
    layer(x)  # a training forward on a cache hit checks before using the weight unmasked
    assert len(reads) == 1


@pytest.mark.parametrize("method", ["ste", "decaying-mask"])
def test_a_compiled_forward_is_not_recompiled_at_every_counted_step(one_thread, method):
    """A layer whose forward reads the counted steps (a periodic mask; decaying-mask's factor) must not guard its
    compiled frame on `nm_step`: it changes every step, and after 8 recompiles torch.compile runs the layer eagerly."""
    import nm_hf

    torch.manual_seed(0)
    config = (SparsityConfig(method="ste", mask_update_interval=2) if method == "ste"
              else SparsityConfig(method=method, method_args={"decay_steps": 10}))
    model = nn.Sequential(nn.Linear(16, 8))
    nm_hf.sparsify(model, config)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    try:
        for step in range(6):
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                compiled(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            nm_hf.after_optimizer_step(model, 0.01)
    finally:
        torch._dynamo.reset()
