"""SparsityConfig mask options on real layers: transposable masks and mask_update_interval.

Covers every method that re-chooses its mask: N:M along both dims of every block (transposable),
masks that move only every k counted optimizer steps, the tracker counting exactly the masks used,
baking, the record, and an exact resume through `sparse_training_state`.
"""

from __future__ import annotations

import pytest
import torch

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.injection import baked_weights
from nm_hf.masks import check_nm, nm_mask, nm_mask_transposable
from nm_hf.methods import available_methods, get_method
from nm_hf.record import config_from_record
from tiny_models import tiny_inputs, tiny_model, train_steps

MOVING = [m for m in available_methods() if get_method(m).recomputes_mask]
KIND_MODELS = ["llama", "gpt2"]  # nn.Linear (groups along dim 1) and GPT-2 Conv1D (groups along dim 0)


def record_masks(model, masks: list):
    """An `on_step` for `train_steps`: append (mask in use, mask the weights have now) after each step."""

    def record() -> None:
        layers = list(nm_hf.iter_sparse_layers(model))
        masks.append(({name: layer.current_mask().clone() for name, layer in layers},
                      {name: nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim)
                       for name, layer in layers}))

    return record


def test_the_methods_that_move_their_mask():
    assert {"sr-ste", "ste", "s-ste", "decaying-mask"} <= set(MOVING)
    assert not {"fixed", "dense"} & set(MOVING)


@pytest.mark.parametrize("model_type", KIND_MODELS)
@pytest.mark.parametrize("method", MOVING)
def test_transposable_masks_through_training_and_finalize(model_type, method):
    model = tiny_model(model_type)
    nm_hf.sparsify(model, SparsityConfig(method=method, transposable=True, decay=0.5))
    layers = dict(nm_hf.iter_sparse_layers(model))
    train_steps(model, 2)
    for name, layer in layers.items():
        mask = layer.current_mask()
        assert torch.equal(mask, nm_mask_transposable(layer.weight.detach(), 2, 4, dim=layer.group_dim)), name
        baked = layer.effective_weight()
        assert check_nm(baked, 2, 4, dim=0) and check_nm(baked, 2, 4, dim=1), name  # rows and columns
    assert model.config.nm_sparsity["transposable"] is True
    nm_hf.finalize(model)
    for name in layers:
        weight = model.get_submodule(name).weight.detach()
        assert check_nm(weight, 2, 4, dim=0) and check_nm(weight, 2, 4, dim=1), name


def test_transposable_is_the_same_mask_for_both_layouts():
    """A Conv1D stores the transpose of a Linear weight: its mask is the transpose too."""
    llama = tiny_model("llama")
    nm_hf.sparsify(llama, SparsityConfig(transposable=True, target_modules=["up_proj"]))
    layer = llama.model.layers[0].mlp.up_proj
    stored_transposed = layer.weight.detach().t().contiguous()
    assert torch.equal(nm_mask_transposable(stored_transposed, 2, 4, dim=0).t(), layer.current_mask())


@pytest.mark.parametrize("model_type", KIND_MODELS)
@pytest.mark.parametrize("method", ["sr-ste", "s-ste"])
def test_masks_move_only_every_k_steps_and_the_tracker_counts_exactly(model_type, method):
    k = 3
    model = tiny_model(model_type)
    nm_hf.sparsify(model, SparsityConfig(method=method, mask_update_interval=k, decay=0.5))
    tracker = nm_hf.SparsityTracker(model)
    initial = {name: layer.current_mask().clone() for name, layer in nm_hf.iter_sparse_layers(model)}
    masks: list[tuple[dict, dict]] = []
    # tracker.step() marks the weights updated: no effect
    train_steps(model, 7, tracker=tracker, on_step=record_masks(model, masks))
    history = [initial, *(used for used, _ in masks)]
    for step in range(1, 8):
        used, fresh = masks[step - 1]
        if step % k:
            assert all(torch.equal(used[n], history[step - 1][n]) for n in initial), f"mask moved at step {step}"
            assert any(not torch.equal(used[n], fresh[n]) for n in initial)  # it lags the weights
        else:  # refreshed: the mask of the weights after this step
            assert all(torch.equal(used[n], fresh[n]) for n in initial), f"no refresh at step {step}"
    assert any((history[3][n] != initial[n]).any() for n in initial)  # the lr is large: masks did move
    flips = sum(int((history[s][n] != history[s - 1][n]).sum()) for s in range(1, 8) for n in initial)
    metrics = tracker.log_metrics(7)
    assert metrics["sparsity/sad"] == sum(int((history[7][n] != initial[n]).sum()) for n in initial)
    assert metrics["sparsity/flip_rate"] == pytest.approx(flips / (7 * tracker.num_masked_weights))
    assert model.config.nm_sparsity["mask_update_interval"] == k


