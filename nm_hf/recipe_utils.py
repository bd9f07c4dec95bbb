"""Pieces shared by the training recipes (`recipes/translation.py`, `recipes/language_modeling.py`).

- `parse_recipe_args`: a YAML/JSON config file first, then command-line flags that override it;
  unknown keys and flags are errors that name the key and the file;
- `setup_logging`: transformers-examples style (main process info, replicas warning);
- `prepare_tokenizer`: train a tokenizer once (local main process), save it, and load the very same
  vocabulary on the other ranks;
- `TokenThroughputMixin` / `with_token_throughput`: count the non-pad tokens a trainer trains on, and
  the time spent evaluating, to report training tokens per second;
- `write_json_atomic`, `format_results_table`, `finish_run` (results.json, model card, optional push).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "ArgumentsError",
    "CONFIG_SUFFIXES",
    "load_config_file",
    "parse_recipe_args",
    "parse_recipe_args_or_exit",
    "check_launch",
    "common_training_defaults",
    "model_summary",
    "setup_logging",
    "apply_config_overrides",
    "prepare_tokenizer",
    "TokenThroughputMixin",
    "ExactEvalMixin",
    "with_token_throughput",
    "HubTarget",
    "take_over_hub_push",
    "write_json_atomic",
    "format_results_table",
    "launch_command",
    "count_parameters",
    "train_and_save",
    "finish_run",
    "safe_perplexity",
]

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ArgumentsError(ValueError):
    """A bad config file or flag; the message names the key/flag and the file."""


# ---------------------------------------------------------------------------------------------------------
# config file + flags


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) config file holding one mapping of flag names to values."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ArgumentsError(f"{path}: a config file must end in {', '.join(CONFIG_SUFFIXES)}")
    if not path.is_file():
        raise ArgumentsError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = (json.loads(text) if text.strip() else {}) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ArgumentsError(f"{path}: cannot parse it: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentsError(f"{path}: expected a mapping of flag names to values at the top level, "
                             f"got {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise ArgumentsError(f"{path}: keys must be flag names (strings), got {bad[0]!r}")
    return data


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(dataclass_types: Sequence[type]) -> list[str]:
    return [f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init]


def _accepts_list(dataclass_types: Sequence[type]) -> set[str]:
    """Fields whose annotation allows a list although argparse takes one value (e.g. `report_to`)."""
    names: set[str] = set()
    for dtype in dataclass_types:
        for name, hint in typing.get_type_hints(dtype).items():
            args = typing.get_args(hint)
            if any(a is list or typing.get_origin(a) is list for a in args):
                names.add(name)
    return names


def _config_tokens(config: Mapping[str, Any], actions: Mapping[str, argparse.Action], path: str,
                   list_fields: set[str]) -> tuple[list[str], dict[str, Any]]:
    """argv tokens for the config values (so argparse checks types and choices), plus direct defaults.

    Values argparse cannot express (None, an empty list, a list for a field such as `report_to` that
    takes one value on the command line but a list in Python) become parser defaults instead.
    """
    tokens: list[str] = []
    direct: dict[str, Any] = {}
    for key, value in config.items():
        action = actions[key]
        takes_list = action.nargs in ("+", "*")
        if value is None:
            direct[key] = None
        elif isinstance(value, bool):
            tokens.append(f"--{key}={'true' if value else 'false'}")
        elif isinstance(value, (list, tuple)):
            if not takes_list:
                if key in list_fields:
                    direct[key] = [_scalar(v, key, path) for v in value]
                    continue
                raise ArgumentsError(f"{path}: key {key!r} takes a single value, got a list {list(value)!r}")
            if not value:
                direct[key] = []
            else:
                tokens += [f"--{key}", *(_scalar(v, key, path) for v in value)]
        elif isinstance(value, dict):
            tokens.append(f"--{key}={json.dumps(value)}")
        else:
            tokens.append(f"--{key}={_scalar(value, key, path)}")
    return tokens, direct


def _scalar(value: Any, key: str, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ArgumentsError(f"{path}: key {key!r} has a value of type {type(value).__name__} ({value!r}); "
                         "use a string, number, boolean or list")


class _Parser:
    """Build an HfArgumentParser lazily (transformers is a heavy import)."""

    @staticmethod
    def make(dataclass_types: Sequence[type], prog: str | None, exit_on_error: bool = True):
        from transformers import HfArgumentParser

        return HfArgumentParser(
            list(dataclass_types),
            prog=prog,
            usage=f"{prog or '%(prog)s'} [CONFIG.yaml|CONFIG.json] [--flag value ...]",
            description="Flags override the values of the optional config file (its keys are flag names).",
            allow_abbrev=False,
            exit_on_error=exit_on_error,
        )


def parse_recipe_args(
    dataclass_types: Sequence[type],
    args: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    prog: str | None = None,
) -> tuple[Any, ...]:
    """Parse `[CONFIG.yaml|.json] [--flag value ...]` into instances of `dataclass_types`.

    Precedence, lowest first: the dataclass defaults, the recipe's `defaults`, the config file, the
    command-line flags. Config values go through the same argparse types and choices as flags. An
    unknown config key raises `ArgumentsError` naming the key and the file; an unknown flag, one
    naming the flag. `--help` prints every flag and exits.
    """
    argv = list(sys.argv[1:] if args is None else args)
    config_path: str | None = None
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(CONFIG_SUFFIXES):
            raise ArgumentsError(f"the first argument must be a config file ({', '.join(CONFIG_SUFFIXES)}) "
                                 f"or a flag, got {argv[0]!r}")
        config_path = argv.pop(0)
    names = _field_names(dataclass_types)
    if defaults:
        unknown = [key for key in defaults if key not in names]
        if unknown:
            raise ArgumentsError(f"recipe defaults name unknown field(s) {unknown}")

    parser = _Parser.make(dataclass_types, prog)
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    if defaults:
        parser.set_defaults(**defaults)

    config_tokens: list[str] = []
    if config_path is not None:
        config = load_config_file(config_path)
        unknown = [key for key in config if key not in names]
        if unknown:
            hints = "; ".join(f"{key!r}{_suggest(key, names)}" for key in unknown)
            raise ArgumentsError(f"{config_path}: unknown key(s): {hints}. Keys must be flag names of "
                                 f"{prog or 'this recipe'} (see --help)")
        config_tokens, direct = _config_tokens(config, actions, config_path, _accepts_list(dataclass_types))
        parser.set_defaults(**direct)
        # parse the config values alone first so a bad value is reported with the file's name
        checker = _Parser.make(dataclass_types, prog, exit_on_error=False)
        if defaults:
            checker.set_defaults(**defaults)
        try:
            checker.parse_known_args(config_tokens)
        except argparse.ArgumentError as err:
            raise ArgumentsError(f"{config_path}: {err}") from None

    namespace, remaining = parser.parse_known_args(config_tokens + argv)
    if remaining:
        flags = [a for a in remaining if a.startswith("-")] or remaining
        options = [f"--{n}" for n in names]
        hints = "; ".join(f"{flag!r}{_suggest(flag.split('=')[0], options)}" for flag in flags)
        raise ArgumentsError(f"unknown or misplaced argument(s): {hints} (see --help)")
    outputs = []
    values = vars(namespace)
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in values.items() if k in keys}))
    return tuple(outputs)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def common_training_defaults() -> dict[str, Any]:
    """TrainingArguments defaults both recipes start from (below their config file and flags).

    No checkpoints unless asked for (the final model is always saved), a log every 50 steps, and DDP
    without the unused-parameter search (every parameter of the recipes' models gets a gradient).
    Without an accelerator: `use_cpu` (transformers only sets up multi-process CPU training, gloo
    DDP under `accelerate launch --multi_gpu`, when it is set; otherwise every rank trains alone as
    rank 0 of 1) and no pinned memory (it only triggers a warning on CPU).
    """
    accelerator = _has_accelerator()
    return {"save_strategy": "no", "logging_steps": 50, "use_cpu": not accelerator,
            "dataloader_pin_memory": accelerator, "ddp_find_unused_parameters": False}


def parse_recipe_args_or_exit(
    dataclass_types: Sequence[type], args: Sequence[str] | None, defaults: Mapping[str, Any], prog: str,
) -> tuple[tuple[Any, ...], HubTarget | None]:
    """`parse_recipe_args` + `take_over_hub_push` (on the last dataclass, the TrainingArguments) for a CLI.

    Bad input exits with `prog: error: ...` (status 1) and no traceback, before anything is loaded.
    """
    try:
        parsed = parse_recipe_args(dataclass_types, args, defaults=defaults, prog=prog)
        hub = take_over_hub_push(parsed[-1])
        check_launch(parsed[-1])
    except ValueError as err:  # ArgumentsError and the dataclasses' own checks
        raise SystemExit(f"{prog}: error: {err}") from None
    return parsed, hub


def check_launch(training_args: Any) -> None:
    """Refuse launches that would silently run differently from what was asked.

    - started as several processes (`WORLD_SIZE` > 1) but transformers set up a one-process run: on a
      machine without GPU that happens with `--use_cpu false`; every rank would then train alone and
      write the same output directory;
    - FSDP asked for (accelerate FSDP config or `--fsdp`) but not set up: on CPU transformers builds a
      gloo DDP run (MULTI_CPU) and drops the FSDP settings. (Where FSDP is set up, the sparse trainers
      refuse it themselves: N:M masks need whole weight matrices.)
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and training_args.world_size != launched:
        raise ArgumentsError(
            f"started as {launched} processes, but transformers set up a {training_args.world_size}-process run "
            f"({training_args.distributed_state.distributed_type}); every process would train alone. Without a GPU "
            "pass --use_cpu true (the recipes' default when no accelerator is found)")
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") or bool(training_args.fsdp)
    distributed_type = str(getattr(training_args.distributed_state, "distributed_type", ""))
    if fsdp_asked and "FSDP" not in distributed_type:
        raise ArgumentsError(
            f"FSDP was requested (accelerate config or --fsdp), but this run is set up as {distributed_type}, "
            "without sharding: on CPU, transformers builds a gloo DDP (MULTI_CPU) run and ignores the FSDP "
            "settings. nm_hf's sparse trainers do not support FSDP anyway (N:M masks need whole weight "
            "matrices); use DDP: accelerate launch --config_file recipes/accelerate/multi_cpu.yaml (CPU) "
            "or --multi_gpu (GPUs)")


# ---------------------------------------------------------------------------------------------------------
# logging


def setup_logging(training_args: Any) -> None:
    """Log like the transformers examples: info on the main process, warnings on the replicas.

    `--log_level`/`--log_level_replica` override it. nm_hf's own loggers follow the same level.
    """
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for name in ("nm_hf", "__main__"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(f"process {training_args.process_index} of {training_args.world_size}, "
                f"device {training_args.device}")


# ---------------------------------------------------------------------------------------------------------
# model config


def _convert_like(old: Any, raw: str, key: str) -> Any:
    lowered = raw.strip().lower()
    if isinstance(old, bool) or (old is None and lowered in ("true", "false")):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config_overrides: {key}={raw!r} is not a boolean")
    if old is None and lowered in ("none", "null"):
        return None
    for kind in (int, float):
        if isinstance(old, kind) or old is None:
            try:
                return kind(raw)
            except ValueError:
                if old is not None:
                    raise ValueError(f"--config_overrides: {key}={raw!r} is not a valid "
                                     f"{kind.__name__}") from None
    return raw


def apply_config_overrides(config: Any, overrides: str | None) -> dict[str, Any]:
    """Apply `--config_overrides "key=value,key=value"` to a model config; all checked before any is set."""
    if not overrides:
        return {}
    updates: dict[str, Any] = {}
    for item in overrides.split(","):
        if "=" not in item:
            raise ValueError(f"--config_overrides: {item!r} is not key=value (write 'a=1,b=0.1')")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: {type(config).__name__} has no attribute {key!r}")
        updates[key] = _convert_like(getattr(config, key), raw, key)
    for key, value in updates.items():
        setattr(config, key, value)
    return updates


# ---------------------------------------------------------------------------------------------------------
# tokenizer shared by all ranks


def prepare_tokenizer(training_args: Any, save_dir: str | os.PathLike[str], train: Callable[[], Any],
                      reuse_existing: bool = False) -> Any:
    """Train a tokenizer on the local main process, save it to `save_dir`, load it on the other ranks.

    BPE training may break ties differently from one run to the next, so replicas must not train
    their own: every rank has to use the very same vocabulary. With `reuse_existing` (a resumed run)
    a tokenizer already saved in `save_dir` is loaded instead of trained again, so it keeps matching
    the checkpoint's embeddings.
    """
    from transformers import AutoTokenizer

    save_dir = Path(save_dir)
    if reuse_existing and (save_dir / "tokenizer.json").is_file():
        logger.info(f"resuming: using the tokenizer saved in {save_dir}")
        return AutoTokenizer.from_pretrained(save_dir)
    with training_args.main_process_first(desc="tokenizer training"):
        if training_args.local_process_index == 0:
            start = time.perf_counter()
            tokenizer = train()
            save_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(save_dir)
            logger.info(f"trained a tokenizer of {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s, "
                        f"saved to {save_dir}")
        else:
            tokenizer = AutoTokenizer.from_pretrained(save_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# throughput


class TokenThroughputMixin:
    """Counts the non-pad tokens each training step consumes, and the time spent in `evaluate`.

    Tokens: `attention_mask` ones (or all `input_ids`), plus target tokens (`labels != -100`) when
    `count_label_tokens` is true (seq2seq: target tokens are not in `input_ids`).
    """

    count_label_tokens: bool = False

    def _throughput_state(self) -> dict[str, float]:
        state = self.__dict__.get("_nm_throughput")
        if state is None:
            state = {"tokens": 0, "eval_seconds": 0.0, "in_train": False}
            self.__dict__["_nm_throughput"] = state
        return state

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        state = self._throughput_state()
        state["tokens"] += batch_token_count(inputs, self.count_label_tokens)
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):  # type: ignore[override]
        state = self._throughput_state()
        state["in_train"] = True
        try:
            return super().train(*args, **kwargs)
        finally:
            state["in_train"] = False

    def evaluate(self, *args, **kwargs):  # type: ignore[override]
        state = self._throughput_state()
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if state["in_train"]:
                state["eval_seconds"] += time.perf_counter() - start

    def throughput(self, train_runtime: float) -> dict[str, float]:
        """Totals over all processes (every rank must call this: it is a collective)."""
        state = self._throughput_state()
        local = torch.tensor([float(state["tokens"])], device=self.args.device)
        total = float(self.accelerator.reduce(local, reduction="sum").item())
        train_only = max(train_runtime - state["eval_seconds"], 1e-9)
        return {
            "train_tokens": int(total),
            "train_eval_seconds": round(state["eval_seconds"], 3),
            "tokens_per_second": total / train_only,
        }


def batch_token_count(inputs: Mapping[str, Any], count_label_tokens: bool) -> int:
    count = 0
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        count += int(mask.sum())
    elif isinstance(inputs.get("input_ids"), torch.Tensor):
        count += inputs["input_ids"].numel()
    labels = inputs.get("labels")
    if count_label_tokens and isinstance(labels, torch.Tensor):
        count += int((labels != -100).sum())
    return count


class ExactEvalMixin:
    """Evaluate each example exactly once, in dataset order, also in multi-process runs.

    - Order: with `--train_sampling_strategy group_by_length`, `Trainer` also length-groups the
      *evaluation* sampler, so predictions come back shuffled and a metric that matches them to the
      references by position (BLEU, a predictions file) scores the wrong pairs. Evaluation here always
      uses the dataset order (a sequential sampler, sharded by accelerate across processes).
    - Duplicates: a distributed sampler pads the last round of batches with examples from the start so
      every rank gets a full batch. `Trainer` drops those copies (`gather_for_metrics`), but
      `Seq2SeqTrainer.evaluate/predict` switch to a plain `gather` that keeps them, so with 2 processes
      BLEU and the loss would count some sentences twice. Restore `gather_for_metrics` for the loop.
    """

    def _get_eval_sampler(self, eval_dataset):  # type: ignore[override]
        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def evaluation_loop(self, *args, **kwargs):  # type: ignore[override]
        self.gather_function = functools.partial(self.accelerator.gather_for_metrics,
                                                 use_gather_object=self.args.eval_use_gather_object)
        return super().evaluation_loop(*args, **kwargs)


def with_token_throughput(trainer_cls: type, count_label_tokens: bool = False) -> type:
    """`trainer_cls` with `TokenThroughputMixin` and `ExactEvalMixin` mixed in."""
    return type(f"Recipe{trainer_cls.__name__}", (TokenThroughputMixin, ExactEvalMixin, trainer_cls),
                {"count_label_tokens": count_label_tokens})


# ---------------------------------------------------------------------------------------------------------
# hub


@dataclasses.dataclass
class HubTarget:
    repo_id: str
    token: str | None
    private: bool


def take_over_hub_push(training_args: Any) -> HubTarget | None:
    """Read `--push_to_hub/--hub_model_id/--hub_token/--hub_private_repo` and switch the Trainer's own push off.

    The recipe pushes once at the end with `nm_hf.hub.push_to_hub` (finalized model, model card,
    results) instead of the Trainer pushing every checkpoint. Call before building the Trainer.
    """
    if not training_args.push_to_hub:
        return None
    if not training_args.hub_model_id:
        raise ArgumentsError("--push_to_hub needs --hub_model_id (e.g. --hub_model_id your-name/model-2of4)")
    target = HubTarget(repo_id=training_args.hub_model_id, token=training_args.hub_token,
                       private=bool(training_args.hub_private_repo))
    training_args.push_to_hub = False
    return target


# ---------------------------------------------------------------------------------------------------------
# results


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def format_results_table(results: Mapping[str, Any], title: str = "results") -> str:
    """A two-column text table of the scalar entries of `results` (nested dicts flattened with '/')."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(f"{name}/", value)
            elif isinstance(value, (list, tuple)):
                rows.append((name, ", ".join(map(str, value))))
            else:
                rows.append((name, _format_value(value)))

    walk("", results)
    width = max([len(name) for name, _ in rows] + [len(title)])
    line = "-" * min(width + 2 + max([len(v) for _, v in rows] + [8]), 100)
    out = [line, title, line]
    out += [f"{name:<{width}}  {value}" for name, value in rows]
    out.append(line)
    return "\n".join(out)


def safe_perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def launch_command(argv: Sequence[str] | None = None) -> str:
    """The command line of this run, as `accelerate launch ...` when started by accelerate/torchrun."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(argv[0]) if argv and os.path.isabs(argv[0]) else (argv[0] if argv else "")
    parts = [script, *argv[1:]]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ:
        prefix = ["accelerate", "launch"]
        if world > 1:
            prefix += ["--num_processes", str(world)]
        return shlex.join(prefix + parts)
    return shlex.join(["python", *parts])


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train_and_save(trainer: Any, training_args: Any, sparsity_config: Any) -> dict[str, Any]:
    """Train, measure, save the finalized model; returns the "train" and "sparsity" result blocks.

    `trainer` is a `with_token_throughput(SparseTrainer/SparseSeq2SeqTrainer)` instance. The sparsity
    block combines the tracker's summary (SAD, flip rate) with a check of the weights the forward pass
    uses (`nm_ok`: every group of m holds at most n non-zeros in every targeted layer).
    """
    from nm_hf.report import sparsity_report

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    runtime = float(train_result.metrics.get("train_runtime", 0.0))
    throughput = trainer.throughput(runtime)
    summary = trainer.sparsity_summary()
    report = sparsity_report(trainer.model)
    trainer.save_model()  # masks baked in; the live model stays sparse
    trainer.save_state()
    if training_args.should_save:
        write_json_atomic(Path(training_args.output_dir) / "train_metrics.json", train_result.metrics)
    return {
        # headline numbers (top-level numbers of results.json become rows of the model card's table)
        "sparsity": round(report.sparsity, 6),
        "nm_ok": report.nm_ok,
        "sad": summary.get("sad"),
        "sad_from_init": summary.get("sad_from_init"),
        "train_runtime_s": round(runtime, 2),
        "tokens_per_second": round(throughput["tokens_per_second"], 1),
        # details
        "sparsity_config": {
            "pattern": sparsity_config.pattern, "method": sparsity_config.method,
            "decay": sparsity_config.decay, "decay_mode": sparsity_config.decay_mode,
            "target_modules": sparsity_config.target_modules, "exclude_modules": sparsity_config.exclude_modules,
            "layers": len(report.layers),
        },
        "mask_stats": {key: summary.get(key) for key in ("flip_rate", "mean_flip_rate", "sad_rate",
                                                         "sad_from_init_rate", "pruned_weight_norm")},
        "train": {
            "steps": trainer.state.global_step,
            "loss": train_result.metrics.get("train_loss"),
            "tokens": throughput["train_tokens"],
            "eval_seconds_during_training": throughput["train_eval_seconds"],
            "processes": training_args.world_size,
        },
    }


def model_summary(model: torch.nn.Module, model_name_or_path: str | None) -> dict[str, Any]:
    return {
        "type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        "parameters": count_parameters(model),
        "from_scratch": not model_name_or_path,
        "base_model": model_name_or_path,
    }


def finish_run(
    training_args: Any,
    results: dict[str, Any],
    *,
    model: Any,
    task: str,
    dataset_name: str | None,
    base_model: str | None,
    hub: HubTarget | None,
    title: str = "results",
) -> None:
    """On the main process: results.json, model card, results table, then the optional Hub push.

    Must be called by every process (it only waits for the others at the end).
    """
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        command = launch_command()
        repo_id = hub.repo_id if hub is not None else None
        write_json_atomic(output_dir / "results.json", results)
        from nm_hf.card import write_model_card

        write_model_card(output_dir, model=model, results=results, dataset_name=dataset_name, task=task,
                         command=command, base_model=base_model, repo_id=repo_id)
        print("\n" + format_results_table(results, title=title), flush=True)
        print(f"outputs in {output_dir}/", flush=True)
        if hub is not None:
            from nm_hf.hub import push_to_hub

            info = push_to_hub(output_dir, hub.repo_id, token=hub.token, private=hub.private,
                               commit_message=f"nm_hf {task} recipe", results=results,
                               dataset_name=dataset_name, task=task, command=command, base_model=base_model)
            logger.info(f"pushed {output_dir} to {getattr(info, 'commit_url', hub.repo_id)}")
    if training_args.world_size > 1:
        _barrier()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
