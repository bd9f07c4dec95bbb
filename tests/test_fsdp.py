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

SCRIPTS = Path(__file__).parent / "scripts"
TORCHRUN = Path(sys.executable).with_name("torchrun")
SPECS = ("dense", "ste", "sr-ste:gradient", "sr-ste:decoupled", "fixed", "s-ste", "decaying-mask", "step")
RESUME_SPECS = ("sr-ste:decoupled", "s-ste", "decaying-mask", "step")  # method state, step count, optimizer extras
ACCELERATE_SPECS = ("sr-ste:gradient", "sr-ste:decoupled", "step")
EXACT = ("sad", "sad_from_init", "flips", "sparsity", "steps_in_window", "step")


def torchrun(script: str, *args: str) -> None:
    """Run tests/scripts/`script` on 2 gloo ranks in fresh processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(SCRIPTS / script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_sparse_train.py", str(out), *SPECS)
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict:
    """Train 3 steps and save a sharded checkpoint; in new processes load it, train 3 more, and train 6 straight."""
    out = tmp_path_factory.mktemp("fsdp_resume")
    torchrun("fsdp_resume.py", "first", str(out), *RESUME_SPECS)
    torchrun("fsdp_resume.py", "resume", str(out), *RESUME_SPECS)
    return json.loads((out / "resume.json").read_text())


@pytest.fixture(scope="module")
def accelerated(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_accelerate")
    torchrun("fsdp_accelerate.py", str(out), *ACCELERATE_SPECS)
    return json.loads((out / "accelerate.json").read_text())


def _same_history(mine: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in mine] == [r["step"] for r in reference]
    for record, expected in zip(mine, reference, strict=True):
        assert {k: record[k] for k in EXACT} == {k: expected[k] for k in EXACT}
        assert record["pruned_weight_norm"] == pytest.approx(expected["pruned_weight_norm"], rel=1e-4, abs=1e-6)
        assert record["layers"].keys() == expected["layers"].keys()


@pytest.mark.parametrize("spec", SPECS)
def test_two_fsdp_ranks_train_like_one_process(results, spec):
    run = results[spec]
    assert run["weight_diff"] < 1e-4
    assert run["mask_diff"] == 0
    # the tracker on sharded weights: local counts summed over the shards give one process's numbers
    assert [r["step"] for r in run["history"]] == [2, 4, 6]
    _same_history(run["history"], run["reference_history"])
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


def test_a_module_reading_its_childs_weight_trains_like_one_process_when_sharded_with_the_child(results):
    """`fully_shard` on the reading module (the read layer in its unit) and the root: inside the reader's forward the
    weight is all-gathered, so the read sees the whole masked weight, as in one process."""
    run = results["reader_in_the_layers_unit"]
    assert run["readers"] == ["block"] and run["sparse"] == ["block.proj"]
    assert run["weight_diff"] < 1e-4
    assert run["mask_diff"] == 0
    assert run["output_diff"] < 1e-5
    assert run["dense_read_gap"] > 0.1  # a dense read would have given another output


class ReadsProj(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)


class WithReader(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reader = ReadsProj()
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reader(x))


@pytest.mark.parametrize("units", [("reader.proj",), ("reader.proj", "reader")])
def test_a_layer_sharded_below_the_module_reading_its_weight_is_refused_by_name(units):
    """The read layer a `fully_shard` unit of its own below the reader: its weight is this rank's shard while the
    reader runs. Plain FSDP2 fails on that read with a DTensor error; nm_hf refuses it first, naming both."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import nm_hf

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        for sparse in (False, True):
            model = WithReader()
            if sparse:
                nm_hf.sparsify(model, SparsityConfig(method="sr-ste", target_modules=["proj"]))
            for name in units:
                fully_shard(model.get_submodule(name), mesh=mesh)
            fully_shard(model, mesh=mesh)
            if not sparse:
                with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
                    model(torch.randn(2, 16))
                continue
            message = (r"^nm_hf: 'reader' \(ReadsProj\) reads the weight of 'reader.proj' in its forward, but "
                       r"fully_shard made 'reader.proj' an FSDP2 unit below that module, .* apply fully_shard to "
                       r"the reading module \(or a module above it\) and not to 'reader.proj'")
            with pytest.raises(ValueError, match=message):
                model(torch.randn(2, 16))
            assert "weight" not in vars(model.reader.proj)  # nothing left exposed
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("spec", RESUME_SPECS)
def test_resume_from_a_sharded_checkpoint_equals_an_uninterrupted_run(resumed, spec):
    """DCP for weights and optimizer, a per-rank file for nm_hf's state and the tracker (this rank's shards)."""
    run = resumed[spec]
    assert run["weight_diff"] < 1e-4
    assert run["mask_diff"] == 0
    assert run["step"] == 6
    assert run["method_state"] == run["straight_method_state"]  # S-STE's scale, STEP's switch (after the resume)
    # the tracker continues: the record logged before the save, the unlogged step 3 in the window after it
    assert [r["step"] for r in run["history"]] == [2, 4, 6]
    assert run["history"][1]["steps_in_window"] == 2
    _same_history(run["history"], run["straight_history"])
    summary, straight = run["summary"], run["straight_summary"]
    assert summary["steps"] == straight["steps"] == 6
    assert summary["mean_flip_rate"] == pytest.approx(straight["mean_flip_rate"], rel=1e-9)
    assert summary["sad_from_init"] == straight["sad_from_init"]
    if spec == "step":
        assert run["method_state"][0] == {"switch_step": 5}


