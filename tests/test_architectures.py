"""End to end on every supported architecture: sparsify 2:4, train a step, finalize, save, plain reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, is_sparsified, iter_sparse_layers, sparsify
from nm_hf.layers import SparseLayerMixin
from nm_hf.masks import check_nm, nm_group_counts
from nm_hf.record import CONFIG_KEY
from nm_hf.report import sparsity_report
from tiny_models import ARCHITECTURES, HEAD_PARTS, output_tensor, tiny_inputs, tiny_model


def input_dim(module: nn.Module) -> int:
    """The weight dimension holding input features: dim 1 of nn.Linear, dim 0 of GPT-2's Conv1D."""
    return 0 if isinstance(module, Conv1D) else 1


def expected_targets(model: nn.Module) -> list[str]:
    """Every linear-like projection of the backbone (`base_model`) except weights tied to an embedding and
    named heads; nothing outside it (the output embedding, task heads)."""
    out_emb = model.get_output_embeddings()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    backbone = {id(m) for m in model.base_model.modules()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is out_emb or id(module) not in backbone:
            continue
        if id(module.weight) in embedding_weights or HEAD_PARTS.intersection(name.split(".")):
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_sparsify_train_finalize_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    auto_class = ARCHITECTURES[model_type]
    classes_before = {name: type(mod) for name, mod in model.named_modules()}
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight

    sparsify(model, SparsityConfig(n=2, m=4))
    names = [name for name, _ in iter_sparse_layers(model)]
    assert names, "nothing was sparsified"
    assert sorted(names) == sorted(expected_targets(model))
    record = getattr(model.config, CONFIG_KEY)
    assert sorted(record["targeted_modules"]) == sorted(names)
    modules = dict(model.named_modules())
    linear_like = [n for n, mod in modules.items() if isinstance(mod, (nn.Linear, Conv1D))]
    assert sorted(record["ignored_modules"]) == sorted(set(linear_like) - set(names))
    assert record["group_dims"] == {n: 0 if isinstance(modules[n], Conv1D) else 1 for n in names}
    # heads stay dense
    assert not any(HEAD_PARTS.intersection(name.split(".")) for name in names)
    if out_emb is not None:
        assert not isinstance(out_emb, SparseLayerMixin)
        assert not any(layer.weight is out_emb.weight for _, layer in iter_sparse_layers(model))
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # a training step: forward + backward, finite gradients on every targeted weight
    model.train()
    inputs = tiny_inputs(model)
    output_tensor(model(**inputs)).float().pow(2).mean().backward()
    for name, layer in iter_sparse_layers(model):
        grad = layer.weight.grad
        assert grad is not None, f"{name}: no gradient"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name}: bad gradient"
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        sparse_logits = output_tensor(model(**inputs))

    finalize(model)
    assert not is_sparsified(model)
    assert {name: type(mod) for name, mod in model.named_modules()} == classes_before
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight.detach()
        dim = input_dim(modules[name])
        assert check_nm(weight, 2, 4, dim=dim), f"{name} is not 2:4 along its input dim"
        assert (nm_group_counts(weight, 4, dim=dim) == 2).all(), f"{name}: a group has fewer than 2 non-zeros"
        assert not torch.signbit(weight[weight == 0]).any(), f"{name}: pruned weights must be +0.0"
        other = 1 - dim
        if weight.shape[other] % 4 == 0:  # the groups really run along the input dim, not the other one
            assert not check_nm(weight, 2, 4, dim=other), f"{name} is 2:4 along the wrong dim too"
    report = sparsity_report(model)
    assert report.nm_ok and [row.name for row in report.layers] == getattr(model.config, CONFIG_KEY)[
        "targeted_modules"]
    assert report.sparsity == pytest.approx(0.5)

    with torch.no_grad():
        final_logits = output_tensor(model(**inputs))
    # the finalized dense model computes what the sparse layers computed (up to GEMM rounding)
    torch.testing.assert_close(final_logits, sparse_logits, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded, info = auto_class.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not is_sparsified(reloaded)
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    for key in state:
        assert state[key].dtype == state2[key].dtype and torch.equal(state[key], state2[key]), key
    with torch.no_grad():
        assert torch.equal(output_tensor(reloaded(**inputs)), final_logits)
    if tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    record = getattr(reloaded.config, CONFIG_KEY)
    assert record["state"] == "finalized" and record["n"] == 2 and record["m"] == 4
    assert sparsity_report(reloaded).nm_ok
