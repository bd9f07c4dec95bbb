"""The native kernels (`nm_hf.native`) give bit-identical results to the torch expressions they replace."""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import nm_hf
from nm_hf import native
from nm_hf.masks import (
    add_pruned_,
    apply_mask,
    apply_mask_,
    count_changed,
    masked_and_add_pruned_,
    nm_mask,
    nm_mask_and_apply,
    pruned_nonzero,
)
from tiny_models import tiny_model, train_steps

HAVE_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 0.5]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits, so -0.0 != 0.0 and NaN == NaN."""
    return tensor.contiguous().view(torch.uint8)


def with_specials(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weights with ties, signed zeros, infs and NaNs sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).to(dtype)
    flat = weight.view(-1)
    where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 8),), generator=generator)
    values = torch.tensor(SPECIALS).to(dtype)
    flat[where] = values[torch.randint(0, len(SPECIALS), where.shape, generator=generator)]
    return weight


def both_paths(function, *args):
    """(native result, torch result) of `function(*args)`."""
    fast = function(*args)
    with native.disabled():
        plain = function(*args)
    return fast, plain


def test_the_kernels_build_where_a_compiler_exists():
    if not HAVE_COMPILER:
        assert "unavailable" in native.status() or "disabled" in native.status()
        return
    assert native.kernels() is not None, native.status()
    assert native.status().startswith("native kernels")
    with native.disabled():
        assert native.kernels() is None and "torch" in native.status()
    assert native.kernels() is not None


SHAPES = [((5, 12), -1), ((12, 5), 0), ((3, 8, 16), 1), ((64, 256), -1), ((256, 96), 0), ((8, 16, 24), 2),
          ((2100, 1024), 1), ((1024, 2112), 0)]  # the last two are split over the thread pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_nm_mask_matches_the_torch_path(dtype, shape, dim):
    weight = with_specials(shape, dtype)
    patterns = [(2, 4), (1, 4), (3, 4), (1, 2), (4, 8), (2, 8), (8, 16), (5, 16), (2, 6)]
    if weight.numel() > 100_000:  # the split over the pool: the main patterns are enough
        patterns = [(2, 4), (4, 8), (2, 8)]
    for n, m in patterns:
        if shape[dim] % m:
            continue
        fast, plain = both_paths(nm_mask, weight, n, m, dim)
        assert torch.equal(fast, plain), (n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_nm_mask_and_apply_is_nm_mask_then_apply_mask(dtype, shape, dim):
    """The fused pass (one read of the weight) gives the two separate results bit for bit, on both paths."""
    weight = with_specials(shape, dtype, seed=7)
    patterns = [(2, 4), (1, 4), (4, 8), (5, 16), (2, 6)] if weight.numel() <= 100_000 else [(2, 4), (4, 8)]
    for n, m in patterns:
        if shape[dim] % m:
            continue
        mask = nm_mask(weight, n, m, dim)
        expected = apply_mask(weight, mask)
        fast, plain = both_paths(nm_mask_and_apply, weight, n, m, dim)
        for got_mask, got_masked in (fast, plain):
            assert torch.equal(got_mask, mask) and torch.equal(bits(got_masked), bits(expected)), (n, m)
    if weight.ndim == 2 and shape[dim] % 4 == 0:  # a transposed view (a Conv1D weight as nn.Linear sees it)
        view, view_dim = weight.t(), 1 - dim % 2
        got_mask, got_masked = nm_mask_and_apply(view, 2, 4, view_dim)
        assert torch.equal(bits(got_masked), bits(apply_mask(view, nm_mask(view, 2, 4, view_dim))))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_nm_mask_and_apply_takes_float8_weights(dtype):
    """float8 weights are ranked on float32 keys: the masked weight is still float8, as on the torch path
    (the native pass used to view its float32 masked keys as float8 and fail on the reshape)."""
    weight = torch.tensor([[0.5, -2.0, 1.0, -0.0, 3.0, 3.0, -3.0, 0.25]]).to(dtype)
    mask = nm_mask(weight, 2, 4)
    expected = apply_mask(weight, mask)
    fast, plain = both_paths(nm_mask_and_apply, weight, 2, 4)
    for got_mask, got_masked in (fast, plain):
        assert got_masked.dtype == dtype and torch.equal(got_mask, mask)
        assert torch.equal(bits(got_masked), bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_apply_mask_matches_the_torch_path(dtype, shape, dim):
    weight = with_specials(shape, dtype, seed=1)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    for keep in (True, False):
        fast, plain = both_paths(apply_mask, weight, mask, keep)
        assert torch.equal(bits(fast), bits(plain)), keep
    if weight.ndim == 2:  # a weight stored transposed (GPT-2 Conv1D) goes through the same kernel
        fast, plain = both_paths(apply_mask, weight.t(), mask.t())
        assert torch.equal(bits(fast), bits(plain))
    pairs = [(weight, mask)] + ([(weight.t(), mask.t())] if weight.ndim == 2 else [])
    for target, target_mask in pairs:  # in place: the same bits, in the tensor given
        expected = bits(apply_mask(target, target_mask))
        copy = target.clone()
        assert apply_mask_(copy, target_mask) is copy and torch.equal(bits(copy), expected)
        with native.disabled():
            assert torch.equal(bits(apply_mask_(target.clone(), target_mask)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_add_pruned_matches_the_torch_path(dtype, shape, dim):
    weight = with_specials(shape, dtype, seed=3)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.5
    grad = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    for alpha in (1.0, 2e-4, 0.37):
        fast, plain = both_paths(lambda a=alpha: add_pruned_(grad.clone(), weight, mask, a))
        assert torch.equal(bits(fast), bits(plain)), alpha
    if weight.ndim == 2:  # weight and mask stored [in, out], gradient [out, in]
        stored_weight, stored_mask = weight.t().contiguous(), mask.t().contiguous()
        fast, plain = both_paths(lambda: add_pruned_(grad.clone(), stored_weight.t(), stored_mask.t(), 1e-2))
        assert torch.equal(bits(fast), bits(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES[:4])
def test_pruned_nonzero_matches_the_torch_path(dtype, shape, dim):
    weight = with_specials(shape, dtype, seed=6)
    mask = weight.ne(0)  # every pruned entry is ±0.0: nothing non-zero outside the mask
    cases = [(weight, mask, False), (weight, torch.ones_like(mask), False), (weight, ~mask, True)]
    for value in (-0.0, 0.0, 1e-3, float("nan"), -float("inf")):
        changed = weight.clone()
        changed.view(-1)[int((~mask).view(-1).nonzero()[0])] = value
        cases.append((changed, mask, value != 0))
    if weight.ndim == 2:  # stored transposed (GPT-2 Conv1D)
        cases += [(w.t().contiguous().t(), m.t().contiguous().t(), expected) for w, m, expected in cases]
    for w, m, expected in cases:
        fast, plain = both_paths(pruned_nonzero, w, m)
        assert fast == plain == expected
        pruned = w[~m]  # with signed_zeros, -0.0 counts too: False means w is its own masked copy
        signed = bool(((pruned != 0) | torch.signbit(pruned)).any())
        fast, plain = both_paths(lambda w, m: pruned_nonzero(w, m, signed_zeros=True), w, m)
        assert fast == plain == signed
        assert signed == (not torch.equal(bits(w), bits(apply_mask(w, m))))


@pytest.mark.parametrize("numel", [1, 7, 4096, 70_001])
def test_count_changed_matches_the_torch_path(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=g) > 0.5
    for previous in (mask.clone(), ~mask, torch.rand(numel, generator=g) > 0.3):
        fast, plain = both_paths(count_changed, mask, previous)
        assert fast.dtype == plain.dtype == torch.int64 and fast.ndim == 0
        assert int(fast) == int(plain) == int((mask != previous).sum())
    square = mask[: (numel // 64) * 64].view(-1, 64) if numel >= 64 else mask.view(1, -1)
    fast, plain = both_paths(count_changed, square.t(), square.t().contiguous())  # not contiguous: torch's path
    assert int(fast) == int(plain) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_masked_and_add_pruned_is_both_separate_calls(dtype, shape, dim):
    weight = with_specials(shape, dtype, seed=8)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(9)) > 0.5
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    expected_grad = add_pruned_(grad.clone(), weight, mask, 0.37)
    expected_masked = apply_mask(weight, mask)
    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        got = grad.clone()
        return masked_and_add_pruned_(got, weight, mask, 0.37), got

    for masked, got_grad in both_paths(fused):
        assert torch.equal(bits(masked), bits(expected_masked)) and torch.equal(bits(got_grad), bits(expected_grad))
    if weight.ndim == 2:  # weight and mask stored [in, out] (GPT-2 Conv1D), gradient [out, in]: the separate calls
        stored_weight, stored_mask = weight.t().contiguous().t(), mask.t().contiguous().t()
        got = grad.clone()
        masked = masked_and_add_pruned_(got, stored_weight, stored_mask, 0.37)
        assert torch.equal(bits(got), bits(add_pruned_(grad.clone(), stored_weight, stored_mask, 0.37)))
        assert torch.equal(bits(masked), bits(apply_mask(stored_weight, stored_mask)))


def test_add_pruned_works_in_place_and_leaves_kept_entries():
    weight = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, False, True, False]])
    grad = torch.zeros(1, 4)
    assert add_pruned_(grad, weight, mask, 0.5) is grad
    assert grad.tolist() == [[0.0, -1.0, 0.0, 2.0]]


@pytest.mark.parametrize("model_type,method,mode", [("gpt2", "sr-ste", "gradient"), ("llama", "sr-ste", "gradient"),
                                                    ("llama", "sr-ste", "decoupled"), ("gpt2", "ste", "gradient"),
                                                    ("llama", "fixed", "gradient")])
def test_training_is_bit_identical_with_and_without_the_kernels(model_type, method, mode, one_thread):
    base = tiny_model(model_type)
    runs = []
    for use_native in (True, False):
        model = copy.deepcopy(base)
        nm_hf.sparsify(model, nm_hf.SparsityConfig(method=method, decay=0.5, decay_mode=mode))
        model.train()
        torch.manual_seed(0)
        if use_native:
            train_steps(model, 3)
        else:
            with native.disabled():
                train_steps(model, 3)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    for key, value in runs[0].items():
        assert torch.equal(bits(value), bits(runs[1][key])), key


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


STATUS_AND_MASK = ("import torch; from nm_hf import native; from nm_hf.masks import nm_mask; "
                   "w = torch.tensor([[1.0, -3.0, 2.0, 0.5]]); "
                   "print(native.status()); print(nm_mask(w, 2, 4).tolist())")


def test_the_switch_and_a_failing_compiler_fall_back_to_torch(tmp_path):
    off = run_python(STATUS_AND_MASK, NM_HF_NATIVE="0", NM_HF_CACHE_DIR=str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines() == ["disabled (NM_HF_NATIVE=0)", "[[False, True, True, False]]"]
    broken = run_python(STATUS_AND_MASK, CC="false", NM_HF_CACHE_DIR=str(tmp_path / "broken"))
    assert broken.returncode == 0, broken.stderr
    status, mask = broken.stdout.splitlines()
    assert status.startswith("unavailable: the C compiler failed") and mask == "[[False, True, True, False]]"
    assert not (tmp_path / "broken").exists() or not any((tmp_path / "broken").iterdir())


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_the_build_is_cached_in_the_cache_dir(tmp_path, umask_022):
    cache = tmp_path / "cache"
    first = run_python(STATUS_AND_MASK, NM_HF_CACHE_DIR=str(cache))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[1] == "[[False, True, True, False]]"
    (built,) = cache.iterdir()
    assert built.name.startswith("nm_kernels-") and built.suffix == ".so"
    assert stat.S_IMODE(built.stat().st_mode) == 0o644
    before = built.stat().st_mtime_ns
    again = run_python(STATUS_AND_MASK, NM_HF_CACHE_DIR=str(cache))
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert built.stat().st_mtime_ns == before and list(cache.iterdir()) == [built]  # loaded, not rebuilt


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_flags_the_compiler_refused_are_not_tried_again(tmp_path):
    """A compiler without OpenMP (Apple's clang, say) fails the -fopenmp sets once, not at every import."""
    real = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))))
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                    f'case "$*" in *-fopenmp*) echo "unsupported option -fopenmp" >&2; exit 1;; esac\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    env = {"CC": str(fake), "NM_HF_CACHE_DIR": str(tmp_path / "cache")}
    first = run_python(STATUS_AND_MASK, **env)
    assert first.returncode == 0, first.stderr
    assert "-fopenmp" not in first.stdout.splitlines()[0] and "-march=native" in first.stdout.splitlines()[0]
    tried = calls.read_text().splitlines()
    assert len(tried) == 2 and "-fopenmp" in tried[0] and "-fopenmp" not in tried[1]
    assert len(list((tmp_path / "cache").glob("*.failed"))) == 1
    again = run_python(STATUS_AND_MASK, **env)
    assert again.returncode == 0, again.stderr
    status, mask = again.stdout.splitlines()
    assert mask == first.stdout.splitlines()[1]
    assert status.startswith(first.stdout.splitlines()[0][:-1])  # same library, and it says what it skipped
    assert "not tried again, refused before: -O3 -march=native -fopenmp" in status
    assert calls.read_text().splitlines() == tried  # the second process ran the compiler not at all


