"""Training-step time and peak memory of an N:M sparse model relative to the same dense model.

Model: a small Marian transformer (`MarianMTModel` from a `MarianConfig`: d_model 256, 3 encoder + 3
decoder layers, 4 heads, FFN 1024, vocab 8000), random token batches (64 sentences x 32 tokens by
default), AdamW (`--optim`: torch's fused kernel by default, as the Trainer's default; `adamw_torch` for
the per-tensor loop), CPU. Every method starts from the same initial weights, sees the same batches and
the same dropout masks (the RNG is re-seeded per step index).

Time. The CPU may be shared, so the models are interleaved: each round runs `--block` steps of every
model back to back, in an order rotated each round (no model always runs first or last). A step is
forward + backward + `optimizer.step()` + `zero_grad()`. The reported ratio is the median over rounds
of (sparse time / dense time in the same round); the ratio of the per-model median step times is
printed next to it. Targets: SR-STE 2:4 time ratio <= 1.03, every other method <= 1.05.

Peak memory. For each model, one training step (after warm-up) runs under `torch.profiler` with
`profile_memory=True`. Every allocation and free the profiler saw is put in time order and summed;
the peak of that running sum is the step's transient peak. To it we add the bytes that were already
resident when the step began: parameters, optimizer state, gradients (none: `zero_grad` sets them to
None) and the sparse layers' cached masks, counting every storage once. During this measured step
`nm_mask` is made to work on the calling thread in one piece (its CPU thread-pool chunking is turned
off), because the profiler does not see allocations made on other threads; the single-piece path
holds larger temporaries, so this can only overstate the sparse model's peak. Target: ratio <= 1.05.

`--model moe` runs a small Mixtral-style mixture-of-experts model instead (`MixtralForCausalLM`:
hidden 256, 2 layers, 8 experts of FFN 512, top-2, vocab 8000; causal-LM batches), whose fused 3-D
expert weights are sparsified with the linears; `--experts_implementation` picks the experts forward
("eager", "batched_mm" or "grouped_mm"). Targets for it: time ratio <= 1.10, memory ratio <= 1.05.
`--model gpt2` runs the language-model recipe's model (`recipes/configs/lm_python_docs.yaml`: GPT-2, d 128,
4 layers, 4 heads, FFN 512, vocab 4000, 16 x 128-token causal-LM batches unless --batch_size/--seq_len/
--vocab say otherwise), whose sparsified layers are GPT-2 `Conv1D`s (weights stored [in, out]).

The plain (unpatched) model is the baseline, printed as "plain"; `--methods dense` adds the patched but
unmasked model, which isolates the cost of the layer swap itself.

Tracker. Then a few extra untimed steps per sparse model measure `SparsityTracker.step()` right after the
optimizer step (`mark_updated=False`): the flip counting as a share of that model's median step (target
<= 1%), and apart from it the masks only the tracker computes (method "dense"; for the others it just
moves the recompute out of the next forward). Then two copies of each model train side by side, one
with `step(defer=True)` (SparseTrainer's: the next forward counts the flips and makes mask and masked
weight in one pass) and one with `step(defer=False)`; the paired ratio of their step times is printed.

`--profile` adds where each model's step time goes beyond the plain model's, in ms and as shares of that
model's median step, at the `--threads` given (run it with 1 and 2): layer swap (the dense-patched step
minus plain; `--profile` adds "dense" to --methods), mask recompute (`layer.compute_mask`: `nm_mask` on
the ranking weight), masking in forward (`apply_mask(W, mask)`) and in backward (the masked weight again
for grad_x, plus the masked gradient where pruned weights are frozen), the SR-STE decay term
(`add_pruned_`), the autograd function's fixed per-call overhead (`nm_linear` forward + backward on
one-row tensors minus `F.linear`'s and those pieces), the rest (what the pieces leave unexplained) and
the tracker step. The pieces are the public functions timed in isolation on each model's own sparse
weights and masks, so the breakdown follows their implementation (if a kernel fuses two pieces, timing
them apart overstates them and the rest goes negative); which pieces a layer pays is read from its
method, and for the mask observed (a step that calls `choose_mask` computed one). Then the same
kernels timed where the layers call them, inside a few real steps: there the weights come from memory
as the step left it rather than from a cache warmed by repetition, which is most of the rest.

Run: `python benchmarks/train_step.py` (flags: --model, --experts_implementation, --steps, --warmup,
--batch_size, --seq_len, --block, --methods, --threads, --optim, --no_memory, --profile).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import busy_machine_note, machine_header
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MarianConfig,
    MarianMTModel,
    MixtralConfig,
    MixtralForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import nm_hf.masks  # noqa: E402
from nm_hf import native  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.cpu_memory import keep_freed_memory  # noqa: E402
from nm_hf.injection import iter_sparse_layers, sparsify  # noqa: E402
from nm_hf.layers.functional import nm_linear  # noqa: E402
from nm_hf.layers.linear import Sparse2DLayer  # noqa: E402
from nm_hf.masks import add_pruned_, apply_mask, apply_mask_, masked_and_add_pruned_, nm_mask  # noqa: E402
from nm_hf.methods import available_methods, get_method  # noqa: E402
from nm_hf.tracker import SparsityTracker  # noqa: E402

TIME_TARGET = 1.03  # SR-STE 2:4 (the performance issue)
#: every other method's step time / plain
OTHER_TIME_TARGET = 1.05
MEMORY_TARGET = 1.05
#: the mixture-of-experts case's targets (`--model moe`)
MOE_TIME_TARGET = 1.10
BASELINE = "plain"  # the unmodified model every ratio is taken against
#: AdamW implementations, named as the Trainer's --optim
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
#: the tracker's flip counting per step, as a share of the step (issue 23)
TRACKER_TARGET = 0.01
TRACKER_STEPS = 3  # untimed extra steps per sparse model that measure the tracker
KERNEL_STEPS = 3  # untimed extra steps per model in which --profile times the mask kernels where they run
PIECE_REPEATS = 7  # each isolated piece of --profile: median of this many passes


def build_model(vocab: int, seed: int) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=vocab, d_model=256, encoder_layers=3, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=2, forced_eos_token_id=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return MarianMTModel(config)


def build_moe_model(vocab: int, seed: int, implementation: str) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    model.set_experts_implementation(implementation)
    return model


#: --model gpt2: the LM recipe's model and batch (recipes/configs/lm_python_docs.yaml)
GPT2_DEFAULTS = {"batch_size": 16, "seq_len": 128, "vocab": 4000}


def build_gpt2_model(vocab: int, seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_inner=512, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def make_batches(count: int, batch_size: int, seq_len: int, vocab: int, seed: int, causal: bool = False
                 ) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        labels = ids if causal else torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


class Runner:
    """One model + optimizer; `step(i)` runs training step i (same batch and dropout RNG for every model)."""

    def __init__(self, name: str, model: nn.Module, batches: list[dict], seed: int, fused: bool = True) -> None:
        self.name, self.model, self.batches, self.seed = name, model, batches, seed
        self.model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=fused)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def step(self, index: int, record: bool = True) -> tuple[float, float]:
        """Runs one step; returns (wall seconds, CPU seconds of this process)."""
        torch.manual_seed(self.seed + index)
        batch = self.batches[index % len(self.batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if record:
            self.times.append(elapsed)
            self.cpu_times.append(cpu)
            self.losses.append(loss.item())
        return elapsed, cpu


def resident_bytes(runner: Runner) -> int:
    """Bytes held between steps: parameters, grads, optimizer state, cached masks (each storage once)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in runner.model.parameters():
        add(p)
        add(p.grad)
    for state in runner.optimizer.state.values():
        for value in state.values():
            add(value)
    for _, layer in iter_sparse_layers(runner.model):
        add(getattr(layer, "_nm_mask_cache", None))
        add(getattr(layer, "_nm_eval_weight", None))
    return sum(seen.values())


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, bytes) of every CPU allocation (+) and free (-) the profiler recorded."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    return sorted(events)


