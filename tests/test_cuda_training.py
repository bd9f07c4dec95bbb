"""Training on a CUDA device: every method, through SparseTrainer, agrees with the same run on CPU.

The library's CPU fast paths (native kernels, chunked mask search) are skipped on other devices, so the
device path is a different code path; these tests need a CUDA device and are skipped without one (the CI
machine has none: run them where one is, e.g. `pytest tests/test_cuda_training.py -rs`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

import nm_hf
from nm_hf.config import SparsityConfig
from nm_hf.methods import available_methods
from tiny_models import lm_rows, tiny_model

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # several GPUs: the Trainer wraps the model in DataParallel and multiplies the batch, unlike the CPU run
    pytest.mark.skipif(torch.cuda.device_count() > 1, reason="compares one device with the CPU (run with "
                       "CUDA_VISIBLE_DEVICES=0)"),
]

NO_DROPOUT = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "llama": {}}
STEPS = 8


def run(tmp_path, model_type: str, method: str, device: str, **overrides):
    """Train a tiny model `STEPS` steps; return (logged losses, model after finalize, tracker history)."""
    model = tiny_model(model_type, seed=0, **NO_DROPOUT[model_type])
    kwargs = dict(output_dir=str(tmp_path / f"{model_type}-{method}-{device}"), max_steps=STEPS,
                  per_device_train_batch_size=8, logging_steps=2, save_strategy="no", learning_rate=3e-3,
                  warmup_steps=0, report_to="none", use_cpu=device == "cpu", disable_tqdm=True, seed=0,
                  data_seed=0, optim="adamw_torch")
    kwargs.update(overrides)
    # `window`/`switch_threshold` make STEP switch inside the short run, so both of its phases run
    method_args = {"switch_threshold": 0.0, "window": 3} if method == "step" else {}
    config = SparsityConfig(n=2, m=4, method=method, decay=0.1, method_args=method_args)
    trainer = nm_hf.SparseTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=lm_rows(64, 16),
                                  sparsity_config=config)
    trainer.train()
    assert next(model.parameters()).device.type == device
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    history = trainer.sparsity_tracker.history
    nm_hf.finalize(model)
    return losses, model.cpu(), history


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("method", available_methods())
def test_each_method_trains_on_cuda_as_on_cpu(tmp_path, monkeypatch, model_type, method):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare fp32 with fp32
    cpu_losses, cpu_model, cpu_history = run(tmp_path, model_type, method, "cpu")
    gpu_losses, gpu_model, gpu_history = run(tmp_path, model_type, method, "cuda")
    assert all(torch.isfinite(torch.tensor(gpu_losses)))
    assert gpu_losses == pytest.approx(cpu_losses, rel=2e-3)
    report = nm_hf.sparsity_report(gpu_model)
    assert report.layers and report.nm_ok is (method != "dense")  # "dense" trains without masks
    assert report.sparsity == pytest.approx(nm_hf.sparsity_report(cpu_model).sparsity)
    # the tracker measured the same kind of thing on both devices
    assert [r["step"] for r in gpu_history] == [r["step"] for r in cpu_history]
    for gpu_record, cpu_record in zip(gpu_history, cpu_history, strict=True):
        assert gpu_record["sad_from_init"] == pytest.approx(cpu_record["sad_from_init"], rel=0.05, abs=8)
    # the finalized weights: same masks up to float ties, close values
    cpu_state, gpu_state = cpu_model.state_dict(), gpu_model.state_dict()
    for name, value in gpu_state.items():
        if value.is_floating_point():
            zeros_differ = ((value == 0) != (cpu_state[name] == 0)).float().mean().item()
            assert zeros_differ < 0.01, name
            assert torch.allclose(value, cpu_state[name], atol=5e-3, rtol=5e-2), name


@pytest.mark.parametrize("method", ["sr-ste", "s-ste"])
def test_bf16_mixed_precision_on_cuda(tmp_path, method):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bf16")
    cpu_losses, _, _ = run(tmp_path, "llama", method, "cpu")
    losses, model, history = run(tmp_path, "llama", method, "cuda", bf16=True)
    assert losses == pytest.approx(cpu_losses, rel=2e-2)  # bf16 autocast against the fp32 CPU run
    assert nm_hf.sparsity_report(model).nm_ok
    assert history and all(0 <= r["sad_rate"] <= 1 for r in history)


def test_finalized_cuda_model_converts_to_semi_structured(tmp_path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0+")
    _, model, _ = run(tmp_path, "llama", "sr-ste", "cuda")
    model = model.half().cuda().eval()
    inputs = {"input_ids": lm_rows(2, 16)[0]["input_ids"][None].cuda()}
    with torch.no_grad():
        dense_logits = model(**inputs).logits.float()
        nm_hf.to_semi_structured(model)
        sparse_logits = model(**inputs).logits.float()
    assert torch.allclose(sparse_logits, dense_logits, atol=2e-2, rtol=2e-2)
