"""2:4 semi-structured conversion: the constraint checks run anywhere, the conversion needs CUDA."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark
from transformers.pytorch_utils import Conv1D

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, iter_sparse_layers, sparsify
from nm_hf.semi_structured import (
    SemiStructuredError,
    SemiStructuredLinear,
    check_semi_structured,
    semi_structured_problems,
    to_semi_structured,
)
from tiny_models import output_tensor, tiny_inputs, tiny_model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, classes = before
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- pure checks


def test_supported_layer_has_no_problems():
    assert semi_structured_problems("q", (4096, 4096), torch.float16, "cuda", capability=(8, 0)) == []
    assert semi_structured_problems("q", (32, 64), torch.bfloat16, "cuda", capability=(9, 0)) == []
    assert semi_structured_problems("q", (64, 128), torch.float16, "cuda", backend="cutlass") == []


@pytest.mark.parametrize("kwargs,fragment", [
    ({"device_type": "cpu"}, "q: weight is on cpu; semi-structured sparse kernels are CUDA-only"),
    ({"dtype": torch.float32}, "q: dtype torch.float32; convert the model to float16 or bfloat16"),
    ({"shape": (24, 64)}, "q: weight [out=24, in=64] is not a multiple of the cusparselt tile (16 x 16)"),
    ({"shape": (32, 40)}, "in=40] is not a multiple"),
    ({"shape": (32, 32), "backend": "cutlass"}, "not a multiple of the cutlass tile (32 x 64)"),
    ({"capability": (7, 5)}, "compute capability 7.5; 2:4 sparse tensor cores need 8.0+"),
    ({"shape": (64, 128), "capability": (9, 0), "backend": "cutlass"},
     "compute capability 9.0; PyTorch's CUTLASS 2:4 kernels run on 8.x only: use backend='cusparselt'"),
    ({"shape": (2, 16, 16)}, "only 2-D weights"),
    ({"n": 2, "m": 8}, "pattern 2:8; sparse tensor cores only run 2:4"),
])
def test_each_constraint_is_reported(kwargs, fragment):
    args = {"shape": (64, 64), "dtype": torch.float16, "device_type": "cuda"}
    extra = {k: kwargs.pop(k) for k in ("capability", "backend", "n", "m") if k in kwargs}
    args.update(kwargs)
    problems = semi_structured_problems("q", args["shape"], args["dtype"], args["device_type"], **extra)
    assert len(problems) == 1 and fragment in problems[0]


# ----------------------------------------------------------------------------- whole models on CPU


def finalized_llama(dtype=torch.float16, **overrides):
    model = tiny_model("llama", **overrides).to(dtype)
    finalize(sparsify(model, SparsityConfig()))
    return model


def test_cpu_model_is_refused_and_left_unchanged():
    model = finalized_llama()
    before = snapshot(model)
    with pytest.raises(SemiStructuredError) as err:
        to_semi_structured(model)
    message = str(err.value)
    assert "the model was not modified" in message
    for name in model.config.nm_sparsity["targeted_modules"]:  # every layer is named, not just the first
        assert f"{name}: weight is on cpu" in message
    assert_unchanged(model, before)


def test_live_sparse_model_stays_live_after_a_refusal():
    model = tiny_model("gpt2").half()
    sparsify(model, SparsityConfig())
    before = snapshot(model)
    with pytest.raises(SemiStructuredError, match="transformer.h.0.attn.c_attn: weight is on cpu"):
        to_semi_structured(model)
    assert len(list(iter_sparse_layers(model))) == 8  # not finalized
    assert_unchanged(model, before)


def test_planning_on_cpu_finds_bad_shapes_and_dtypes():
    assert check_semi_structured(finalized_llama(), assume_cuda=True, backend="cusparselt") == []
    # intermediate size 40 is divisible by 4 (so it trains 2:4) but not by the 16 x 16 tile
    odd = finalized_llama(intermediate_size=40)
    problems = check_semi_structured(odd, assume_cuda=True, backend="cusparselt")
    assert sorted(p.split(":")[0] for p in problems) == sorted(
        f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj", "down_proj"))
    assert all("not a multiple of the cusparselt tile" in p for p in problems)
    fp32 = finalized_llama(torch.float32)
    assert all("dtype torch.float32" in p for p in check_semi_structured(fp32, assume_cuda=True))
    # CUTLASS needs 32 x 64 tiles: the tiny 32 x 32 projections do not fit
    assert any("cutlass tile (32 x 64)" in p for p in
               check_semi_structured(finalized_llama(), assume_cuda=True, backend="cutlass"))


def test_pattern_is_checked():
    model = tiny_model("llama").half()
    finalize(sparsify(model, SparsityConfig(n=1, m=4)))
    assert any("1:4" in p for p in check_semi_structured(model, assume_cuda=True))
    broken = finalized_llama()
    with torch.no_grad():
        broken.model.layers[0].self_attn.v_proj.weight[0, :4] = 1.0
    problems = check_semi_structured(broken, assume_cuda=True)
    assert problems == ["model.layers.0.self_attn.v_proj: 1 groups of 4 input weights have more than 2 non-zeros"]
    dense = tiny_model("llama").half()
    finalize(sparsify(dense, SparsityConfig(method="dense")))
    assert check_semi_structured(dense, assume_cuda=True)  # "dense" finalized weights are not 2:4


def test_semi_structured_linear_multiplies_a_2d_view():
    """Its forward equals nn.Linear's for 2-D, 3-D and non-contiguous inputs (on CPU, with a dense weight)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 6)
    flat = SemiStructuredLinear(8, 6)
    flat.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4, 8)
    for inputs in (x, x[:, :2], x.transpose(0, 1), x[0]):
        torch.testing.assert_close(flat(inputs), plain(inputs))
        assert flat(inputs).shape == plain(inputs).shape


def test_plain_model_without_record():
    with pytest.raises(SemiStructuredError, match="nothing to convert"):
        to_semi_structured(tiny_model("llama").half())


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability 8.0+ (2:4 sparse tensor cores)")
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_conversion_on_cuda_matches_dense(model_type):
    overrides = {"hidden_size": 64, "intermediate_size": 128} if model_type == "llama" else \
        {"n_embd": 64, "n_inner": 128}
    model = tiny_model(model_type, **overrides).half().cuda().eval()
    finalize(sparsify(model, SparsityConfig()))
    inputs = {k: v.cuda() for k, v in tiny_inputs(model, batch=8, length=16).items()}
    with torch.no_grad():
        expected = output_tensor(model(**inputs)).float()
    to_semi_structured(model)
    sparse_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
                      and isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)]
    assert len(sparse_weights) == len(model.config.nm_sparsity["targeted_modules"])
    assert all(type(m) is SemiStructuredLinear for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.sparse.SparseSemiStructuredTensor))
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        got = output_tensor(model(**inputs)).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- the benchmark script


def _benchmark_module():
    return load_benchmark("gpu_inference")


def test_benchmark_plan_runs_on_cpu(capsys):
    bench = _benchmark_module()
    small = ["--plan", "--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "64"]
    assert bench.main([*small, "--intermediate", "128"]) == 0
    assert "all 7 targeted layers can become 2:4 semi-structured (cusparselt, fp16)" in capsys.readouterr().out
    assert bench.main([*small, "--intermediate", "100"]) == 1  # 100 is 2:4-trainable, not a 16 x 16 tile
    assert "3 of 7 layers cannot be converted" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_benchmark_without_cuda_says_why(capsys):
    assert _benchmark_module().main(["--skip-generate"]) == 1
    assert "skipped: no CUDA device" in capsys.readouterr().err