def peak_step_memory(runner: Runner, index: int) -> tuple[int, int]:
    """(resident bytes before the step, peak bytes during it) for one profiled training step."""
    resident = resident_bytes(runner)
    chunk = nm_hf.masks._CHUNK_ELEMENTS
    nm_hf.masks._CHUNK_ELEMENTS = 1 << 62  # one piece on this thread: the profiler sees it all
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step(index, record=False)
    finally:
        nm_hf.masks._CHUNK_ELEMENTS = chunk
    running = peak = 0
    for _, size in _allocation_events(prof):
        running += size
        peak = max(peak, running)
    return resident, resident + peak



def _median_seconds(fn, repeats: int, *args) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls, after one untimed call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def observe_step(runner: Runner, index: int) -> tuple[list[bool], list[int]]:
    """Runs two untimed steps (`index`, `index + 1`); per sparse layer, in the second: did it compute its
    mask (`choose_mask`: a ranking, or a method's proof that the previous mask still holds), and how
    many forward calls it had. (The first makes the observed step follow this model's own optimizer
    step, as in training: a `current_mask()` call since then would have done the recompute.)"""
    runner.step(index, record=False)
    index += 1
    layers = [layer for _, layer in iter_sparse_layers(runner.model)]
    calls, computed = [0] * len(layers), [False] * len(layers)

    def counting(i: int, choose):
        def choose_mask(*args, **kwargs):
            computed[i] = True
            return choose(*args, **kwargs)
        return choose_mask

    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    for i, layer in enumerate(layers):
        layer.choose_mask = counting(i, layer.choose_mask)  # an instance attribute, deleted below
    try:
        runner.step(index, record=False)
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            del layer.choose_mask
    return computed, calls


