"""SparseTrainer's first-step safety net: a sparse layer whose weight gets a gradient without the layer being
called (its model reads the weight directly, as LayoutLMv3 does with its relative-position tables) is reported."""

from __future__ import annotations

import pytest
import torch
from test_trainer import gpt2, lm_args, lm_data
from torch import nn

from nm_hf.config import SparsityConfig
from nm_hf.injection import iter_sparse_layers
from nm_hf.trainer import SparseTrainer
from tiny_models import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SparsityConfig(n=2, m=4)


class ReadsAChildsWeight(nn.Module):
    """`table` is used as a lookup table (`table.weight.t()[ids]`) from the second forward on, never called;
    `late` is called in the second forward only; `unused` is neither called nor read. With 2 micro-batches per
    update both happen in the first update's last micro-batch: the check must cover all of them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.table = nn.Linear(16, 8, bias=False)
        self.late = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)
        self.forwards = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.forwards += 1
        hidden = self.proj(self.embed(input_ids))
        if self.forwards == 2:
            hidden = self.late(hidden)
        if self.forwards >= 2:
            hidden = hidden + self.table.weight.t()[input_ids % 16].sum(-1, keepdim=True)
        return {"loss": hidden.sum(-1).pow(2).mean()}


def direct_read_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "nm_hf.trainer" and "without calling the layer" in r.getMessage()]


def test_a_weight_read_without_calling_its_layer_is_reported_once(tmp_path, caplog):
    model = ReadsAChildsWeight()
    args = lm_args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   logging_steps=10)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(24), sparsity_config=CONFIG)
    assert {"proj", "table", "late", "unused"} <= {name for name, _ in iter_sparse_layers(model)}
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train()
    warnings = direct_read_warnings(caplog)
    assert len(warnings) == 1, warnings  # once, not per step; not `late` (called in the update's 2nd micro-batch)
    message = warnings[0]
    assert message.startswith("table: ")
    for part in ("mask does not apply", "dense weight", "finalize", "exclude_modules=['table'"):
        assert part in message, message
    # one-shot: nothing is left on the layers' forward after the first step
    assert not any(layer._forward_pre_hooks for _, layer in iter_sparse_layers(model))


def test_a_normal_model_is_not_reported(tmp_path, caplog):
    model = gpt2()
    trainer = SparseTrainer(model=model, args=lm_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                            train_dataset=lm_data(), sparsity_config=CONFIG)
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train()
    assert not direct_read_warnings(caplog), caplog.text
    assert not any(layer._forward_pre_hooks for _, layer in iter_sparse_layers(model))


def test_a_layer_neither_called_nor_given_a_gradient_is_not_reported(tmp_path, caplog):
    model = ReadsAChildsWeight()  # one update of one micro-batch: `table` and `late` are not used in it either
    args = lm_args(tmp_path, max_steps=1, per_device_train_batch_size=4, logging_steps=10)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(8), sparsity_config=CONFIG)
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train()
    assert not direct_read_warnings(caplog), caplog.text


class ReadsATableSparsifyFinds(ReadsAChildsWeight):
    """`table` is read as a lookup table with gradients in every forward, unguarded: `sparsify` finds the read in
    the source and exposes the masked weight to it, so the weight's gradient is explained (`late` and `unused`
    are neither called nor given a gradient)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.proj(self.embed(input_ids)) + self.table.weight.t()[input_ids % 16].sum(-1, keepdim=True)
        return {"loss": hidden.sum(-1).pow(2).mean()}


def test_a_read_sparsify_found_is_not_reported(tmp_path, caplog):
    model = ReadsATableSparsifyFinds()
    args = lm_args(tmp_path, max_steps=2, per_device_train_batch_size=4, logging_steps=10)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(8), sparsity_config=CONFIG)
    assert {"proj", "table"} <= {name for name, _ in iter_sparse_layers(model)}
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train()
    assert not direct_read_warnings(caplog), caplog.text
    assert "weight" not in vars(model.table)
