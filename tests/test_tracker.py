"""SparsityTracker (SAD, flip rate, pruned-weight norm) and its history/state files (plots: test_plot.py)."""

from __future__ import annotations

import copy
import json
import math
import os
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from nm_hf.config import SparsityConfig
from nm_hf.injection import after_optimizer_step, finalize, iter_sparse_layers, sparsify
from nm_hf.tracker import (
    HISTORY_FILE,
    SparsityTracker,
    mark_weights_updated,
    pack_bits,
    popcount,
    unpack_bits,
)
from tiny_models import tiny_model, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- bit helpers


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 64, 1001])
def test_pack_bits_matches_numpy_and_round_trips(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(unpack_bits(packed, (numel,)), mask)
    assert int(popcount(packed)) == int(mask.sum())


def test_popcount_every_byte():
    values = torch.arange(256, dtype=torch.uint8)
    expected = sum(bin(v).count("1") for v in range(256))
    assert int(popcount(values)) == expected
    for v in (0, 1, 3, 128, 255, 0b10110110):
        assert int(popcount(torch.tensor([v], dtype=torch.uint8))) == bin(v).count("1")


# --------------------------------------------------------------------------- hand-made masks


def _one_layer(method: str = "ste") -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 2, bias=False))
    return sparsify(model, SparsityConfig(n=2, m=4, method=method, target_modules=["0"]))


def _set(model: nn.Module, rows: list[list[float]]) -> None:
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(rows))


W0 = [[4, 3, 2, 1, 4, 3, 2, 1], [1, 2, 3, 4, 1, 2, 3, 4]]  # masks 1100 1100 / 0011 0011
W1 = [[1, 2, 3, 4, 4, 3, 2, 1], [1, 2, 3, 4, 1, 2, 3, 4]]  # first group of row 0 flips: 4 entries


