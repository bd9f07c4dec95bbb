"""step (STEP, Lu et al. 2023): method arguments, the dense forward before the switch and STE after it, the
optimizer wiring (plain loop and SparseTrainer), and an exact resume in a plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.masks import nm_mask
from nm_hf.methods import available_methods, get_method
from nm_hf.optim import StepAdamW
from nm_hf.trainer import SparseTrainer, create_sparse_optimizer
from tiny_models import out_in, random_sparse_layer, tiny_inputs, tiny_model, train_steps

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
IN, OUT = 16, 12


def test_registered_with_its_optimizer_and_defaults():
    assert "step" in available_methods()
    method = get_method("step")
    assert method.optimizer_class is StepAdamW and method.masks_forward and method.recomputes_mask
    config = SparsityConfig(method="step")
    assert config.method_args == {"switch_threshold": 1e-8, "window": None, "min_switch_fraction": 0.1,
                                  "max_switch_fraction": 0.5}
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert "10%" in method.describe(config.to_dict()) and "50%" in method.describe(config.to_dict())


@pytest.mark.parametrize("args, message", [
    ({"switch_threshold": -1.0}, "switch_threshold must be a finite number >= 0"),
    ({"switch_threshold": True}, "switch_threshold must be a finite number >= 0"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"window": 2.5}, "window must be an integer >= 1"),
    ({"min_switch_fraction": 1.5}, r"min_switch_fraction must be a number in \[0, 1\]"),
    ({"min_switch_fraction": 0.6}, "need 0 <= min_switch_fraction <= max_switch_fraction"),
    ({"max_switch_fraction": 0}, "max_switch_fraction > 0"),
    ({"switch_treshold": 1.0}, "did you mean 'switch_threshold'"),
])
def test_bad_method_args_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message) as info:
        SparsityConfig(method="step", method_args=args)
    assert "\n" not in str(info.value) and str(info.value).startswith("SparsityConfig.method_args: method 'step'")


def make_layer(kind: str):
    return random_sparse_layer(kind, SparsityConfig(method="step"), IN, OUT)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dense_before_the_switch_straight_through_after(kind):
    layer = make_layer(kind)
    x = torch.randn(5, IN, dtype=torch.float64)
    grad_out = torch.randn(5, OUT, dtype=torch.float64)
    w = out_in(layer, layer.weight.detach())
    mask = nm_mask(w, 2, 4, dim=1)
    assert layer.nm_method_state == {"switch_step": None} and "dense phase" in repr(layer)

    for phase, forward_weight in ((None, w), (7, w * mask)):
        get_method("step").set_phase(layer, phase)
        layer.weight.grad = None
        y = layer(x)
        y.backward(grad_out)
        torch.testing.assert_close(y, F.linear(x, forward_weight, layer.bias), rtol=0, atol=1e-12)
        # the gradient of the forward weight reaches every dense weight (dense phase: it is the dense gradient)
        torch.testing.assert_close(out_in(layer, layer.weight.grad), grad_out.t() @ x, rtol=0, atol=1e-12)
        layer.eval()
        with torch.no_grad():  # outside training: always the N:M weight that will be deployed
            torch.testing.assert_close(layer(x), F.linear(x, w * mask, layer.bias), rtol=0, atol=1e-12)
        layer.train()
    assert "mask phase since step 7" in repr(layer)


def gpt2():
    return tiny_model("gpt2", **NO_DROPOUT)


def loop(model, optimizer, steps: int, lr: float = 1e-2) -> None:
    """`steps` steps on one batch of 4; `after_optimizer_step` only for a sparsified model."""
    train_steps(model, steps, lr=lr, optimizer=optimizer, inputs=tiny_inputs(model, batch=4),
                call_hook=nm_hf.is_sparsified(model))


def test_plain_loop_is_dense_adamw_until_the_switch_then_masked():
    dense = gpt2()
    sparse = copy.deepcopy(dense)
    nm_hf.sparsify(sparse, SparsityConfig(method="step", method_args={"switch_threshold": 0.0}))
    optimizer = create_sparse_optimizer(sparse, lr=1e-2, weight_decay=0.01, total_steps=8)
    assert isinstance(optimizer, StepAdamW) and (optimizer.min_step, optimizer.max_step) == (1, 4)
    reference = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.01, fused=True)  # the Trainer's default
    loop(sparse, optimizer, 4)
    loop(dense, reference, 4)
    # four dense AdamW steps, bit for bit (AutoSwitch only watched)
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(a, b), name
    layers = dict(nm_hf.iter_sparse_layers(sparse))
    assert optimizer.switch_step == 4 and all(layer.nm_method_state == {"switch_step": 4} for layer in layers.values())

    inputs = tiny_inputs(sparse, batch=4)
    sparse.train()
    logits = sparse(**inputs).logits
    finalized = nm_hf.finalize(copy.deepcopy(sparse)).train()
    # finalize wrote W * M: the training forward of the mask phase computes with that model's weights
    torch.testing.assert_close(logits, finalized(**inputs).logits, rtol=0, atol=0)
    frozen = {name: optimizer.state[layer.weight]["exp_avg_sq"].clone() for name, layer in layers.items()}
    loop(sparse, optimizer, 2)
    for name, layer in layers.items():
        assert torch.equal(optimizer.state[layer.weight]["exp_avg_sq"], frozen[name]), name


def test_plain_loop_resume_is_exact():
    config = SparsityConfig(method="step", method_args={"switch_threshold": 0.0, "max_switch_fraction": 0.4})
    full = gpt2()
    nm_hf.sparsify(full, config)
    full_opt = create_sparse_optimizer(full, total_steps=10)
    loop(full, full_opt, 3)
    weights = copy.deepcopy(full.state_dict())
    optimizer_state = copy.deepcopy(full_opt.state_dict())
    sparse_state = copy.deepcopy(nm_hf.sparse_training_state(full))
    loop(full, full_opt, 5)  # switches after step 4

    resumed = tiny_model("gpt2", seed=1, **NO_DROPOUT)
    nm_hf.sparsify(resumed, config)
    resumed.load_state_dict(weights)
    opt = create_sparse_optimizer(resumed, total_steps=10)
    opt.load_state_dict(optimizer_state)
    nm_hf.load_sparse_training_state(resumed, sparse_state)
    loop(resumed, opt, 5)
    assert opt.switch_step == full_opt.switch_step == 4
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert nm_hf.sparse_training_state(resumed)["layers"].keys() == sparse_state["layers"].keys()


def test_optimizer_for_other_methods_and_missing_total_steps():
    model = gpt2()
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste"))
    assert type(create_sparse_optimizer(model, lr=0.1)) is torch.optim.AdamW
    step_model = gpt2()
    nm_hf.sparsify(step_model, SparsityConfig(method="step"))
    with pytest.raises(ValueError, match="method 'step' needs total_steps"):
        create_sparse_optimizer(step_model)
    with pytest.raises(ValueError, match="has no sparse layers"):
        create_sparse_optimizer(gpt2())


def test_bad_restored_state_names_the_layer():
    model = gpt2()
    nm_hf.sparsify(model, SparsityConfig(method="step"))
    state = nm_hf.sparse_training_state(model)
    name = next(iter(state["layers"]))
    state["layers"][name]["method_state"] = {"switch_step": -1}
    with pytest.raises(ValueError, match=f"layer '{name}': method 'step' needs its state"):
        nm_hf.load_sparse_training_state(model, state)


def trainer_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
                  adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1, report_to="none",
                  use_cpu=True, disable_tqdm=True, save_strategy="no", optim="adamw_torch", logging_steps=3)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lm_rows(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, 96, (8,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def test_sparse_trainer_builds_step_adamw_from_the_training_arguments(tmp_path):
    model = gpt2()
    config = SparsityConfig(method="step", method_args={"switch_threshold": 0.0, "window": 3})
    trainer = SparseTrainer(model=model, args=trainer_args(tmp_path), train_dataset=lm_rows(), sparsity_config=config)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, StepAdamW)
    assert (optimizer.total_steps, optimizer.window, optimizer.max_step, optimizer.switch_step) == (6, 3, 3, 3)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-7
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.1, 0.0}  # the Trainer's groups
    layers = [layer for _, layer in nm_hf.iter_sparse_layers(model)]
    assert optimizer.masked_ids == {id(layer.weight) for layer in layers}
    assert all(layer.nm_method_state == {"switch_step": 3} for layer in layers)


def test_sparse_trainer_refuses_another_optimizer_before_touching_the_model(tmp_path):
    model = gpt2()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"method 'step' trains with nm_hf.optim.StepAdamW .*got optimizers=\(AdamW"):
        SparseTrainer(model=model, args=trainer_args(tmp_path), train_dataset=lm_rows(), optimizers=(optimizer, None),
                      sparsity_config=SparsityConfig(method="step"))
    assert not nm_hf.is_sparsified(model)
    with pytest.raises(ValueError, match=r"got optimizer_cls_and_kwargs=\(AdamW"):
        SparseTrainer(model=model, args=trainer_args(tmp_path), train_dataset=lm_rows(),
                      optimizer_cls_and_kwargs=(torch.optim.AdamW, {}), sparsity_config=SparsityConfig(method="step"))
    # one built for the model is accepted
    nm_hf.sparsify(model, SparsityConfig(method="step"))
    built = create_sparse_optimizer(model, total_steps=6)
    trainer = SparseTrainer(model=model, args=trainer_args(tmp_path), train_dataset=lm_rows(), optimizers=(built, None))
    trainer.train()
    assert built.steps == 6 and built.switch_step is not None
