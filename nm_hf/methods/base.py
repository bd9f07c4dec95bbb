"""`SparsityMethod`, the interface a training method implements, and the registry of methods."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..masks import apply_mask

if TYPE_CHECKING:  # the layers call the methods, never the other way round at import time
    from ..layers.base import SparseLayerMixin

__all__ = ["SparsityMethod", "MaskedWeight", "register_method", "get_method", "available_methods",
           "UnknownMethodError"]


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


class MaskedWeight(torch.autograd.Function):
    """`W * mask` with the default methods' weight gradient: straight-through, plus `decay * (1 - mask) * W`,
    or times the mask (`freeze_pruned`)."""

    @staticmethod
    def forward(ctx, weight, mask, decay, freeze_pruned):  # noqa: D401
        ctx.save_for_backward(weight if decay and not freeze_pruned else None, mask)
        ctx.decay, ctx.freeze_pruned = decay, freeze_pruned
        return apply_mask(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        if ctx.freeze_pruned:
            return apply_mask(grad, mask), None, None, None
        if ctx.decay:  # grad + decay * (1 - mask) * W in one temporary, rounded as that expression (no FMA)
            return apply_mask(weight, mask, keep=False).mul_(ctx.decay).add_(grad), None, None, None
        return grad, None, None, None


class SparsityMethod:
    """Hooks a method overrides; the defaults describe plain STE (mask recomputed, dense gradient).

    Methods are stateless singletons: per-layer state (the mask cache, the method's arguments, the
    step counter, `layer.nm_method_state`) lives on the layer, so one object serves every layer and
    every model.

    The forward weight: methods that keep the defaults of `forward_weight` and `bake` compute with
    `W * mask` through the layers' fused autograd function, with the weight gradient set by
    `gradient_decay` / `freezes_pruned`. A method whose forward weight is something else overrides
    `forward_weight` (autograd-aware) and `bake` (the same weight, without grad).
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
    #: True: the mask is re-chosen from the weights as training goes, so the mask options
    #: (`SparsityConfig.transposable`, `mask_update_interval`) mean something for this method
    recomputes_mask: ClassVar[bool] = True
    #: True: the method reads `layer.nm_step` (optimizer steps counted by `nm_hf.after_optimizer_step`)
    uses_step: ClassVar[bool] = False
    #: set for each subclass: True when it keeps the default `forward_weight` (the fused `W * mask` path)
    fused_forward: ClassVar[bool] = True
    #: the optimizer the method trains with (STEP: `nm_hf.optim.StepAdamW`); None: any optimizer will do.
    #: `SparseTrainer` and `nm_hf.create_sparse_optimizer` build it with AdamW's arguments (`lr`, `betas`,
    #: `eps`, `weight_decay`), `total_steps` and `optimizer_kwargs(layers)`, and refuse another optimizer
    optimizer_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.fused_forward = cls.forward_weight is SparsityMethod.forward_weight

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

    @property
    def has_prepare(self) -> bool:
        """True when the method defines its own `prepare` (it may write the weights, as `fixed` does):
        `sparsify` keeps a copy of the weights to undo it on an error, and only then."""
        return type(self).prepare is not SparsityMethod.prepare

    def ranking_weight(self, layer: SparseLayerMixin, weight: torch.Tensor) -> torch.Tensor:
        """What the mask ranks by magnitude (detached); default the weight itself."""
        return weight

    def unchanged_mask(self, layer: SparseLayerMixin, weight: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """`(mask, exact)` when ranking `weight` provably chooses the layer's previous `mask` again (the ranking
        is then skipped), else None (the default: always rank).

        `exact`: `weight` already equals `apply_mask(weight, mask)` bit for bit (its pruned entries are
        +0.0), so the training forward and backward use it without masking it. A bare mask is taken as
        `(mask, False)`.
        """
        return None

    def dense_training_forward(self, layer: SparseLayerMixin) -> bool:
        """True: the training forward uses the dense weight, no mask (STEP's precondition phase); the layers
        then compute no mask for it. Default False."""
        return False

    def gradient_decay(self, layer: SparseLayerMixin) -> float:
        """Extra `decay * (1 - mask) * W` added to the weight gradient in backward (0: none).

        Return it times `layer.nm_decay_scale` (the trainer's correction for gradient accumulation and fp16's
        loss scale); a non-zero value is how `SparseTrainer` knows a gradient decay is in use."""
        return 0.0

    def freezes_pruned(self, layer: SparseLayerMixin) -> bool:
        """True: pruned weights get zero gradient (`dL/d(W*M) * M`)."""
        return False

    def after_optimizer_step(self, layer: SparseLayerMixin, lr: float) -> bool:
        """Runs after each optimizer step (`nm_hf.after_optimizer_step`); True if it changed the layer.

        `layer.nm_step` already counts this step when the hook runs.
        """
        return False

    def forward_weight(self, layer: SparseLayerMixin, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The weight the training forward pass uses, autograd-aware, in the stored layout of `weight`.

        The layers call it only for methods that override it. With this default they run the fused
        `nm_linear` instead (same maths, but it saves the boolean mask rather than a masked copy of the
        weight); this body is that maths as a weight, for callers outside the layers.
        """
        return MaskedWeight.apply(weight, mask, self.gradient_decay(layer), self.freezes_pruned(layer))

    @torch.no_grad()
    def bake(self, layer: SparseLayerMixin, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The N:M weight the layer computes with outside training and `finalize` writes (no grad).

        `weight` may be the layer's own or one from a state dict (`nm_hf.injection.baked_weights`);
        `mask` is its mask. Default: `weight * mask` with exact +0.0 for pruned entries.
        """
        return apply_mask(weight, mask)

    def optimizer_kwargs(self, layers: Sequence[SparseLayerMixin]) -> dict[str, Any]:
        """Keyword arguments of `optimizer_class` beyond AdamW's and `total_steps`, for the model's sparse `layers`.

        Only called when `optimizer_class` is set; lets the optimizer see the layers it must watch or
        tell (STEP: the masked weights and the phase callback). Default: none.
        """
        return {}

    def check_state(self, layer: SparseLayerMixin, state: Mapping[str, Any]) -> dict[str, Any]:
        """Validated per-layer method state being restored (`nm_hf.load_sparse_training_state`).

        Methods that keep state in `layer.nm_method_state` (e.g. S-STE's scale) check it here; the
        default accepts only an empty state.
        """
        if state:
            raise ValueError(f"method {self.name!r} keeps no per-layer state, got keys {sorted(state)}")
        return {}

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
