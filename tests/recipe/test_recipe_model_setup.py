"""The recipe's model setup: the causal-LM loss is divided by the tokens the model predicts."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from nm_hf.recipe.model_setup import count_causal_lm_targets
from tiny_models import tiny_model

BLOCK = 16


def manual_loss(model, blocks: torch.Tensor) -> float:
    """Mean cross-entropy over the predicted positions (each block's tokens 2..BLOCK)."""
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_trainer_evaluates_the_mean_loss_over_predicted_tokens(model_type, tmp_path):
    model = tiny_model(model_type).eval()
    changed = count_causal_lm_targets(model)
    assert changed == (model_type == "gpt2")  # Llama's class name already names its loss
    assert model.loss_type == "ForCausalLM"
    blocks = torch.randint(3, model.config.vocab_size, (6, BLOCK), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none",
                             use_cpu=True)
    loss = Trainer(model=model, args=args).evaluate(data)["eval_loss"]
    assert math.isclose(loss, manual_loss(model, blocks), rel_tol=1e-5)
    assert not count_causal_lm_targets(model)  # once is enough


def test_encoder_decoder_models_are_left_alone():
    model = tiny_model("t5")
    before = getattr(model, "loss_type", None)
    assert not count_causal_lm_targets(model)
    assert getattr(model, "loss_type", None) == before