def every_kernel(weight: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor | bool]:
    """The result of every native kernel on `weight` (and `grad` for the decay terms, native in f32/f64 only:
    torch's own fp16 arithmetic may give NaNs other sign bits when its threads split the tensor differently)."""
    results: list[torch.Tensor | bool] = []
    for n, m, dim in ((2, 4, -1), (4, 8, -1), (2, 4, 0), (1, 4, -1)):
        mask, masked = nm_mask_and_apply(weight, n, m, dim)
        results += [nm_mask(weight, n, m, dim), mask, masked, apply_mask(weight, mask, keep=False),
                    apply_mask_(weight.clone(), mask), pruned_nonzero(weight, mask), pruned_nonzero(masked, mask),
                    count_changed(mask, weight.gt(0)).reshape(1)]
        if weight.dtype in (torch.float32, torch.float64):
            grad_copy = grad.clone()
            results += [add_pruned_(grad.clone(), weight, mask, 0.3),
                        add_pruned_(grad.t().contiguous(), weight.t(), mask.t(), 0.3),  # the Conv1D layout
                        masked_and_add_pruned_(grad_copy, weight, mask, 0.3), grad_copy]
    return results


@pytest.mark.parametrize("threads,dtype", [(2, torch.float32), (3, torch.float32), (3, torch.float16),
                                          (3, torch.float64)])