def tracker_cost(runner: Runner, first_index: int, steps: int) -> tuple[float, float]:
    """Seconds per step of `SparsityTracker.step` (median over `steps` untimed training steps): the flip
    counting, and the masks it computes that the training step itself does not (layers whose forward
    uses no mask, e.g. method "dense"; for the others it only moves the recompute out of the forward).

    Called as SparseTrainer does: right after the optimizer step, `step(mark_updated=False)`.
    """
    layers = [layer for _, layer in iter_sparse_layers(runner.model)]
    tracker = SparsityTracker(runner.model)
    counting, extra = [], []
    for k in range(steps):
        runner.step(first_index + k, record=False)
        masks = 0.0
        for layer in layers:
            start = time.perf_counter()
            layer.current_mask()  # the recompute the next forward (or the tracker) would do
            if not layer.is_masked:
                masks += time.perf_counter() - start
        start = time.perf_counter()
        tracker.step(mark_updated=False)
        counting.append(time.perf_counter() - start)
        extra.append(masks)
    return statistics.median(counting), statistics.median(extra)


def deferral_ratio(runner: Runner, first_index: int, steps: int) -> float:
    """Median paired ratio of a training step followed by `SparsityTracker.step(defer=True)` (what
    SparseTrainer does: the next forward counts the flips while it makes mask and masked weight in one
    pass) to the same with `defer=False` (the tracker computes the masks right away, the forward then
    masks the weights in a pass of its own), on two copies of the model, interleaved in rotating order."""
    pair = {}
    for defer in (False, True):
        twin = Runner(f"{runner.name} defer={defer}", copy.deepcopy(runner.model), runner.batches, runner.seed)
        pair[defer] = (twin, SparsityTracker(twin.model), [])
    for k in range(steps + 1):  # the first round warms up
        for defer in ((False, True) if k % 2 else (True, False)):
            twin, tracker, times = pair[defer]
            start = time.perf_counter()
            twin.step(first_index + k, record=False)
            tracker.step(mark_updated=False, defer=defer)
            times.append(time.perf_counter() - start)
    eager, deferred = pair[False][2][1:], pair[True][2][1:]
    return statistics.median(d / e for d, e in zip(deferred, eager, strict=True))


