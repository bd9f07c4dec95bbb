"""`SparsityConfig`: what to sparsify and how, small enough to live in `config.json`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SparsityConfig", "METHODS", "DECAY_MODES", "CONFIG_KEY"]

METHODS = ("sr-ste", "ste", "fixed", "dense")
DECAY_MODES = ("gradient", "decoupled")
# Attribute of `model.config` (and key in config.json) that holds the sparsity record.
CONFIG_KEY = "nm_sparsity"


@dataclass
class SparsityConfig:
    """N:M sparsity settings.

    Args:
        n, m: keep `n` weights in every group of `m` consecutive weights along the input dimension.
        method: "sr-ste" (mask recomputed from dense weights each step, pruned weights decayed),
            "ste" (same, no decay), "fixed" (one-shot magnitude mask at `sparsify` time, frozen:
            the ASP baseline) or "dense" (layers patched but not masked, for fair comparisons).
        decay: SR-STE's lambda_w, the strength pulling pruned weights towards zero. The default is
            the paper's (tuned with SGD); Adam normalises each weight's update, so with Adam the
            gradient-mode decay only acts once `decay * |w|` outweighs a pruned weight's data gradient
            (the README's small-GPT-2 results use 1).
        decay_mode: "gradient" (the paper's: `decay * (1 - mask) * W` added to the gradient in
            backward, so it goes through clipping and Adam's normalisation) or "decoupled"
            (`W -= lr * decay * (1 - mask) * W` after each optimizer step, like AdamW's weight decay).
        target_modules: "all-linear", a list of module names (exact or dotted-suffix match) or a
            regex string (full match on the module name).
        exclude_modules: same forms as `target_modules`; removed from the targets.
    """

    n: int = 2
    m: int = 4
    method: str = "sr-ste"
    decay: float = 2e-4
    decay_mode: str = "gradient"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparsityConfig.{name} must be a positive integer, got {value!r}")
        if self.n > self.m:
            raise ValueError(f"SparsityConfig needs n <= m (keep n of every m weights), got {self.n}:{self.m}")
        if self.method not in METHODS:
            raise ValueError(f"SparsityConfig.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.decay_mode not in DECAY_MODES:
            raise ValueError(
                f"SparsityConfig.decay_mode must be one of {', '.join(DECAY_MODES)}; got {self.decay_mode!r}"
            )
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not self.decay >= 0:
            raise ValueError(f"SparsityConfig.decay must be a number >= 0, got {self.decay!r}")
        self.decay = float(self.decay)
        self.target_modules = _check_selector(self.target_modules, "target_modules", allow_none=False)
        self.exclude_modules = _check_selector(self.exclude_modules, "exclude_modules", allow_none=True)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def effective_decay(self) -> float:
        """The decay the layers apply: only SR-STE decays pruned weights."""
        return self.decay if self.method == "sr-ste" else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        """Inverse of `to_dict`; unknown keys (records added at save time) are kept in `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_pattern(cls, pattern: str, **kwargs: Any) -> SparsityConfig:
        """`SparsityConfig.from_pattern("2:4", method="ste")`."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not match:
            raise ValueError(f"sparsity pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
        return cls(n=int(match.group(1)), m=int(match.group(2)), **kwargs)


def _check_selector(value: Any, name: str, allow_none: bool) -> str | list[str] | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"SparsityConfig.{name} must be 'all-linear', a list of names or a regex")
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"SparsityConfig.{name}={value!r} is not a valid regex: {err}") from err
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"SparsityConfig.{name} must be a string or a list of non-empty strings, got {value!r}")