def test_kernels_split_over_openmp_threads_give_the_same_bits(threads, dtype):
    if not native.splits_itself():
        pytest.skip(f"the kernels do not split themselves here: {native.status()}")
    weight, grad = with_specials((520, 1016), dtype), with_specials((520, 1016), dtype, seed=1)
    previous_threads = torch.get_num_threads()
    previous_min = native.set_parallel_min(1 << 62)
    try:
        whole = every_kernel(weight, grad)
        torch.set_num_threads(threads)
        native.set_parallel_min(1)  # every call splits, into uneven pieces (520 rows over 3 threads)
        split = every_kernel(weight, grad)
    finally:
        torch.set_num_threads(previous_threads)
        native.set_parallel_min(previous_min)
    assert [type(r) for r in split] == [type(r) for r in whole]
    for index, (a, b) in enumerate(zip(split, whole, strict=True)):
        assert a == b if isinstance(a, bool) else torch.equal(bits(a), bits(b)), index
    assert whole[5] is True and whole[6] is False  # pruned_nonzero saw both answers


def test_set_parallel_min_checks_its_value_before_changing_anything():
    before = native.set_parallel_min(1 << 16)
    for bad in (0, -5, 1 << 63, 2.5, True, "1"):
        with pytest.raises(ValueError, match="set_parallel_min"):
            native.set_parallel_min(bad)
    assert native.set_parallel_min(before) == 1 << 16


