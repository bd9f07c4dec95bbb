"""Convolutions (`nn.Conv2d` / `nn.Conv1d`, groups=1): N:M along input channels, target_modules="all"."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_injection import refuse
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

import nm_hf
from nm_hf.checkpoint import inspect_checkpoint
from nm_hf.config import SparsityConfig
from nm_hf.layers import SparseConv1d, SparseConv2d
from nm_hf.masks import check_nm, nm_mask
from tiny_models import train_steps

RESNET_STEM = "resnet.embedder.embedder.convolution"
VIT_PATCH = "vit.embeddings.patch_embeddings.projection"


def tiny_resnet(seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    return AutoModelForImageClassification.from_config(config).eval()


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, image_size=16, patch_size=4, num_labels=3)
    return AutoModelForImageClassification.from_config(config).eval()


def tiny_wav2vec2(seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("wav2vec2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=16)
    return AutoModel.from_config(config).eval()


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def convs(model, cls=nn.Conv2d) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, cls)]


def test_all_on_resnet_sparsifies_convs_and_lists_the_rgb_stem(caplog):
    model = tiny_resnet()
    with caplog.at_level(logging.WARNING, logger="nm_hf.injection"):
        nm_hf.sparsify(model, SparsityConfig(n=2, m=4, target_modules="all"))
    layers = dict(nm_hf.iter_sparse_layers(model))
    assert sorted(layers) == sorted(set(convs(model)) - {RESNET_STEM})  # the classifier head stays dense
    assert all(isinstance(layer, SparseConv2d) for layer in layers.values())
    record = model.config.nm_sparsity
    assert RESNET_STEM in record["ignored_modules"] and "classifier.1" in record["ignored_modules"]
    assert record["ignored_reasons"] == {RESNET_STEM: "3 input features are not divisible by m=4"}
    assert set(record["group_dims"].values()) == {1}
    assert any(RESNET_STEM in message and "not divisible" in message for message in caplog.messages)
    for name, layer in layers.items():
        assert check_nm(layer.effective_weight(), 2, 4, dim=1), name
    model(pixel_values=images()).logits.sum().backward()


def test_all_linear_keeps_its_meaning_on_convs():
    model = tiny_resnet()
    refuse(model, SparsityConfig(), "no layer left to sparsify")  # the only linear is the classifier head
    vit = tiny_vit()
    nm_hf.sparsify(vit, SparsityConfig())
    assert not any(isinstance(layer, SparseConv2d) for _, layer in nm_hf.iter_sparse_layers(vit))


def test_vit_patch_embedding_ignored_under_all_and_refused_by_name():
    model = tiny_vit()
    refuse(model, SparsityConfig(target_modules=[VIT_PATCH]), "3 input features, not divisible by m=4")
    nm_hf.sparsify(model, SparsityConfig(target_modules="all"))
    record = model.config.nm_sparsity
    assert VIT_PATCH not in record["targeted_modules"]
    assert record["ignored_reasons"] == {VIT_PATCH: "3 input features are not divisible by m=4"}
    assert any(name.endswith("attention.q_proj") for name in record["targeted_modules"])


def test_wav2vec2_conv1d_front_end():
    model = tiny_wav2vec2()
    nm_hf.sparsify(model, SparsityConfig(target_modules="all"))
    layers = dict(nm_hf.iter_sparse_layers(model))
    assert isinstance(layers["feature_extractor.conv_layers.1.conv"], SparseConv1d)
    reasons = model.config.nm_sparsity["ignored_reasons"]
    assert reasons["feature_extractor.conv_layers.0.conv"] == "1 input features are not divisible by m=4"
    assert "grouped convolution (groups=4)" in reasons["encoder.pos_conv_embed.conv"]
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    model.train()
    model(audio).last_hidden_state.sum().backward()
    weight = layers["feature_extractor.conv_layers.1.conv"].weight
    assert weight.grad is not None and weight.grad.shape == weight.shape


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.depthwise(self.grouped(self.dense(x)))


def test_grouped_and_depthwise_convs_refused_by_name_left_dense_under_all():
    model = GroupedConvs()
    refuse(model, SparsityConfig(target_modules=["grouped"]), "'grouped' is a grouped convolution (groups=2)")
    refuse(model, SparsityConfig(target_modules=["depthwise"]), "depthwise convolution (groups=8)")
    nm_hf.sparsify(model, SparsityConfig(target_modules="all"))
    assert [name for name, _ in nm_hf.iter_sparse_layers(model)] == ["dense"]


@pytest.mark.parametrize("method", ["sr-ste", "ste", "fixed"])
@pytest.mark.parametrize("cls", [nn.Conv2d, nn.Conv1d])
def test_gradient_formula_on_a_conv_weight(method, cls):
    torch.manual_seed(0)
    conv = cls(8, 6, 3, padding=1)
    shape = (2, 8, 5, 5) if cls is nn.Conv2d else (2, 8, 7)
    x = torch.randn(shape)
    dense = conv.weight.detach().clone()
    model = nn.Sequential(conv)
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, method=method, decay=0.3, target_modules=["0"]))
    layer = model[0]
    weight = layer.weight.detach().clone()  # "fixed" zeroed its pruned weights
    mask = nm_mask(dense, 2, 4, dim=1)
    assert torch.equal(layer.current_mask(), mask)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    conv_fn = F.conv2d if cls is nn.Conv2d else F.conv1d
    masked = (weight * mask).requires_grad_(True)
    torch.testing.assert_close(out, conv_fn(x, masked, layer.bias.detach(), padding=1))
    (grad_ste,) = torch.autograd.grad(conv_fn(x, masked, layer.bias.detach(), padding=1), masked, grad_out)
    expected = {"ste": grad_ste, "sr-ste": grad_ste + 0.3 * weight * ~mask, "fixed": grad_ste * mask}[method]
    torch.testing.assert_close(layer.weight.grad, expected)


def test_transposable_conv_masks_tile_every_kernel_position():
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, transposable=True, target_modules="all"))
    mask = model[0].current_mask()
    for i in range(3):
        for j in range(3):
            assert check_nm(mask[:, :, i, j], 2, 4, dim=1) and check_nm(mask[:, :, i, j], 2, 4, dim=0)


def test_resnet_finalize_reload_and_compressed_round_trip(tmp_path):
    model = tiny_resnet()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, target_modules="all"))
    model.train()
    train_steps(model, 2, lr=0.05, call_hook=False, loss=lambda m: m(pixel_values=images()).logits.sum())
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=images()).logits
    nm_hf.finalize(model)
    assert not nm_hf.is_sparsified(model) and type(model.resnet.embedder.embedder.convolution) is nn.Conv2d
    model.save_pretrained(tmp_path / "plain")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=images()).logits, logits)
    assert nm_hf.sparsity_report(plain).nm_ok

    reloaded = nm_hf.load_sparse(tmp_path / "plain").eval()
    assert sorted(n for n, _ in nm_hf.iter_sparse_layers(reloaded)) == sorted(model.config.nm_sparsity[
        "targeted_modules"])
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images()).logits, logits)

    nm_hf.save_compressed(model, tmp_path / "compressed")
    restored = nm_hf.load_compressed(tmp_path / "compressed").eval()
    for (key, value), (key2, value2) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert key == key2 and torch.equal(value, value2), key
    report, _ = inspect_checkpoint(tmp_path / "compressed")
    assert report.nm_ok and len(report.layers) == len(model.config.nm_sparsity["targeted_modules"])
