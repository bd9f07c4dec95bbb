"""`SparsityConfig`: what to sparsify and how, small enough to live in `config.json`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .masks import check_transposable
from .methods import available_methods, get_method

__all__ = ["SparsityConfig", "DECAY_MODES", "TARGET_PRESETS"]

DECAY_MODES = ("gradient", "decoupled")
#: `target_modules` strings that are presets rather than regexes
TARGET_PRESETS = ("all-linear", "all")


@dataclass(frozen=True)
class SparsityConfig:
    """N:M sparsity settings (frozen: change one with `dataclasses.replace(config, n=1)`).

    Args:
        n, m: keep `n` weights in every group of `m` consecutive weights along the input dimension.
        method: a registered method (`nm_hf.methods.available_methods()`): "sr-ste" (mask recomputed
            from dense weights each step, pruned weights decayed), "ste" (same, no decay), "fixed"
            (one-shot magnitude mask at `sparsify` time, frozen), "dense" (layers patched but not
            masked, for fair comparisons), "s-ste" (soft-thresholded, rescaled weights),
            "decaying-mask" (pruned weights fade out over a schedule) or "step" (dense AdamW until
            AutoSwitch, then STE with the second moment frozen; trains with its own optimizer,
            `nm_hf.optim.StepAdamW`); see docs/concepts.md.
        decay: SR-STE's lambda_w, the strength pulling pruned weights towards zero. The default is
            the paper's (tuned with SGD). Under Adam a small gradient-mode decay leaves the masks
            flipping more, yet in the docs' AdamW sweep 2e-4 trained as well as 1 (docs/concepts.md,
            "Decay placement"). Only methods that use a decay read it; `sparsify` warns about
            another value (not 0 or the default) given to a method that does not.
        decay_mode: "gradient" (the paper's: `decay * (1 - mask) * W` added to the gradient in
            backward) or "decoupled" (`W -= lr * decay * (1 - mask) * W` after each optimizer step).
        target_modules: "all-linear" (every linear map: nn.Linear, GPT-2 Conv1D, mixture-of-experts
            expert weights; not heads or tied output embeddings), "all" (those plus dense convolutions;
            layers whose input size is not divisible by m are left dense and listed), a list of module
            names (exact or dotted-suffix match) or a regex string (full match on the module name).
        exclude_modules: same forms as `target_modules`; removed from the targets.
        method_args: the method's own hyperparameters (checked by the method; defaults filled in),
            e.g. decaying-mask's `schedule`, step's `switch_threshold`.
        transposable: choose masks that are N:M along both the rows and the columns of every m x m
            block (Hu et al., ICML 2024), so the transposed weight of the backward pass is N:M too.
            Supported for 1:2, 1:4, 2:4 and 3:4, with methods that re-choose their mask.
        mask_update_interval: re-choose the masks once every this many optimizer steps (counted by
            `nm_hf.after_optimizer_step`) instead of after every step; 2by4-pretrain uses 40. Only
            for methods that re-choose their mask.
    """

    n: int = 2
    m: int = 4
    method: str = "sr-ste"
    decay: float = 2e-4
    decay_mode: str = "gradient"
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    transposable: bool = False
    mask_update_interval: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparsityConfig.{name} must be a positive integer, got {value!r}")
        if self.n > self.m:
            raise ValueError(f"SparsityConfig needs n <= m (keep n of every m weights), got {self.n}:{self.m}")
        try:
            method = get_method(self.method)
        except ValueError as err:
            raise ValueError(f"SparsityConfig.{err}") from None
        if self.decay_mode not in DECAY_MODES:
            raise ValueError(
                f"SparsityConfig.decay_mode must be one of {', '.join(DECAY_MODES)}; got {self.decay_mode!r}"
            )
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"SparsityConfig.decay must be a finite number >= 0, got {decay!r}")
        object.__setattr__(self, "decay", float(decay))
        object.__setattr__(self, "target_modules", _check_selector(self.target_modules, "target_modules", False))
        object.__setattr__(self, "exclude_modules", _check_selector(self.exclude_modules, "exclude_modules", True))
        try:
            args = method.check_args(self.method_args if self.method_args is not None else {})
        except ValueError as err:
            raise ValueError(f"SparsityConfig.method_args: {err}") from None
        object.__setattr__(self, "method_args", args)
        self._check_mask_options(method)

    def _check_mask_options(self, method: Any) -> None:
        if not isinstance(self.transposable, bool):
            raise ValueError(f"SparsityConfig.transposable must be True or False, got {self.transposable!r}")
        interval = self.mask_update_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"SparsityConfig.mask_update_interval must be a positive integer, got {interval!r}")
        options = [name for name, on in (("transposable=True", self.transposable),
                                          (f"mask_update_interval={interval}", interval != 1)) if on]
        if options and not method.recomputes_mask:
            moving = ", ".join(m for m in available_methods() if get_method(m).recomputes_mask)
            raise ValueError(f"SparsityConfig.{' and '.join(options)} needs a method that re-chooses its mask during "
                             f"training ({moving}); method {self.method!r} does not")
        if self.transposable:
            try:
                check_transposable(self.n, self.m)
            except ValueError as err:
                raise ValueError(f"SparsityConfig.transposable: {err}") from None

    def __hash__(self) -> int:  # method_args is a dict: hash the JSON form
        return hash(repr(sorted(self.to_dict().items())))

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def effective_decay(self) -> float:
        """The decay the layers apply: 0 for methods that use none."""
        return self.decay if get_method(self.method).uses_decay else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (selectors as lists); `from_dict` inverts it."""
        data = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        data["method_args"] = dict(self.method_args)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        """Inverse of `to_dict`; unknown keys are refused (with a did-you-mean hint)."""
        if not isinstance(data, dict):
            raise TypeError(f"SparsityConfig.from_dict needs a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            parts = []
            for key in unknown:
                hint = difflib.get_close_matches(str(key), names, n=1)
                parts.append(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            raise ValueError(f"SparsityConfig has no field(s) {', '.join(parts)}; fields: {', '.join(names)}")
        return cls(**data)

    @classmethod
    def from_pattern(cls, pattern: str, **kwargs: Any) -> SparsityConfig:
        """`SparsityConfig.from_pattern("2:4", method="ste")`."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not match:
            raise ValueError(f"sparsity pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
        return cls(n=int(match.group(1)), m=int(match.group(2)), **kwargs)


def _check_selector(value: Any, name: str, allow_none: bool) -> str | tuple[str, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"SparsityConfig.{name} must be 'all-linear', a list of names or a regex")
    if isinstance(value, str):
        if allow_none and value in TARGET_PRESETS:  # exclude_modules: a preset would exclude every target
            raise ValueError(f"SparsityConfig.{name}={value!r}: the presets select targets; exclude layers by "
                             "name or regex (leave target_modules at its default to keep them all)")
        if value not in TARGET_PRESETS:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"SparsityConfig.{name}={value!r} is not a valid regex: {err}") from err
        return value
    if allow_none and isinstance(value, (list, tuple)) and not value:
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"SparsityConfig.{name} must be a string or a non-empty list of non-empty strings, "
                     f"got {value!r}")
