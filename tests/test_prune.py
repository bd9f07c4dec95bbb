"""`nm_hf.prune`: one-shot N:M pruning (magnitude, Wanda, SparseGPT) of a dense model, checked independently."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.injection import find_target_modules, iter_sparse_layers, sparsify, sparsity_config_of
from nm_hf.layers import as_out_in, group_dim_of, iter_targets
from nm_hf.masks import check_nm, nm_mask
from nm_hf.prune import _prune_sparsegpt, _Statistics
from nm_hf.record import CONFIG_KEY
from tiny_models import VOCAB, tiny_model

BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}


def calibration(batches: int = 4, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token batches; the last one is right-padded (its padded positions must not count)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batches):
        ids = torch.randint(3, VOCAB, (4, length), generator=g)
        mask = torch.ones_like(ids)
        if i == batches - 1:
            mask[1:, length // 2:] = 0
            ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def layer_inputs(model, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Each named layer's inputs over the batches as [tokens, in], padded positions left out."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    current = {}

    def hook(name):
        def record(module, args, out):
            x = args[0]
            seen[name].append(x[current["mask"]].reshape(-1, x.shape[-1]).detach().float())
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    model.eval()  # no dropout (prune runs the model in eval mode)
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def targets_in_block(model, block: int, model_type: str) -> list[str]:
    prefix = f"{BLOCKS[model_type]}.{block}."
    return [n for n in find_target_modules(model, SparsityConfig()) if n.startswith(prefix)]


def out_in(module, weight=None) -> torch.Tensor:
    return as_out_in(module, weight if weight is not None else module.weight).detach()


# --------------------------------------------------------------------------- the criteria


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_magnitude_mask_is_nm_mask_of_the_weights(model_type):
    model = tiny_model(model_type)
    dense = copy.deepcopy(model)
    nm_hf.prune(model, SparsityConfig(method="fixed"), criterion="magnitude")
    layers = list(iter_sparse_layers(model))
    assert len(layers) == len(find_target_modules(dense, SparsityConfig()))
    for name, layer in layers:
        original = dense.get_submodule(name).weight
        expected = nm_mask(original.abs(), 2, 4, dim=group_dim_of(layer))
        assert torch.equal(layer.weight != 0, expected), name
        assert torch.equal(layer.weight[expected], original[expected]), name  # kept weights untouched
        assert torch.equal(layer.current_mask(), expected), name


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_wanda_masks_follow_the_inputs_of_the_already_pruned_blocks(model_type):
    model = tiny_model(model_type)
    dense = copy.deepcopy(model)
    batches = calibration()
    nm_hf.prune(model, SparsityConfig(), criterion="wanda", calibration=batches, progress=False)

    def expected(module, original, x):
        return nm_mask(out_in(module, original).abs() * x.norm(dim=0)[None, :], 2, 4, dim=1)

    # block 0: the inputs of the dense model
    first = targets_in_block(dense, 0, model_type)
    inputs = layer_inputs(dense, first, batches)
    for name in first:
        module = model.get_submodule(name)
        assert torch.equal(out_in(module) != 0, expected(module, dense.get_submodule(name).weight, inputs[name])), name
    # block 1: inputs from the pruned block 0 (and block 1's own dense layers)
    second = targets_in_block(dense, 1, model_type)
    probe = copy.deepcopy(model)
    nm_hf.finalize(probe)
    with torch.no_grad():
        for name in second:
            probe.get_submodule(name).weight.copy_(dense.get_submodule(name).weight)
    inputs = layer_inputs(probe, second, batches)
    for name in second:
        module = model.get_submodule(name)
        assert torch.equal(out_in(module) != 0, expected(module, dense.get_submodule(name).weight, inputs[name])), name
    assert all(check_nm(layer.weight, 2, 4, dim=layer.group_dim) for _, layer in iter_sparse_layers(model))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_each_block_gets_its_own_attention_mask_and_rotary_embeddings(criterion):
    # Gemma 3: block 0 attends in a sliding window with local rotary embeddings, block 1 globally; the
    # statistics of block 1 must come from its own inputs (here block 0 is not pruned: the dense model's)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64, sliding_window=4, pad_token_id=0,
                                  layer_types=["sliding_attention", "full_attention"])
    dense = AutoModelForCausalLM.from_config(config)
    model = copy.deepcopy(dense)
    names = ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    batches = calibration()
    inputs = layer_inputs(dense, names, batches)
    nm_hf.prune(model, SparsityConfig(target_modules=names), criterion=criterion, calibration=batches,
                progress=False)
    alone = copy.deepcopy(dense)
    for name in names:
        x, reference = inputs[name], dense.get_submodule(name).weight.detach()
        weight = model.get_submodule(name).weight.detach()
        if criterion == "wanda":
            expected = nm_mask(reference.abs() * x.norm(dim=0)[None, :], 2, 4, dim=1)
            assert torch.equal(weight != 0, expected), name
        else:  # SparseGPT's update with the Hessian of the layer's real inputs
            stats = _Statistics(x.shape[1], x.device, hessian=True)
            stats.add(x)
            target = {t.name: t for t in iter_targets(alone)}[name]
            _prune_sparsegpt(target, stats, SparsityConfig(), block_size=128, damping=0.01)
            assert torch.allclose(weight, target.weight, rtol=1e-4, atol=1e-6), name


def test_padding_is_left_out_of_inputs_the_model_flattens():
    # Qwen2-MoE's shared expert gets the hidden states as [batch * length, hidden]
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                  num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    dense = AutoModelForCausalLM.from_config(config)
    model = copy.deepcopy(dense)
    name = "model.layers.0.mlp.shared_expert.up_proj"
    batches = calibration()
    seen, current = [], {}
    handle = dense.get_submodule(name).register_forward_hook(
        lambda module, args, out: seen.append(args[0][current["mask"].reshape(-1)]))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            dense(**batch, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    nm_hf.prune(model, SparsityConfig(target_modules=[name]), criterion="wanda", calibration=batches, progress=False)
    reference = dense.get_submodule(name).weight.detach()
    expected = nm_mask(reference.abs() * x.norm(dim=0)[None, :], 2, 4, dim=1)
    assert torch.equal(model.get_submodule(name).weight != 0, expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sparsegpt_reconstructs_every_layer_better_than_magnitude(model_type):
    batches = calibration()
    dense = tiny_model(model_type)
    names = find_target_modules(dense, SparsityConfig())
    inputs = layer_inputs(dense, names, batches)
    pruned = {}
    for criterion in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        nm_hf.prune(model, SparsityConfig(), criterion=criterion,
                    calibration=batches if criterion == "sparsegpt" else None, progress=False)
        pruned[criterion] = model
    for name in names:
        x, reference = inputs[name], out_in(dense.get_submodule(name))
        errors = {}
        for criterion, model in pruned.items():
            weight = out_in(model.get_submodule(name))
            assert check_nm(weight, 2, 4, dim=1), (criterion, name)
            errors[criterion] = (x @ (reference - weight).t()).square().sum().item()
        assert errors["sparsegpt"] < errors["magnitude"], (name, errors)


def test_sparsegpt_moves_the_kept_weights_and_handles_dead_inputs():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    batches = calibration()
    name = "model.layers.0.mlp.down_proj"
    # an input feature of down_proj that is always 0 (its Hessian row is empty)
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: (args[0].index_fill(-1, torch.tensor([5]), 0.0),))
    nm_hf.prune(model, SparsityConfig(), criterion="sparsegpt", calibration=batches, progress=False)
    hook.remove()
    weight, original = model.get_submodule(name).weight, dense.get_submodule(name).weight
    kept = weight != 0
    assert not torch.equal(weight[kept], original[kept])  # not a mask only: the kept weights were updated
    assert not weight[:, 5].any()  # a dead input's weights are pruned
    assert torch.isfinite(weight).all()


# --------------------------------------------------------------------------- the sparsified result


def test_the_model_is_left_sparsified_with_the_method_and_keeps_the_pruned_mask():
    model = tiny_model("llama")
    nm_hf.prune(model, SparsityConfig(method="sr-ste"), criterion="wanda", calibration=calibration(),
                progress=False)
    assert sparsity_config_of(model).method == "sr-ste"
    assert getattr(model.config, CONFIG_KEY)["state"] == "training"
    pruned = {name: layer.weight != 0 for name, layer in iter_sparse_layers(model)}
    # sr-ste starts from the pruned pattern: its first mask keeps exactly the surviving weights
    for name, layer in iter_sparse_layers(model):
        assert torch.equal(layer.current_mask(), pruned[name]), name
    # and fine-tunes from there
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = calibration(1)[0]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    nm_hf.after_optimizer_step(model, 0.1)
    assert any(layer.weight[~pruned[name]].any() for name, layer in iter_sparse_layers(model))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_the_targets_are_grouped_by_block_once(criterion, monkeypatch):
    """The grouping of the targets by block sizes the calibration capture and drives the pruning: computed once."""
    module = sys.modules["nm_hf.prune"]  # `nm_hf.prune` is the function
    calls = []

    def counted(*args):
        calls.append(args[0])
        return original(*args)

    original = module._by_block
    monkeypatch.setattr(module, "_by_block", counted)
    model = tiny_model("llama")
    nm_hf.prune(model, SparsityConfig(), criterion=criterion, calibration=calibration(2), progress=False)
    assert calls == ["model.layers"]
    for _, layer in iter_sparse_layers(model):
        assert check_nm(layer.weight, 2, 4, dim=1)


def test_progress_bar_over_blocks(capsys):
    model = tiny_model("llama")
    nm_hf.prune(model, SparsityConfig(), criterion="wanda", calibration=calibration(2), progress=True)
    err = capsys.readouterr().err
    assert "nm_hf.prune (wanda)" in err and "2/2" in err


# --------------------------------------------------------------------------- refusals and interrupts


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict[str, torch.Tensor], sparse_before: bool = False) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert bool(list(iter_sparse_layers(model))) == sparse_before
    if not sparse_before:
        assert getattr(model.config, CONFIG_KEY, None) is None
    assert model.training  # the caller's mode is kept


def _bad_batch_ids():
    return [{"input_ids": torch.full((2, 8), VOCAB + 5)}]  # out of the vocabulary: the embedding fails


REFUSALS = [
    (dict(criterion="obs"), nm_hf.PruneError, r"criterion must be one of magnitude, wanda, sparsegpt; got 'obs'"),
    (dict(criterion="wanda"), nm_hf.PruneError, r"criterion 'wanda' needs calibration="),
    (dict(criterion="magnitude", calibration="CAL"), nm_hf.PruneError, r"uses no calibration data"),
    (dict(config=SparsityConfig(method="dense")), nm_hf.PruneError, r"method 'dense' does not mask"),
    (dict(config=SparsityConfig(target_modules=("nope",))), nm_hf.PruneError,
     r"(?s)cannot prune .*'nope' matched no module"),
    (dict(config=SparsityConfig(target_modules=("q_proj", "lm_head")), criterion="sparsegpt", calibration="CAL"),
     nm_hf.PruneError, r"not all inside one list of blocks"),
    (dict(criterion="wanda", calibration=[]), nm_hf.PruneError, r"calibration is empty"),
    (dict(criterion="wanda", calibration=["some text"]), nm_hf.PruneError, r"must be a dict of model inputs"),
    (dict(criterion="sparsegpt", calibration="CAL", block_size=6), nm_hf.PruneError,
     r"block_size must be a positive multiple of m=4"),
    (dict(criterion="sparsegpt", calibration="BAD"), IndexError, None),
    (dict(criterion="sparsegpt", calibration="CAL", damping=float("inf")), nm_hf.PruneError,
     r"damping must be a finite number > 0 .*got inf"),
    (dict(criterion="wanda", calibration="ONE"), nm_hf.PruneError,
     r"calibration must be an iterable of batches .*got one dict: pass \[batch\]"),
    (dict(criterion="sparsegpt", calibration="IDS"), nm_hf.PruneError,
     r"input_ids must be a tensor \[batch, length\] .*got shape \(16,\)"),
    (dict(criterion="wanda", calibration="LISTS"), nm_hf.PruneError,
     r"input_ids must be a tensor \[batch, length\] \(a tokenizer's return_tensors='pt'.*got list"),
    # SparseGPT would zero every targeted weight (no input reaches them), Wanda keep arbitrary ones
    (dict(criterion="sparsegpt", calibration="PADDED"), nm_hf.PruneError, r"every position of every batch is padding"),
    (dict(criterion="wanda", calibration="PADDED"), nm_hf.PruneError, r"every position of every batch is padding"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_every_refusal_leaves_the_model_untouched(kwargs, error, match):
    model = tiny_model("llama")
    model.train()
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == "CAL":
        kwargs["calibration"] = calibration(1)
    elif kwargs.get("calibration") == "BAD":
        kwargs["calibration"] = _bad_batch_ids()
    elif kwargs.get("calibration") == "ONE":
        kwargs["calibration"] = calibration(1)[0]  # one batch, not an iterable of batches
    elif kwargs.get("calibration") == "IDS":
        kwargs["calibration"] = calibration(1)[0]["input_ids"]  # its rows are 1-D
    elif kwargs.get("calibration") == "LISTS":  # a tokenizer's output without return_tensors="pt"
        kwargs["calibration"] = [{key: value.tolist() for key, value in calibration(1)[0].items()}]
    elif kwargs.get("calibration") == "PADDED":
        kwargs["calibration"] = [{**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
                                 for batch in calibration(2)]
    config = kwargs.pop("config", SparsityConfig())
    before = state(model)
    with pytest.raises(error, match=match):
        nm_hf.prune(model, config, progress=False, **kwargs)
    assert_untouched(model, before)


def test_an_already_sparsified_model_is_refused_untouched():
    model = sparsify(tiny_model("llama"), SparsityConfig())
    model.train()
    before = state(model)
    with pytest.raises(nm_hf.PruneError, match=r"already has sparse layers: prune a dense model"):
        nm_hf.prune(model, SparsityConfig(), criterion="magnitude")
    assert_untouched(model, before, sparse_before=True)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_an_interrupt_while_pruning_restores_every_weight(criterion):
    model = tiny_model("llama")
    model.train()
    before = state(model)

    def interrupt(module, args, kwargs):
        if not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]):
            raise KeyboardInterrupt  # block 0 was pruned: interrupt block 1

    handle = model.model.layers[1].register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        nm_hf.prune(model, SparsityConfig(), criterion=criterion, calibration=calibration(2), progress=False)
    handle.remove()
    assert_untouched(model, before)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_layers_the_forward_never_calls_are_refused_and_every_weight_restored(criterion):
    """No calibration token reaches block 1's MLP: SparseGPT would zero those layers whole, Wanda keep arbitrary
    weights. The refusal comes after block 0 was pruned: every weight is restored."""
    model = tiny_model("llama")
    model.train()
    before = state(model)
    model.model.layers[1].mlp.forward = lambda x: torch.zeros_like(x)  # its layers never run
    with pytest.raises(nm_hf.PruneError, match=r"'model\.layers\.1\.mlp\.gate_proj', .* received no calibration "
                                               r"token when their block ran"):
        nm_hf.prune(model, SparsityConfig(), criterion=criterion, calibration=calibration(2), progress=False)
    del model.model.layers[1].mlp.forward
    assert_untouched(model, before)