@torch.no_grad()
def piece_seconds(runner: Runner, recomputed: list[bool], calls: list[int], repeats: int) -> dict[str, float]:
    """Seconds per training step of each piece of the sparse step, timed in isolation on the model's own
    sparse weights and masks with the public functions (so the figures follow their implementation):

    - "mask": `layer.choose_mask(weight)` (`nm_mask` on the ranking weight, with the masked weight in the
      same pass where the 2-D layers' forward asks for it), for layers whose step computed a new mask
      (`observe_step`);
    - "forward": `apply_mask(W, mask)`, the masked weight of the forward, for layers computing `W * mask`
      (not for the forward call whose mask pass made it, nor where the weight is its own masked copy:
      `fixed` with +0.0 pruned weights);
    - "backward": `apply_mask(W, mask)` again for the input gradient of the 2-D layers (`nm_linear`
      does not save the masked weight; not where W is its own masked copy), plus `apply_mask(grad_W, mask)`
      where pruned weights are frozen;
    - "decay": `add_pruned_(grad_W, W, mask, decay)` (`grad_W += decay * (W - W * mask)`) where the
      method has a gradient-mode decay; in the 2-D layers `masked_and_add_pruned_`, which also makes the
      input gradient's masked weight (then not counted under "backward");
    - "function": the fixed per-call cost of the autograd function, `nm_linear` forward + backward on
      one-row tensors minus `F.linear`'s and minus the pieces above on the same tiny tensors.

    Each piece is counted once per forward call of the layer in the step (`calls`).
    """
    totals = dict.fromkeys(("mask", "forward", "backward", "decay", "function"), 0.0)
    layers = [layer for _, layer in iter_sparse_layers(runner.model)]
    for layer, new_mask, count in zip(layers, recomputed, calls, strict=True):
        weight, mask = layer.weight.detach(), layer.current_mask()
        method = layer.method
        fused_call = count and layer.is_masked and method.fused_forward and isinstance(layer, Sparse2DLayer)
        # the forward that re-chooses the mask gets the masked weight from the same pass where it can, or
        # finds the weight already masked (then no call of this step masks it)
        chosen = layer.choose_mask(weight, True)[1] if fused_call else None
        already_masked = chosen is weight
        fused_mask = bool(new_mask and chosen is not None and not already_masked)
        if new_mask:
            totals["mask"] += _median_seconds(layer.choose_mask, repeats, weight, fused_mask)
        if not count or not layer.is_masked or not method.fused_forward:
            continue
        grad = torch.zeros_like(weight)
        decay, freeze = method.gradient_decay(layer), method.freezes_pruned(layer)
        if not already_masked:
            totals["forward"] += (count - fused_mask) * _median_seconds(apply_mask, repeats, weight, mask)
        two_d = isinstance(layer, Sparse2DLayer)
        if two_d:
            totals["function"] += count * function_overhead(decay, freeze, repeats)
        if two_d and decay and not freeze:  # grad_x's masked weight comes from the decay term's pass
            totals["decay"] += count * _median_seconds(masked_and_add_pruned_, repeats, grad, weight, mask, decay)
            continue
        if two_d and not already_masked:
            totals["backward"] += count * _median_seconds(apply_mask, repeats, weight, mask)
        if freeze:
            totals["backward"] += count * _median_seconds(apply_mask_, repeats, grad, mask)
        elif decay:
            totals["decay"] += count * _median_seconds(add_pruned_, repeats, grad, weight, mask, decay)
    return totals


#: (module, name) of every mask kernel entry point the layers call, for `kernels_in_step`
KERNEL_CALL_SITES = (("nm_hf.layers.base", "nm_mask"), ("nm_hf.layers.base", "nm_mask_and_apply"),
                     ("nm_hf.layers.base", "nm_mask_transposable"),
                     ("nm_hf.layers.conv", "nm_mask_transposable"), ("nm_hf.layers.functional", "apply_mask"),
                     ("nm_hf.layers.functional", "add_pruned_"), ("nm_hf.layers.functional", "apply_mask_"),
                     ("nm_hf.layers.functional", "masked_and_add_pruned_"), ("nm_hf.layers.experts", "apply_mask"))


