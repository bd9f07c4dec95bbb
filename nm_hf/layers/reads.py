"""Direct weight reads: a module whose code reads a sparse layer's `weight` instead of calling the layer.

A model may use a layer's weight without running the layer's forward: LayoutLMv3 indexes its relative-position
Linears as lookup tables (`self.rel_pos_bias.weight.t()[index]`), Mamba passes `dt_proj` / `x_proj` / `out_proj`'s
weights to fused kernels, torch's `nn.TransformerEncoderLayer` hands its linears' weights to a fused eval path. The
mask a sparse layer applies in its forward would not reach those computations. `sparsify` finds such reads
(`nm_hf.layers.read_scan`: transformers' `force_accelerate_hooks` declarations and the source of the modules' forwards) and
calls `expose_weight_reads(reader, paths)`: while the reading module runs, each directly-read sparse layer under it
has its forward tensor (`SparseLayerMixin.forward_tensor`: `W * mask` with the method's gradient rule in training,
the cached N:M weight in eval without gradients, S-STE's weight, ...) in its instance `__dict__` under `weight`.
Attribute lookup finds that entry before `nn.Module.__getattr__` reaches `_parameters`, so every read computes with
the masked tensor, and a call of the layer inside the reader uses it as is (no second mask); `named_parameters`, the
state dict and the optimizer still see the dense Parameter. The same device as the expert weights
(`nm_hf.layers.experts`), with module hooks instead of a class swap (the reader may be the root model, whose class
name `save_pretrained` records).

The hooks are module-level functions and find their layers from a tuple of child paths stored on the reader, so a
deep copy or a pickle of the model carries working hooks that act on the copy's own layers. A forward pre-hook
exposes the tensors (once per reader call: one mask computation for every read in it); a forward hook registered
with `always_call=True` removes them, also when the forward raises. A layer already exposed by a reader around this
one (a grandparent reading it too) is left to that reader. An interrupt that is no `Exception` (KeyboardInterrupt)
skips torch's always-called hooks: the next call of the same reader, and `model.train()` / `model.eval()`, drop
what it left exposed.

FSDP2: the reader must run inside the forward of the `fully_shard` unit that holds the layer (the same unit, or the
layer in a unit around the reader), where the weight is the all-gathered tensor. A layer that is a unit of its own
below the reader (or inside one) is this rank's shard while the reader runs: plain FSDP2 fails on such a read
("got mixed torch.Tensor and DTensor"), and the pre-hook refuses it first with the names of the reader, the layer and
the unit (one `isinstance` per read layer and call when the weight is no `DTensor`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

from .base import SparseLayerMixin, is_sharded, is_sparse_layer
from .read_scan import module_at

__all__ = ["expose_weight_reads", "remove_weight_reads", "weight_readers"]

#: on a reading module: the paths (tuples of child names) of the layers under it whose weight its code reads
READS_ATTRIBUTE = "_nm_weight_reads"

#: on a reading module: its name in the model `sparsify` was given, for messages ("" for that model itself)
NAME_ATTRIBUTE = "_nm_weight_reads_name"

#: per thread: the reader calls running now, innermost last, each with the layers it exposed
_OPEN = threading.local()


def _open_calls() -> list[tuple[nn.Module, list[SparseLayerMixin]]]:
    calls = getattr(_OPEN, "calls", None)
    if calls is None:
        calls = _OPEN.calls = []
    return calls


def _sparse_layer_at(reader: nn.Module, path: tuple[str, ...]) -> SparseLayerMixin | None:
    """The sparse layer at `path` under `reader` (through a PEFT wrapper's `base_layer`), else None."""
    module: Any = module_at(reader, path)
    for _ in range(4):
        if is_sparse_layer(module) and isinstance(module, nn.Module):
            return module
        module = getattr(module, "base_layer", None)
        if not isinstance(module, nn.Module):
            return None
    return None


def _hide(layers: list[SparseLayerMixin]) -> None:
    for layer in layers:
        layer.__dict__.pop("weight", None)
    layers.clear()


def _refuse_a_shard_read(reader: nn.Module, path: tuple[str, ...], layer: SparseLayerMixin) -> None:
    """Raise when FSDP2 holds the layer's weight sharded in a `fully_shard` unit below the reader (the reader runs
    outside that unit's forward, so it would read this rank's shard)."""
    if not is_sharded(layer.weight):
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [module_at(reader, path[:depth]) for depth in range(1, len(path) + 1)]
    units = [path[:depth] for depth, module in enumerate(modules, 1) if isinstance(module, FSDPModule)]
    if isinstance(layer, FSDPModule) and layer is not modules[-1]:  # a PEFT wrapper's `base_layer` sharded
        units.append((*path, "base_layer"))
    if not units:  # held by the reader's unit or one around it (then read outside that unit's forward): not refused
        return
    name = reader.__dict__.get(NAME_ATTRIBUTE)  # None: not known, the paths are given relative to the reader
    kind = next(cls for cls in type(reader).__mro__ if not issubclass(cls, FSDPModule)).__name__  # not FSDP<kind>
    reader_text = kind if name is None else f"'{name}' ({kind})" if name else f"the model ({kind})"
    named = ", ".join(repr(".".join(filter(None, (name, *unit)))) for unit in units)
    raise ValueError(
        f"nm_hf: {reader_text} reads the weight of '{'.'.join(filter(None, (name, *path)))}' in its forward, but "
        f"fully_shard made {named} {'an FSDP2 unit' if len(units) == 1 else 'FSDP2 units'} below that module, so "
        f"the read gets this rank's shard: apply fully_shard to the reading module (or a module above it) and not "
        f"to {named}, so that the layer is all-gathered while the reader runs")


def _expose_read_weights(reader: nn.Module, args: Any) -> None:
    """Forward pre-hook of a reading module: expose the forward tensor of each directly-read sparse layer."""
    calls = _open_calls()
    for index, (owner, _) in enumerate(calls):
        if owner is reader:  # a call of this reader that never finished (interrupted): what it exposed is stale
            for _, layers in calls[index:]:
                _hide(layers)
            del calls[index:]
            break
    exposed: list[SparseLayerMixin] = []
    calls.append((reader, exposed))  # (popped by the always-called forward hook, even when this hook raises)
    live = {id(layer) for _, layers in calls for layer in layers}
    try:
        for path in reader.__dict__.get(READS_ATTRIBUTE, ()):
            layer = _sparse_layer_at(reader, path)
            if layer is None or id(layer) in live:  # exposed by a reader around this one: its tensor holds
                continue
            layer.__dict__.pop("weight", None)  # left by an interrupted call
            _refuse_a_shard_read(reader, path, layer)
            layer.__dict__["weight"] = layer.forward_tensor()
            exposed.append(layer)
            live.add(id(layer))
    except BaseException:
        _hide(exposed)
        raise


def _hide_read_weights(reader: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called) of a reading module: remove what its pre-hook exposed."""
    calls = _open_calls()
    for index in range(len(calls) - 1, -1, -1):
        if calls[index][0] is reader:
            for _, layers in calls[index:]:  # (calls above it could only be interrupted ones)
                _hide(layers)
            del calls[index:]
            return


def expose_weight_reads(reader: nn.Module, paths: list[tuple[str, ...]], name: str | None = None) -> None:
    """While `reader` runs, let reads of the `weight` of the sparse layers at `paths` under it (tuples of child
    names) see their forward tensors (see the module docstring). Adds to the paths of an earlier call. `name`: the
    reader's name in the model ("" for the model itself), for error messages."""
    if name is not None:
        reader.__dict__[NAME_ATTRIBUTE] = name
    known = reader.__dict__.get(READS_ATTRIBUTE)
    if known is None:
        reader.register_forward_pre_hook(_expose_read_weights)
        reader.register_forward_hook(_hide_read_weights, always_call=True, prepend=True)
        known = ()
    reader.__dict__[READS_ATTRIBUTE] = tuple(dict.fromkeys((*known, *(tuple(p) for p in paths))))


def remove_weight_reads(model: nn.Module) -> None:
    """Remove the hooks and the state `expose_weight_reads` put on `model`'s modules (`finalize`)."""
    for module in model.modules():
        module.__dict__.pop(NAME_ATTRIBUTE, None)
        if module.__dict__.pop(READS_ATTRIBUTE, None) is None:
            continue
        for hooks, function in ((module._forward_pre_hooks, _expose_read_weights),
                                (module._forward_hooks, _hide_read_weights)):
            for key in [key for key, hook in hooks.items() if hook is function]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def weight_readers(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[SparseLayerMixin]]]:
    """(module name, module, the sparse layers whose weight it reads and exposes) for every reading module."""
    for name, module in model.named_modules():
        paths = module.__dict__.get(READS_ATTRIBUTE)
        if paths:
            layers = [layer for path in paths if (layer := _sparse_layer_at(module, path)) is not None]
            yield name, module, layers
