"""`SparsityArguments`: the N:M sparsity flags, for your own training scripts (parsed by `HfArgumentParser`).

    parser = HfArgumentParser((SparsityArguments, Seq2SeqTrainingArguments))
    sparsity_args, training_args = parser.parse_args_into_dataclasses()
    trainer = SparseSeq2SeqTrainer(..., sparsity_config=sparsity_args.to_config())

Every value is checked when the dataclass is built, so a bad flag fails at parse time, before any
data is loaded, with a message that names the flag. The recipes' data and model flags live in
`nm_hf.recipe.args` (recipe support, which the library core does not import).

This module deliberately does not use `from __future__ import annotations`: `HfArgumentParser` needs
real type objects to pick argparse types and choices.
"""

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .config import DECAY_MODES, SparsityConfig
from .methods import available_methods

__all__ = ["SparsityArguments", "parse_module_selector", "parse_method_args"]

# A selector value containing one of these characters is a regex; otherwise a comma-separated name list.
_REGEX_CHARS = set("^$*+?()[]{}|\\")


def parse_module_selector(value: str | None, flag: str) -> str | list[str] | None:
    """Turn a `--target_modules`/`--exclude_modules` string into what `SparsityConfig` takes.

    "all-linear" stays as is; a value with regex metacharacters (other than ".") is a regex matched
    against full module names; anything else is a comma-separated list of module names, each matching
    exactly or as a dotted suffix ("q_proj", "self_attn.q_proj").
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise ValueError(f"{flag} is empty; use 'all-linear', a comma-separated list of module names or a regex")
    if text in ("all-linear", "all"):
        return text
    if _REGEX_CHARS.intersection(text):
        try:
            re.compile(text)
        except re.error as err:
            raise ValueError(f"{flag} {text!r} is not a valid regex: {err}") from None
        return text
    names = [part.strip() for part in text.split(",")]
    if any(not name for name in names):
        raise ValueError(f"{flag} {text!r} has an empty entry; write names separated by single commas")
    bad = [name for name in names if not re.fullmatch(r"[\w.\-]+", name)]
    if bad:
        raise ValueError(f"{flag}: {bad[0]!r} is not a module name (letters, digits, '_', '.', '-')")
    return names


def _typed(text: str) -> Any:
    """A `--method_args` value with its type inferred: bool, None, int, float, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def parse_method_args(value: str | dict[str, Any] | None, flag: str = "--method_args") -> dict[str, Any]:
    """`"decay_steps=500,schedule=linear"` (or a JSON object, which a YAML config's mapping becomes) -> dict.

    Values get their type inferred: `true`/`false` -> bool, `none`/`null` -> None, integers -> int,
    other numbers (`1e-8`, `0.5`) -> float, anything else stays a string. Which keys and values are
    valid is the method's business (checked by `SparsityConfig`).
    """
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {text!r} is not a valid JSON object: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{flag} {text!r} must be a JSON object or key=value pairs")
        return parsed
    args: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key) or not raw:
            raise ValueError(f"{flag}: {item.strip()!r} must look like key=value (e.g. decay_steps=500); separate "
                             "pairs with commas")
        if key in args:
            raise ValueError(f"{flag}: {key!r} is given twice")
        args[key] = _typed(raw)
    return args