def kernels_in_step(runner: Runner, first_index: int, steps: int) -> float:
    """Seconds per step spent in the mask kernels (`nm_mask`, `apply_mask`, `add_pruned_`) timed where
    the layers call them, inside `steps` untimed training steps: unlike the isolated pieces, the weights
    then come from memory as training leaves it, not from a cache warmed by the repetition."""
    spent = [0.0]
    patched = []

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    for module_name, name in KERNEL_CALL_SITES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            patched.append((module, name, getattr(module, name)))
            setattr(module, name, timed(getattr(module, name)))
    try:
        for k in range(steps):
            runner.step(first_index + k, record=False)
    finally:
        for module, name, function in patched:
            setattr(module, name, function)
    return spent[0] / steps


_OVERHEAD_CACHE: dict[tuple[float, bool, int], float] = {}


def function_overhead(decay: float, freeze: bool, repeats: int, calls: int = 50) -> float:
    """Seconds per call that `nm_linear` forward + backward costs beyond `F.linear`'s and the masking and
    decay pieces, on one-row tensors (so only the fixed Python/autograd cost is left)."""
    key = (decay, freeze, torch.get_num_threads())
    if key in _OVERHEAD_CACHE:
        return _OVERHEAD_CACHE[key]
    torch.manual_seed(0)
    weight = torch.randn(8, 8, requires_grad=True)
    bias = torch.zeros(8, requires_grad=True)
    x = torch.randn(1, 8, requires_grad=True)
    mask = nm_mask(weight.detach(), 2, 4)

    def fused() -> None:
        for _ in range(calls):
            nm_linear(x, weight, bias, mask, decay=decay, freeze_pruned=freeze).sum().backward()

    def plain() -> None:
        for _ in range(calls):
            torch.nn.functional.linear(x, weight, bias).sum().backward()

    w, g = weight.detach(), torch.zeros(8, 8)

    def pieces() -> None:
        for _ in range(calls):
            apply_mask(w, mask)  # forward
            if decay and not freeze:  # backward: the decay term and the input gradient's masked weight
                masked_and_add_pruned_(g, w, mask, decay)
                continue
            apply_mask(w, mask)  # backward, for the input gradient
            if freeze:
                apply_mask_(g, mask)
            elif decay:
                add_pruned_(g, w, mask, decay)

    repeats = max(repeats, 15)  # one-row tensors: cheap, and the difference of three timings is noisy
    with torch.enable_grad():
        seconds = (_median_seconds(fused, repeats) - _median_seconds(plain, repeats)) / calls
    seconds -= _median_seconds(pieces, repeats) / calls
    _OVERHEAD_CACHE[key] = seconds
    return seconds



def report_tracker(runners: dict[str, Runner], methods: list[str], index: int, steps: int
                   ) -> dict[str, tuple[float, float]]:
    """Prints the tracker's cost per step for every sparse model; returns `tracker_cost`'s seconds per model."""
    print(f"\ntracker: SparsityTracker.step(mark_updated=False) right after the optimizer step, median over {steps} "
          f"extra untimed steps;\nshare = of the model's median step above. Last column: a step plus "
          f"step(defer=True) (SparseTrainer's: the\nnext forward counts the flips) / a step plus step(defer=False), "
          f"paired median over {2 * steps} rounds of two copies")
    print(f"{'model':<8} {'flip counting ms':>16} {'share':>7} {'masks only it computes ms':>26} {'share':>7} "
          f"{'deferred/eager':>15}")
    costs = {}
    for method in methods:
        runner = runners[method]
        counting, extra = costs[method] = tracker_cost(runner, index, steps)
        deferral = deferral_ratio(runner, index + steps, 2 * steps)
        step_seconds = statistics.median(runner.times)
        print(f"{method:<8} {counting * 1e3:>16.2f} {counting / step_seconds:>7.2%} {extra * 1e3:>26.2f} "
              f"{extra / step_seconds:>7.2%} {deferral:>15.3f}")
    return costs


PROFILE_ROWS = (
    ("layer swap (dense-patched - plain)", "swap"),
    ("mask recompute (nm_mask)", "mask"),
    ("masking in forward", "forward"),
    ("masking in backward", "backward"),
    ("SR-STE decay term", "decay"),
    ("autograd Function overhead", "function"),
    ("rest (step - plain - the above)", "rest"),
)


