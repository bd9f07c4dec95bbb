"""Contracts every registered method x layer kind must meet (a new method or kind is tested here for free).

For each pair, on a tiny model whose targeted layers are of that kind: the weights the forward pass
uses are N:M along the kind's input dimension (for masked methods), training steps keep it so,
`finalize` + `save_pretrained` reload bit-exactly with plain transformers, the tracker's flip and
SAD counts match masks compared by hand, and the compressed format round-trips.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import nm_hf
from nm_hf.layers import available_layer_kinds, layer_kind_of_sparse
from nm_hf.masks import check_nm
from nm_hf.methods import available_methods, get_method
from tiny_models import tiny_inputs, tiny_model

#: a tiny model whose "all-linear" targets are all of the given kind
MODEL_FOR_KIND = {"linear": "llama", "conv1d-gpt2": "gpt2"}

PAIRS = [(method, kind.name) for method in available_methods() for kind in available_layer_kinds()]


def test_every_layer_kind_has_a_contract_model():
    missing = [kind.name for kind in available_layer_kinds() if kind.name not in MODEL_FOR_KIND]
    assert not missing, f"add a tiny model for layer kind(s) {missing} to MODEL_FOR_KIND"


def _train(model, steps: int = 3, tracker=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    inputs = tiny_inputs(model)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        nm_hf.after_optimizer_step(model, 0.05)
        if tracker is not None:
            tracker.step()


@pytest.mark.parametrize(("method", "kind"), PAIRS)
def test_method_and_kind_contract(method, kind, tmp_path):
    model = tiny_model(MODEL_FOR_KIND[kind])
    config = nm_hf.SparsityConfig(n=2, m=4, method=method, decay=0.5)
    nm_hf.sparsify(model, config)
    layers = list(nm_hf.iter_sparse_layers(model))
    assert layers and all(layer_kind_of_sparse(layer).name == kind for _, layer in layers)
    masked = get_method(method).masks_forward

    tracker = nm_hf.SparsityTracker(model)
    before = {name: layer.current_mask().clone() for name, layer in layers}
    _train(model, tracker=tracker)
    metrics = tracker.log_metrics(3)
    after = {name: layer.current_mask() for name, layer in layers}
    expected_sad = sum(int((before[name] != after[name]).sum()) for name in before)
    assert metrics["sparsity/sad"] == expected_sad
    for name, layer in layers:
        if masked:
            assert check_nm(layer.effective_weight(), 2, 4, dim=layer.group_dim), name

    model.eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    nm_hf.finalize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    record = reloaded.config.nm_sparsity
    assert record["state"] == "finalized" and record["method"] == method
    report = nm_hf.sparsity_report(reloaded)
    assert report.nm_ok is masked  # dense weights break the pattern; every masked method keeps it

    if masked:  # the compressed format stores N:M weights only
        nm_hf.save_compressed(model, tmp_path / "compressed")
        restored = nm_hf.load_compressed(tmp_path / "compressed").eval()
        for (key, value), (key2, value2) in zip(model.state_dict().items(), restored.state_dict().items(),
                                                strict=True):
            assert key == key2 and torch.equal(value, value2), key
