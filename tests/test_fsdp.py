"""N:M training under FSDP2 (two gloo ranks on CPU through torchrun) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nm_hf.config import SparsityConfig
from nm_hf.layers import SparseConv1D, SparseLinear

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_sparse_train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
SPECS = ("dense", "ste", "sr-ste:gradient", "sr-ste:decoupled", "fixed", "s-ste", "decaying-mask", "step")
EXACT = ("sad", "sad_from_init", "flips", "sparsity", "steps_in_window", "step")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(out), *SPECS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("spec", SPECS)
def test_two_fsdp_ranks_train_like_one_process(results, spec):
    run = results[spec]
    assert run["weight_diff"] < 1e-4
    assert run["mask_diff"] == 0
    # the tracker on sharded weights: local counts summed over the shards give one process's numbers
    assert [r["step"] for r in run["history"]] == [2, 4, 6]
    for mine, reference in zip(run["history"], run["reference_history"], strict=True):
        assert {k: mine[k] for k in EXACT} == {k: reference[k] for k in EXACT}
        assert mine["pruned_weight_norm"] == pytest.approx(reference["pruned_weight_norm"], rel=1e-4, abs=1e-6)
        assert mine["layers"].keys() == reference["layers"].keys()
    if spec not in ("dense", "fixed"):
        assert run["history"][0]["sad"] > 0  # the masks moved: the comparison means something
    # finalize on the sharded model, saved by rank 0 from the full state dict, reloaded by plain transformers
    assert run["baked_state"] == "finalized"
    assert run["baked_diff"] < 1e-4
    if spec != "dense":
        assert run["baked_sparsity"] == 0.5  # counted over every shard, not this rank's


def test_load_state_dict_between_fsdp_forwards_is_seen(results):
    """An all-gathered weight keeps version 0 and may reuse its address: the mask must still follow new weights."""
    assert results["reload_between_forwards"] < 1e-5


def _sharded(layer, parts):
    return layer.sharding_problem(tuple(layer.weight.shape), parts)


def test_groups_cut_by_shard_boundaries_are_refused():
    config = SparsityConfig(method="ste")
    linear = SparseLinear(8, 6, config=config)  # [out, in]: FSDP2 shards the output dim, groups are whole
    assert _sharded(linear, {0: 4}) is None
    assert "not a multiple of 4" in _sharded(linear, {1: 4})
    conv = SparseConv1D(6, 12, config=config)  # GPT-2 Conv1D [in, out]: dim 0 holds the groups
    assert _sharded(conv, {0: 3}) is None  # chunks of 4 rows
    assert "chunks of 6 rows, not a multiple of 4" in _sharded(conv, {0: 2})
    periodic = SparseLinear(8, 8, config=SparsityConfig(method="ste", mask_update_interval=2))
    assert "mask_update_interval=2" in _sharded(periodic, {0: 2})
    transposable = SparseLinear(8, 6, config=SparsityConfig(method="ste", transposable=True))
    assert "dim 0" in _sharded(transposable, {0: 2})  # m x m blocks: the output dim is grouped too


def test_mark_weights_updated_reaches_a_forward_tensor_whose_key_cannot_change():
    """FSDP2's forward sees an all-gathered tensor refilled in place (version 0, same address), not the
    sharded Parameter that `mark_weights_updated` / `load_state_dict` touch: the mask must follow anyway."""
    from nm_hf.layers import mark_weights_updated

    layer = SparseLinear(8, 2, config=SparsityConfig(method="ste"))
    full = layer.weight  # what the forward sees
    first = layer.current_mask().clone()
    layer._parameters["weight"] = torch.nn.Parameter(torch.zeros(1))  # outside the forward: the shard
    full.data.copy_(full.data.flip(1))  # the next all-gather: same storage, no version bump
    mark_weights_updated([layer])
    layer._parameters["weight"] = full
    assert torch.equal(layer.current_mask(), first.flip(1))
