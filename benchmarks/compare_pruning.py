#!/usr/bin/env python
"""One-shot 2:4 pruning of a pretrained dense LM, side by side: nm_hf.prune vs llm-compressor.

    .venv/bin/python benchmarks/compare_pruning.py --model runs/grid_lm/dense-2x4_learning_rate4e-3

For each criterion (nm_hf.prune's magnitude, wanda, sparsegpt, and llm-compressor's one-shot
`SparseGPTModifier(sparsity=0.5, mask_structure="2:4")`) the dense model is pruned on the same
calibration data (the first --calibration_samples training blocks of the data the model was trained on,
in the same batches), checked to be N:M, evaluated (validation and test perplexity), then fine-tuned for
--finetune_steps with each of --finetune_methods (SR-STE, fixed mask) by `SparseTrainer` with identical
settings, and evaluated again. The evaluation is one function for every model: the token-weighted mean
cross-entropy over all validation / test blocks (what the LM recipe's Trainer.evaluate reports).

llm-compressor is installed by this script into its own venv (--llmcompressor_venv, default
.venv-llmcompressor, gitignored; pinned versions below, from PyPI), so its pins never touch the project's.
It runs as a subprocess there (benchmarks/llmcompressor_oneshot.py) on a copy of the model and saves
the pruned model uncompressed; this script evaluates and fine-tunes it like the others. If the install
or the run fails, its row says why and the rest of the benchmark still runs.

Prints a table and writes every figure, with the command, the machine and the versions, to --output
(benchmarks/results/compare_pruning.json by default). docs/pretrained.md shows the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nm_hf._files import atomic_write_json  # noqa: E402
from nm_hf.prune import CRITERIA  # noqa: E402

#: the peer's row name in --criteria
PEER = "llm-compressor"
#: what goes into the peer's venv (torch 2.13.0 is the CPU build here; llmcompressor 0.14.0.1 needs
#: torch >=2.10,<=2.14 and transformers >=5.15,<=5.17, which pip resolves to 5.17.0 there)
PEER_PACKAGES = ("torch==2.13.0", "llmcompressor==0.14.0.1")
WORKER = Path(__file__).resolve().parent / "llmcompressor_oneshot.py"
DEFAULT_MODEL = "runs/grid_lm/dense-2x4_learning_rate4e-3"
DEFAULT_OUTPUT = "benchmarks/results/compare_pruning.json"


class BenchmarkError(ValueError):
    """A request refused before anything runs (one line, naming the flag)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="dense causal LM directory with its tokenizer (only read)")
    parser.add_argument("--criteria", nargs="+", default=[*CRITERIA, PEER],
                        help=f"rows of the table: any of {', '.join(CRITERIA)}, {PEER}")
    parser.add_argument("--finetune_methods", nargs="*", default=["sr-ste", "fixed"],
                        help="nm_hf methods of the fine-tune after pruning (none: prune only)")
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-3,
                        help="fine-tune peak learning rate (cosine)")
    parser.add_argument("--decay", type=float, default=1.0,
                        help="SR-STE decay (gradient mode), as recipes/configs/lm_python_docs.yaml")
    parser.add_argument("--no_dense_reference", action="store_true",
                        help="skip the reference row: the dense model fine-tuned the same way without a mask")
    parser.add_argument("--batch_size", type=int, default=16, help="fine-tune and calibration batch size")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--calibration_samples", type=int, default=128,
                        help="first training blocks used as calibration data (wanda, sparsegpt, "
                             "llm-compressor)")
    parser.add_argument("--sparsity", default="2:4", help="N:M pattern")
    parser.add_argument("--dataset", default="python_docs", help="built-in data set the model was trained on")
    parser.add_argument("--train_file", help="local text files instead of --dataset (with the two below)")
    parser.add_argument("--validation_file")
    parser.add_argument("--test_file")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and in the peer's subprocess")
    parser.add_argument("--work_dir", default="runs/compare_pruning",
                        help="fine-tune output dirs, the peer's model copy and pruned model")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="results JSON")
    parser.add_argument("--llmcompressor_venv", default=".venv-llmcompressor",
                        help=f"venv for {PEER} (created with {' '.join(PEER_PACKAGES)} if missing)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every refusal before any data is loaded or file written."""
    from nm_hf.methods import available_methods, get_method

    known = (*CRITERIA, PEER)
    unknown = [c for c in args.criteria if c not in known]
    if unknown:
        raise BenchmarkError(f"--criteria: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if len(set(args.criteria)) != len(args.criteria):
        raise BenchmarkError("--criteria: a criterion is listed twice")
    for method in args.finetune_methods:
        if method not in available_methods():
            raise BenchmarkError(f"--finetune_methods: unknown method {method!r}; "
                                 f"choose from {', '.join(available_methods())}")
        if not get_method(method).masks_forward:
            raise BenchmarkError(f"--finetune_methods: {method!r} does not mask the forward pass, so the "
                                 "fine-tuned model would not stay sparse")
    try:
        n, m = (int(x) for x in args.sparsity.split(":"))
    except ValueError:
        raise BenchmarkError(f"--sparsity must look like 2:4, got {args.sparsity!r}") from None
    if not 0 < n < m:
        raise BenchmarkError(f"--sparsity {args.sparsity}: need 0 < N < M")
    if PEER in args.criteria and n * 2 != m:
        raise BenchmarkError(f"--sparsity {args.sparsity}: the {PEER} row runs "
                             "SparseGPTModifier(sparsity=0.5), so it needs a 50% pattern (2:4, 4:8, ...)")
    for flag in ("finetune_steps", "batch_size", "eval_batch_size", "calibration_samples", "block_size",
                 "threads"):
        value = getattr(args, flag)
        if value < (0 if flag == "finetune_steps" else 1):
            raise BenchmarkError(f"--{flag} must be positive, got {value}")
    if args.finetune_methods and args.finetune_steps == 0:
        raise BenchmarkError("--finetune_steps 0 with --finetune_methods: pass --finetune_methods with no "
                             "value to prune only")
    files = [args.train_file, args.validation_file, args.test_file]
    if any(files) and not all(files):
        raise BenchmarkError("--train_file, --validation_file and --test_file go together")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise BenchmarkError(f"--model {args.model}: no config.json there (train one with "
                             "recipes/language_modeling.py recipes/configs/lm_python_docs.yaml "
                             "--method dense, see docs/pretrained.md)")


# --------------------------------------------------------------------------- data and evaluation


def load_blocks(args: argparse.Namespace, tokenizer: Any) -> Any:
    """train/validation/test blocks of --block_size tokens, tokenized and split as the LM recipe does."""
    from nm_hf.data.text import load_text_data, tokenize_and_group
    from nm_hf.recipe.args import TextDataArguments

    defaults = TextDataArguments(dataset=args.dataset, block_size=args.block_size)
    raw = load_text_data(dataset=args.dataset, train_file=args.train_file,
                         validation_file=args.validation_file, test_file=args.test_file,
                         **defaults.split_sizes())
    return tokenize_and_group(raw, tokenizer, args.block_size, add_eos=defaults.add_eos)


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataset: Any, batch_size: int) -> float:
    """exp of the token-weighted mean next-token cross-entropy over `dataset` (dropout off)."""
    from transformers import default_data_collator

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = range(start, min(start + batch_size, len(dataset)))
            batch = default_data_collator([dataset[i] for i in rows])
            loss = model(**batch).loss
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(loss) * count
            tokens += count
    finally:
        model.train(was_training)
    return math.exp(total / tokens)


def evaluate(model: torch.nn.Module, blocks: Any, batch_size: int) -> dict[str, float]:
    start = time.perf_counter()
    result = {"validation_perplexity": round(perplexity(model, blocks["validation"], batch_size), 4),
              "test_perplexity": round(perplexity(model, blocks["test"], batch_size), 4)}
    return {**result, "eval_s": round(time.perf_counter() - start, 2)}


def nm_check(model: torch.nn.Module, names: list[str], n: int, m: int) -> dict[str, Any]:
    """Whether every targeted weight is N:M along its input dimension, and its measured sparsity."""
    from nm_hf.layers import iter_targets
    from nm_hf.masks import check_nm

    by_name = {target.name: target for target in iter_targets(model)}
    bad = [name for name in names
           if not check_nm(by_name[name].weight.detach(), n, m, dim=by_name[name].group_dim)]
    zeros = sum(int((by_name[name].weight == 0).sum()) for name in names)
    total = sum(by_name[name].weight.numel() for name in names)
    return {"nm_ok": not bad, "layers_violating": bad, "sparsity": round(zeros / total, 6)}


# --------------------------------------------------------------------------- pruning


def load_dense(path: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def prune_with_nm_hf(args: argparse.Namespace, criterion: str, calibration: list[Any]) -> tuple[Any, float]:
    """The dense model pruned by nm_hf.prune (finalized: plain layers with the zeros in), and the seconds."""
    import nm_hf

    model = load_dense(args.model)
    n, m = (int(x) for x in args.sparsity.split(":"))
    start = time.perf_counter()
    nm_hf.prune(model, nm_hf.SparsityConfig(n=n, m=m, method="fixed"), criterion=criterion,
                calibration=calibration if criterion != "magnitude" else None, progress=False)
    seconds = time.perf_counter() - start
    nm_hf.finalize(model)
    return model, seconds


def ensure_peer_venv(venv: Path, log: Path) -> dict[str, Any]:
    """The peer's venv, created with `PEER_PACKAGES` unless it already has them; the install seconds."""
    python = venv / "bin" / "python"
    wanted = dict(spec.split("==") for spec in PEER_PACKAGES)
    if python.exists() and peer_versions(python).get("llmcompressor") == wanted["llmcompressor"]:
        return {"created": False, "install_s": 0.0}
    start = time.perf_counter()
    base = getattr(sys, "_base_executable", None) or sys.executable
    for command in ([base, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", *PEER_PACKAGES]):
        with log.open("a", encoding="utf-8") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"creating {venv} failed: {' '.join(command)} exited with {done.returncode} "
                               f"(log {log}):\n" + "\n".join(tail))
    return {"created": True, "install_s": round(time.perf_counter() - start, 1)}


def peer_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'torch', 'transformers')}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def prune_with_peer(args: argparse.Namespace, calibration: list[Any], names: list[str], work: Path
                    ) -> tuple[Any, dict[str, Any]]:
    """The dense model pruned by llm-compressor in its venv (a subprocess on a copy), loaded back here."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "llmcompressor.log"
    log.write_text("", encoding="utf-8")
    venv = ensure_peer_venv(Path(args.llmcompressor_venv), log)
    copy, output = work / "dense_copy", work / "pruned"
    for path in (copy, output):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(args.model, copy)
    calibration_file = work / "calibration.pt"
    torch.save(calibration, calibration_file)
    command = [str(Path(args.llmcompressor_venv) / "bin" / "python"), str(WORKER), "--model", str(copy),
               "--calibration", str(calibration_file), "--targets", json.dumps(names),
               "--output_dir", str(output), "--mask_structure", args.sparsity, "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{PEER} exited with {done.returncode} (log {log}):\n" + "\n".join(tail))
    timings = json.loads((output / "timings.json").read_text(encoding="utf-8"))
    return load_dense(output), {**venv, "subprocess_s": round(seconds, 2), **timings}


def same_other_weights(model: torch.nn.Module, dense: torch.nn.Module, names: list[str]) -> bool:
    """True if every parameter outside the targeted layers equals the dense model's."""
    targeted = {f"{name}.weight" for name in names}
    pruned = dict(model.named_parameters())
    return all(torch.equal(pruned[key], value) for key, value in dense.named_parameters()
               if key not in targeted)


# --------------------------------------------------------------------------- fine-tune


def finetune(args: argparse.Namespace, pruned_state: dict[str, torch.Tensor], method: str, blocks: Any,
             out_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The pruned weights fine-tuned by SparseTrainer with `method` (its first mask: the pruned pattern)."""
    from transformers import TrainingArguments, default_data_collator

    import nm_hf
    from nm_hf.trainer import SparseTrainer

    model = load_dense(args.model)
    model.load_state_dict(pruned_state)
    n, m = (int(x) for x in args.sparsity.split(":"))
    config = nm_hf.SparsityConfig(n=n, m=m, method=method, decay=args.decay, decay_mode="gradient")
    training = TrainingArguments(
        output_dir=str(out_dir), max_steps=args.finetune_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.finetune_steps // 10), adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1,
        max_grad_norm=1.0, seed=args.seed, logging_steps=max(1, args.finetune_steps // 4), save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = SparseTrainer(model=model, args=training, sparsity_config=config, train_dataset=blocks["train"],
                            data_collator=default_data_collator)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    nm_hf.finalize(model)
    return model, {"train_s": round(seconds, 1), "train_loss": round(float(output.training_loss), 4)}


# --------------------------------------------------------------------------- the run


def model_provenance(path: str) -> dict[str, Any]:
    """The dense model's path and the command that trained it (its results.json, if the recipe wrote one)."""
    info: dict[str, Any] = {"path": path}
    results = Path(path) / "results.json"
    if results.is_file():
        data = json.loads(results.read_text(encoding="utf-8"))
        info["trained_by"] = data.get("run", {}).get("command")
        info["recipe_validation_perplexity"] = data.get("eval_perplexity")
        info["recipe_test_perplexity"] = data.get("test_perplexity")
    return info


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every row of the benchmark (`argv`: the command's flags, recorded with the results)."""
    from transformers import AutoTokenizer, default_data_collator, set_seed

    import nm_hf
    from benchmarks._machine import machine_header
    from nm_hf.recipe.model_setup import calibration_batches
    from nm_hf.recipe.results import count_parameters

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    n, m = (int(x) for x in args.sparsity.split(":"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    blocks = load_blocks(args, tokenizer)
    data_s = time.perf_counter() - start
    calibration = [{k: v for k, v in batch.items() if k != "labels"} for batch in
                   calibration_batches(blocks["train"], default_data_collator, args.calibration_samples,
                                       args.batch_size)]
    dense = load_dense(args.model)
    names = nm_hf.find_target_modules(dense, nm_hf.SparsityConfig(n=n, m=m))
    print(machine_header(), flush=True)
    dense_eval = evaluate(dense, blocks, args.eval_batch_size)
    print(f"dense: validation ppl {dense_eval['validation_perplexity']}, "
          f"test ppl {dense_eval['test_perplexity']}", flush=True)
    results: dict[str, Any] = {
        "benchmark": "compare_pruning",
        "command": " ".join(shlex.quote(a) for a in
                            [".venv/bin/python", "benchmarks/compare_pruning.py", *argv]),
        "machine": machine_header(),
        "model": {**model_provenance(args.model), "parameters": count_parameters(dense),
                  "type": type(dense).__name__, "targeted_layers": len(names)},
        "data": {"dataset": args.train_file or args.dataset, "block_size": args.block_size,
                 **{f"{split}_blocks": len(blocks[split]) for split in ("train", "validation", "test")},
                 "calibration_samples": sum(int(b["input_ids"].shape[0]) for b in calibration),
                 "calibration_batches": len(calibration), "load_s": round(data_s, 1)},
        "pattern": args.sparsity,
        "finetune": {"methods": args.finetune_methods, "steps": args.finetune_steps,
                     "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                     "schedule": "cosine, 10% warm-up",
                     "optimizer": "AdamW (0.9, 0.95), weight decay 0.1, clip 1.0",
                     "sr_ste_decay": args.decay, "seed": args.seed},
        "dense": dense_eval,
        "rows": [],
    }
    # the reference: what the same extra steps give without pruning
    if args.finetune_methods and not args.no_dense_reference:
        print("--- dense reference fine-tune (method dense)", flush=True)
        set_seed(args.seed)
        state = {key: value.detach().clone() for key, value in dense.state_dict().items()}
        tuned, info = finetune(args, state, "dense", blocks, work / "finetune" / "dense")
        dense_eval["finetuned"] = {"dense": {**evaluate(tuned, blocks, args.eval_batch_size), **info}}
        print(f"dense fine-tune: {dense_eval['finetuned']['dense']}", flush=True)
    for criterion in args.criteria:
        row: dict[str, Any] = {"criterion": criterion}
        results["rows"].append(row)
        print(f"--- {criterion}", flush=True)
        try:
            if criterion == PEER:
                model, peer = prune_with_peer(args, calibration, names, work / "llmcompressor")
                row["prune_s"] = peer["oneshot_s"]
                row[PEER] = peer
            else:
                model, seconds = prune_with_nm_hf(args, criterion, calibration)
                row["prune_s"] = round(seconds, 2)
        except Exception as err:  # the peer's install/run: record why, go on with the other rows
            if criterion != PEER:
                raise
            row["error"] = str(err)
            print(f"{PEER} failed: {err}", flush=True)
            continue
        row.update(nm_check(model, names, n, m))
        row["other_weights_unchanged"] = same_other_weights(model, dense, names)
        if not row["nm_ok"]:
            raise RuntimeError(f"{criterion}: the pruned weights are not {args.sparsity} in "
                               f"{row['layers_violating']}")
        row["pruned"] = evaluate(model, blocks, args.eval_batch_size)
        print(f"pruned in {row['prune_s']} s: {row['pruned']}", flush=True)
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        del model
        row["finetuned"] = {}
        for method in args.finetune_methods:
            set_seed(args.seed)
            tuned, info = finetune(args, state, method, blocks, work / "finetune" / f"{criterion}-{method}")
            check = nm_check(tuned, names, n, m)
            if not check["nm_ok"]:
                raise RuntimeError(f"{criterion} + {method}: the fine-tuned weights are not {args.sparsity} "
                                   f"in {check['layers_violating']}")
            row["finetuned"][method] = {**evaluate(tuned, blocks, args.eval_batch_size), **info,
                                        "nm_ok": check["nm_ok"], "sparsity": check["sparsity"]}
            print(f"{method} fine-tune: {row['finetuned'][method]}", flush=True)
    return results


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one line per criterion and fine-tune (perplexities: validation / test)."""
    def ppl(entry: dict[str, Any]) -> str:
        return f"{entry['validation_perplexity']:.2f} / {entry['test_perplexity']:.2f}"

    lines = ["| criterion | prune s | ppl after pruning (val / test) | fine-tune "
             "| ppl after fine-tune (val / test) | fine-tune s |", "|---|---|---|---|---|---|"]
    dense = results["dense"]
    tuned = dense.get("finetuned", {}).get("dense")
    lines.append(f"| dense (not pruned) | - | {ppl(dense)} | "
                 + (f"dense, {results['finetune']['steps']} steps | {ppl(tuned)} | {tuned['train_s']:.0f} |"
                    if tuned else "- | - | - |"))
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['criterion']} | failed (see the JSON) | - | - | - | - |")
            continue
        first = f"| {row['criterion']} | {row['prune_s']:.2f} | {ppl(row['pruned'])} | "
        if not row["finetuned"]:
            lines.append(first + "- | - | - |")
        for i, (method, tuned) in enumerate(row["finetuned"].items()):
            lead = first if i == 0 else "| | | | "
            lines.append(lead + f"{method}, {results['finetune']['steps']} steps | {ppl(tuned)} | "
                         f"{tuned['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except BenchmarkError as err:
        sys.exit(f"compare_pruning.py: error: {err}")
    start = time.perf_counter()
    results = run(args, argv)
    results["total_s"] = round(time.perf_counter() - start, 1)
    table = format_table(results)
    print(table)
    results["table"] = table
    atomic_write_json(args.output, results)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
