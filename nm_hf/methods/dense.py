"""`dense`: layers patched for bookkeeping (same code path, metrics) but the forward pass is dense."""

from __future__ import annotations

from .base import SparsityMethod


class DenseMethod(SparsityMethod):
    name = "dense"
    summary = "Dense: no mask is applied (a baseline trained through the same code path)."
    masks_forward = False
    recomputes_mask = False  # the would-be mask is tracked, but no mask is used
