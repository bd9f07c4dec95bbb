"""Starting a recipe run: parsing with recipe defaults, launch checks, logging, the command and its secrets.

- `parse_recipe_args_or_exit`: the CLI entry (config file + flags, run-length-aware defaults, checks of
  the training flags and of the launch); bad input prints `prog: error: ...` and exits with status 2
  (argparse's convention) before anything is loaded or written;
- `user_errors`: the same one-line exit for errors of the user's data and settings found later;
- `launch_command`: the command line as recorded in results.json, the model card and the printed
  table, its secrets replaced by `REDACTED` (`redact_command`, from `nm_hf.redact`, re-exported here);
- `process_elapsed_seconds`: time since the process started (imports included), for `run/total_time_s`;
- `run_environment`: the versions, CPU and threads a run ran with, for `run/environment` (floating-point
  results can change with the CPU's instruction set even where code, seed and data are the same).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from nm_hf.redact import REDACTED, is_secret_flag, redact_command

from .config_files import ArgumentsError, parse_recipe_args_full

__all__ = [
    "HubTarget",
    "REDACTED",
    "adaptive_training_defaults",
    "check_launch",
    "check_inert_flags",
    "check_training_arguments",
    "common_training_defaults",
    "exit_with_error",
    "is_secret_flag",
    "launch_command",
    "one_line",
    "parse_recipe_args_or_exit",
    "process_elapsed_seconds",
    "redact_command",
    "run_environment",
    "run_length_defaults",
    "setup_logging",
    "take_over_hub_push",
    "user_errors",
]

logger = logging.getLogger(__name__)

_IMPORTED_AT = time.monotonic()  # fallback start time where /proc is missing


# ---------------------------------------------------------------------------------------------------------
# errors


def one_line(err: BaseException | str) -> str:
    """An error message on one line: continuation lines (`  - problem`) joined with `; `."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    rest = [line[2:] if line.startswith("- ") else line for line in lines[1:]]
    return lines[0] + (" " + "; ".join(rest) if rest else "")


def exit_with_error(prog: str, message: BaseException | str) -> NoReturn:
    """Print `prog: error: message` (one line) to stderr and exit with status 2, like argparse."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def user_errors(prog: str, kinds: tuple[type[BaseException], ...] = (ValueError, OSError)) -> Iterator[None]:
    """Turn the errors a user's data or settings cause (`ValueError`, `OSError`) into `exit_with_error`."""
    try:
        yield
    except kinds as err:
        exit_with_error(prog, err)


# ---------------------------------------------------------------------------------------------------------
# defaults


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def common_training_defaults() -> dict[str, Any]:
    """TrainingArguments defaults both recipes start from (below their config file and flags).

    No checkpoints unless asked for (the final model is always saved), a log every 50 steps (fewer for
    short runs, see `run_length_defaults`), and DDP without the unused-parameter search (every
    parameter of the recipes' models gets a gradient). Without an accelerator: `use_cpu`
    (transformers only sets up multi-process CPU training, gloo DDP under `accelerate launch
    --multi_gpu`, when it is set; otherwise every rank trains alone as rank 0 of 1) and no pinned
    memory (it only triggers a warning on CPU).
    """
    accelerator = _has_accelerator()
    return {"save_strategy": "no", "logging_steps": 50, "use_cpu": not accelerator,
            "dataloader_pin_memory": accelerator, "ddp_find_unused_parameters": False}


