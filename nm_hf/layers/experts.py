"""Mixture-of-experts expert weights: the fused 3-D Parameters of a transformers 5 experts module.

transformers 5 stores the experts of a MoE block as 3-D Parameters (`gate_up_proj`, `down_proj`, ...)
of shape `[num_experts, out, in]`, or `[num_experts, in, out]` when the class is decorated with
`use_experts_implementation(is_transposed=True)` (gpt_oss) or is Llama4's undecorated
`Llama4TextExperts`. The forward runs through `config._experts_implementation` ("eager",
"batched_mm", "grouped_mm", ...), which reads the Parameters directly, never an `nn.Linear`.

Each targeted Parameter becomes an `ExpertWeight`: the N:M state of one 3-D tensor (mask cache,
method, step counter; a `SparseLayerMixin` that is not a module), N:M per expert along the input
dimension (dim 2, or dim 1 when transposed). The experts module itself switches (in place, same
Parameters, same state-dict keys) to a subclass of its own class whose forward puts the method's
forward weight (`W * mask` with the method's gradient rule, S-STE's weight, ...) in the module's
instance `__dict__` under the Parameter's name for the duration of the call: attribute lookup finds
it before `nn.Module.__getattr__` reaches `_parameters`, so every experts implementation, including
ones registered later, computes with the masked tensor, while `state_dict`, the optimizer and
`named_parameters` still see the dense Parameter. (`torch.nn.utils.parametrize` would do the same
but renames the state-dict keys to `parametrizations.<name>.original`, which plain `from_pretrained`
cannot load.)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .base import SparseLayerMixin

__all__ = ["EXPERT_PARAMETERS", "ExpertWeight", "SparseExpertsMixin", "expert_parameters", "experts_transposed",
           "sparse_experts_class"]

#: names of the fused expert matrices transformers uses
EXPERT_PARAMETERS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
#: experts classes without `use_experts_implementation` whose layout is known: name -> transposed
_UNDECORATED = {"Llama4TextExperts": True}


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of `module`'s 3-D expert Parameters (`[num_experts, ., .]`), in registration order."""
    num_experts = getattr(module, "num_experts", None)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        return []
    params = module._parameters
    return [name for name, value in params.items()
            if name in EXPERT_PARAMETERS and value is not None and value.ndim == 3 and value.shape[0] == num_experts]


def experts_transposed(module: nn.Module) -> bool | None:
    """True for `[E, in, out]` storage, False for `[E, out, in]`, None when it cannot be told."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    for cls in type(module).__mro__:
        if cls.__name__ in _UNDECORATED:
            return _UNDECORATED[cls.__name__]
    params = module._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or gate_up.ndim != 3 or down.ndim != 3:
        return None
    plain = gate_up.shape[2] == down.shape[1] and gate_up.shape[1] == 2 * down.shape[2]
    transposed = gate_up.shape[1] == down.shape[2] and gate_up.shape[2] == 2 * down.shape[1]
    return None if plain == transposed else transposed


class ExpertWeight(SparseLayerMixin):
    """N:M state of one 3-D expert Parameter, owned by its experts module (`module.nm_parts[name]`)."""

    is_parameter_target = True

    def __init__(self, owner: nn.Module, parameter: str, group_dim: int) -> None:
        self.owner = owner
        self.parameter = parameter
        self.group_dim = group_dim

    @property
    def weight(self) -> nn.Parameter:
        return self.owner._parameters[self.parameter]

    @property
    def training(self) -> bool:
        return self.owner.training

    def forward_tensor(self) -> torch.Tensor:
        """The tensor the experts implementation computes with (autograd-aware in training)."""
        weight = self.weight
        if not self.is_masked:
            return weight
        if not self.training and not torch.is_grad_enabled():
            return self.cached_eval_weight()
        method = self.method
        if method.uses_step or self.nm_mask_interval > 1:
            self.warn_if_steps_uncounted()
        return method.forward_weight(self, weight, self.current_mask())

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.weight.shape))
        return f"ExpertWeight({self.parameter}: {shape}, group_dim={self.group_dim}{self.nm_extra_repr()})"


class SparseExpertsMixin:
    """Mixed in front of an experts class: its forward computes with the sparse layers' forward tensors."""

    nm_parts: dict[str, ExpertWeight]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        exposed = {name: part.forward_tensor() for name, part in self.nm_parts.items()}
        state = self.__dict__
        state.update(exposed)
        try:
            return super().forward(*args, **kwargs)
        finally:
            for name in exposed:
                state.pop(name, None)

    def train(self, mode: bool = True):
        if mode:  # the eval caches would only go stale and hold memory
            for part in self.nm_parts.values():
                part.forget_eval_weight()
        return super().train(mode)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}: n:m={part.pattern}, method={part.nm_method}" for name, part in self.nm_parts.items())
        base = super().extra_repr()
        return f"{base}, {parts}" if base else parts


_SPARSE_CLASSES: dict[type, type] = {}


def sparse_experts_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The sparse subclass of experts class `cls` (made once; importable from this module, so picklable)."""
    if cls not in _SPARSE_CLASSES:
        name = f"Sparse{cls.__name__}"
        while name in globals() and globals()[name] is not _SPARSE_CLASSES.get(cls):
            name += "_"
        sparse = type(name, (SparseExpertsMixin, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, sparse)
        _SPARSE_CLASSES[cls] = sparse
    return _SPARSE_CLASSES[cls]
