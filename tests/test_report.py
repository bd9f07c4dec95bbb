"""sparsity_report on live, finalized, reloaded and offloaded models."""

from __future__ import annotations

import pytest
import torch

import nm_hf
from tiny_models import tiny_model


def test_report_counts_the_weights_the_forward_uses(tiny_llama):
    nm_hf.sparsify(tiny_llama, nm_hf.SparsityConfig(n=1, m=4, method="ste"))
    report = nm_hf.sparsity_report(tiny_llama)
    assert report.nm_ok and report.sparsity == pytest.approx(0.75)
    nm_hf.finalize(tiny_llama)
    again = nm_hf.sparsity_report(tiny_llama)
    assert again.to_dict()["total"] == report.to_dict()["total"]


def test_report_on_offloaded_weights_names_the_layer():
    model = tiny_model("llama")
    nm_hf.sparsify(model, nm_hf.SparsityConfig())
    nm_hf.finalize(model)
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape, device="meta"))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj': its weight is on the meta device"):
        nm_hf.sparsity_report(model)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_report_of_chosen_layers_of_a_sparse_model_counts_the_weights_the_forward_uses(model_type):
    model = tiny_model(model_type)
    nm_hf.sparsify(model, nm_hf.SparsityConfig(method="sr-ste"))
    full = {row.name: row for row in nm_hf.sparsity_report(model).layers}
    names = list(full)[:2]
    chosen = nm_hf.sparsity_report(model, names=names)
    assert [row.name for row in chosen.layers] == names
    assert chosen.layers == [full[name] for name in names]
    assert chosen.nm_ok and chosen.sparsity == pytest.approx(0.5)


def test_report_of_named_layers_without_record_names_the_argument():
    """names= on a model without a record: a wrong name is blamed on names=, not on a record it does not have."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"'q_proj' from names= is not in LlamaForCausalLM.*full module names"):
        nm_hf.sparsity_report(model, names=["q_proj"], n=2, m=4)
    report = nm_hf.sparsity_report(model, names=["model.layers.0.self_attn.q_proj"], n=2, m=4)
    assert [row.name for row in report.layers] == ["model.layers.0.self_attn.q_proj"] and not report.nm_ok
