"""llm-compressor's one-shot SparseGPT on a dense model: the peer side of `compare_pruning.py`.

Runs inside the separate venv that `compare_pruning.py` creates (llm-compressor and its pins, never the
project's), so it imports nothing from nm_hf. It reads the calibration batches `compare_pruning.py`
wrote (the same token blocks nm_hf.prune gets, in the same batches), runs
`oneshot(recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=<the layers nm_hf
targets>))`, saves the pruned model uncompressed (plain dense tensors with the zeros in them) to
--output_dir and writes timings.json there. compare_pruning.py then loads and evaluates it with the
same code as the other criteria.

GPT-2's projections are `transformers.Conv1D` (weight [in, out]). llm-compressor 0.14.0.1 hooks only
modules whose class is named Linear, Conv1d, Conv2d or Conv3d (`PRUNABLE_LAYER_TYPES`, matched exactly),
so on GPT-2 it prunes nothing and says nothing. Here each targeted Conv1D is swapped for the equivalent
`nn.Linear` (weight transposed, same bias) for the oneshot call and swapped back before saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def conv1d_as_linear(model, names: list[str]) -> dict[str, tuple]:
    """Swap the targeted GPT-2 Conv1D modules for equivalent nn.Linear ones; returns what to swap back."""
    import torch
    from transformers.pytorch_utils import Conv1D

    swapped = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Conv1D):
            continue
        linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        swapped[name] = (parent, child, module)
    return swapped


def linear_back_to_conv1d(swapped: dict[str, tuple]) -> None:
    """Put the Conv1D modules back with the (pruned) weights of their Linear stand-ins."""
    import torch

    for parent, child, conv in swapped.values():
        linear = getattr(parent, child)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if conv.bias is not None:
                conv.bias.copy_(linear.bias)
        setattr(parent, child, conv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="dense model directory (a copy: it is only read)")
    parser.add_argument("--calibration", required=True,
                        help="calibration batches (.pt: a list of dicts of tensors)")
    parser.add_argument("--targets", required=True, help="JSON list of the module names to prune")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--mask_structure", default="2:4")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--dampening_frac", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    imported = time.perf_counter()
    n, m = (int(x) for x in args.mask_structure.split(":"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    batches = torch.load(args.calibration)
    samples = sum(int(batch["input_ids"].shape[0]) for batch in batches)
    # the batches as they are: a DataLoader is used by oneshot directly (no re-tokenizing or shuffling)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    targets = json.loads(args.targets)
    swapped = conv1d_as_linear(model, targets)
    recipe = SparseGPTModifier(sparsity=n / m, mask_structure=args.mask_structure, targets=targets,
                               block_size=args.block_size, dampening_frac=args.dampening_frac)
    loaded = time.perf_counter()
    model = oneshot(model=model, recipe=recipe, dataset=loader, num_calibration_samples=samples)
    pruned = time.perf_counter()
    linear_back_to_conv1d(swapped)
    output = Path(args.output_dir)
    model.save_pretrained(output, save_compressed=False)
    saved = time.perf_counter()
    timings = {
        "oneshot_s": round(pruned - loaded, 2), "import_s": round(imported - start, 2),
        "load_s": round(loaded - imported, 2), "save_s": round(saved - pruned, 2),
        "conv1d_as_linear": len(swapped), "calibration_samples": samples, "calibration_batches": len(batches),
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "modifier": {"class": "SparseGPTModifier", "sparsity": n / m, "mask_structure": args.mask_structure,
                     "block_size": args.block_size, "dampening_frac": args.dampening_frac},
    }
    (output / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