def test_baking_a_state_dict_uses_the_mask_in_use():
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="ste", mask_update_interval=5))
    train_steps(model, 2)  # weights moved, the mask is still the initial one
    state = model.state_dict()
    baked = baked_weights(model, state)
    for name, layer in nm_hf.iter_sparse_layers(model):
        key = f"{name}.weight"
        assert torch.equal(baked[key], layer.effective_weight())
        assert torch.equal(baked[key] != 0, layer.current_mask() & (state[key] != 0))


@pytest.mark.parametrize("model_type", KIND_MODELS)
def test_a_copy_of_the_model_keeps_the_periodic_mask_it_trained_with(model_type):
    """Mid-interval the mask lags the weights: a deep copy (an EMA model, a copy finalized while the
    original trains on) or a model moved to another dtype must compute with that mask, not re-choose it."""
    import copy

    model = tiny_model(model_type)
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", mask_update_interval=5))
    train_steps(model, 3)  # the mask is still the one chosen at step 0
    layers = [layer for _, layer in nm_hf.iter_sparse_layers(model)]
    in_use = [layer.current_mask().clone() for layer in layers]
    assert any(not torch.equal(mask, nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))
               for mask, layer in zip(in_use, layers, strict=True))  # stale: the test can tell them apart
    inputs = tiny_inputs(model)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    twin = copy.deepcopy(model)
    for mask, (_, layer) in zip(in_use, nm_hf.iter_sparse_layers(twin), strict=True):
        assert torch.equal(layer.current_mask(), mask)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, expected)
    nm_hf.finalize(twin)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, expected)
    model.double()  # another dtype: the mask is kept until the next refresh
    for mask, layer in zip(in_use, layers, strict=True):
        assert torch.equal(layer.current_mask(), mask)
    train_steps(model, 2)  # step 5: the refresh chooses a new mask from the weights
    assert all(torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))
               for layer in layers)


def test_a_probe_with_meta_weights_keeps_the_periodic_mask():
    from torch import nn
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", mask_update_interval=5))
    x = torch.randn(2, 16)
    model(x)
    layers = [layer for _, layer in nm_hf.iter_sparse_layers(model)]
    in_use = [layer.current_mask().clone() for layer in layers]
    meta = {name: torch.empty_like(p, device="meta") for name, p in model.named_parameters()}
    probe = functional_call(model, meta, (x.to("meta"),))  # a shape probe, as torch.func / FSDP tooling do
    assert probe.shape == (2, 4) and probe.is_meta
    # ... and it must not leave the layers' periodic masks on the meta device
    assert all(torch.equal(layer.current_mask(), mask) for layer, mask in zip(layers, in_use, strict=True))
    assert model(x).shape == (2, 4)


def test_resume_with_the_training_state_is_exact():
    config = SparsityConfig(method="sr-ste", mask_update_interval=3, decay=0.5)
    torch.manual_seed(0)
    straight = tiny_model("llama")
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    nm_hf.sparsify(straight, config)
    train_steps(straight, 4)
    saved_weights = {k: v.clone() for k, v in straight.state_dict().items()}
    saved_state = nm_hf.sparse_training_state(straight)
    assert saved_state["step"] == 4 and all("mask" in e for e in saved_state["layers"].values())

    resumed = tiny_model("llama")
    resumed.load_state_dict(initial)
    nm_hf.sparsify(resumed, config)
    resumed.load_state_dict(saved_weights)
    nm_hf.load_sparse_training_state(resumed, saved_state)
    for name, layer in nm_hf.iter_sparse_layers(resumed):
        # step 4: the mask is the one chosen at step 3, not the one of the loaded weights
        assert torch.equal(layer.current_mask(), straight.get_submodule(name).current_mask()), name
    inputs = tiny_inputs(straight)
    with torch.no_grad():
        assert torch.equal(resumed(**inputs).logits, straight(**inputs).logits)


