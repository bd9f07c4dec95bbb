"""Memory per rank of SR-STE 2:4 training under FSDP2 vs DDP (2 gloo ranks on CPU).

Model: a small Llama (`LlamaForCausalLM` from a config: hidden 256, 4 layers, 4 heads, FFN 1024,
vocab 8000, 8.29M parameters), sparsified with SR-STE 2:4, AdamW, random causal-LM batches (4
sequences of 64 tokens per rank), 3 training steps. DDP: the model wrapped in
`DistributedDataParallel`. FSDP2: each decoder layer and the model wrapped with `fully_shard`.

Per rank (rank 0 reported; the ranks hold equal shards here):
- model state: bytes of parameters, gradients and optimizer state this rank holds after a step,
  each storage counted once (FSDP2: the local shards; DDP: whole tensors);
- peak RSS growth: `ru_maxrss` after training minus the resident size before the model was built
  (process level: includes activations, all-gather buffers, gloo buffers and allocator slack, so it is
  noisier than the first number).
Printed: both numbers per mode and the FSDP2 / DDP ratios.

Run: `python benchmarks/fsdp_memory.py` (it launches `torchrun --standalone --nproc_per_node 2` once per
mode); `--mode ddp|fsdp` is the per-rank worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

STEPS, BATCH, SEQ, VOCAB = 3, 4, 64, 8000


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(mode: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import nm_hf
    from nm_hf.config import SparsityConfig
    from nm_hf.injection import after_optimizer_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    nm_hf.sparsify(model, SparsityConfig(method="sr-ste"))
    params = sum(p.numel() for p in model.parameters())
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after_optimizer_step(model, 1e-3)
        state = _storage_bytes([p for p in model.parameters()] + [p.grad for p in model.parameters()]
                               + [t for s in optimizer.state.values() for t in s.values()
                                  if isinstance(t, torch.Tensor) and t.ndim])
        optimizer.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    if rank == 0:
        print(json.dumps({"mode": mode, "params": params, "model_state_bytes": state, "peak_rss_growth_kib": peak}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp"), help="run as one torchrun rank (internal)")
    args = parser.parse_args()
    if args.mode:
        worker(args.mode)
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for mode in ("ddp", "fsdp"):
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--mode", mode],
                              capture_output=True, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1])
    ddp, fsdp = results["ddp"], results["fsdp"]
    print(f"model: small Llama, {ddp['params'] / 1e6:.2f}M parameters, SR-STE 2:4, AdamW, 2 gloo ranks (rank 0)")
    print(f"{'':8}{'model state (MiB)':>20}{'peak RSS growth (MiB)':>24}")
    for name, run in (("DDP", ddp), ("FSDP2", fsdp)):
        print(f"{name:8}{run['model_state_bytes'] / 2**20:>20.1f}{run['peak_rss_growth_kib'] / 1024:>24.1f}")
    print(f"ratio FSDP2 / DDP: model state {fsdp['model_state_bytes'] / ddp['model_state_bytes']:.2f}, "
          f"peak RSS growth {fsdp['peak_rss_growth_kib'] / ddp['peak_rss_growth_kib']:.2f}")


if __name__ == "__main__":
    main()
