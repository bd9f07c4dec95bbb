"""`fixed`: one-shot magnitude mask chosen at `sparsify` time and frozen (the mask-at-init baseline).

Pruned weights are zeroed when the layer is sparsified and get zero gradient afterwards, so the mask
recomputed from the weights stays the one chosen then. A kept weight that lands exactly on 0.0
ties with the pruned zeros: ties go to the current mask.
"""

from __future__ import annotations

import math

import torch

from ..masks import pruned_nonzero
from .base import SparsityMethod


class FixedMethod(SparsityMethod):
    name = "fixed"
    summary = ("Fixed mask: the N:M mask is chosen once by weight magnitude when the model is sparsified and "
               "stays frozen; pruned weights are zero and receive no gradient.")
    recomputes_mask = False

    @torch.no_grad()
    def prepare(self, layer) -> None:
        layer.weight.masked_fill_(~layer.current_mask(), 0)
        layer.restamp_mask()

    def ranking_weight(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """Previously kept weights rank one ulp higher, so an exact 0.0 among them cannot move the mask.

        Weights loaded from elsewhere (zeros in other places) still decide the mask.
        """
        previous = layer.cached_mask()
        if previous is None or previous.shape != weight.shape or previous.device != weight.device:
            return weight
        magnitude = weight.abs()
        return torch.where(previous, torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)), magnitude)

    def unchanged_mask(self, layer, weight: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """The previous mask while every weight it prunes is still ±0.0 (what training leaves them).

        Ranking would choose it again: its kept weights rank one ulp above 0 and the pruned ones at 0,
        so each group keeps its n (ties go to the mask). One read of the weights instead of a ranking;
        optimizers leave the pruned weights +0.0 (their gradient is zero), and then the weight is its own
        masked copy (`exact`), which saves the masking passes of forward and backward.
        """
        previous = layer.cached_mask()
        if (previous is None or layer.nm_transposable or previous.shape != weight.shape
                or previous.device != weight.device):
            return None
        if not pruned_nonzero(weight, previous, signed_zeros=True):
            return previous, True
        if not pruned_nonzero(weight, previous):  # some pruned -0.0: same mask, but masking writes +0.0
            return previous, False
        return None

    def freezes_pruned(self, layer) -> bool:
        return True
