"""`sr-ste` (Zhou et al., ICLR 2021): STE plus a decay that pulls the pruned weights towards zero.

The decay is `decay * (1 - mask) * W`. In "gradient" mode (the paper's) it is added to the weight
gradient in backward, so it goes through clipping and Adam's normalisation; in "decoupled" mode it is
applied after each optimizer step as `W -= lr * decay * (1 - mask) * W`, like AdamW's weight decay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import SparsityMethod


class SRSTEMethod(SparsityMethod):
    name = "sr-ste"
    summary = ("SR-STE (Zhou et al., ICLR 2021): the N:M mask is recomputed from the dense weights every step, "
               "the gradient is straight-through, and pruned weights get an extra decay towards zero.")
    uses_decay = True

    def describe(self, record: Mapping[str, Any]) -> str:
        return (f"{self.summary} Decay lambda_w = {record.get('decay', 0):g}, applied in "
                f"{record.get('decay_mode', 'gradient')} mode.")

    def gradient_decay(self, layer) -> float:
        if layer.nm_decay_mode != "gradient":
            return 0.0
        return layer.nm_decay * layer.nm_decay_scale

    def after_optimizer_step(self, layer, lr: float) -> bool:
        if layer.nm_decay_mode != "decoupled" or not layer.nm_decay:
            return False  # (checked before entering no_grad: this runs for every layer after every step)
        with torch.no_grad():
            weight = layer.weight
            weight.sub_(weight.masked_fill(layer.current_mask(), 0), alpha=lr * layer.nm_decay)
            layer.restamp_mask()  # shrinking pruned weights cannot change the mask
        return True

    def extra_repr(self, layer) -> str:
        return f", decay={layer.nm_decay:g} ({layer.nm_decay_mode})"