def test_training_state_mismatches_are_refused_before_anything_changes():
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="ste", mask_update_interval=2))
    state = nm_hf.sparse_training_state(model)
    other = tiny_model("llama")
    nm_hf.sparsify(other, SparsityConfig(method="ste", mask_update_interval=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="missing .*unexpected"):
        nm_hf.load_sparse_training_state(other, state)
    name = next(iter(state["layers"]))
    broken = {**state, "layers": {**state["layers"], name: {"method_state": {}, "mask": torch.zeros(3)}}}
    with pytest.raises(ValueError, match=f"layer {name!r}: the mask must be a bool tensor"):
        nm_hf.load_sparse_training_state(model, {**broken, "step": 7})
    assert nm_hf.injection.training_step(model) == 0  # nothing was applied
    with pytest.raises(ValueError, match="not a sparse training state"):
        nm_hf.load_sparse_training_state(model, {"step": 1})


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(method="dense", transposable=True), "transposable=True needs a method that re-chooses its mask"),
    (dict(method="fixed", transposable=True), "method 'fixed' does not"),
    (dict(method="fixed", mask_update_interval=40), "mask_update_interval=40 needs a method"),
    (dict(n=2, m=8, transposable=True), "transposable: transposable masks support 1:2, 1:4, 2:4, 3:4"),
    (dict(transposable=1), "transposable must be True or False"),
    (dict(mask_update_interval=0), "mask_update_interval must be a positive integer"),
    (dict(mask_update_interval=2.0), "mask_update_interval must be a positive integer"),
    (dict(mask_update_interval=True), "mask_update_interval must be a positive integer"),
])
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_options_round_trip_through_the_record():
    config = SparsityConfig(method="ste", transposable=True, mask_update_interval=40)
    data = config.to_dict()
    assert data["transposable"] is True and data["mask_update_interval"] == 40
    assert SparsityConfig.from_dict(data) == config
    assert config_from_record({**data, "targeted_modules": ["a"], "state": "training"}) == config
    # records written before these options existed read as the defaults
    old = {k: v for k, v in data.items() if k not in ("transposable", "mask_update_interval")}
    assert SparsityConfig.from_dict(old) == SparsityConfig(method="ste")
    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    assert "transposable" in repr(model.model.layers[0].mlp.up_proj)
    assert nm_hf.injection.sparsity_config_of(model) == config


def test_decoupled_decay_does_not_refresh_a_periodic_mask():
    """Regression: SR-STE's decoupled decay re-stamps the mask after shrinking pruned weights; with
    mask_update_interval > 1 that re-stamp must keep the periodic key (it refreshed the mask every step)."""
    model = tiny_model("llama")
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", decay=0.5, decay_mode="decoupled", mask_update_interval=3))
    initial = {name: layer.current_mask().clone() for name, layer in nm_hf.iter_sparse_layers(model)}
    masks: list[tuple[dict, dict]] = []
    train_steps(model, 6, on_step=record_masks(model, masks))
    after = [initial, *(used for used, _ in masks)]  # after[s]: the mask in use after step s
    for step in (1, 2, 4, 5):
        assert all(torch.equal(after[step][n], after[step - 1][n]) for n in initial), step
    assert any(not torch.equal(after[3][n], after[2][n]) for n in initial)  # refreshed at step 3


@pytest.mark.parametrize("model_type", KIND_MODELS)
def test_loading_new_weights_gives_a_periodic_mask_of_their_own(model_type):
    """Mid-interval, a state dict loaded into the model (another checkpoint, the best model at the end of
    training) brings weights the mask in use was not chosen from: the mask is chosen again from them.
    A load without the weights (e.g. only biases or adapter keys) keeps it."""
    model = tiny_model(model_type)
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste", mask_update_interval=5))
    train_steps(model, 2)
    other = tiny_model(model_type, seed=1)
    nm_hf.sparsify(other, SparsityConfig(method="sr-ste", mask_update_interval=5))
    layers = dict(nm_hf.iter_sparse_layers(model))
    in_use = {name: layer.current_mask().clone() for name, layer in layers.items()}
    not_weights = {k: v for k, v in other.state_dict().items() if not k.endswith(".weight")}
    model.load_state_dict(not_weights, strict=False)
    assert all(torch.equal(layer.current_mask(), in_use[name]) for name, layer in layers.items())
    model.load_state_dict(other.state_dict())
    for name, layer in layers.items():
        assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim)), name
    assert any(not torch.equal(layer.current_mask(), in_use[name]) for name, layer in layers.items())