def test_accelerate_fsdp2_plugin_on_cpu_builds_ddp(accelerated):
    """Why the Trainer's FSDP path cannot run here: accelerate drops the FSDP plugin on CPU (no error)."""
    assert accelerated["cpu_distributed_type"] == "DistributedType.MULTI_CPU"
    assert accelerated["cpu_wrapper"] == "DistributedDataParallel"
    assert accelerated["is_fsdp2"]  # after setting the state as accelerate does on GPUs


@pytest.mark.parametrize("spec", ACCELERATE_SPECS)
def test_accelerator_fsdp2_with_nm_hf_steps_trains_like_one_process(accelerated, spec):
    """accelerate's FSDP2 prepare, accumulate, backward and clipping with the steps SparseTrainer adds."""
    run = accelerated[spec]
    assert run["sharded"]
    assert run["weight_diff"] < 1e-4
    assert run["mask_diff"] == 0
    assert [r["step"] for r in run["history"]] == [2, 4]
    _same_history(run["history"], run["reference_history"])
    assert run["history"][0]["sad"] > 0
    if spec == "step":  # prepare swaps the optimizer's Parameters: AutoSwitch must still watch the sparse weights
        assert len(run["autoswitch"]) == len(run["reference_autoswitch"]) == 3
        assert run["autoswitch"] == pytest.approx(run["reference_autoswitch"], rel=1e-4)


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


def test_a_shard_boundary_cutting_groups_is_refused_at_the_first_step_not_at_finalize():
    """The forward masks the whole all-gathered weight and never checks the shards: without a tracker, a cut
    group (or a periodic mask) used to surface only in `finalize`, after the whole run."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import nm_hf

    model = torch.nn.Sequential(SparseConv1D(8, 12, config=SparsityConfig(method="ste")))  # [12, 8]: 6 rows a rank
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        local = model[0].weight.detach()[:6].clone()
        model[0].weight = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                                shape=(12, 8), stride=(8, 1)))
        with pytest.raises(ValueError, match=r"'0': SparseConv1D: weight \(12, 8\) sharded 2 ways .* chunks of 6 rows"):
            nm_hf.after_optimizer_step(model, 0.01)
        assert model[0].nm_step == 0  # nothing counted
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "rank", "mesh_shape", "placements", "shape"), [
    (2, 1, (2,), ("shard0",), (5, 4, 8)),  # uneven chunks: rank 1 holds experts 3 and 4
    (2, 0, (2,), ("shard0",), (5, 4, 8)),
    (2, 1, (2,), ("shard1",), (5, 4, 8)),  # another dim sharded: dim 0 whole
    (2, 1, (2,), ("replicate",), (5, 4, 8)),
    (4, 3, (2, 2), ("shard0", "shard0"), (8, 4, 8)),  # one dim over two mesh dims, chunked in mesh order
    (4, 2, (2, 2), ("replicate", "shard0"), (7, 4, 8)),  # HSDP
    (4, 3, (2, 2), ("shard0", "shard0"), (3, 4, 8)),  # more ranks than rows along one mesh dim: an empty part
])
def test_shard_range_matches_the_layout_dtensor_gives_the_rank(world, rank, mesh_shape, placements, shape):
    """Which experts a rank's shard holds (S-STE's per-expert betas): the very elements DTensor gives the rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from nm_hf.layers.base import shard_range

    kinds = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", mesh_shape)
        full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
        sharded = distribute_tensor(full, mesh, [kinds[p] for p in placements], src_data_rank=None)
        local = sharded.to_local()  # src_data_rank=None: each rank cuts its own part from `full` (no data moved)
        spans = [shard_range(sharded, dim) for dim in range(full.ndim)]
        assert torch.equal(local, full[spans[0].start:spans[0].stop, spans[1].start:spans[1].stop,
                                        spans[2].start:spans[2].stop])
        assert shard_range(full, 0) == range(shape[0])
    finally:
        dist.destroy_process_group()


def test_shard_range_refuses_strided_sharding():
    """FSDP2 over tensor parallelism shards strided: no contiguous range on a rank, so no slice of per-expert
    state to take (torch 2.13's `_StridedShard` is not `is_shard()`: a check by that alone would miss it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from nm_hf.layers.base import shard_range

    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        strided = DTensor.from_local(torch.zeros(2, 4), mesh, [_StridedShard(0, split_factor=2)], run_check=False,
                                     shape=(4, 4), stride=(4, 1))
        with pytest.raises(ValueError, match="sharded as .* along dim 0 holds no contiguous range"):
            shard_range(strided, 0)
        assert shard_range(strided, 1) == range(4)
    finally:
        dist.destroy_process_group()


def test_strided_sharding_along_the_groups_is_refused():
    """FSDP2 over tensor parallelism (`_StridedShard`, not `is_shard()` in torch 2.13): refused along the dim
    that holds the groups (interleaved pieces could cut them), accepted along another."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    linear = SparseLinear(8, 8, config=SparsityConfig(method="ste"))  # [out, in]: dim 1 holds the groups
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2,))
        for dim, refused in ((1, True), (0, False)):
            local = linear.weight.detach().chunk(2, dim)[0].clone()
            strided = DTensor.from_local(local, mesh, [_StridedShard(dim, split_factor=2)], run_check=False,
                                         shape=(8, 8), stride=(8, 1))
            if refused:
                with pytest.raises(ValueError, match="SparseLinear: a weight sharded as .* along the dim that holds "
                                                     "its groups cannot be masked shard by shard"):
                    linear.check_sharding(strided)
            else:
                linear.check_sharding(strided)
    finally:
        dist.destroy_process_group()
