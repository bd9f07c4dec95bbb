"""How fast is `nm_mask` compared with one elementwise pass over the same weight?

SR-STE recomputes every layer's mask after each optimizer update, so the mask must cost about as
much as touching the weight a couple of times, not a sort. The baseline is `w * w` (read the weight,
write a tensor of the same size) on the same tensor, measured in the same repetitions, so machine
noise hits both alike: every repetition times the baseline and each candidate back to back, and the
figure reported is the median over repetitions of candidate time / baseline time.

Each case runs on the path the library uses (the native kernels of `nm_hf.native` where they could
be built; the first line says which) and, marked "(torch)", on the torch expressions they replace.
`apply_mask` (`W * mask`, in the forward and backward of every masked layer) and `add_pruned_` (SR-STE's
decay term, in place on a gradient) are timed too.

`nm_mask_transposable` (SparsityConfig(transposable=True)) scores every 4x4 block against the 90
valid patterns; its target is a ratio <= 6.0.

Run: `python benchmarks/mask_speed.py` (4096x4096 fp32, CPU; targets: nm_mask 2:4 <= 1.0 (one pass
over the weights is the memory-bound limit), 4:8 <= 2.0, transposable 2:4 <= 6.0). Flags: --size,
--reps, --warmup, --threads. Exit status 1 with --check if a ratio misses its target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import busy_machine_note, machine_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nm_hf import native  # noqa: E402
from nm_hf.masks import add_pruned_, apply_mask, count_changed, nm_mask, nm_mask_transposable  # noqa: E402

#: headline case -> target ratio to one elementwise pass
TARGETS = {"nm_mask 2:4 (dim=-1)": 1.0, "nm_mask 4:8": 2.0, "transposable 2:4 (dim=-1)": 6.0}


def on_torch_path(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with the native kernels switched off (the torch expressions)."""
    def run() -> object:
        with native.disabled():
            return fn()
    return run


def topk_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The textbook implementation (groups along the last dim): topk of |w| per group, then scatter."""
    groups = weight.abs().reshape(-1, m)
    index = groups.topk(n, dim=1).indices
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, index, True).reshape(weight.shape)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (default 21)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a headline ratio misses its target: " + ", ".join(f"{k} <= {v}" for k, v in TARGETS.items()))
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    grad = torch.randn(args.size, args.size)
    mask = nm_mask(w, 2, 4)
    moved = nm_mask(w + 0.05 * torch.randn(args.size, args.size), 2, 4)  # a next step's mask: some flips
    library_cases: dict[str, Callable[[], object]] = {
        "nm_mask 2:4 (dim=-1)": lambda: nm_mask(w, 2, 4),
        "nm_mask 4:8": lambda: nm_mask(w, 4, 8),
        "nm_mask 1:4": lambda: nm_mask(w, 1, 4),
        "nm_mask 2:4 dim=0": lambda: nm_mask(w, 2, 4, dim=0),
        "apply_mask (W * mask)": lambda: apply_mask(w, mask),
        "add_pruned_ (decay term)": lambda: add_pruned_(grad, w, mask, 1e-4),
        "count_changed (tracker flips)": lambda: count_changed(moved, mask),
    }
    cases: dict[str, Callable[[], object]] = {}
    for name, fn in library_cases.items():
        cases[name] = fn
        cases[f"{name} (torch)"] = on_torch_path(fn)
    cases["topk+scatter 2:4 (reference)"] = lambda: topk_mask(w, 2, 4)
    cases["transposable 2:4 (dim=-1)"] = lambda: nm_mask_transposable(w, 2, 4)
    cases["transposable 2:4 dim=0"] = lambda: nm_mask_transposable(w, 2, 4, dim=0)
    assert torch.equal(topk_mask(w, 2, 4), nm_mask(w, 2, 4))  # no ties in randn: same answer

    def baseline() -> object:
        return w * w

    print(machine_header())
    print(f"nm_hf hot path: {native.status()}")
    note = busy_machine_note()
    if note:
        print(note)
    print(f"weight {args.size}x{args.size} fp32, {args.warmup} warm-up + {args.reps} timed repetitions")
    for _ in range(args.warmup):
        baseline()
        for fn in cases.values():
            fn()
    base_times: list[float] = []
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            b = timed(baseline)  # a fresh baseline right before each candidate
            t = timed(fn)
            base_times.append(b)
            times[name].append(t)
            ratios[name].append(t / b)

    print(f"baseline w * w: median {statistics.median(base_times) * 1e3:.2f} ms")
    print(f"{'case':<36} {'median ms':>10} {'ratio':>7}  ratio IQR")
    for name in cases:
        r = ratios[name]
        q = statistics.quantiles(r, n=4) if len(r) >= 4 else [min(r), 0, max(r)]
        print(f"{name:<36} {statistics.median(times[name]) * 1e3:>10.2f} {statistics.median(r):>7.2f}  "
              f"{q[0]:.2f}-{q[2]:.2f}")
    missed = False
    for name, target in TARGETS.items():
        headline = statistics.median(ratios[name])
        verdict = "OK" if headline <= target else "ABOVE TARGET"
        missed |= headline > target
        print(f"{name} / (w * w) = {headline:.2f} (target <= {target}): {verdict}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
