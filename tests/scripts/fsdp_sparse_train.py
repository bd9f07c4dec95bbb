"""N:M training under FSDP2 against one process, for tests/test_fsdp.py (and by hand).

    torchrun --nproc_per_node 2 tests/scripts/fsdp_sparse_train.py OUT_DIR [METHOD[:DECAY_MODE] ...]

For each method every rank first trains a tiny Llama alone on the full batches (the reference), then
the same model with each decoder layer and the model wrapped with `fully_shard` on a 2-rank CPU
mesh, each rank on its half of the same batches (6 AdamW steps, tracker logs every 2 steps). Rank 0
writes OUT_DIR/results.json: per method the largest weight difference, the mask entries that differ,
both trackers' histories, the largest difference between the baked models (reference `finalize` vs
`finalize` of the sharded model, saved by rank 0 from the full state dict and reloaded with plain
transformers), whether a forward after `load_state_dict` between two forwards (no optimizer step)
used the new weights' masks, and how a module reading its child's weight directly (`ReadsItsProj`) trains
with `fully_shard` on that module, the child in its unit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

import nm_hf  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import after_optimizer_step, iter_sparse_layers  # noqa: E402
from nm_hf.layers.reads import weight_readers  # noqa: E402
from nm_hf.methods import get_method  # noqa: E402
from nm_hf.tracker import SparsityTracker  # noqa: E402
from nm_hf.trainer import create_sparse_optimizer  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

STEPS, LR, LOG_EVERY = 6, 1e-2, 2
DEFAULT_SPECS = ("dense", "ste", "sr-ste:gradient", "sr-ste:decoupled", "fixed", "s-ste", "decaying-mask", "step")
METHOD_ARGS = {"decaying-mask": {"decay_steps": 4}, "step": {"min_switch_fraction": 0.3, "max_switch_fraction": 0.5}}


def config_for(spec: str) -> SparsityConfig:
    method, _, mode = spec.partition(":")
    kwargs = {"decay": 0.5, "decay_mode": mode} if mode else {}
    return SparsityConfig(method=method, method_args=METHOD_ARGS.get(method, {}), **kwargs)


def build(config: SparsityConfig) -> torch.nn.Module:
    model = tiny_model("llama")
    nm_hf.sparsify(model, config)
    return model


def optimizer_for(model: torch.nn.Module, config: SparsityConfig) -> torch.optim.Optimizer:
    if getattr(get_method(config.method), "optimizer_class", None) is not None:
        return create_sparse_optimizer(model, lr=LR, weight_decay=0.0, total_steps=STEPS)
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def train(model, config, batches, part: slice) -> list[dict]:
    optimizer = optimizer_for(model, config)
    tracker = SparsityTracker(model)
    for step, ids in enumerate(batches, 1):
        ids = ids[part]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(model, LR)
        tracker.step()
        if step % LOG_EVERY == 0:
            tracker.log_metrics(step)
    return tracker.history


def masks_of(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: layer.compute_mask(state[f"{name}.weight"]) for name, layer in iter_sparse_layers(model)}


def main() -> None:
    out = Path(sys.argv[1])
    specs = sys.argv[2:] or DEFAULT_SPECS
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (4, 16), generator=generator) for _ in range(STEPS)]
    per_rank = 4 // world
    results = {}
    for spec in specs:
        config = config_for(spec)
        reference = build(config)
        ref_history = train(reference, config, batches, slice(None))
        model = build(config)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        history = train(model, config, batches, slice(rank * per_rank, (rank + 1) * per_rank))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ref_state = reference.state_dict()
        weight_diff = max(float((full[key] - ref_state[key]).abs().max()) for key in ref_state)
        ref_masks, masks = masks_of(reference, ref_state), masks_of(reference, full)
        mask_diff = sum(int((masks[name] != ref_masks[name]).sum()) for name in ref_masks)

        # baked model: finalize both; rank 0 saves the sharded one from its full state dict
        nm_hf.finalize(reference)
        nm_hf.finalize(model)
        baked = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        saved = out / spec.replace(":", "-")
        if rank == 0:
            model.save_pretrained(saved, state_dict=baked)
        dist.barrier()
        reloaded = AutoModelForCausalLM.from_pretrained(saved).state_dict()
        ref_baked = reference.state_dict()
        baked_diff = max(float((reloaded[key] - ref_baked[key]).abs().max()) for key in ref_baked)
        record = json.loads((saved / "config.json").read_text())["nm_sparsity"]
        results[spec] = {"weight_diff": weight_diff, "mask_diff": mask_diff, "history": history,
                         "reference_history": ref_history, "baked_diff": baked_diff,
                         "baked_state": record["state"], "baked_sparsity": record["sparsity"],
                         "reference_sparsity": float(sum(int((v == 0).sum()) for k, v in ref_baked.items()
                                                         if k in {f"{n}.weight" for n in ref_masks}))}
    results["reload_between_forwards"] = reload_check(mesh, rank)
    results["reader_in_the_layers_unit"] = reader_check(mesh, rank, batches)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@torch.no_grad()
def reload_check(mesh, rank: int) -> float:
    """Forward, load other weights with load_state_dict (no optimizer step), forward: compare with one process."""
    config = SparsityConfig(method="ste")
    other = build(config)
    for layer in other.model.layers:  # the same model with other weights: masks must change
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(torch.linspace(-1.0, 1.0, module.weight.shape[1]))
    model = build(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.eval()
    other.eval()
    ids = torch.arange(3, 19).reshape(1, 16)
    model(input_ids=ids)
    sharded = model.state_dict()
    for key, value in other.state_dict().items():
        local = value.chunk(mesh.size())[rank] if sharded[key].placements[0].is_shard() else value
        sharded[key].to_local().copy_(local)
    model.load_state_dict(sharded)
    return float((model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max())


class ReadsItsProj(torch.nn.Module):
    """Reads `proj`'s weight in a matmul and as a lookup table (as LayoutLMv3's relative-position bias), and calls
    `proj`: `sparsify` hooks this module to expose the masked weight while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.abs() * 4).long() % 16
        return self.proj(x) + F.linear(x, self.proj.weight) + self.proj.weight.t()[index].mean(-2)


class ReaderModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.block = ReadsItsProj()
        self.head = torch.nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def reader_check(mesh, rank: int, batches: list[torch.Tensor]) -> dict:
    """`fully_shard` on the reading module (its `proj` in its unit) and the root vs one process: SR-STE 2:4, AdamW
    on each rank's half of the batches; the weights, the masks and the eval output after training."""
    config = SparsityConfig(method="sr-ste")

    def run(shard: bool) -> torch.nn.Module:
        model = nm_hf.sparsify(ReaderModel(), config)
        if shard:
            fully_shard(model.block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        part = slice(rank * 2, rank * 2 + 2) if shard else slice(None)
        for ids in batches[:4]:
            model(ids[part]).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            after_optimizer_step(model, LR)
        return model.eval()

    reference, model = run(shard=False), run(shard=True)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ref_state = reference.state_dict()
    ref_masks, masks = masks_of(reference, ref_state), masks_of(reference, full)
    with torch.no_grad():
        ids = batches[0]
        expected = reference(ids)
        dense_read = reference.head(ReadsItsProj.forward(reference.block, reference.embed(ids)))  # no hooks
        output_diff = float((model(ids) - expected).abs().max())
    return {"readers": [name for name, _, _ in weight_readers(reference)],
            "sparse": sorted(ref_masks),
            "weight_diff": max(float((full[key] - ref_state[key]).abs().max()) for key in ref_state),
            "mask_diff": sum(int((masks[name] != ref_masks[name]).sum()) for name in ref_masks),
            "output_diff": output_diff, "dense_read_gap": float((dense_read - expected).abs().max())}


if __name__ == "__main__":
    main()
