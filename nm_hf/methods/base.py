"""`SparsityMethod`, the interface a training method implements, and the registry of methods."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # the layers call the methods, never the other way round at import time
    from ..layers.base import SparseLayerMixin

__all__ = ["SparsityMethod", "register_method", "get_method", "available_methods", "UnknownMethodError"]


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


class SparsityMethod:
    """Hooks a method overrides; the defaults describe plain STE (mask recomputed, dense gradient).

    Methods are stateless singletons: per-layer state (the mask cache, the method's arguments)
    lives on the layer, so one object serves every layer and every model.
    """

    #: registry key, e.g. "sr-ste"
    name: ClassVar[str] = ""
    #: one sentence for docs and the model card
    summary: ClassVar[str] = ""
    #: False: layers are patched for bookkeeping only and the forward pass is dense
    masks_forward: ClassVar[bool] = True
    #: True: `SparsityConfig.decay` / `decay_mode` mean something for this method
    uses_decay: ClassVar[bool] = False
    #: defaults of the method's own hyperparameters (`SparsityConfig.method_args`)
    arg_defaults: ClassVar[Mapping[str, Any]] = {}

    # ------------------------------------------------------------------ configuration

    def check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Validated `method_args` with defaults filled in; unknown keys are refused."""
        if not isinstance(args, Mapping):
            raise ValueError(f"SparsityConfig.method_args must be a dict, got {type(args).__name__}")
        unknown = [key for key in args if key not in self.arg_defaults]
        if unknown:
            known = ", ".join(sorted(self.arg_defaults)) or "none"
            hints = [difflib.get_close_matches(key, list(self.arg_defaults), n=1) for key in unknown]
            hint = "".join(f" (did you mean {h[0]!r}?)" for h in hints if h)
            raise ValueError(f"method {self.name!r} has no argument(s) {', '.join(map(repr, unknown))}{hint}; "
                             f"its arguments: {known}")
        return {**self.arg_defaults, **args}

    def describe(self, record: Mapping[str, Any]) -> str:
        """How the model was trained, for the model card (a sentence)."""
        return self.summary

    # ------------------------------------------------------------------ layer hooks

    def prepare(self, layer: SparseLayerMixin) -> None:
        """Called once when `layer` is sparsified (after every targeted layer was converted)."""

    def ranking_weight(self, layer: SparseLayerMixin, weight: torch.Tensor) -> torch.Tensor:
        """What the mask ranks by magnitude (detached); default the weight itself."""
        return weight

    def gradient_decay(self, layer: SparseLayerMixin) -> float:
        """Extra `decay * (1 - mask) * W` added to the weight gradient in backward (0: none)."""
        return 0.0

    def freezes_pruned(self, layer: SparseLayerMixin) -> bool:
        """True: pruned weights get zero gradient (`dL/d(W*M) * M`)."""
        return False

    def after_optimizer_step(self, layer: SparseLayerMixin, lr: float) -> bool:
        """Runs after each optimizer step (`nm_hf.after_optimizer_step`); True if it changed the layer."""
        return False

    def extra_repr(self, layer: SparseLayerMixin) -> str:
        return ""


_REGISTRY: dict[str, SparsityMethod] = {}


def register_method(method: SparsityMethod, *, replace: bool = False) -> SparsityMethod:
    """Add `method` to the registry under `method.name` (an existing name needs `replace=True`)."""
    if not isinstance(method, SparsityMethod):
        raise TypeError(f"register_method needs a SparsityMethod instance, got {type(method).__name__}")
    if not method.name or not isinstance(method.name, str):
        raise ValueError(f"{type(method).__name__}.name must be a non-empty string")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered (pass replace=True)")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> SparsityMethod:
    """The registered method called `name`; `UnknownMethodError` lists the others."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        hint = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UnknownMethodError(f"method must be one of {', '.join(_REGISTRY)}; got {name!r}{suggestion}") from None
