"""Size and speed of the compressed checkpoint format (`nm_hf.save_compressed`, 2:4 fp16).

Size: the tiny Llama of `tests/test_compressed.py::test_size_ratio_2_4_fp16` (hidden 64, FFN 256, fp16,
sparsified 2:4 and finalized) saved with `save_compressed` and with `save_pretrained`. Printed: the bytes
of the stored kept values and position codes of the targeted weights against their dense bytes (35/64 =
0.547 expected for 2:4: two fp16 values and 3 position bits per group of four), and the whole compressed
weights file against `model.safetensors` (embeddings and norms stay dense in both).

Speed: one random 2:4-sparse fp16 weight of `--shape` (default 4096 x 11008, a 7B Llama MLP projection;
groups along the input dim), `compress_tensor` (which also rebuilds the tensor once to check the encoding)
and `decompress_tensor` timed `--reps` times each, median reported. Wall-clock figures depend on the
machine's load, so the header line gives the load average at the start and the last line at the end.

Run: `python benchmarks/compressed_size.py [--shape 4096 11008] [--reps 3] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine_header

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from nm_hf.checkpoint import WEIGHTS_NAME, save_compressed  # noqa: E402
from nm_hf.checkpoint.codec import compress_tensor, decompress_tensor  # noqa: E402
from nm_hf.checkpoint.compressed import stored_nm_bytes  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import finalize, sparsify  # noqa: E402
from nm_hf.masks import nm_mask  # noqa: E402

# the tiny Llama of tests/test_compressed.py::test_size_ratio_2_4_fp16 (tests/tiny_models.py's settings)
TINY_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)


def size_report(directory: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).to(torch.float16)
    finalize(sparsify(model, SparsityConfig(n=2, m=4)))
    modules = dict(model.named_modules())
    dense = sum(modules[name].weight.numel() * modules[name].weight.element_size()
                for name in model.config.nm_sparsity["targeted_modules"])
    out = save_compressed(model, directory / "compressed")
    stored = stored_nm_bytes(out)
    model.save_pretrained(directory / "dense")
    whole, plain = (out / WEIGHTS_NAME).stat().st_size, (directory / "dense" / "model.safetensors").stat().st_size
    print("size: tiny Llama (hidden 64, FFN 256), fp16, 2:4")
    print(f"  targeted weights: {stored:,} compressed bytes / {dense:,} dense bytes = {stored / dense:.4f}")
    print(f"  whole weights file: {whole:,} bytes / model.safetensors {plain:,} bytes = {whole / plain:.4f}")


def speed_report(shape: tuple[int, int], reps: int) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    weight = (weight * nm_mask(weight, 2, 4)).to(torch.float16)
    compress_times, decompress_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        values, packed, _ = compress_tensor(weight, 2, 4, group_dim=1)
        compress_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        rebuilt = decompress_tensor(values, packed, 2, 4, tuple(shape), 1)
        decompress_times.append(time.perf_counter() - start)
    assert torch.equal(rebuilt, weight)
    print(f"speed: one {shape[0]} x {shape[1]} fp16 weight, 2:4, median of {reps}")
    print(f"  compress_tensor   {statistics.median(compress_times):.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in compress_times)})")
    print(f"  decompress_tensor {statistics.median(decompress_times):.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in decompress_times)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 11008), metavar=("ROWS", "COLS"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_header())
    with tempfile.TemporaryDirectory() as directory:
        size_report(Path(directory))
    speed_report(tuple(args.shape), args.reps)
    if hasattr(os, "getloadavg"):
        print("load avg at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
