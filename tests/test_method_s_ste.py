"""S-STE: soft-thresholded forward weight, a scale per weight matrix (per expert for fused expert weights) fixed
at sparsify time, straight-through gradient.

Every formula is checked against a reference written here with Python loops over the groups (the
paper's definition), not against the library's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_layers_experts import tiny_moe
from torch import nn

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.injection import baked_weights
from nm_hf.layers import SparseConv1D, SparseLinear
from nm_hf.masks import check_nm, nm_mask_transposable
from nm_hf.methods import get_method, s_ste
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


# ---------------------------------------------------------------- fused MoE expert weights: one beta per expert

EXPERT_MODELS = ["mixtral", "gpt_oss"]  # [E, out, in] and [E, in, out]


def sparse_moe(model_type: str):
    model = tiny_moe(model_type)
    nm_hf.sparsify(model, SparsityConfig(method="s-ste"))
    experts = {name: layer for name, layer in nm_hf.iter_sparse_layers(model) if layer.is_parameter_target}
    assert experts
    return model, experts


def expert_slice_out_in(layer, e: int) -> torch.Tensor:
    """Expert `e`'s matrix as a linear's [out, in] weight."""
    w = layer.weight.detach().select(layer.expert_dim, e)
    return w if layer.group_dim - 1 == 1 else w.t()


@pytest.mark.parametrize("model_type", EXPERT_MODELS)
def test_expert_weights_get_the_betas_of_separate_per_expert_linears(model_type):
    model, experts = sparse_moe(model_type)
    for name, layer in experts.items():
        weight, mask = layer.weight.detach(), layer.current_mask()
        assert layer.expert_dim == 0
        scales = layer.nm_method_state["scale"]
        assert isinstance(scales, list) and len(scales) == weight.shape[0], name
        for e, beta in enumerate(scales):
            alone = s_ste.soft_threshold(weight[e], mask[e], 4, layer.group_dim - 1)
            assert beta == s_ste.least_squares_scale(weight[e], alone)  # the expert's slice taken alone
            w = expert_slice_out_in(layer, e).double()
            assert beta == pytest.approx(reference_scale(w, reference_soft_threshold(w, 2, 4)), rel=1e-6)  # S in fp32
            linear = SparseLinear(w.shape[1], w.shape[0], bias=False, config=SparsityConfig(method="s-ste"))
            with torch.no_grad():
                linear.weight.copy_(expert_slice_out_in(layer, e))
            linear.method.prepare(linear)
            assert linear.nm_method_state["scale"] == pytest.approx(beta, rel=1e-12)  # the unfused model's beta
        assert len(set(scales)) > 1  # (the experts do differ)
        assert f"scale per expert=[{scales[0]:.4g}, " in repr(layer)
    linear = next(layer for _, layer in nm_hf.iter_sparse_layers(model) if not layer.is_parameter_target)
    assert linear.expert_dim is None and isinstance(linear.nm_method_state["scale"], float)


@pytest.mark.parametrize("model_type", EXPERT_MODELS)
def test_expert_forward_and_bake_scale_each_expert_by_its_own_beta(model_type):
    model, experts = sparse_moe(model_type)
    model.train()
    for name, layer in experts.items():
        weight, mask = layer.weight.detach(), layer.current_mask()
        alone = [s_ste.soft_threshold(weight[e], mask[e], 4, layer.group_dim - 1) for e in range(weight.shape[0])]
        betas = [s_ste.least_squares_scale(weight[e], s) for e, s in enumerate(alone)]  # each expert's own
        expected = torch.stack([s.mul(beta) for s, beta in zip(alone, betas, strict=True)])
        assert torch.equal(layer.effective_weight(), expected), name  # bake: what eval and finalize use
        used = layer.forward_tensor()  # the training forward weight
        assert torch.equal(used.detach(), expected), name
        grad = torch.randn_like(used)
        used.backward(grad)
        assert torch.equal(layer.weight.grad, grad)  # straight-through, no factor beta
        assert check_nm(expected, 2, 4, dim=layer.group_dim)
    model.zero_grad()
    baked = baked_weights(model)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    reference = tiny_moe(model_type).train()  # plain tensors: each expert's beta_e * S(W_e) in place
    reference.load_state_dict({**model.state_dict(), **baked})
    for name, layer in experts.items():
        assert torch.equal(reference.get_parameter(name).detach(), layer.effective_weight())
    torch.testing.assert_close(logits, reference(input_ids=ids).logits)


def test_expert_scales_are_saved_resumed_and_checked(tmp_path):
    model, experts = sparse_moe("mixtral")
    with torch.no_grad():  # training moves the weights away from the ones the scales were taken from
        for p in model.parameters():
            p.mul_(1.5)
    path = tmp_path / "state.pt"
    torch.save(nm_hf.sparse_training_state(model), path)
    state = torch.load(path, weights_only=True)  # plain Python: the scales are a list of floats
    resumed = tiny_moe("mixtral")
    resumed.load_state_dict(model.state_dict())
    nm_hf.sparsify(resumed, SparsityConfig(method="s-ste"))
    resumed_experts = {name: layer for name, layer in nm_hf.iter_sparse_layers(resumed)
                       if layer.is_parameter_target}
    name = next(iter(experts))
    assert resumed_experts[name].nm_method_state["scale"] != experts[name].nm_method_state["scale"]

    layer = resumed_experts[name]
    count = layer.weight.shape[0]
    wrong = {**state, "layers": {**state["layers"], name: {"method_state": {"scale": [1.0] * (count - 1)}}}}
    before = dict(layer.nm_method_state)
    with pytest.raises(ValueError, match=f"layer {name!r}: method 's-ste' needs one scale per expert: the layer "
                                         f"has {count} experts, the state {count - 1} scales"):
        nm_hf.load_sparse_training_state(resumed, wrong)
    assert layer.nm_method_state == before  # refused before anything was restored

    nm_hf.load_sparse_training_state(resumed, state)
    for key, saved in experts.items():
        assert resumed_experts[key].nm_method_state == saved.nm_method_state
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=ids).logits, model(input_ids=ids).logits)


def test_expert_state_check():
    _, experts = sparse_moe("mixtral")
    layer = next(iter(experts.values()))
    count = layer.weight.shape[0]
    method = get_method("s-ste")
    assert method.check_state(layer, {"scale": [1, 2.5] + [1.0] * (count - 2)}) == \
        {"scale": [1.0, 2.5] + [1.0] * (count - 2)}
    # a state saved when one beta served every expert: taken for each expert (the forward it trained with)
    assert method.check_state(layer, {"scale": 1.25}) == {"scale": [1.25] * count}
    for bad in ({}, {"scale": [1.0] * (count - 1) + [math.inf]}, {"scale": [True] * count},
                {"scale": [1.0] * count, "other": 1}, {"scale": "1"}):
        with pytest.raises(ValueError, match=rf"method 's-ste' needs its state as \{{'scale': finite number or "
                                             rf"list of {count} finite numbers\}}"):
            method.check_state(layer, bad)
    for bad in ({"scale": [1.0] * (count + 1)}, {"scale": []}):
        with pytest.raises(ValueError, match="needs one scale per expert"):
            method.check_state(layer, bad)
    with pytest.raises(ValueError, match=r"\{'scale': finite number\}, got"):  # a 2-D layer keeps one float
        method.check_state(make_layer("linear"), {"scale": [1.0] * OUT})


def test_a_shard_of_an_expert_weight_bakes_with_its_own_experts_betas():
    """FSDP2 shards dim 0, the experts: rank 1 of 2 holds experts 2 and 3 and must scale them by theirs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _, experts = sparse_moe("mixtral")
    layer = next(iter(experts.values()))
    full = layer.weight.detach().clone()
    expected = layer.effective_weight()
    assert len(set(layer.nm_method_state["scale"])) == 4
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        shard = DTensor.from_local(full[2:].clone(), mesh, [Shard(0)], run_check=False, shape=full.shape,
                                   stride=full.stride())
        layer.owner._parameters[layer.parameter] = nn.Parameter(shard)
        baked = layer.effective_weight()
        assert isinstance(baked, DTensor) and torch.equal(baked.to_local(), expected[2:])
    finally:
        dist.destroy_process_group()
