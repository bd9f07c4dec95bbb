"""accelerate's `Accelerator` with the FSDP2 plugin on CPU plus nm_hf's per-step pieces, for tests/test_fsdp.py.

    torchrun --nproc_per_node 2 tests/scripts/fsdp_accelerate.py OUT_DIR METHOD[:DECAY_MODE] ...

The largest piece of the Trainer's FSDP2 path that runs without a GPU. `Accelerator(fsdp_plugin=...)`
on CPU picks `DistributedType.MULTI_CPU` and wraps the model in DDP (accelerate enables FSDP only for
GPU-like devices); this script records that (`cpu_distributed_type`, `cpu_wrapper`), then sets the
state's `distributed_type` to FSDP, as accelerate does on GPUs, so that `accelerator.prepare` runs
its FSDP2 code (`fully_shard` of every `LlamaDecoderLayer` and the model). The loop does what the
Trainer does with `SparseTrainer`'s callback and mixin: the optimizer is built before and prepared
with the model (the Trainer does so under FSDP2; accelerate swaps its parameters for the sharded
ones), `accelerator.accumulate` over 2 micro-batches with the
gradient-mode decay scaled by 1/2 (`SparseTrainerMixin.training_step`), `accelerator.backward`,
`clip_grad_norm_`, then per update `nm_hf.after_optimizer_step` and `SparsityTracker.step`
(`_SparsityCallback.on_optimizer_step`). It is compared with one process on the same global batches
(plain torch, the same accumulation and clipping). Rank 0 writes OUT_DIR/accelerate.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

import nm_hf  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import after_optimizer_step, iter_sparse_layers  # noqa: E402
from nm_hf.tracker import SparsityTracker  # noqa: E402
from nm_hf.trainer import create_sparse_optimizer  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

STEPS, LR, LOG_EVERY, ACCUMULATE, CLIP = 4, 1e-2, 2, 2, 1.0
# STEP switches at step 3 (T_max), not on its statistic: a switch after 1 step freezes v = g^2 of one step, and
# the ~1e-7 differences of sharded sums blow up in weights whose gradient was ~0 then (measured: 14)
METHOD_ARGS = {"step": {"switch_threshold": 0.0, "max_switch_fraction": 0.75}}


def config_for(spec: str) -> SparsityConfig:
    method, _, mode = spec.partition(":")
    kwargs = {"decay": 0.5, "decay_mode": mode} if mode else {}
    return SparsityConfig(method=method, method_args=METHOD_ARGS.get(method, {}), **kwargs)


def build(config: SparsityConfig) -> torch.nn.Module:
    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    for _, layer in iter_sparse_layers(model):
        layer.nm_decay_scale = 1.0 / ACCUMULATE  # what SparseTrainerMixin.training_step sets
    return model


def autoswitch(optimizer: torch.optim.Optimizer) -> list[float] | None:
    """StepAdamW's AutoSwitch values (None for other optimizers)."""
    values = getattr(optimizer, "window_values", None)
    return None if values is None else list(values)


def one_process(config: SparsityConfig, batches: list[torch.Tensor]) -> tuple[torch.nn.Module, list[dict], list | None]:
    model = build(config)
    optimizer = create_sparse_optimizer(model, lr=LR, weight_decay=0.0, total_steps=STEPS)
    tracker = SparsityTracker(model)
    for step, ids in enumerate(batches, 1):
        for micro in ids.chunk(ACCUMULATE):
            (model(input_ids=micro, labels=micro).loss / ACCUMULATE).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(model, LR)
        tracker.step(mark_updated=False)
        if step % LOG_EVERY == 0:
            tracker.log_metrics(step)
    return model, tracker.history, autoswitch(optimizer)


def plugin() -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                          reshard_after_forward=True)


def with_accelerate(accelerator: Accelerator, config: SparsityConfig, batches: list[torch.Tensor],
                    part: slice) -> tuple[torch.nn.Module, list[dict], bool, list | None]:
    model = build(config)
    optimizer = create_sparse_optimizer(model, lr=LR, weight_decay=0.0, total_steps=STEPS)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2: swaps the optimizer's parameters
    sharded = all(type(layer.weight).__name__ == "DTensor" for _, layer in iter_sparse_layers(model))
    tracker = SparsityTracker(model)
    for step, ids in enumerate(batches, 1):
        for micro in ids[part].chunk(ACCUMULATE):
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=micro, labels=micro).loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
                optimizer.zero_grad()
        assert accelerator.sync_gradients
        if not accelerator.optimizer_step_was_skipped:
            after_optimizer_step(model, LR)
        tracker.step(mark_updated=False)
        if step % LOG_EVERY == 0:
            tracker.log_metrics(step)
    return model, tracker.history, sharded, autoswitch(optimizer.optimizer)


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    fsdp_plugin = plugin()
    accelerator = Accelerator(fsdp_plugin=fsdp_plugin, cpu=True, gradient_accumulation_steps=ACCUMULATE)
    cpu_type = str(accelerator.distributed_type)  # on CPU accelerate drops the plugin...
    cpu_wrapper = type(accelerator.prepare(torch.nn.Linear(4, 4))).__name__  # ...and builds DDP
    accelerator.free_memory()
    # what accelerate's AcceleratorState sets on GPUs (both states: each AcceleratorState() copies PartialState's)
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (8, 16), generator=generator) for _ in range(STEPS)]
    per_rank = 8 // world
    results: dict = {"cpu_distributed_type": cpu_type, "cpu_wrapper": cpu_wrapper, "is_fsdp2": accelerator.is_fsdp2}
    for spec in specs:
        config = config_for(spec)
        reference, ref_history, ref_autoswitch = one_process(config, batches)
        model, history, sharded, autoswitch_values = with_accelerate(accelerator, config, batches,
                                                  slice(rank * per_rank, (rank + 1) * per_rank))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ref_state = reference.state_dict()
        weight_diff = max(float((full[key] - ref_state[key]).abs().max()) for key in ref_state)
        mask_diff = sum(int((layer.compute_mask(full[f"{name}.weight"]) != layer.current_mask()).sum())
                        for name, layer in iter_sparse_layers(reference))
        results[spec] = {"sharded": sharded, "weight_diff": weight_diff, "mask_diff": mask_diff,
                         "history": history, "reference_history": ref_history,
                         "autoswitch": autoswitch_values, "reference_autoswitch": ref_autoswitch}
        accelerator.free_memory()
    if rank == 0:
        (out / "accelerate.json").write_text(json.dumps(results))
    accelerator.end_training()


if __name__ == "__main__":
    main()
