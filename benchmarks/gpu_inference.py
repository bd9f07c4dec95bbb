"""Dense vs 2:4 semi-structured inference on an NVIDIA GPU (sparse tensor cores, compute capability 8.0+).

Two measurements, both with the same 2:4-pruned weights in both arms (so only the kernel differs):

1. Matmuls: `F.linear(x, W)` with W dense vs W = `to_sparse_semi_structured(W)`, for LLM-sized weight
   shapes and several token counts (rows of x). Median of CUDA-event timings over `--reps` runs after
   `--warmup`; speedup = dense time / sparse time. The max relative difference of the outputs is printed.
2. End-to-end generation: a Llama-architecture model built from a config (random weights: nothing is
   downloaded), sparsified 2:4, finalized, then greedy `generate` of exactly `--new-tokens` tokens for
   each `--batch` size, dense model vs the same model after `nm_hf.to_semi_structured`. Reports
   tokens/s for both and how many generated tokens agree (fp16 rounding differs between the kernels,
   so a random-weight model can diverge after a while; the first-step logits are compared too).

Run: `python benchmarks/gpu_inference.py` (fp16, cuSPARSELt; `--backend cutlass`, `--dtype bf16`).
`--json out.json` writes every number. `--plan` only builds the model and checks that every layer can
be converted (runs on CPU too: no timing). Without a suitable GPU it prints why and exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import finalize, sparsify  # noqa: E402
from nm_hf.masks import nm_mask  # noqa: E402
from nm_hf.semi_structured import check_semi_structured, describe, to_semi_structured  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_ready() -> str | None:
    """None if 2:4 kernels can run here, else the reason."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"GPU compute capability {major}.{minor}; 2:4 sparse tensor cores need 8.0+"
    return None