@dataclass
class SparsityArguments:
    """How to sparsify: the N:M pattern, the training method and which layers."""

    sparsity: str = field(
        default="2:4",
        metadata={"help": "N:M pattern: keep N of every M consecutive weights along the input dimension."},
    )
    method: str = field(
        default="sr-ste",
        metadata={
            "help": "sr-ste (mask from dense weights each step, pruned weights decayed), ste (same, no decay), "
            "fixed (one-shot magnitude mask, frozen), dense (layers patched but unmasked: baseline), s-ste "
            "(soft-thresholded, rescaled weights), decaying-mask (pruned weights fade out over a schedule) or "
            "step (dense AdamW until the second moment settles, then STE with it frozen); see docs/concepts.md.",
            "choices": available_methods(),
        },
    )
    decay: float = field(
        default=2e-4, metadata={"help": "SR-STE's lambda_w: strength of the pull of pruned weights towards 0. "
                                "2e-4 is the paper's; under AdamW 2e-4 and 1 trained equally well here, 1 with "
                                "steadier masks (docs/concepts.md, Decay placement)."}
    )
    decay_mode: str = field(
        default="gradient",
        metadata={
            "help": "gradient (the paper's: added to the weight gradient) or decoupled (applied after each "
            "optimizer step, like AdamW's weight decay).",
            "choices": list(DECAY_MODES),
        },
    )
    target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Layers to sparsify: 'all-linear' (every nn.Linear/Conv1D and expert weight except heads and "
            "tied output embeddings), 'all' (those plus dense convolutions), a comma-separated list of module names (exact or dotted suffix: 'q_proj,v_proj') "
            "or a regex matched against full module names ('.*decoder.*fc[12]')."
        },
    )
    exclude_modules: str | None = field(
        default=None, metadata={"help": "Layers to leave dense; same forms as --target_modules."}
    )
    method_args: str | None = field(
        default=None,
        metadata={"help": "The method's own hyperparameters as key=value pairs separated by commas, e.g. "
                  "'decay_steps=500,schedule=exponential' (decaying-mask; steps are optimizer steps) or "
                  "'switch_threshold=1e-7' (step); values are read as bool (true/false), none, int, float or "
                  "text. Unknown keys and bad values are refused (see docs/concepts.md for each method's)."},
    )
    transposable: bool = field(
        default=False,
        metadata={"help": "Masks N:M along the rows and the columns of every MxM block, so the transposed weight "
                  "is N:M too (1:2, 1:4, 2:4, 3:4; methods that re-choose their mask)."},
    )
    mask_update_interval: int = field(
        default=1,
        metadata={"help": "Re-choose the masks once every this many optimizer steps instead of every step "
                  "(2by4-pretrain uses 40; methods that re-choose their mask)."},
    )

    def __post_init__(self) -> None:
        self.to_config()  # fail at parse time, naming the flag

    def to_config(self) -> SparsityConfig:
        """The `SparsityConfig` these flags describe; `ValueError` naming the flag on bad input."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.sparsity))
        if not match:
            raise ValueError(f"--sparsity must look like N:M (e.g. 2:4), got {self.sparsity!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if n < 1 or m < 1:
            raise ValueError(f"--sparsity {self.sparsity}: N and M must be positive")
        if n > m:
            raise ValueError(f"--sparsity {self.sparsity}: N must be <= M (keep N of every M weights)")
        if self.method not in available_methods():
            raise ValueError(f"--method must be one of {', '.join(available_methods())}; got {self.method!r}")
        if self.decay_mode not in DECAY_MODES:
            raise ValueError(f"--decay_mode must be one of {', '.join(DECAY_MODES)}; got {self.decay_mode!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not self.decay >= 0:
            raise ValueError(f"--decay must be a number >= 0, got {self.decay!r}")
        target = parse_module_selector(self.target_modules, "--target_modules")
        exclude = parse_module_selector(self.exclude_modules, "--exclude_modules")
        method_args = parse_method_args(self.method_args)
        interval = self.mask_update_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"--mask_update_interval must be a positive integer, got {interval!r}")
        if not isinstance(self.transposable, bool):
            raise ValueError(f"--transposable must be true or false, got {self.transposable!r}")
        try:
            return SparsityConfig(n=n, m=m, method=self.method, decay=float(self.decay), decay_mode=self.decay_mode,
                                  target_modules=target, exclude_modules=exclude, method_args=method_args,
                                  transposable=self.transposable, mask_update_interval=interval)
        except ValueError as err:  # name the flag, not the config field
            raise ValueError(re.sub(r"^SparsityConfig\.(\w+)", r"--\1", str(err))) from None
