"""Per-layer sparsity tables, from a live model or straight from saved tensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .injection import iter_sparse_layers
from .layers import iter_targets
from .masks import nm_group_counts
from .record import CONFIG_KEY

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report", "layer_sparsity"]


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    pattern: str
    sparsity: float  # fraction of exact zeros in the weight the forward pass uses
    nm_ok: bool  # every group of m along the input dimension has at most n non-zeros
    numel: int
    zeros: int
    #: why the pattern cannot hold whatever the values (the input size is not a multiple of m); "" if it can
    reason: str = ""

    @property
    def verdict(self) -> str:
        """The "N:M holds" cell: yes, NO, or NO with the reason no value could make it hold."""
        return "yes" if self.nm_ok else f"NO ({self.reason})" if self.reason else "NO"


@dataclass
class SparsityReport:
    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total_zeros(self) -> int:
        return sum(row.zeros for row in self.layers)

    @property
    def total_numel(self) -> int:
        return sum(row.numel for row in self.layers)

    @property
    def sparsity(self) -> float:
        return self.total_zeros / self.total_numel if self.total_numel else 0.0

    @property
    def nm_ok(self) -> bool:
        return bool(self.layers) and all(row.nm_ok for row in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(row) for row in self.layers],
            "total": {"numel": self.total_numel, "zeros": self.total_zeros,
                      "sparsity": self.sparsity, "nm_ok": self.nm_ok},
        }

    def to_markdown(self) -> str:
        lines = ["| layer | shape | n:m | sparsity | N:M holds |", "|---|---|---|---|---|"]
        for row in self.layers:
            shape = "x".join(map(str, row.shape))
            lines.append(f"| {row.name} | {shape} | {row.pattern} | {row.sparsity:.2%} | {row.verdict} |")
        lines.append(f"| **total** ({len(self.layers)} layers) | {self.total_numel:,} weights | | "
                     f"{self.sparsity:.2%} | {'yes' if self.nm_ok else 'NO'} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        head = f"{'layer':<{width}}  {'shape':>12}  {'n:m':>5}  {'sparsity':>8}  N:M holds"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            rows.append(f"{r.name:<{width}}  {shape:>12}  {r.pattern:>5}  {r.sparsity:>8.2%}  {r.verdict}")
        rows.append("-" * len(head))
        rows.append(f"{'total':<{width}}  {self.total_numel:>12,}  {'':>5}  {self.sparsity:>8.2%}  "
                    f"{'yes' if self.nm_ok else 'NO'}")
        return "\n".join(rows)


@torch.no_grad()
def layer_sparsity(name: str, weight: torch.Tensor, n: int, m: int, group_dim: int) -> LayerSparsity:
    """One row of the table for a weight whose groups of m run along `group_dim`."""
    if weight.is_meta:
        raise ValueError(f"layer {name!r}: its weight is on the meta device (offloaded to disk or not loaded), "
                         "so its zeros cannot be counted; load the model without device_map offloading, or run "
                         "`nm-hf inspect` on the saved checkpoint directory")
    zeros = int((weight == 0).sum())
    size = weight.shape[group_dim]
    reason = f"input size {size} is not divisible by m={m}" if size % m else ""
    ok = not reason and bool((nm_group_counts(weight, m, dim=group_dim) <= n).all())
    return LayerSparsity(name=name, shape=tuple(weight.shape), pattern=f"{n}:{m}",
                         sparsity=zeros / weight.numel() if weight.numel() else 0.0,
                         nm_ok=ok, numel=weight.numel(), zeros=zeros, reason=reason)




def sparsity_report(
    model: nn.Module, names: Iterable[str] | None = None, n: int | None = None, m: int | None = None
) -> SparsityReport:
    """Per-layer sparsity of a sparsified model, or of a finalized/reloaded one.

    For a model with sparse layers the rows describe the weights the forward pass uses
    (`weight * mask`). For a finalized or plainly reloaded model the targeted layers are read from
    the record `sparsify` left in `model.config` (or given as `names`, with `n` and `m`).
    """
    report = SparsityReport()
    sparse_layers = list(iter_sparse_layers(model))
    if sparse_layers and names is None:
        for name, layer in sparse_layers:
            report.layers.append(layer_sparsity(name, layer.effective_weight(), layer.nm_n, layer.nm_m,
                                                layer.group_dim))
        return report
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    source = "names=" if names is not None else "the sparsity record"
    if names is None:
        if not isinstance(record, dict):
            raise ValueError(f"{type(model).__name__} has no sparse layers and no '{CONFIG_KEY}' record in "
                             "its config; pass names=[...] to choose the layers")
        names = record.get("targeted_modules", [])
    if isinstance(record, dict):
        n, m = n or record["n"], m or record["m"]
    elif n is None or m is None:
        raise ValueError("without a sparsity record in the model config, pass n= and m= with names=")
    targets = {target.name: target for target in iter_targets(model)}
    modules = dict(model.named_modules())
    sparse = dict(sparse_layers)
    for name in names:
        if name in sparse:  # the weight its forward pass uses, not the dense one it trains
            layer = sparse[name]
            report.layers.append(layer_sparsity(name, layer.effective_weight(), n, m, layer.group_dim))
        elif name in targets:
            target = targets[name]
            report.layers.append(layer_sparsity(name, target.weight, n, m, target.group_dim))
        elif name in modules:
            raise ValueError(f"layer {name!r} from {source} is a {type(modules[name]).__name__} in "
                             f"{type(model).__name__}, not a layer kind nm_hf knows")
        else:
            raise ValueError(f"layer {name!r} from {source} is not in {type(model).__name__} (use full module names, "
                             f"e.g. {next(iter(targets), '?')!r})")
    return report