def cuda_time(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of `fn()` over `reps` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time(fn, reps: int, warmup: int) -> float | None:
    """Median ms of replaying `fn` captured in a CUDA graph (GPU time without the host's per-call work);
    None if it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - the reason is printed, the column left empty
        print(f"  (CUDA graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return None
    return cuda_time(graph.replay, reps, warmup)


def probe_columns(x: torch.Tensor, weight: torch.Tensor, sparse, reps: int, warmup: int) -> dict:
    """Where the sparse matmul's time goes: the same product as a CUDA graph replay, the raw cuSPARSELt
    op without the tensor subclass's Python dispatch, and that op with the algorithm cuSPARSELt's search
    picks (`torch._cslt_sparse_mm_search`), when this torch has them."""
    out = {"dense_graph_ms": graph_time(lambda: F.linear(x, weight), reps, warmup),
           "sparse_graph_ms": graph_time(lambda: F.linear(x, sparse), reps, warmup)}
    cusparselt = getattr(torch.sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    if cusparselt is None or not isinstance(sparse, cusparselt) or not hasattr(torch, "_cslt_sparse_mm"):
        return out  # the raw op reads cuSPARSELt's packed format only
    packed = sparse.packed
    dense_t = x.t().contiguous()
    try:  # the raw op takes no padding: token counts below its tile fail, and the columns stay empty
        out["cslt_raw_ms"] = cuda_time(lambda: torch._cslt_sparse_mm(packed, dense_t), reps, warmup)
        if hasattr(torch, "_cslt_sparse_mm_search"):
            alg = int(torch._cslt_sparse_mm_search(packed, dense_t))
            out["cslt_best_alg"] = alg
            out["cslt_best_alg_ms"] = cuda_time(lambda: torch._cslt_sparse_mm(packed, dense_t, alg_id=alg),
                                                reps, warmup)
            out["cslt_best_alg_graph_ms"] = graph_time(
                lambda: torch._cslt_sparse_mm(packed, dense_t, alg_id=alg), reps, warmup)
    except RuntimeError as err:
        print(f"  (raw cuSPARSELt op failed: {str(err).splitlines()[0][:120]})")
    return out


def bench_matmuls(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    rows = []
    print(f"\n{'weight [out x in]':>18} {'tokens':>7} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>8} {'max rel diff':>13}")
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=g)
        weight = weight * nm_mask(weight, 2, 4, dim=1)
        sparse = to_sparse_semi_structured(weight)
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, generator=g)
            with torch.no_grad():
                dense_ms = cuda_time(lambda x=x, w=weight: F.linear(x, w), args.reps, args.warmup)
                sparse_ms = cuda_time(lambda x=x, w=sparse: F.linear(x, w), args.reps, args.warmup)
                ref, got = F.linear(x, weight).float(), F.linear(x, sparse).float()
            diff = float((ref - got).abs().max() / ref.abs().max().clamp(min=1e-6))
            row = {"out": out_f, "in": in_f, "tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                   "speedup": dense_ms / sparse_ms, "max_rel_diff": diff}
            rows.append(row)
            print(f"{shape:>18} {tokens:>7} {dense_ms:>9.4f} {sparse_ms:>9.4f} {row['speedup']:>7.2f}x "
                  f"{diff:>13.2e}")
            if args.probe:
                with torch.no_grad():
                    row.update(probe_columns(x, weight, sparse, args.reps, args.warmup))
                print("    probe: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in row.items() if k.startswith(("sparse_graph", "cslt", "dense_graph"))))
    return rows


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    sparsify(model, SparsityConfig(n=2, m=4))
    return finalize(model)


def bench_generation(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    dense = build_model(args, dtype, "cuda")
    sparse = to_semi_structured(copy.deepcopy(dense), backend=args.backend)
    print(f"\nmodel: Llama hidden {args.hidden}, FFN {args.intermediate}, {args.layers} layers, "
          f"vocab {args.vocab}; {describe(sparse)}")
    rows = []
    print(f"{'batch':>6} {'dense tok/s':>12} {'2:4 tok/s':>10} {'speedup':>8} {'tokens agree':>13} "
          f"{'logits rel diff':>16}")
    for batch in args.batch:
        g = torch.Generator(device="cuda").manual_seed(batch)
        prompt = torch.randint(3, args.vocab, (batch, args.prompt), device="cuda", generator=g)
        kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
        # a static cache makes transformers compile the decoding step into CUDA graphs (the warm-up, of the
        # same length, compiles); the dynamic cache runs eagerly, paying each matmul's host-side work
        warmup = {"cache_implementation": "static"} if args.cache == "static" else {"max_new_tokens": 4,
                                                                                      "min_new_tokens": 4}
        if args.cache == "static":
            kwargs["cache_implementation"] = "static"
        outputs, seconds = {}, {}
        with torch.no_grad():
            for label, model in (("dense", dense), ("sparse", sparse)):
                started = time.perf_counter()
                model.generate(prompt, **{**kwargs, **warmup})  # warm-up
                torch.cuda.synchronize()
                print(f"  {label} warm-up {time.perf_counter() - started:.1f} s")
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.gen_reps):
                    outputs[label] = model.generate(prompt, **kwargs)
                torch.cuda.synchronize()
                seconds[label] = (time.perf_counter() - start) / args.gen_reps
            ref, got = dense(prompt).logits.float(), sparse(prompt).logits.float()
        logits_diff = float((ref - got).abs().max() / ref.abs().max().clamp(min=1e-6))
        new = slice(args.prompt, None)
        agree = float((outputs["dense"][:, new] == outputs["sparse"][:, new]).float().mean())
        tokens = batch * args.new_tokens
        row = {"batch": batch, "cache": args.cache, "dense_tokens_per_s": tokens / seconds["dense"],
               "sparse_tokens_per_s": tokens / seconds["sparse"], "speedup": seconds["dense"] / seconds["sparse"],
               "tokens_agree": agree, "first_step_logits_rel_diff": logits_diff}
        rows.append(row)
        print(f"{batch:>6} {row['dense_tokens_per_s']:>12.1f} {row['sparse_tokens_per_s']:>10.1f} "
              f"{row['speedup']:>7.2f}x {agree:>13.1%} {logits_diff:>16.2e}")
    return rows


def plan(args: argparse.Namespace, dtype: torch.dtype) -> int:
    model = build_model(args, dtype, "cpu")
    problems = check_semi_structured(model, assume_cuda=True, backend=args.backend)
    layers = len(model.config.nm_sparsity["targeted_modules"])
    if problems:
        print(f"{len(problems)} of {layers} layers cannot be converted:\n  - " + "\n  - ".join(problems))
        return 1
    print(f"all {layers} targeted layers can become 2:4 semi-structured ({args.backend}, {args.dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--backend", choices=["cusparselt", "cutlass"], default="cusparselt")
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008", "16384x4096"],
                        help="weight shapes OUTxIN for the matmul benchmark")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 1024, 4096],
                        help="rows of the input (batch x sequence) for the matmul benchmark")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gen-reps", type=int, default=3)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                        help="generation cache; 'static' makes transformers compile decoding into CUDA graphs")
    parser.add_argument("--probe", action="store_true",
                        help="also time each sparse matmul as a CUDA graph, as the raw cuSPARSELt op, and with "
                             "the algorithm cuSPARSELt's search picks (where the time goes)")
    parser.add_argument("--skip-matmul", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--plan", action="store_true", help="only check that every layer can be converted")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.plan:
        return plan(args, dtype)
    reason = cuda_ready()
    if reason:
        print(f"gpu_inference: skipped: {reason}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name()} | {args.dtype} | backend {args.backend}")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
               "backend": args.backend, "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_matmul:
        results["matmul"] = bench_matmuls(args, dtype)
    if not args.skip_generate:
        results["generate"] = bench_generation(args, dtype)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
