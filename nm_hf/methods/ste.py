"""`ste`: mask recomputed from the dense weights every step, straight-through gradient, no decay."""

from __future__ import annotations

from .base import SparsityMethod


class STEMethod(SparsityMethod):
    name = "ste"
    summary = ("STE: the N:M mask is recomputed from the dense weights after every optimizer step and the "
               "gradient of the masked weights is applied to all dense weights (straight-through).")
