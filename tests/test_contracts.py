"""Contracts every registered method x layer kind must meet (a new method or kind is tested here for free).

For each pair, on a tiny model whose targeted layers are of that kind: the weights the forward pass
uses are N:M along the kind's input dimension (for masked methods), training steps keep it so,
`finalize` + `save_pretrained` reload bit-exactly with plain transformers, the tracker's flip and
SAD counts match masks compared by hand, and the compressed format round-trips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from test_layers_conv import images, tiny_resnet, tiny_wav2vec2
from test_layers_experts import tiny_moe
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

import nm_hf
from nm_hf.layers import available_layer_kinds, layer_kind_of_sparse
from nm_hf.masks import check_nm
from nm_hf.methods import available_methods, get_method
from tiny_models import output_tensor, tiny_inputs, tiny_model, train_steps


@dataclass(frozen=True)
class ContractModel:
    """A tiny model whose targets (`target_modules`) are all of one layer kind."""

    build: Callable[[], torch.nn.Module]
    #: inputs for a forward pass of the built model
    inputs: Callable[[torch.nn.Module], dict[str, Any]]
    #: the class that reloads it with plain transformers
    auto_class: Any
    target_modules: Any = "all-linear"

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        return output_tensor(model(**self.inputs(model))).float().pow(2).mean()


def _audio(model) -> dict[str, Any]:
    return {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}


CAUSAL = {"auto_class": AutoModelForCausalLM, "inputs": tiny_inputs}

#: a tiny model whose targets are all of the given kind
MODEL_FOR_KIND = {
    "linear": ContractModel(lambda: tiny_model("llama"), **CAUSAL),
    "conv1d-gpt2": ContractModel(lambda: tiny_model("gpt2"), **CAUSAL),
    "conv2d": ContractModel(tiny_resnet, lambda model: {"pixel_values": images()}, AutoModelForImageClassification,
                            target_modules="all"),
    "conv1d": ContractModel(tiny_wav2vec2, _audio, AutoModel, target_modules=["feature_extractor.conv_layers.1.conv"]),
    "experts": ContractModel(lambda: tiny_moe("qwen3_moe"), **CAUSAL, target_modules=["experts"]),
}

PAIRS = [(method, kind.name) for method in available_methods() for kind in available_layer_kinds()]


def test_every_layer_kind_has_a_contract_model():
    missing = [kind.name for kind in available_layer_kinds() if kind.name not in MODEL_FOR_KIND]
    assert not missing, f"add a tiny model for layer kind(s) {missing} to MODEL_FOR_KIND"


@pytest.mark.parametrize(("method", "kind"), PAIRS)
def test_method_and_kind_contract(method, kind, tmp_path):
    case = MODEL_FOR_KIND[kind]
    model = case.build()
    config = nm_hf.SparsityConfig(n=2, m=4, method=method, decay=0.5, target_modules=case.target_modules)
    nm_hf.sparsify(model, config)
    layers = list(nm_hf.iter_sparse_layers(model))
    assert layers and all(layer_kind_of_sparse(layer).name == kind for _, layer in layers)
    masked = get_method(method).masks_forward

    tracker = nm_hf.SparsityTracker(model)
    before = {name: layer.current_mask().clone() for name, layer in layers}
    model.train()
    train_steps(model, 3, lr=0.05, tracker=tracker, loss=case.loss)
    metrics = tracker.log_metrics(3)
    after = {name: layer.current_mask() for name, layer in layers}
    expected_sad = sum(int((before[name] != after[name]).sum()) for name in before)
    assert metrics["sparsity/sad"] == expected_sad
    for name, layer in layers:
        if masked:
            assert check_nm(layer.effective_weight(), 2, 4, dim=layer.group_dim), name

    model.eval()
    inputs = case.inputs(model)
    with torch.no_grad():
        logits = output_tensor(model(**inputs))
    nm_hf.finalize(model)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**inputs)), logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "plain")
    reloaded = case.auto_class.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(reloaded(**inputs)), logits)
    record = reloaded.config.nm_sparsity
    assert record["state"] == "finalized" and record["method"] == method
    report = nm_hf.sparsity_report(reloaded)
    assert report.nm_ok is masked  # dense weights break the pattern; every masked method keeps it

    if masked:  # the compressed format stores N:M weights only
        nm_hf.save_compressed(model, tmp_path / "compressed")
        restored = nm_hf.load_compressed(tmp_path / "compressed", case.auto_class).eval()
        for (key, value), (key2, value2) in zip(model.state_dict().items(), restored.state_dict().items(),
                                                strict=True):
            assert key == key2 and torch.equal(value, value2), key