def report_profile(runners: dict[str, Runner], methods: list[str], index: int, ratios: dict[str, float],
                   tracker: dict[str, tuple[float, float]]) -> None:
    """Prints where each method's step time goes beyond the plain model's, as shares of its step.

    `ratios`: the paired step-time ratios to plain (robust to load changes, unlike differences of
    medians): a model with ratio r spends 1 - 1/r of its step beyond plain, and the layer swap costs
    (r_dense - 1) plain steps. `tracker`: `report_tracker`'s result.
    """
    rows: dict[str, dict[str, float]] = {}
    for method in methods:
        runner = runners[method]
        recomputed, calls = observe_step(runner, index)
        pieces = piece_seconds(runner, recomputed, calls, PIECE_REPEATS)
        step_seconds = statistics.median(runner.times)
        plain = step_seconds / ratios[method]  # the plain step in the same rounds
        pieces["swap"] = plain * (ratios["dense"] - 1)
        kernels_isolated = sum(pieces[key] for key in ("mask", "forward", "backward", "decay"))
        pieces["rest"] = step_seconds - plain - sum(pieces.values())
        pieces["kernels isolated"] = kernels_isolated
        pieces["kernels in step"] = kernels_in_step(runner, index + 2, KERNEL_STEPS)
        pieces["tracker"], pieces["tracker masks"] = tracker[method]
        pieces["step"], pieces["plain"], pieces["overhead"] = step_seconds, plain, step_seconds - plain
        rows[method] = pieces
    width = max(16, *(len(m) + 2 for m in methods))
    print(f"\nprofile ({torch.get_num_threads()} thread(s)): ms per step (share of that model's median step); the "
          f"pieces are timed in isolation\non each model's own sparse weights and masks (median of {PIECE_REPEATS}), "
          "the rest is what they do not explain;\nplain step = the model's median step / its paired ratio")
    print(f"{'':<36}" + "".join(f"{m:>{width}}" for m in methods))

    def line(label: str, key: str, share: bool = True) -> None:
        cells = []
        for method in methods:
            value, step_seconds = rows[method][key], rows[method]["step"]
            cells.append(f"{value * 1e3:.1f} ({value / step_seconds:.1%})" if share else f"{value * 1e3:.1f}")
        print(f"{label:<36}" + "".join(f"{c:>{width}}" for c in cells))

    line("step", "step", share=False)
    line("plain step", "plain", share=False)
    line("step - plain", "overhead")
    for label, key in PROFILE_ROWS:
        line("  " + label, key)
    line("mask kernels above, timed in isolation", "kernels isolated")
    line(f"the same, timed inside {KERNEL_STEPS} real steps", "kernels in step")
    line("tracker step: flip counting", "tracker")
    line("tracker step: masks only it computes", "tracker masks")


