"""Resume N:M training under FSDP2 from a sharded checkpoint, for tests/test_fsdp.py (and by hand).

    torchrun --nproc_per_node 2 tests/scripts/fsdp_resume.py first OUT_DIR METHOD[:DECAY_MODE] ...
    torchrun --nproc_per_node 2 tests/scripts/fsdp_resume.py resume OUT_DIR METHOD[:DECAY_MODE] ...

`first`: per method, train a tiny Llama (each decoder layer and the model wrapped with `fully_shard`
on a 2-rank CPU mesh) for SAVE_AT of STEPS AdamW steps, then save a checkpoint in OUT_DIR/METHOD:
weights and optimizer state with `torch.distributed.checkpoint` (each rank writes its shards), and
per rank `nm_hf_rank{rank}.pt` with `nm_hf.sparse_training_state`, the tracker's `state_dict` (this
rank's shards) and the optimizer's entries DCP does not carry (StepAdamW's AutoSwitch state).
`resume` (fresh processes): per method, build and shard a fresh model, load that checkpoint, train
the remaining steps; then train the same model uninterrupted for STEPS steps. Rank 0 writes
OUT_DIR/resume.json: per method the largest weight difference and the mask entries that differ
between the two runs, and both trackers' histories and summaries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

import nm_hf  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import after_optimizer_step, iter_sparse_layers, training_step  # noqa: E402
from nm_hf.tracker import SparsityTracker  # noqa: E402
from nm_hf.trainer import create_sparse_optimizer  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

STEPS, SAVE_AT, LR, LOG_EVERY = 6, 3, 1e-2, 2
# STEP switches at step 5 (T_max = 0.8 * 6): after the resume, so its AutoSwitch state must carry over
METHOD_ARGS = {"decaying-mask": {"decay_steps": 4}, "step": {"min_switch_fraction": 0.5, "max_switch_fraction": 0.8}}
OPTIMIZER_KEYS = ("state", "param_groups")  # what DCP's optimizer state dict carries


def config_for(spec: str) -> SparsityConfig:
    method, _, mode = spec.partition(":")
    kwargs = {"decay": 0.5, "decay_mode": mode} if mode else {}
    return SparsityConfig(method=method, method_args=METHOD_ARGS.get(method, {}), **kwargs)


def sharded_model(config: SparsityConfig, mesh) -> torch.nn.Module:
    """Sparsify first, then shard; the optimizer is built after sharding."""
    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def setup(config: SparsityConfig, mesh):
    model = sharded_model(config, mesh)
    optimizer = create_sparse_optimizer(model, lr=LR, weight_decay=0.0, total_steps=STEPS)
    return model, optimizer


def train(model, optimizer, tracker, batches, first: int, last: int, part: slice) -> None:
    for step in range(first, last + 1):
        ids = batches[step - 1][part]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(model, LR)
        tracker.step()
        if step % LOG_EVERY == 0:
            tracker.log_metrics(step)


def save_checkpoint(path: Path, model, optimizer, tracker, rank: int) -> None:
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=path)  # every rank writes its shards
    extra = {key: value for key, value in optimizer.state_dict().items() if key not in OPTIMIZER_KEYS}
    torch.save({"sparse": nm_hf.sparse_training_state(model), "tracker": tracker.state_dict(),
                "optimizer_extra": extra}, path / f"nm_hf_rank{rank}.pt")


def load_checkpoint(path: Path, model, optimizer, rank: int) -> SparsityTracker:
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)  # in place, into this rank's shards
    set_model_state_dict(model, state["model"])  # load_state_dict: the layers' masks follow the new weights
    own = torch.load(path / f"nm_hf_rank{rank}.pt", weights_only=True)
    if own["optimizer_extra"]:  # DCP's optimizer dict lacks them; it loads positionally like optimizer.state_dict()
        optimizer.load_state_dict({**state["optimizer"], **own["optimizer_extra"]})
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    nm_hf.load_sparse_training_state(model, own["sparse"])
    tracker = SparsityTracker(model)
    tracker.load_state_dict(own["tracker"])
    return tracker


def full_masks(model, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: layer.compute_mask(full[f"{name}.weight"]) for name, layer in iter_sparse_layers(model)}


def main() -> None:
    phase, out, specs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (4, 16), generator=generator) for _ in range(STEPS)]
    part = slice(rank * (4 // world), (rank + 1) * (4 // world))
    full_options = StateDictOptions(full_state_dict=True)
    results = {}
    for spec in specs:
        config = config_for(spec)
        checkpoint = out / spec.replace(":", "-")
        if phase == "first":
            model, optimizer = setup(config, mesh)
            tracker = SparsityTracker(model)
            train(model, optimizer, tracker, batches, 1, SAVE_AT, part)
            save_checkpoint(checkpoint, model, optimizer, tracker, rank)
            continue
        model, optimizer = setup(config, mesh)
        tracker = load_checkpoint(checkpoint, model, optimizer, rank)
        train(model, optimizer, tracker, batches, SAVE_AT + 1, STEPS, part)
        straight, straight_optimizer = setup(config, mesh)
        straight_tracker = SparsityTracker(straight)
        train(straight, straight_optimizer, straight_tracker, batches, 1, STEPS, part)
        resumed_full = get_model_state_dict(model, options=full_options)
        straight_full = get_model_state_dict(straight, options=full_options)
        weight_diff = max(float((resumed_full[key] - straight_full[key]).abs().max()) for key in straight_full)
        judge = tiny_model("llama")  # an unsharded layer of the same config computes the full masks
        nm_hf.sparsify(judge, config)
        masks, straight_masks = full_masks(judge, resumed_full), full_masks(judge, straight_full)
        mask_diff = sum(int((masks[name] != straight_masks[name]).sum()) for name in masks)
        results[spec] = {"weight_diff": weight_diff, "mask_diff": mask_diff, "history": tracker.history,
                         "straight_history": straight_tracker.history, "summary": tracker.summary(),
                         "straight_summary": straight_tracker.summary(), "step": training_step(model),
                         "method_state": [layer.nm_method_state for _, layer in iter_sparse_layers(model)],
                         "straight_method_state": [layer.nm_method_state for _, layer in iter_sparse_layers(straight)]}
    if rank == 0 and phase == "resume":
        (out / "resume.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
