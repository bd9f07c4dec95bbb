"""The method registry: every N:M training method is one registered `SparsityMethod` object.

A method owns everything method-specific: whether the forward pass is masked, how the mask is
ranked (and whether it may move), the forward weight and the weight-gradient rule, what happens
after each optimizer step, its own hyperparameters (`SparsityConfig.method_args`, validated here)
and the sentence the model card uses. No other module compares method names. Adding a method is
one new file in this package plus one `register_method(...)` line below (see docs/extending.md).
"""

from __future__ import annotations

from .base import (
    MaskedWeight,
    SparsityMethod,
    UnknownMethodError,
    available_methods,
    get_method,
    register_method,
)
from .decaying_mask import DecayingMaskMethod
from .dense import DenseMethod
from .fixed import FixedMethod
from .s_ste import SSTEMethod
from .sr_ste import SRSTEMethod
from .ste import STEMethod
from .step import STEPMethod

__all__ = ["SparsityMethod", "MaskedWeight", "register_method", "get_method", "available_methods",
           "UnknownMethodError"]

for _method in (SRSTEMethod(), STEMethod(), FixedMethod(), DenseMethod(), SSTEMethod(), DecayingMaskMethod(),
                STEPMethod()):
    register_method(_method)