def iqr(values: list[float]) -> str:
    if len(values) < 4:
        return f"{min(values):.3f}-{max(values):.3f}"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default 3)")
    parser.add_argument("--batch_size", type=int, default=None, help="sentences per batch (default 64; gpt2: 16)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sentence (default 32; gpt2: 128)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 8000; gpt2: 4000)")
    parser.add_argument("--block", type=int, default=1, help="consecutive steps of one model per turn (default 1)")
    parser.add_argument("--methods", default="sr-ste,ste,fixed",
                        help="comma-separated methods compared with the plain model (default sr-ste,ste,fixed; "
                        "'dense' = layers patched but not masked)")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no_memory", action="store_true", help="skip the profiled peak-memory step")
    parser.add_argument("--profile", action="store_true",
                        help="also print the breakdown of each method's step (mask recompute, masking in forward and "
                        "backward, decay, autograd function, tracker) as shares of the step; adds 'dense'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep_freed_memory", action="store_true",
                        help="nm_hf.keep_freed_memory() first, as the recipes do on CPU (glibc)")
    parser.add_argument("--optim", choices=OPTIMIZERS, default="adamw_torch_fused",
                        help="AdamW implementation, named as Trainer's --optim: adamw_torch_fused (default, "
                             "as the Trainer's default on torch >= 2.8) or adamw_torch (the per-tensor loop)")
    parser.add_argument("--model", choices=("marian", "moe", "gpt2"), default="marian",
                        help="marian (default), moe (a small Mixtral-style mixture-of-experts model) or gpt2 "
                             "(the language-model recipe's model)")
    parser.add_argument("--native_parallel_min", type=int, default=None,
                        help="elements a native kernel covers before it splits over OpenMP threads "
                             "(default: the library's; a huge value keeps every call on one thread)")
    parser.add_argument("--experts_implementation", choices=("eager", "batched_mm", "grouped_mm"), default="grouped_mm",
                        help="experts forward of --model moe (default grouped_mm)")
    args = parser.parse_args(argv)
    defaults = GPT2_DEFAULTS if args.model == "gpt2" else {"batch_size": 64, "seq_len": 32, "vocab": 8000}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in ("steps", "batch_size", "seq_len", "block"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.vocab < 8:
        parser.error(f"--vocab must be >= 8, got {args.vocab}")
    max_positions = 128 if args.model == "gpt2" else 512
    if args.seq_len > max_positions:
        parser.error(f"--seq_len must be <= {max_positions} (the model's positions), got {args.seq_len}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown or not methods:
        parser.error(f"--methods takes a comma-separated subset of {', '.join(available_methods())}; got {args.methods!r}")
    if args.profile and "dense" not in methods:  # its step minus plain's is the layer swap's cost
        methods.append("dense")
    try:
        pattern = SparsityConfig.from_pattern(args.pattern)
    except ValueError as err:
        parser.error(f"--pattern: {err}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    if args.native_parallel_min is not None:
        if args.native_parallel_min < 1:
            parser.error(f"--native_parallel_min must be >= 1, got {args.native_parallel_min}")
        native.set_parallel_min(args.native_parallel_min)

    print(machine_header())
    print(f"nm_hf hot path: {native.status()}")
    if args.keep_freed_memory:
        print(f"keep_freed_memory: {'applied' if keep_freed_memory() else 'not glibc, nothing changed'}")
    note = busy_machine_note()
    if note:
        print(note)
    moe = args.model == "moe"
    time_target = MOE_TIME_TARGET if moe else TIME_TARGET
    if moe:
        base = build_moe_model(args.vocab, args.seed, args.experts_implementation)
    elif args.model == "gpt2":
        base = build_gpt2_model(args.vocab, args.seed)
    else:
        base = build_model(args.vocab, args.seed)
    batches = make_batches(4, args.batch_size, args.seq_len, args.vocab, args.seed + 1, causal=args.model != "marian")
    fused = args.optim == "adamw_torch_fused"
    runners = {BASELINE: Runner(BASELINE, copy.deepcopy(base), batches, args.seed, fused)}
    for method in methods:
        model = copy.deepcopy(base)
        sparsify(model, SparsityConfig(n=pattern.n, m=pattern.m, method=method))
        runners[method] = Runner(method, model, batches, args.seed, fused)
    n_params = sum(p.numel() for p in base.parameters())
    sparse_layers = list(iter_sparse_layers(runners[methods[0]].model))
    n_sparse = sum(layer.weight.numel() for _, layer in sparse_layers)
    what = {"moe": f"Mixtral-style MoE hidden 256, 2 layers, 8 experts x FFN 512 (top-2, {args.experts_implementation})",
            "gpt2": "GPT-2 d 128, 4 layers, FFN 512 (the LM recipe's model)",
            "marian": "Marian d_model 256, 3+3 layers, FFN 1024"}[args.model]
    print(f"{what}, vocab {args.vocab}: {n_params / 1e6:.2f}M parameters, "
          f"{len(sparse_layers)} layers / {n_sparse / 1e6:.2f}M weights sparsified {args.pattern}")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.optim}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per model, interleaved in blocks of {args.block}")

    names = list(runners)
    for i in range(args.warmup):
        for name in names:
            runners[name].step(i, record=False)

    rounds = -(-args.steps // args.block)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    per_round_cpu: dict[str, list[float]] = {name: [] for name in names}
    step = args.warmup
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        block = min(args.block, args.steps - r * args.block)
        for name in order:
            runner = runners[name]
            timings = [runner.step(step + k) for k in range(block)]
            per_round[name].append(sum(t[0] for t in timings) / block)
            per_round_cpu[name].append(sum(t[1] for t in timings) / block)
        step += block
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    # the masks the sparse models used must be those of their current weights (a stale cache would
    # make the sparse step look cheaper than it is)
    for method in methods:
        if not get_method(method).masks_forward:
            continue
        for name, layer in iter_sparse_layers(runners[method].model):
            fresh = nm_mask(layer.weight.detach(), layer.nm_n, layer.nm_m, dim=layer.group_dim)
            if not torch.equal(layer.current_mask(), fresh):
                raise RuntimeError(f"{method}: {name} used a stale mask; the timing is not valid")

    dense_median = statistics.median(runners[BASELINE].times)
    print("\nwall time: ratio (paired) = median over rounds of sparse/dense step time in the same round;"
          "\ncpu ratio = the same with this process's CPU time (less sensitive to other processes)")
    print(f"{'model':<8} {'median ms/step':>14} {'ratio (paired)':>15} {'paired IQR':>12} "
          f"{'ratio of medians':>17} {'cpu ratio':>10} {'final loss':>10}")
    print(f"{BASELINE:<8} {dense_median * 1e3:>14.1f} {'1':>15} {'':>12} {'1':>17} {'1':>10} "
          f"{runners[BASELINE].losses[-1]:>10.4f}")
    time_ratios: dict[str, float] = {}
    for method in methods:
        paired = [s / d for s, d in zip(per_round[method], per_round[BASELINE], strict=True)]
        time_ratios[method] = statistics.median(paired)
        med = statistics.median(runners[method].times)
        cpu_ratio = statistics.median(
            s / d for s, d in zip(per_round_cpu[method], per_round_cpu[BASELINE], strict=True))
        print(f"{method:<8} {med * 1e3:>14.1f} {time_ratios[method]:>15.3f} {iqr(paired):>12} "
              f"{med / dense_median:>17.3f} {cpu_ratio:>10.3f} {runners[method].losses[-1]:>10.4f}")

    memory_ratios: dict[str, float] = {}
    if not args.no_memory:
        print(f"\n{'model':<8} {'resident MiB':>12} {'step peak MiB':>14} {'ratio':>7}")
        index = step
        peaks = {}
        for name in names:
            resident, peak = peak_step_memory(runners[name], index)
            peaks[name] = peak
            ratio = peak / peaks[BASELINE]
            if name != BASELINE:
                memory_ratios[name] = ratio
            print(f"{name:<8} {resident / 2**20:>12.1f} {peak / 2**20:>14.1f} {ratio:>7.3f}")

    index = step + 1  # after the memory step
    tracker = report_tracker(runners, methods, index, TRACKER_STEPS)
    index += 3 * TRACKER_STEPS + 1  # tracker_cost, then deferral_ratio (a warm-up round + 2 x steps)
    if args.profile:
        report_profile(runners, methods, index, time_ratios, tracker)

    print()
    for method, ratio in time_ratios.items():
        target = time_target if method == "sr-ste" or moe else OTHER_TIME_TARGET
        print(f"{method} {args.pattern} step time / dense = {ratio:.3f} (target <= {target}): "
              f"{'OK' if ratio <= target else 'ABOVE TARGET'}")
    if "sr-ste" in memory_ratios:
        ok = memory_ratios["sr-ste"] <= MEMORY_TARGET
        print(f"SR-STE {args.pattern} peak memory / dense = {memory_ratios['sr-ste']:.3f} "
              f"(target <= {MEMORY_TARGET}): {'OK' if ok else 'ABOVE TARGET'}")
    tracker_shares = {method: tracker[method][0] / statistics.median(runners[method].times) for method in methods}
    worst = max(tracker_shares, key=tracker_shares.get)
    ok = tracker_shares[worst] <= TRACKER_TARGET
    print(f"Tracker flip counting / step = {tracker_shares[worst]:.2%} at most ({worst}; target <= "
          f"{TRACKER_TARGET:.0%}): {'OK' if ok else 'ABOVE TARGET'}")
    print(machine_header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