def test_hand_made_masks_sad_flip_rate_norm_and_sparsity():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    assert tracker.num_masked_weights == 16
    assert torch.equal(tracker.initial_masks()["0"], torch.tensor(
        [[1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool))

    _set(model, W1)
    tracker.step()  # 4 flips
    tracker.step()  # weights unchanged: 0 flips
    logs = tracker.log_metrics(step=2)
    assert logs == {
        "sparsity/sad": 4,
        "sparsity/sad_rate": 4 / 16,
        "sparsity/sad_from_init": 4,
        "sparsity/sad_from_init_rate": 4 / 16,
        "sparsity/flip_rate": (4 + 0) / (2 * 16),
        "sparsity/pruned_weight_norm": pytest.approx(math.sqrt(1 + 4 + 4 + 1 + 1 + 4 + 1 + 4)),
        "sparsity/sparsity": 0.5,
    }
    record = tracker.history[-1]
    assert record["step"] == 2 and record["steps_in_window"] == 2 and record["flips"] == 4
    assert record["layers"]["0"]["sad"] == 4 and record["layers"]["0"]["flips"] == 4

    _set(model, W0)  # back to the initial masks
    tracker.step()
    logs = tracker.log_metrics(step=3)
    assert logs["sparsity/sad"] == 4 and logs["sparsity/sad_from_init"] == 0
    assert logs["sparsity/flip_rate"] == 4 / 16

    logs = tracker.log_metrics(step=3)  # nothing happened since: zero window
    assert logs["sparsity/sad"] == 0 and logs["sparsity/flip_rate"] == 0.0
    assert [r["step"] for r in tracker.history] == [2, 3, 3]


def test_sparsity_counts_exact_zeros_among_kept_weights():
    model = _one_layer()
    # group [5, 0, 0, 0]: the mask keeps 5 and the first 0 (ties go to the lower index) -> 3 zeros of 4
    _set(model, [[5, 0, 0, 0, 4, 3, 2, 1], [1, 2, 3, 4, 1, 2, 3, 4]])
    tracker = SparsityTracker(model)
    assert tracker.log_metrics(0)["sparsity/sparsity"] == (3 + 2 + 2 + 2) / 16


def test_dense_method_tracks_the_mask_it_would_have():
    model = _one_layer("dense")
    _set(model, W0)
    tracker = SparsityTracker(model)
    _set(model, W1)
    tracker.step()
    logs = tracker.log_metrics(1)
    assert logs["sparsity/sad"] == 4 and logs["sparsity/flip_rate"] == 4 / 16
    assert logs["sparsity/sparsity"] == 0.0  # the forward uses the dense weight
    assert tracker.method == "dense"


def test_step_sees_weights_written_without_a_version_bump():
    """Fused optimizers write weights without bumping `_version`; `step()` must not use a stale mask."""
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    model[0].weight.data.copy_(torch.tensor(W1))  # no version bump, like torch's fused AdamW
    tracker.step()
    assert tracker.log_metrics(1)["sparsity/sad"] == 4

    model[0].weight.data.copy_(torch.tensor(W0))
    stale = model[0].current_mask().clone()
    mark_weights_updated([model[0]])
    assert not torch.equal(model[0].current_mask(), stale)


def test_fused_adamw_step_is_seen_without_manual_marking():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    before = model[0].current_mask().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=10.0, fused=True)
    model[0].weight.grad = torch.tensor([[1.0, 1, -1, -1, 0, 0, 0, 0], [0.0] * 8])  # |4-10|,|3-10| < 2+10,1+10
    opt.step()  # the fused kernel writes the weights without bumping their version counter
    tracker.step(mark_updated=False)
    assert not torch.equal(model[0].current_mask(), before)
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(model[0].current_mask(), expected)
    assert tracker.log_metrics(1)["sparsity/sad"] == 4


def test_a_mask_recompute_leaves_the_previous_mask_tensor_intact():
    """The tracker holds the previous step's mask by reference: a recompute must make a new tensor."""
    model = _one_layer()
    _set(model, W0)
    before = model[0].current_mask()
    snapshot = before.clone()
    _set(model, W1)
    mark_weights_updated([model[0]])
    after = model[0].current_mask()
    assert after.data_ptr() != before.data_ptr() and not torch.equal(after, snapshot)
    assert torch.equal(before, snapshot)


def test_flips_counted_when_a_forward_recomputed_the_mask_before_step():
    """Forward first (the layer's cache moves on), `step()` later, and a `step()` skipped: same counts."""
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    _set(model, W1)
    model.train()
    model(torch.ones(1, 8)).sum().backward()  # recomputes the mask: the layer now holds the W1 one
    tracker.step(mark_updated=False)
    assert int(tracker.log_metrics(1)["sparsity/sad"]) == 4 and tracker.history[-1]["flips"] == 4
    _set(model, W0)
    mark_weights_updated([model[0]])
    model(torch.ones(1, 8))
    _set(model, W1)  # a step() was skipped in between: the two masks are the same again
    tracker.step()
    assert tracker.log_metrics(2)["sparsity/flip_rate"] == 0.0
    assert torch.equal(unpack_bits(tracker.state_dict()["prev"][0], (2, 8)), model[0].current_mask())


def test_periodic_mask_flips_only_at_its_refresh():
    model = sparsify(nn.Sequential(nn.Linear(8, 2, bias=False)),
                     SparsityConfig(n=2, m=4, method="ste", target_modules=["0"], mask_update_interval=2))
    _set(model, W0)
    tracker = SparsityTracker(model)
    _set(model, W1)
    flips = []
    for step in (1, 2):
        model[0].set_step(step)
        tracker.step()
        flips.append(tracker.log_metrics(step)["sparsity/sad"])
    assert flips == [0, 4]


# --------------------------------------------------------------------------- brute force on a real model


def _topk_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Independent reference: the n largest |w| of every m along `dim` (no ties in random data)."""
    w = weight.movedim(dim, -1)
    groups = w.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(w.shape).movedim(-1, dim)


def _perturb(model: nn.Module, g: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for _, layer in iter_sparse_layers(model):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * scale)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_tracker_matches_brute_force_counts(n, m):
    model = sparsify(tiny_model("gpt2"), SparsityConfig(n=n, m=m, method="ste"))
    layers = dict(iter_sparse_layers(model))
    ref = lambda: {k: _topk_mask(v.weight.detach(), n, m, v.group_dim) for k, v in layers.items()}  # noqa: E731
    g = torch.Generator().manual_seed(n * 10 + m)
    tracker = SparsityTracker(model)
    init = ref()
    last_log, prev = init, init
    window_flips = {k: 0 for k in layers}
    steps = 0
    total = sum(v.weight.numel() for v in layers.values())
    for step in range(1, 9):
        _perturb(model, g, scale=0.01)
        tracker.step()
        now = ref()
        for k in layers:
            window_flips[k] += int((now[k] != prev[k]).sum())
        prev, steps = now, steps + 1
        if step in (2, 3, 7, 8):
            logs = tracker.log_metrics(step)
            record = tracker.history[-1]
            sad = {k: int((now[k] != last_log[k]).sum()) for k in layers}
            sad_init = {k: int((now[k] != init[k]).sum()) for k in layers}
            pruned = {k: float(layers[k].weight.detach()[~now[k]].norm()) for k in layers}
            assert logs["sparsity/sad"] == sum(sad.values()) > 0
            assert logs["sparsity/sad_from_init"] == sum(sad_init.values())
            assert logs["sparsity/flip_rate"] == pytest.approx(sum(window_flips.values()) / (steps * total))
            assert logs["sparsity/pruned_weight_norm"] == pytest.approx(
                math.sqrt(sum(v ** 2 for v in pruned.values())), rel=1e-5)
            assert logs["sparsity/sparsity"] == pytest.approx(1 - n / m)
            for k in layers:
                row = record["layers"][k]
                assert (row["sad"], row["sad_from_init"], row["flips"]) == (sad[k], sad_init[k], window_flips[k])
                assert row["pruned_weight_norm"] == pytest.approx(pruned[k], rel=1e-5)
            last_log, steps = now, 0
            window_flips = {k: 0 for k in layers}
    summary = tracker.summary()
    assert summary["sad_from_init"] == tracker.history[-1]["sad_from_init"] and summary["step"] == 8
    assert summary["steps"] == 8 and summary["mean_flip_rate"] > 0


def test_summary_measures_an_unlogged_window():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    assert tracker.summary()["sad_from_init"] == 0 and tracker.summary()["step"] is None
    _set(model, W1)
    tracker.step()
    summary = tracker.summary()
    assert summary["sad"] == 4 and summary["flip_rate"] == 4 / 16 and summary["step"] is None
    assert tracker.history == [] and tracker.steps_since_log == 1  # summary changes nothing


# --------------------------------------------------------------------------- deferred counting (SparseTrainer's)


def _train(model: nn.Module, tracker: SparsityTracker, steps: int, defer: bool, lr: float = 0.05) -> list:
    """A plain training loop (forward, backward, AdamW, tracker.step) logging every third step."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # dropout
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        after_optimizer_step(model, lr)  # e.g. SR-STE's decoupled decay
        tracker.step(mark_updated=False, defer=defer)
        if step % 3 == 0:
            tracker.log_metrics(step)
    return tracker.history


@pytest.mark.parametrize("method", ["ste", "dense", "sr-ste-decoupled"])
def test_deferred_counts_equal_eager_counts_in_a_training_loop(method):
    """Deferred, a step's flips are counted in the next forward (or, for a forward that uses no mask,
    before the next optimizer step): the history must be exactly the eager one."""
    config = (SparsityConfig(method="sr-ste", decay_mode="decoupled", decay=1.0) if method == "sr-ste-decoupled"
              else SparsityConfig(method=method))
    torch.manual_seed(0)
    base = sparsify(tiny_model("gpt2"), config)
    histories = {}
    for defer in (False, True):
        model = copy.deepcopy(base)
        tracker = SparsityTracker(model)
        history = _train(model, tracker, 8, defer)
        summary = tracker.summary()  # counts the unlogged steps 7-8
        histories[defer] = (history, summary, tracker.state_dict()["prev"])
    (eager, eager_summary, eager_prev), (deferred, deferred_summary, deferred_prev) = histories[False], histories[True]
    assert sum(record["flips"] for record in eager) > 0  # the masks moved
    assert deferred == eager and deferred_summary == eager_summary
    assert all(torch.equal(a, b) for a, b in zip(eager_prev, deferred_prev, strict=True))


def test_deferred_step_leaves_the_mask_to_the_next_forward():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    before = model[0].current_mask()
    _set(model, W1)
    tracker.step(defer=True)
    assert model[0].cached_mask() is before  # the tracker read nothing
    model.train()
    model(torch.ones(1, 8)).sum().backward()  # re-chooses the mask; the flips are counted there
    assert model[0].cached_mask() is not before
    logs = tracker.log_metrics(1)
    assert logs["sparsity/sad"] == 4 and logs["sparsity/flip_rate"] == 4 / 16


def test_deferred_step_without_a_forward_is_counted_when_read():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    _set(model, W1)
    tracker.step(defer=True)
    assert tracker.summary()["flip_rate"] == 4 / 16  # counted from the current mask
    assert tracker.log_metrics(1)["sparsity/sad"] == 4
    _set(model, W0)
    tracker.step(defer=True)
    _set(model, W1)  # changed back with neither a forward nor an optimizer step: the two changes merge
    tracker.step(defer=True)
    tracker.log_metrics(3)
    record = tracker.history[-1]
    assert record["steps_in_window"] == 2 and record["flips"] == 0 and record["sad"] == 0  # eager: 4 + 4 flips


@pytest.mark.parametrize("method", ["ste", "dense"])
def test_deferred_counts_survive_a_weight_swap_and_finalize(method):
    """A state dict loaded between a step and its forward (an averaged-weights evaluation) and `finalize`
    settle a deferred step first; afterwards other optimizers' steps leave the tracker alone."""
    torch.manual_seed(0)
    base = sparsify(tiny_model("gpt2"), SparsityConfig(method=method))
    ids = torch.randint(0, base.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    results = {}
    for defer in (False, True):
        torch.manual_seed(0)  # dropout
        model = copy.deepcopy(base)
        tracker = SparsityTracker(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            tracker.step(mark_updated=False, defer=defer)
            trained = copy.deepcopy(model.state_dict())
            model.load_state_dict(base.state_dict())  # evaluate other weights, then put the trained ones back
            with torch.no_grad():
                model.eval()(input_ids=ids)
            model.load_state_dict(trained)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        tracker.step(mark_updated=False, defer=defer)
        finalize(model)
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).step()  # an unrelated optimizer
        results[defer] = tracker.state_dict()["total_flips"]
    assert sum(results[False]) > 0 and results[True] == results[False]


def test_only_the_optimizer_of_the_tracked_weights_settles_a_deferred_step():
    model = _one_layer("dense")  # its forward needs no mask: only the optimizer hook counts the step
    _set(model, W0)
    tracker = SparsityTracker(model)
    before = model[0].current_mask()
    _set(model, W1)
    tracker.step(defer=True)
    torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).step()
    assert model[0].cached_mask() is before  # another model's optimizer: not settled
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()  # settles first (the weights of the step it counts), then steps
    assert model[0].cached_mask() is not before and tracker.state_dict()["total_flips"] == [4]


def test_a_dropped_tracker_is_freed_and_no_longer_called():
    model = _one_layer()
    _set(model, W0)
    tracker = SparsityTracker(model)
    tracker.step(defer=True)
    ref = weakref.ref(tracker)
    del tracker
    assert ref() is None  # neither the layer's listener nor the optimizer hook keeps it alive
    _set(model, W1)
    model.train()
    model(torch.ones(1, 8)).sum().backward()  # a mask recompute and an optimizer step with no tracker left
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(model[0].current_mask(), torch.tensor(
        [[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool))


# --------------------------------------------------------------------------- state and history files


def test_state_dict_resume_continues_identically(tmp_path):
    base = sparsify(tiny_model("gpt2"), SparsityConfig(method="ste"))
    g = torch.Generator().manual_seed(0)
    noise = [[torch.randn(layer.weight.shape, generator=g) * 0.01 for _, layer in iter_sparse_layers(base)]
             for _ in range(6)]

    def run(model, tracker, steps):
        for step in steps:
            with torch.no_grad():
                for (_, layer), delta in zip(iter_sparse_layers(model), noise[step - 1], strict=True):
                    layer.weight.add_(delta)
            tracker.step()
            if step % 2 == 0:
                tracker.log_metrics(step)

    model_a = copy.deepcopy(base)
    tracker_a = SparsityTracker(model_a)
    run(model_a, tracker_a, [1, 2, 3])
    tracker_a.save_state(tmp_path / "tracker.pt")
    model_b = copy.deepcopy(model_a)  # the "checkpoint" weights at step 3
    run(model_a, tracker_a, [4, 5, 6])

    tracker_b = SparsityTracker(model_b)  # its own init would be the step-3 masks ...
    tracker_b.load_state(tmp_path / "tracker.pt")  # ... the saved state restores the real ones
    run(model_b, tracker_b, [4, 5, 6])
    assert tracker_b.history == tracker_a.history
    assert [r["step"] for r in tracker_b.history] == [2, 4, 6]
    assert tracker_b.summary() == tracker_a.summary()

    state = torch.load(tmp_path / "tracker.pt", weights_only=True)
    for packed, numel in zip(state["init"], state["numels"], strict=True):
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)  # 1 bit per weight


def test_sharded_summary_right_after_a_resume_sums_the_restored_flips(monkeypatch):
    """A sharded (FSDP2) tracker sums its flip total over the shards at `_measure`; one restored by
    `load_state_dict` at a log boundary (no step since) must not report a mean flip rate of 0."""
    import nm_hf.tracker as tracker_module

    # one shard of a one-rank group: the all-reduce is the identity, the sharded code path runs
    monkeypatch.setattr(tracker_module.dist, "all_reduce", lambda tensor, group=None: None)
    model = sparsify(tiny_model("gpt2"), SparsityConfig(method="ste"))
    tracker = SparsityTracker(model)
    tracker._group = object()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            for _, layer in iter_sparse_layers(model):
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        tracker.step()
    tracker.log_metrics(2)
    expected = tracker.summary()
    assert expected["mean_flip_rate"] > 0

    resumed = SparsityTracker(model)
    resumed._group = object()
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.summary() == expected


def test_load_state_rejects_another_model(tmp_path):
    tracker = SparsityTracker(sparsify(tiny_model("gpt2"), SparsityConfig()))
    tracker.save_state(tmp_path / "t.pt")
    other = SparsityTracker(sparsify(tiny_model("gpt2"), SparsityConfig(target_modules=["c_fc"])))
    with pytest.raises(ValueError, match=r"t\.pt: the saved sparsity tracker tracks other layers"):
        other.load_state(tmp_path / "t.pt")
    with pytest.raises(ValueError, match="not a SparsityTracker state"):
        other.load_state_dict({"names": []})


def test_history_file_round_trip_and_errors(tmp_path):
    model = _one_layer("sr-ste")
    _set(model, W0)
    tracker = SparsityTracker(model)
    _set(model, W1)
    tracker.step()
    tracker.log_metrics(1)
    path = tracker.save(tmp_path / "run" / HISTORY_FILE)
    assert [p.name for p in path.parent.iterdir()] == [HISTORY_FILE]  # no temp file left behind
    doc = SparsityTracker.load_history(tmp_path / "run")
    assert doc == json.loads(path.read_text())
    assert doc["method"] == "sr-ste" and doc["pattern"] == "2:4" and doc["num_masked_weights"] == 16
    assert doc["layers"] == {"0": {"shape": [2, 8], "numel": 16}}
    assert doc["config"] is None  # a bare nn.Module has no config to carry the sparsity record
    assert doc["records"][0]["sad"] == 4 and doc["records"][0]["layers"]["0"]["sad"] == 4

    with pytest.raises(FileNotFoundError, match="no sparsity history"):
        SparsityTracker.load_history(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        SparsityTracker.load_history(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a sparsity history"):
        SparsityTracker.load_history(tmp_path / "other.json")


def test_tracker_needs_sparse_layers():
    with pytest.raises(ValueError, match="no sparse layers to track"):
        SparsityTracker(nn.Linear(4, 4))


@pytest.mark.parametrize("content", ["empty", "truncated", "garbage", "other"])
def test_unreadable_state_file_is_one_error_naming_it(tmp_path, content):
    tracker = SparsityTracker(_one_layer())
    good = tracker.save_state(tmp_path / "good.pt").read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"\xff\xfe not a tracker" * 8}.get(content)
    path = tmp_path / "sparsity_tracker.pt"
    if data is None:
        torch.save({"format": 1, "names": ["0"]}, path)  # right format tag, keys missing
    else:
        path.write_bytes(data)
    with pytest.raises(ValueError, match=r"sparsity_tracker\.pt") as info:
        tracker.load_state(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"sparsity_tracker\.pt"):
        SparsityTracker.read_state(path)


def test_history_and_state_files_get_umask_permissions(tmp_path):
    model = _one_layer()
    tracker = SparsityTracker(model)
    tracker.log_metrics(0)
    old = os.umask(0o022)
    try:
        history = tracker.save(tmp_path / "run" / HISTORY_FILE)
        state = tracker.save_state(tmp_path / "run" / "sparsity_tracker.pt")
    finally:
        os.umask(old)
    assert history.stat().st_mode & 0o777 == 0o644
    assert state.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in history.parent.iterdir()) == sorted([HISTORY_FILE, "sparsity_tracker.pt"])
    assert SparsityTracker.read_state(state)["names"] == ["0"]


@pytest.mark.parametrize("method", ["sr-ste", "dense"])
def test_log_metrics_summary_and_masks_after_finalize_read_the_baked_weights(method):
    """`finalize` puts plain layers back: the tracker's numbers are read from the baked weights (a results
    table written after finalizing), the same masks, SAD and sparsity as just before it."""
    model = sparsify(tiny_model("gpt2"), SparsityConfig(method=method))
    tracker = SparsityTracker(model)
    train_steps(model, 2, tracker=tracker)
    before, masks = tracker.summary(), {name: mask.clone() for name, mask in tracker.masks().items()}
    finalize(model)
    tracker.step()  # nothing changes a finalized layer's mask
    after = tracker.summary()
    assert all(torch.equal(mask, masks[name]) for name, mask in tracker.masks().items())
    for key in ("sad", "sad_from_init", "sparsity"):
        assert after[key] == before[key], key
    assert after["pruned_weight_norm"] == (0.0 if method == "sr-ste" else before["pruned_weight_norm"])
    assert tracker.log_metrics(3)["sparsity/sad_from_init"] == before["sad_from_init"]