FORK_CHILD = """
import os, sys, torch
from nm_hf import native
from nm_hf.masks import nm_mask
torch.set_num_threads(2)
weight = torch.randn(512, 512)
if sys.argv[1] == "loaded":
    native.set_parallel_min(1)
    expected = nm_mask(weight, 2, 4).tolist()  # the parent's OpenMP threads are running now
else:  # the kernels are first loaded in the child, after torch's own threads ran in the parent
    weight.mul(2).sum()
    with native.disabled():
        expected = nm_mask(weight, 2, 4).tolist()
pid = os.fork()
if pid == 0:
    os._exit(0 if nm_mask(weight, 2, 4).tolist() == expected else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("when", ["loaded", "loaded_in_child"])
def test_a_forked_child_runs_the_kernels_without_waiting_on_the_parents_threads(when):
    if not native.splits_itself():
        pytest.skip(f"the kernels do not split themselves here: {native.status()}")
    result = subprocess.run([sys.executable, "-c", FORK_CHILD, when], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["child", "0"]


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_without_openmp_the_python_pool_splits_and_the_bits_stay(tmp_path):
    code = ("import torch; from nm_hf import native; from nm_hf.masks import nm_mask; torch.set_num_threads(2); "
            "w = torch.randn(2100, 1024, generator=torch.Generator().manual_seed(0)); fast = nm_mask(w, 2, 4); "
            "print(native.status()); print(native.splits_itself()); "
            "native_disabled = native.disabled(); native_disabled.__enter__(); "
            "print(torch.equal(fast, nm_mask(w, 2, 4)))")
    result = run_python(code, NM_HF_NATIVE_OPENMP="0", NM_HF_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    status, splits, same = result.stdout.splitlines()
    assert status.startswith("native kernels") and "-fopenmp" not in status
    assert (splits, same) == ("False", "True")
