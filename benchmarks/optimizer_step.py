"""Optimizer-step time of `StepAdamW` (method "step") relative to torch's fused AdamW on the same parameters.

Model: the language-model recipe's GPT-2 (`recipes/configs/lm_python_docs.yaml`: d 128, 4 layers, FFN 512,
vocab 4000), sparsified with `method="step"`; its optimizer comes from `nm_hf.create_sparse_optimizer`, the
baseline is `torch.optim.AdamW(fused=True)` (the Trainer's default `adamw_torch_fused`, which every other
method trains with) over copies of the same parameters. Gradients are fixed random tensors: only
`optimizer.step()` is timed, interleaved (StepAdamW, then AdamW, each round), median over rounds, first
before AutoSwitch (the dense phase: AdamW plus the statistic of the masked weights' second moment) and
then after it (the masked weights' frozen second moment).

Run: `python benchmarks/optimizer_step.py [--threads 1] [--rounds 60]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import machine_header
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import nm_hf  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402


def build(seed: int, rounds: int) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(StepAdamW of the sparsified LM model, fused AdamW over copies of its parameters), gradients set."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=4000, n_embd=128, n_layer=4, n_head=4, n_inner=512, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    nm_hf.sparsify(model, SparsityConfig(method="step", method_args={"switch_threshold": 0.0}))
    # AutoSwitch (threshold 0: never early) switches at T_max = 0.5 * total_steps = 2 * rounds + 2, after the
    # dense phase's warm-up and timed rounds
    step_adamw = nm_hf.create_sparse_optimizer(model, lr=1e-3, weight_decay=0.1, total_steps=4 * rounds + 4)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    adamw = torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.1, fused=True)
    generator = torch.Generator().manual_seed(seed + 1)
    for p, q in zip(model.parameters(), copies, strict=True):
        p.grad = torch.randn(p.shape, generator=generator)
        q.grad = p.grad.clone()
    return step_adamw, adamw


def timed(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def measure(step_adamw: torch.optim.Optimizer, adamw: torch.optim.Optimizer, rounds: int) -> tuple[float, float, float]:
    """(median ms of StepAdamW, median ms of AdamW, median of the per-round ratio), interleaved."""
    ours, theirs, ratios = [], [], []
    for _ in range(rounds):
        a, b = timed(step_adamw), timed(adamw)
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3, statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds per phase (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(machine_header())
    step_adamw, adamw = build(args.seed, args.rounds)
    print("phase           StepAdamW ms  fused AdamW ms  ratio (paired median)")
    for phase in ("before switch", "after switch"):
        for _ in range(2):  # warm-up
            step_adamw.step()
            adamw.step()
        if phase == "after switch":
            while not step_adamw.switched:
                step_adamw.step()
        ours, theirs, ratio = measure(step_adamw, adamw, args.rounds)
        print(f"{phase:<15} {ours:>12.2f} {theirs:>15.2f} {ratio:>10.3f}")
        if phase == "before switch" and step_adamw.switched:
            raise SystemExit("internal error: AutoSwitch switched during the dense phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
