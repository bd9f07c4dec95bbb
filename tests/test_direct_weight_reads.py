"""Layers whose weight the model reads directly (Mamba's `dt_proj`), bypassing the layer's forward, stay dense."""

from __future__ import annotations

import pytest
import torch
from test_injection import refuse
from transformers import AutoModelForCausalLM

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, ignored_reasons, iter_sparse_layers, sparsify
from nm_hf.record import CONFIG_KEY
from tiny_models import tiny_config, tiny_inputs, train_steps


def tiny_mamba(model_type: str):
    torch.manual_seed(0)
    # hidden 64: dt_proj's input (the time-step rank, hidden / 16) is 4, so m=4 divides every linear's input
    config = tiny_config(model_type, hidden_size=64, state_size=8)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba"])
def test_all_linear_leaves_directly_read_weights_dense(model_type):
    model = tiny_mamba(model_type)
    sparsify(model, SparsityConfig(n=2, m=4))
    names = [name for name, _ in iter_sparse_layers(model)]
    assert names and not any(name.endswith(".dt_proj") for name in names)
    assert any(name.endswith(".x_proj") for name in names)
    record = getattr(model.config, CONFIG_KEY)
    dt_projs = [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)]
    assert set(dt_projs) <= set(record["ignored_modules"])
    assert all("read directly" in record["ignored_reasons"][name] for name in dt_projs)
    assert set(ignored_reasons(model, SparsityConfig(), names)) == set(dt_projs)

    # what the sparse model computes is what the finalized one computes (a dt_proj mask applied only by
    # finalize would change the outputs)
    train_steps(model, 1, lr=1e-2)
    model.eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        sparse_logits = model(**inputs).logits
        finalize(model)
        torch.testing.assert_close(model(**inputs).logits, sparse_logits, rtol=1e-5, atol=1e-5)


def test_naming_a_directly_read_weight_is_refused():
    model = tiny_mamba("mamba")
    refuse(model, SparsityConfig(target_modules=["dt_proj"]), "'backbone.layers.0.mixer.dt_proj'", "read directly",
           "MambaMixer.forward", "exclude_modules")