def run_length_defaults(max_steps: int, *, warmup_fraction: float | None = None, warmup_cap: int = 0,
                        logging_cap: int = 50) -> dict[str, Any]:
    """`logging_steps` (and `warmup_steps` when `warmup_fraction` is given) sized to the run.

    About 10 logs per run (at most every `logging_cap` steps), so a 20-step run still logs its loss and
    sparsity metrics; a warm-up of `warmup_fraction` of the steps, at most `warmup_cap`. With
    `max_steps` -1 (epochs) the step count is unknown here: every `logging_cap` steps, and the warm-up
    as a ratio (transformers reads a `warmup_steps` below 1 as a fraction of the run).
    """
    out: dict[str, Any] = {}
    if max_steps > 0:
        out["logging_steps"] = max(1, min(logging_cap, max_steps // 10))
        if warmup_fraction is not None:
            out["warmup_steps"] = max(1, min(warmup_cap, round(warmup_fraction * max_steps)))
    else:
        out["logging_steps"] = logging_cap
        if warmup_fraction is not None:
            out["warmup_steps"] = warmup_fraction
    return out


def adaptive_training_defaults(scratch_defaults: Mapping[str, Any], *, warmup_fraction: float,
                               warmup_cap: int) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    """A recipe's `adaptive_defaults` for `parse_recipe_args_or_exit` (parsed values: the model arguments
    first, the TrainingArguments last).

    Every run: a logging interval sized to --max_steps (`run_length_defaults`), so a short run still
    logs its loss and sparsity metrics. A model built from scratch (no --model_name_or_path), which
    learns little at the stock TrainingArguments settings: `scratch_defaults` too, with a warm-up of
    `warmup_fraction` of the steps (at most `warmup_cap`). A config file or flag wins over all of them.
    """
    def adaptive_defaults(parsed: tuple[Any, ...]) -> dict[str, Any]:
        model_args, training_args = parsed[0], parsed[-1]
        if model_args.model_name_or_path:
            return run_length_defaults(training_args.max_steps)
        defaults = run_length_defaults(training_args.max_steps, warmup_fraction=warmup_fraction,
                                       warmup_cap=warmup_cap)
        return {**scratch_defaults, **defaults}

    return adaptive_defaults


# ---------------------------------------------------------------------------------------------------------
# checks


def check_training_arguments(training_args: Any, explicit: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse training flags the recipes would otherwise run differently from what they say.

    - `--max_steps 0` trains 1 step and a negative value other than -1 trains `--num_train_epochs`;
    - `--do_train/--do_eval/--do_predict false`: the recipes always train, then evaluate on the
      validation and test splits; a flag saying otherwise would be ignored;
    - `--predict_with_generate false` (translation): BLEU/chrF need generated ids, and the metric would
      fail on logits after the whole training run;
    - a `--resume_from_checkpoint` that is not a directory: the Trainer would only find out after the data,
      tokenizer and model are built, with a traceback.
    """
    steps = training_args.max_steps
    if steps == 0 or steps < -1:
        raise ArgumentsError(f"--max_steps {steps}: give a positive number of optimizer steps, or -1 (the "
                             "default) to train for --num_train_epochs")
    if steps == -1 and not training_args.num_train_epochs > 0:
        raise ArgumentsError(f"--num_train_epochs {training_args.num_train_epochs}: must be > 0 (or set "
                             "--max_steps)")
    for flag in ("do_train", "do_eval", "do_predict"):
        if flag in explicit and not getattr(training_args, flag):
            raise ArgumentsError(f"--{flag} false is not supported: the recipes always train, then evaluate "
                                 "on the validation and test splits (remove the flag)")
    if getattr(training_args, "predict_with_generate", True) is False:
        raise ArgumentsError("--predict_with_generate false is not supported: the translation recipe scores "
                             "generated translations (BLEU/chrF); remove the flag")
    resume = training_args.resume_from_checkpoint
    if resume and not os.path.isdir(resume):
        raise ArgumentsError(f"--resume_from_checkpoint {resume}: no such directory (pass a checkpoint-N "
                             "directory that an earlier run saved with --save_strategy steps)")


def check_inert_flags(values: Sequence[Any], explicit: frozenset[str] | set[str]) -> None:
    """Refuse flags the user set (in the config file or as flags) that this run would ignore without a word:
    what each parsed dataclass's `inert_flags()` names, e.g. the size flags of a model built from scratch
    (`--d_model`, `--dropout`, ...) with `--model_name_or_path`, or `--ding_min_words` with `--train_file`."""
    for value in values:
        names, reason = value.inert_flags() if hasattr(value, "inert_flags") else ((), "")
        ignored = [name for name in names if name in explicit]
        if ignored:
            flags = ", ".join(f"--{name}" for name in ignored)
            raise ArgumentsError(f"{flags}: {reason}, so {'they' if len(ignored) > 1 else 'it'} would be ignored "
                                 "(remove it from the config file or the command line)")


def check_launch(training_args: Any) -> None:
    """Refuse launches that would silently run differently from what was asked.

    - started as several processes (`WORLD_SIZE` > 1) but transformers set up a one-process run: on a
      machine without GPU that happens with `--use_cpu false`; every rank would then train alone and
      write the same output directory;
    - FSDP asked for (accelerate FSDP config or `--fsdp`) but not set up: on CPU transformers builds a
      gloo DDP run (MULTI_CPU) and drops the FSDP settings. (Where FSDP is set up, the sparse trainers
      refuse it themselves: their FSDP path is untested; docs/distributed.md.)
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
            "settings. nm_hf's sparse trainers refuse FSDP anyway (that path is untested; FSDP2 below the "
            "Trainer is, see docs/distributed.md); use DDP: accelerate launch --config_file "
            "recipes/accelerate/multi_cpu.yaml (CPU) or --multi_gpu (GPUs)")


# ---------------------------------------------------------------------------------------------------------
# hub


@dataclasses.dataclass
class HubTarget:
    repo_id: str
    token: str | None
    private: bool

    def __repr__(self) -> str:  # never print the token
        return f"HubTarget(repo_id={self.repo_id!r}, token={REDACTED if self.token else None}, " \
               f"private={self.private})"


def take_over_hub_push(training_args: Any) -> HubTarget | None:
    """Read `--push_to_hub/--hub_model_id/--hub_token/--hub_private_repo` and switch the Trainer's own push off.

    The recipe pushes once at the end with `nm_hf.hub.push_to_hub` (finalized model, model card,
    results) instead of the Trainer pushing every checkpoint. The token is taken out of the
    TrainingArguments, so it is not pickled into the training_args.bin the Trainer saves. Call before
    building the Trainer.
    """
    if not training_args.push_to_hub:
        return None
    if not training_args.hub_model_id:
        raise ArgumentsError("--push_to_hub needs --hub_model_id (e.g. --hub_model_id your-name/model-2of4)")
    target = HubTarget(repo_id=training_args.hub_model_id, token=training_args.hub_token,
                       private=bool(training_args.hub_private_repo))
    training_args.push_to_hub = False
    training_args.hub_token = None
    return target


# ---------------------------------------------------------------------------------------------------------
# entry


def parse_recipe_args_or_exit(
    dataclass_types: Sequence[type],
    args: Sequence[str] | None,
    defaults: Mapping[str, Any],
    prog: str,
    adaptive_defaults: Callable[[tuple[Any, ...]], Mapping[str, Any]] | None = None,
    description: str | None = None,
) -> tuple[tuple[Any, ...], HubTarget | None]:
    """Parse, apply the recipe's run-dependent defaults, check the training flags and the launch.

    `adaptive_defaults(parsed)` returns defaults that depend on other values (e.g. a learning rate
    for a model trained from scratch, a logging interval sized to `--max_steps`); they apply only to
    fields the user set neither in the config file nor as a flag. The last dataclass must be the
    TrainingArguments. Bad input exits with `prog: error: ...` (status 2) and no traceback, before
    anything is loaded.
    """
    try:
        parsed = parse_recipe_args_full(dataclass_types, args, defaults, prog, description)
        if adaptive_defaults is not None:
            extra = {k: v for k, v in adaptive_defaults(parsed.values).items() if k not in parsed.explicit}
            if extra:
                logger.debug(f"recipe defaults for this run: {extra}")
                parsed = parse_recipe_args_full(dataclass_types, args, {**defaults, **extra}, prog, description)
        training_args = parsed.values[-1]
        check_training_arguments(training_args, parsed.explicit)
        check_inert_flags(parsed.values, parsed.explicit)
        hub = take_over_hub_push(training_args)
        check_launch(training_args)
    except ValueError as err:  # ArgumentsError and the dataclasses' own checks
        exit_with_error(prog, err)
    return parsed.values, hub


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
# the command line and its secrets


def launch_command(argv: Sequence[str] | None = None) -> str:
    """The command line of this run (secrets redacted), as `accelerate launch ...` when started by
    accelerate/torchrun."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(argv[0]) if argv and os.path.isabs(argv[0]) else (argv[0] if argv else "")
    parts = redact_command([script, *argv[1:]])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ:
        prefix = ["accelerate", "launch"]
        if world > 1:
            prefix += ["--num_processes", str(world)]
        return shlex.join(prefix + parts)
    return shlex.join(["python", *parts])


def process_elapsed_seconds() -> float:
    """Seconds since this process started, imports included.

    On Linux from the kernel's record of the start (`/proc/self/stat` starttime against the boot
    clock); elsewhere, since `nm_hf.recipe` was imported.
    """
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks
        elapsed = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        if elapsed >= 0:
            return elapsed
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return time.monotonic() - _IMPORTED_AT


def _cpu_model() -> str:
    """The CPU's model name: Linux's /proc/cpuinfo, else what `platform` knows ("" when nothing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment() -> dict[str, Any]:
    """What a run's numbers depend on beyond its command: package versions, the device, the CPU and the
    instruction set torch's CPU kernels dispatch to, torch's thread count and the number of processes.

    Recorded so that two runs of one command that differ in the last digits can be told apart by machine.
    No host name, user or path.
    """
    import accelerate

    from nm_hf.card import framework_versions

    versions = dict(framework_versions())
    versions["accelerate"] = accelerate.__version__
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "versions": versions,
        "device": device,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
