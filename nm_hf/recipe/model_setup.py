"""Building the recipe's model and tokenizer without touching the output directory.

- `apply_config_overrides`: `--config_overrides "key=value,..."` on a model config, all checked first;
- `skeleton`: the model a builder makes, materialised without initialisation (meta device, then empty
  CPU memory): enough to check the layer selection before any data is loaded;
- `check_sparsity_targets`: `nm_hf.find_target_modules` with a one-line error naming the flags;
- `shared_tokenizer`: a tokenizer trained once (process 0) and sent to every process in memory; it is
  written to the output directory only with the trained model, so a run that fails early leaves a
  previous run's model and tokenizer untouched.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..injection import SparsifyError, find_target_modules
from .config_files import ArgumentsError

__all__ = ["apply_config_overrides", "check_sparsity_targets", "resume_dirs", "shared_tokenizer", "skeleton"]

logger = logging.getLogger(__name__)


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


def skeleton(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` on the meta device, then given uninitialised CPU memory: the real layer structure, shapes
    and weight tying at almost no cost (pages never touched are never allocated). Its weights are garbage."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def check_sparsity_targets(model: torch.nn.Module, sparsity_config: Any) -> list[str]:
    """The layers the sparse trainer will convert; `ArgumentsError` (one line, naming the flags) if the
    selection is empty or a selected layer cannot be N:M sparse (e.g. its input size is not a multiple
    of M)."""

    try:
        return find_target_modules(model, sparsity_config)
    except SparsifyError as err:
        problems = [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:] if line.strip()]
        shown = problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])
        detail = "; ".join(shown) or str(err)
        raise ArgumentsError(f"--sparsity {sparsity_config.pattern} --target_modules/--exclude_modules on "
                             f"{type(model).__name__}: {detail}") from None


def resume_dirs(training_args: Any) -> list[str]:
    """Where a resumed run's tokenizer is: the checkpoint resumed from, then the output directory (none
    for a fresh run, which trains its own)."""
    if not training_args.resume_from_checkpoint:
        return []
    return [str(training_args.resume_from_checkpoint), str(training_args.output_dir)]


def shared_tokenizer(training_args: Any, train: Callable[[], Any],
                     reuse_from: Sequence[str | os.PathLike[str] | None] = ()) -> Any:
    """A tokenizer trained once, on process 0, and given to every process; nothing is written to disk
    outside a temporary directory.

    BPE training may break ties differently from one run to the next, so replicas must not train
    their own: every process (every node too) gets process 0's files through a broadcast. The first
    directory of `reuse_from` holding a tokenizer.json (a resumed run's checkpoint) is loaded instead
    of training, so the vocabulary keeps matching the checkpoint's embeddings.
    """
    from transformers import AutoTokenizer

    for directory in reuse_from:
        if directory is not None and (Path(directory) / "tokenizer.json").is_file():
            logger.info(f"resuming: using the tokenizer saved in {directory}")
            return AutoTokenizer.from_pretrained(directory)
    distributed = (training_args.world_size > 1 and torch.distributed.is_available()
                   and torch.distributed.is_initialized())
    if not distributed or training_args.process_index == 0:
        start = time.perf_counter()
        tokenizer = train()
        logger.info(f"trained a tokenizer of {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s")
    if not distributed:
        return tokenizer
    payload: list[dict[str, bytes] | None] = [None]
    if training_args.process_index == 0:
        with tempfile.TemporaryDirectory(prefix="nm_hf_tokenizer_") as tmp:
            tokenizer.save_pretrained(tmp)
            payload = [{path.name: path.read_bytes() for path in Path(tmp).iterdir() if path.is_file()}]
    torch.distributed.broadcast_object_list(payload, src=0)
    if training_args.process_index == 0:
        return tokenizer  # the one that is saved with the model: without a loader's temporary-path settings
    files = payload[0]
    assert files is not None
    with tempfile.TemporaryDirectory(prefix="nm_hf_tokenizer_") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)
