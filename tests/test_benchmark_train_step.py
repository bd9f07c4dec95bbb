"""benchmarks/train_step.py: the tracker report and the --profile breakdown (structure only, nothing timed)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from nm_hf.config import SparsityConfig
from nm_hf.injection import sparsify
from tiny_models import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


ts = load_benchmark("train_step")
METHODS = ["sr-ste", "ste", "fixed", "dense"]


@pytest.fixture(scope="module")
def runners():
    base = tiny_model("gpt2")
    batches = ts.make_batches(2, 2, 8, VOCAB, seed=1, causal=True)
    out = {ts.BASELINE: ts.Runner(ts.BASELINE, copy.deepcopy(base), batches, 0)}
    for method in METHODS:
        out[method] = ts.Runner(method, sparsify(copy.deepcopy(base), SparsityConfig(method=method)), batches, 0)
    for index in range(2):
        for runner in out.values():
            runner.step(index)
    return out


def test_observe_step_sees_which_steps_recompute_the_mask(runners):
    for method, recomputes in (("sr-ste", True), ("fixed", True), ("dense", False)):
        recomputed, calls = ts.observe_step(runners[method], 10)
        assert recomputed and all(r is recomputes for r in recomputed), method
        assert set(calls) == {1}  # every sparse layer runs once per step


def test_pieces_follow_the_method(runners):
    pieces = {}
    for method in METHODS:
        recomputed, calls = ts.observe_step(runners[method], 20)
        pieces[method] = ts.piece_seconds(runners[method], recomputed, calls, repeats=1)
    assert set(pieces["sr-ste"]) == {"mask", "forward", "backward", "decay", "function"}
    assert all(pieces["sr-ste"][key] > 0 for key in ("mask", "decay"))
    assert pieces["sr-ste"]["backward"] == 0  # the decay term's pass also makes grad_x's masked weight
    # each layer runs once per step, and the pass that re-chooses the mask also made its masked weight
    assert pieces["sr-ste"]["forward"] == 0 and pieces["ste"]["forward"] == 0
    assert pieces["fixed"]["forward"] == 0  # fixed keeps its mask, and its pruned weights are +0.0: W is W * mask
    assert pieces["ste"]["decay"] == 0 and pieces["fixed"]["decay"] == 0  # no gradient-mode decay
    assert pieces["ste"]["backward"] > 0 and pieces["fixed"]["backward"] > 0
    assert all(value == 0 for value in pieces["dense"].values())  # unmasked: no piece of the sparse step


def test_tracker_and_profile_reports(runners, capsys):
    tracker = ts.report_tracker(runners, METHODS, index=30, steps=1)
    assert set(tracker) == set(METHODS)
    assert tracker["sr-ste"][1] == 0 and tracker["dense"][1] > 0  # only dense's step computes no mask
    ratios = {method: 1.0 for method in METHODS}
    ts.report_profile(runners, METHODS, index=40, ratios=ratios, tracker=tracker)
    out = capsys.readouterr().out
    assert "flip counting" in out and "masks only it computes" in out and "deferred/eager" in out
    for label, _ in ts.PROFILE_ROWS:
        assert label in out
    assert out.count("tracker step: flip counting") == 1
    assert any(line.split() == METHODS for line in out.splitlines())  # the profile's header: one column each


def test_deferral_ratio_trains_copies_and_leaves_the_model_alone(runners):
    runner = runners["sr-ste"]
    before = {name: p.detach().clone() for name, p in runner.model.named_parameters()}
    ratio = ts.deferral_ratio(runner, 50, steps=2)
    assert 0 < ratio < 10
    assert all(torch.equal(p, before[name]) for name, p in runner.model.named_parameters())


def test_gpt2_model_runs_the_lm_recipes_shape(capsys):
    """--model gpt2 builds the LM recipe's model, whose sparsified layers are GPT-2 Conv1Ds."""
    ts.main(["--model", "gpt2", "--steps", "1", "--warmup", "0", "--no_memory", "--methods", "sr-ste",
             "--batch_size", "2", "--seq_len", "8", "--vocab", "64"])
    out = capsys.readouterr().out
    assert "GPT-2 d 128, 4 layers" in out
    assert "16 layers" in out  # 4 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    assert "batch 2 x 8 tokens" in out
    with pytest.raises(SystemExit):
        ts.main(["--model", "gpt2", "--seq_len", "129"])  # the model has 128 positions
