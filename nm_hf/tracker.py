"""`SparsityTracker`: how the N:M masks move during training (SAD, flip rate, pruned-weight norm).

SR-STE's argument (Zhou et al., 2021) is that plain STE keeps flipping the masks ("Sparse
Architecture Divergence", SAD) while SR-STE settles them. The tracker measures that, from a plain
PyTorch loop or through `SparseTrainer` (which uses this class; the logic lives only here):

    tracker = SparsityTracker(model)          # snapshot of the masks at the start of training
    for batch in loader:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        tracker.step()                        # counts mask flips caused by this optimizer step
        if step % 10 == 0:
            print(tracker.log_metrics(step))  # totals since the last log; appends a history record
    tracker.save("run/sparsity_history.json")

Definitions (sums over all tracked layers; per-layer values go into the history records):
- SAD (`sad`): number of mask entries that differ between now and the last `log_metrics` call,
  i.e. the L1 distance of the two binary masks; `sad_rate` divides by the number of masked weights.
- `sad_from_init`: the same against the masks at tracker creation (start of training).
- `flip_rate`: fraction of mask entries that changed in one optimizer step, averaged over the
  `step()` calls since the last log. One weight swapped into a group and one out count as 2 flips.
- `pruned_weight_norm`: L2 norm of the weights the mask currently removes (SR-STE drives it down).
- `sparsity`: fraction of exact zeros in `weight * mask`, the weights the layers compute with outside
  training (the dense weight for method "dense", whose would-be mask is still tracked so SAD compares
  across methods); a training forward may use more (STEP's dense phase, decaying-mask while alpha > 0).
After `nm_hf.finalize` a tracked layer's mask is read from its baked weight (its non-zeros, ties as
`current_mask` breaks them): SAD and sparsity are the finalized model's, the pruned-weight norm 0 (unchanged for "dense").

Cost: `step()` asks every layer for `current_mask()`, which is cached until the weights change, so the
next forward reuses it (for method "dense" it is an extra `nm_mask` per layer per step). `step(defer=True)`
(SparseTrainer's) leaves that to the next forward, which is told of the new mask through
`nm_hf.layers.add_mask_listener` and then makes mask and masked weight in one pass (see `step`). Counting the
flips is then one read of the two masks (`nm_hf.masks.count_changed`, a native kernel on CPU; with
`count_nonzero(mask ^ previous)` before it, 0.1-0.4% of a one-thread step of the Marian model in
`benchmarks/train_step.py`, which reports it), nothing when a layer kept its
mask; SAD and the other totals are computed only at `log_metrics`. Memory (the trade-off): the
previous step's mask is not copied but held by reference: it is the tensor the layer's mask cache
held (a recompute makes a new tensor, it never overwrites the cached one), so right after `step()` it
costs nothing, and up to 1 byte per weight only while a layer already holds a newer mask (a forward
between the optimizer step and `step()`, or `step()` not called every optimizer step). Two more masks
per layer are kept as packed bits (init and last log: 2 bits per weight), all on the weights' device;
the flip counters stay on the device too, so `step()` does not synchronise a GPU. (Packing each step's
mask instead held 3 bits per weight and cost about 5x the counting pass.)
Under DDP the weights (hence masks) are identical on every rank and everything is local, without any
collective. With weights sharded by FSDP2 (`DTensor`s sharded over one mesh dimension) each rank
keeps and counts the masks of its own shards (`SparseLayerMixin.current_mask`), and `log_metrics` /
`summary` sum the counts over the shards in one all-reduce: every rank must call them, and gets the
numbers one process would. The state (`state_dict`) of such a tracker is this rank's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ._files import atomic_write, atomic_write_text
from .injection import iter_sparse_layers
from .layers import mark_weights_updated
from .layers.base import add_mask_listener, is_sharded, is_sparse_layer, local_tensor
from .masks import count_changed_native, nm_mask, nm_mask_transposable
from .record import read_record

__all__ = ["SparsityTracker", "HISTORY_FILE", "TRACKER_STATE_FILE", "METRIC_PREFIX", "pack_bits",
           "unpack_bits", "popcount", "mark_weights_updated"]

#: file name of the history JSON in an output or checkpoint directory
HISTORY_FILE = "sparsity_history.json"
#: file name of the tracker state (`state_dict`) in a checkpoint directory
TRACKER_STATE_FILE = "sparsity_tracker.pt"
#: prefix of the metric names `log_metrics` returns (tensorboard/wandb group them under it)
METRIC_PREFIX = "sparsity/"
#: totals in every history record and (prefixed) in `log_metrics`' result
TOTAL_KEYS = ("sad", "sad_rate", "sad_from_init", "sad_from_init_rate", "flip_rate", "pruned_weight_norm",
              "sparsity")
_FORMAT = 1

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flattened boolean mask packed 8 per byte, most significant bit first (same as `numpy.packbits`)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: a boolean tensor of `shape`."""
    numel = math.prod(shape)
    bits = (packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits in a uint8 tensor, as a 0-dim int64 tensor on the same device (no sync)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(dtype=torch.int64)


class SparsityTracker:
    """Mask statistics of every sparse layer of `model`, from the moment it is created.

    Call `step()` after every optimizer step and `log_metrics(step)` whenever you log. See the module
    docstring for the metric definitions and the memory/cost notes.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = list(iter_sparse_layers(model))
        if not self._layers:
            raise ValueError(f"{type(model).__name__} has no sparse layers to track (call nm_hf.sparsify first)")
        self.names = [name for name, _ in self._layers]
        self.shapes = [tuple(layer.weight.shape) for _, layer in self._layers]
        self.numels = [layer.weight.numel() for _, layer in self._layers]
        self.num_masked_weights = sum(self.numels)
        self._model = weakref.ref(model)
        self.method = self.pattern = ""
        self.config: dict[str, Any] | None = None
        # what `_local_mask` needs once `finalize` has put a plain layer back (its baked weight)
        self._specs: dict[int, tuple[int, int, int, bool, bool]] = {}
        self._refresh_layers()
        self._group, self._shard = self._shard_group()
        self._sharded = [is_sharded(layer.weight) for _, layer in self._layers]
        self._local_shapes = [tuple(local_tensor(layer.weight).shape) for _, layer in self._layers]
        # sharded: the flip total summed over the shards at the last `_measure` (None: not summed since a load)
        self._reduced_total_flips: int | None = 0

        with torch.no_grad():
            masks = [self._local_mask(layer) for _, layer in self._layers]
            current = [pack_bits(mask) for mask in masks]
        self._init = current
        self._last_log = [p.clone() for p in current]
        # the masks of the previous step: the layers' own mask tensors, held by reference (see the module
        # docstring); `_prev` is the packed view `state_dict` saves
        self._prev_masks: list[torch.Tensor] = masks
        zeros = [torch.zeros((), dtype=torch.int64, device=p.device) for p in current]
        self._window_flips = [z.clone() for z in zeros]
        self._total_flips = [z.clone() for z in zeros]
        self.window_steps = 0
        self.total_steps = 0
        self.history: list[dict[str, Any]] = []
        # deferred counting (`step(defer=True)`): layers whose flips of the last step are not counted yet;
        # they are counted when the layer re-chooses its mask (listener) or, at the latest, before the next
        # optimizer step changes the weights again (global pre-step hook) or anything reads the counts
        self._pending = [False] * len(self._layers)
        ref = weakref.ref(self)
        handles = [add_mask_listener(layer, functools.partial(_on_new_mask, ref, i))
                   for i, (_, layer) in enumerate(self._layers) if not self._sharded[i]]
        handles.append(register_optimizer_step_pre_hook(functools.partial(_before_optimizer_step, ref)))
        weakref.finalize(self, _remove_all, handles)

    def _refresh_layers(self) -> None:
        """Read the method, pattern and masking of the layers that are still sparse, and the model's record when
        the method changed: a dense warm-up's switch (`--dense_warmup_fraction`) re-sparsifies the same layers
        in place with another method. A finalized layer keeps what was read last."""
        live = [layer for _, layer in self._layers if is_sparse_layer(layer)]
        for layer in live:
            self._specs[id(layer)] = (layer.nm_n, layer.nm_m, layer.group_dim, layer.nm_transposable, layer.is_masked)
        if not live:
            return
        methods = sorted({layer.nm_method for layer in live})
        patterns = sorted({layer.pattern for layer in live})
        method = methods[0] if len(methods) == 1 else "mixed"
        self.pattern = patterns[0] if len(patterns) == 1 else "mixed"
        if method != self.method:
            self.method = method
            model = self._model()
            record = read_record(model) if getattr(model, "config", None) is not None else None
            self.config = dict(record) if record is not None else None

    def _shard_group(self) -> tuple[Any, tuple[int, int]]:
        """The process group the layers' weights are sharded over (None: not sharded), and (rank, size) in it."""
        sharded = [(name, layer) for name, layer in self._layers if is_sharded(layer.weight)]
        if not sharded:
            return None, (0, 1)
        weight = sharded[0][1].weight
        mesh, dims = weight.device_mesh, [i for i, p in enumerate(weight.placements) if p.is_shard()]
        for name, layer in sharded:
            w = layer.weight
            layer_dims = [i for i, p in enumerate(w.placements) if p.is_shard()]
            if w.device_mesh != mesh or layer_dims != dims or len(dims) > 1:
                raise ValueError(f"SparsityTracker: layer {name!r} is sharded otherwise than the others or over "
                                 "several mesh dimensions; it supports weights sharded over one mesh dimension")
            try:
                layer.check_sharding()
            except ValueError as err:
                raise ValueError(f"SparsityTracker: layer {name!r}: {err}") from None
        if not dims:  # replicated DTensors: every rank holds everything
            return None, (0, 1)
        group = mesh.get_group(dims[0])
        return group, (dist.get_rank(group), dist.get_world_size(group))

    def _local_mask(self, layer: Any) -> torch.Tensor:
        if not is_sparse_layer(layer):  # finalized: the baked weight's own mask (nm_hf's tie rule, as current_mask)
            n, m, dim, transposable, _ = self._specs[id(layer)]
            scores = local_tensor(layer.weight).detach().abs()
            return (nm_mask_transposable if transposable else nm_mask)(scores, n, m, dim=dim)
        return local_tensor(layer.current_mask())

    # ------------------------------------------------------------------ per step

    @torch.no_grad()
    def step(self, mark_updated: bool = True, defer: bool = False) -> None:
        """Record the mask flips of one optimizer step (call it right after `optimizer.step()`).

        With `mark_updated` (the default) the weights are first marked as modified in place (see
        `mark_weights_updated`), so the masks are recomputed even when the optimizer did not bump the
        weights' version counter (fused AdamW does not); the next forward reuses these masks.

        With `defer` the flips are counted when each layer next re-chooses its mask, in the next forward,
        which then makes the mask and the masked weight in one pass instead of the tracker reading the
        weights once more now (SparseTrainer defers). Layers no forward re-masks (method "dense", unused
        layers) are counted before the next torch optimizer step or when the counts are read. The counts
        are the same as without `defer` as long as a forward or a torch optimizer step comes between
        this call and the next change to the weights, as in any training loop; weights changed twice by
        hand with neither in between count as one change. Sharded (FSDP2) layers are always counted now.
        """
        if mark_updated:
            mark_weights_updated(layer for _, layer in self._layers)
        self._settle()  # a step whose masks nothing has needed yet (see `defer`)
        for i in range(len(self._layers)):
            self._pending[i] = True
            if not defer or self._sharded[i]:
                self._settle_layer(i)
        self.window_steps += 1
        self.total_steps += 1

    def _count(self, index: int, mask: torch.Tensor, strict: bool = True) -> None:
        """Count the flips of layer `index` from its previous mask to `mask`, if its last step is uncounted.

        Not `strict` (called from a forward or another optimizer's step, not by the user): a mask that moved
        to another device or changed shape since is skipped with a warning rather than raising there."""
        if not self._pending[index]:
            return
        self._pending[index] = False
        prev = self._prev_masks[index]
        if mask.data_ptr() == prev.data_ptr():  # the layer kept its mask (no recompute): no flip
            return
        if not strict and (mask.device != prev.device or mask.shape != prev.shape):
            warnings.warn(f"SparsityTracker: the mask of {self.names[index]!r} moved from {prev.device} "
                          f"{tuple(prev.shape)} to {mask.device} {tuple(mask.shape)}; the flips of its last "
                          "step are not counted", UserWarning, stacklevel=2)
            return
        # one read of both: a Python int on CPU (no tensor made per layer and step), else a 0-dim tensor on the
        # device (no sync)
        flips = count_changed_native(mask, prev)
        if flips is None:
            flips = torch.count_nonzero(mask ^ prev)
        self._window_flips[index] += flips
        self._total_flips[index] += flips
        self._prev_masks[index] = mask

    def _settle_layer(self, index: int, strict: bool = True) -> None:
        layer = self._layers[index][1]
        if not is_sparse_layer(layer):  # finalized since (which settles first): nothing left to count
            self._pending[index] = False
            return
        self._count(index, self._local_mask(layer), strict)  # a recompute may count it first

    @torch.no_grad()
    def _settle(self, strict: bool = True, params: set[int] | None = None) -> None:
        """Count every deferred step now, from the layers' current masks (only the layers whose weight's
        id is in `params`, when given)."""
        for i, pending in enumerate(self._pending):
            if pending and (params is None or id(self._layers[i][1].weight) in params):
                self._settle_layer(i, strict)

    @property
    def _prev(self) -> list[torch.Tensor]:
        """The previous step's masks packed 8 per byte (what `state_dict` saves)."""
        return [pack_bits(mask) for mask in self._prev_masks]

    @_prev.setter
    def _prev(self, packed: list[torch.Tensor]) -> None:
        self._prev_masks = [unpack_bits(p, shape) for p, shape in zip(packed, self._local_shapes, strict=True)]

    # ------------------------------------------------------------------ per log

    @torch.no_grad()
    def _measure(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Current metrics (totals and per layer) and the packed current masks; changes nothing (but
        counts deferred steps, as would happen anyway)."""
        self._settle()
        self._refresh_layers()
        layers: dict[str, dict[str, Any]] = {}
        packed_now: list[torch.Tensor] = []
        sad = sad_init = zeros = 0
        pruned_sq = 0.0
        window = max(self.window_steps, 1)
        counts = self._local_counts(packed_now)
        for i, (name, _) in enumerate(self._layers):
            layer_sad, layer_sad_init, flips, nonzero, _ = (int(v) for v in counts[i].tolist())
            pruned_norm = math.sqrt(float(counts[i, 4]))
            layer_zeros = self.numels[i] - nonzero
            numel = self.numels[i]
            layers[name] = {
                "sad": layer_sad,
                "sad_from_init": layer_sad_init,
                "flips": flips,
                "flip_rate": flips / (window * numel) if self.window_steps else 0.0,
                "pruned_weight_norm": pruned_norm,
                "sparsity": layer_zeros / numel,
            }
            sad += layer_sad
            sad_init += layer_sad_init
            zeros += layer_zeros
            pruned_sq += pruned_norm ** 2
        total = self.num_masked_weights
        window_flips = sum(row["flips"] for row in layers.values())
        record = {
            "sad": sad,
            "sad_rate": sad / total,
            "sad_from_init": sad_init,
            "sad_from_init_rate": sad_init / total,
            "flip_rate": window_flips / (window * total) if self.window_steps else 0.0,
            "pruned_weight_norm": math.sqrt(pruned_sq),
            "sparsity": zeros / total,
            "flips": window_flips,
            "steps_in_window": self.window_steps,
            "layers": layers,
        }
        return record, packed_now

    def _local_counts(self, packed_now: list[torch.Tensor]) -> torch.Tensor:
        """Per layer [sad, sad_from_init, window flips, non-zeros used, pruned squared norm], summed over
        the shards (one all-reduce for all layers); also sets the summed total flips."""
        rows = []
        total_flips = torch.zeros((), dtype=torch.float64)
        for i, (_, layer) in enumerate(self._layers):
            mask = self._local_mask(layer)
            packed = pack_bits(mask)
            packed_now.append(packed)
            weight = local_tensor(layer.weight)
            used = weight.masked_fill(~mask, 0) if self._specs[id(layer)][4] else weight
            counts = torch.stack([popcount(packed ^ self._last_log[i]), popcount(packed ^ self._init[i]),
                                  self._window_flips[i], torch.count_nonzero(used)]).cpu().double()
            pruned_sq = weight.masked_fill(mask, 0).float().norm().cpu().double().square()
            row = torch.cat([counts, pruned_sq.reshape(1)])
            own = self._group is None or self._sharded[i] or self._shard[0] == 0  # replicated layers: rank 0's
            rows.append(row if own else torch.zeros_like(row))
            total_flips += self._total_flips[i].cpu().double() if own else 0.0
        counts = torch.cat([torch.stack(rows), total_flips.reshape(1, 1).expand(1, 5)])
        if self._group is not None:
            dist.all_reduce(counts, group=self._group)
        self._reduced_total_flips = int(counts[-1, 0])
        return counts[:-1]

    def log_metrics(self, step: int) -> dict[str, float]:
        """Totals since the last call, as `{"sparsity/sad": ..., ...}`; appends a history record.

        The record (in `history`) also holds the per-layer values and the number of optimizer steps
        in the window. The "last log" masks move to the current ones and the flip window restarts.
        """
        record, packed_now = self._measure()
        record = {"step": int(step), **record}
        self.history.append(record)
        self._last_log = packed_now
        for counter in self._window_flips:
            counter.zero_()
        self.window_steps = 0
        return {METRIC_PREFIX + key: record[key] for key in TOTAL_KEYS}

    @property
    def steps_since_log(self) -> int:
        return self.window_steps

    def summary(self) -> dict[str, Any]:
        """Final numbers for a results table: the current state, the last window's SAD and flip rate.

        If steps were taken since the last `log_metrics`, that unlogged window is measured (without
        changing the tracker). `mean_flip_rate` averages over every `step()` since the start.
        """
        self._refresh_layers()
        if self.history and not self.window_steps:
            record = self.history[-1]
            if self._group is not None and self._reduced_total_flips is None:
                self._measure()  # restored by load_state_dict: sum the shards' flip totals (one all-reduce)
        else:
            record, _ = self._measure()
            record["step"] = None  # not logged: the tracker does not know the global step
        out: dict[str, Any] = {key: record[key] for key in TOTAL_KEYS}
        total_flips = (sum(int(c) for c in self._total_flips) if self._group is None
                       else self._reduced_total_flips)  # sharded: summed at the last measure (no steps since)
        out["mean_flip_rate"] = (total_flips / (self.total_steps * self.num_masked_weights)
                                 if self.total_steps else 0.0)
        out["step"] = record.get("step")
        out["steps"] = self.total_steps
        out["method"] = self.method
        out["pattern"] = self.pattern
        out["num_masked_weights"] = self.num_masked_weights
        return out

    # ------------------------------------------------------------------ history file

    def history_document(self) -> dict[str, Any]:
        """What `save` writes: run metadata plus the list of records."""
        self._refresh_layers()
        return {
            "format": _FORMAT,
            "method": self.method,
            "pattern": self.pattern,
            "config": self.config,
            "num_masked_weights": self.num_masked_weights,
            "layers": {name: {"shape": list(shape), "numel": numel}
                       for name, shape, numel in zip(self.names, self.shapes, self.numels, strict=True)},
            "records": self.history,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the history JSON atomically (`nm_hf._files`: whole file or none, umask permissions).

        NaN/inf (a diverged run's norms) are written as JSON's NaN/Infinity extensions, which Python
        reads back, rather than losing the history.
        """
        return atomic_write_text(path, json.dumps(self.history_document(), indent=1) + "\n")

    @staticmethod
    def load_history(path: str | os.PathLike) -> dict[str, Any]:
        """Read a history JSON written by `save` (a dict: metadata plus `records`, a list of dicts)."""
        path = Path(path)
        if path.is_dir():
            path = path / HISTORY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no sparsity history at {path}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
            raise ValueError(f"{path} is not a sparsity history (expected an object with a 'records' list)")
        return doc

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (masks as packed bits on CPU, counters, history)."""
        self._settle()
        return {
            "format": _FORMAT,
            "names": list(self.names),
            "numels": list(self.numels),
            "init": [p.cpu() for p in self._init],
            "last_log": [p.cpu() for p in self._last_log],
            "prev": [p.cpu() for p in self._prev],
            "window_flips": [int(c) for c in self._window_flips],
            "total_flips": [int(c) for c in self._total_flips],
            "window_steps": self.window_steps,
            "total_steps": self.total_steps,
            "history": self.history,
            "shard": list(self._shard),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a tracker saved with `state_dict` (checked against this model's layers first)."""
        _check_state_format(state)
        if list(state["names"]) != self.names:
            missing = sorted(set(state["names"]) ^ set(self.names))
            raise ValueError("the saved sparsity tracker tracks other layers than this model has; "
                             f"differing layers: {missing[:5] or 'same names, different order'}")
        for name, numel, saved in zip(self.names, self.numels, state["numels"], strict=True):
            if numel != saved:
                raise ValueError(f"layer {name!r} has {numel} weights but the saved tracker state has {saved}")
        shard = tuple(state.get("shard", (0, 1)))
        if shard != self._shard:
            raise ValueError(f"the saved sparsity tracker holds the masks of shard {shard[0]} of {shard[1]}, this rank "
                             f"tracks shard {self._shard[0]} of {self._shard[1]}")
        devices = [p.device for p in self._init]
        self._init = [p.to(d) for p, d in zip(state["init"], devices, strict=True)]
        self._last_log = [p.to(d) for p, d in zip(state["last_log"], devices, strict=True)]
        self._prev = [p.to(d) for p, d in zip(state["prev"], devices, strict=True)]
        self._window_flips = [torch.tensor(int(v), dtype=torch.int64, device=d)
                              for v, d in zip(state["window_flips"], devices, strict=True)]
        self._total_flips = [torch.tensor(int(v), dtype=torch.int64, device=d)
                             for v, d in zip(state["total_flips"], devices, strict=True)]
        self.window_steps = int(state["window_steps"])
        self.total_steps = int(state["total_steps"])
        self.history = list(state["history"])
        self._pending = [False] * len(self._layers)
        self._reduced_total_flips = None  # this rank's totals were restored: summed again at the next measure

    def save_state(self, path: str | os.PathLike) -> Path:
        """`torch.save(state_dict())` atomically (`nm_hf._files`: whole file or none)."""
        state = self.state_dict()
        return atomic_write(path, lambda handle: torch.save(state, handle))

    @staticmethod
    def read_state(path: str | os.PathLike) -> dict[str, Any]:
        """Read a file written by `save_state`; a missing, empty, truncated or foreign file is one ValueError.

        The error names the file, so a resume fails before anything is loaded rather than with a bare
        EOFError/UnpicklingError from deep inside `torch.load`.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch.load raises EOFError, RuntimeError, UnpicklingError, KeyError, ...
            raise ValueError(f"{path} is not a readable sparsity tracker state ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'empty or truncated file'}); "
                             "delete it to restart the sparsity history, or resume from another checkpoint") from err
        _check_state_format(state, path)
        return state

    def load_state(self, path: str | os.PathLike) -> None:
        """Inverse of `save_state` (errors name the file)."""
        state = self.read_state(path)
        try:
            self.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    # ------------------------------------------------------------------ helpers

    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean mask of every tracked layer (the layers' cached masks, not copies)."""
        return {name: layer.current_mask() if is_sparse_layer(layer) else self._local_mask(layer)
                for name, layer in self._layers}

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """Masks at tracker creation, unpacked to boolean tensors (this rank's shards of sharded weights)."""
        return {name: unpack_bits(p, shape)
                for name, p, shape in zip(self.names, self._init, self._local_shapes, strict=True)}


_STATE_KEYS = ("names", "numels", "init", "last_log", "prev", "window_flips", "total_flips", "window_steps",
               "total_steps", "history")


def _on_new_mask(tracker_ref: weakref.ref, index: int, layer: Any, mask: torch.Tensor | None) -> None:
    """A tracked layer re-chose its mask (or, `mask` None, is about to change otherwise: settle now)."""
    tracker = tracker_ref()
    if tracker is None or tracker._sharded[index] or not tracker._pending[index]:
        return
    if mask is None:
        with torch.no_grad():
            tracker._settle_layer(index, strict=False)
    else:  # counting two boolean masks into integer counters records nothing for autograd
        tracker._count(index, mask, strict=False)


def _before_optimizer_step(tracker_ref: weakref.ref, optimizer: Any, args: Any, kwargs: Any) -> None:
    """Before an optimizer changes tracked weights, count the steps no forward has counted yet."""
    tracker = tracker_ref()
    if tracker is not None and any(tracker._pending):
        tracker._settle(strict=False, params={id(p) for group in optimizer.param_groups for p in group["params"]})


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _check_state_format(state: Any, path: str | os.PathLike | None = None) -> None:
    where = f"{path}: " if path is not None else ""
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{where}not a SparsityTracker state (missing or unknown 'format')")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"{where}the SparsityTracker state lacks {', '.join(missing)}")
