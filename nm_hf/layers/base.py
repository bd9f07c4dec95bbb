"""`SparseLayerMixin`: the N:M state every sparse layer kind shares (settings, method, mask cache).

The mask is cached against a key made of the weight's identity and autograd version counter and a
global count of optimizer steps: an optimizer step (any torch optimizer, fused ones included, which
do not bump version counters), `load_state_dict` or a new Parameter invalidates it; repeated
forwards with unchanged weights (eval, gradient accumulation, the tracker right after a step) reuse
it. The key needs nothing stored on the Parameter, so `copy.deepcopy(model)` and
`load_state_dict(..., assign=True)` keep training with fresh masks. The key also holds a per-layer
count of `load_state_dict` / `mark_weights_updated` calls: under FSDP2 the forward sees a freshly
all-gathered tensor whose version counter stays 0 and whose storage address recurs, so writes to
the sharded weights outside an optimizer step would not show in that tensor's key otherwise.

Sharded weights (FSDP2 `DTensor`s, outside the forward): `current_mask()` is the mask of this rank's
shard, as a `DTensor` sharded like the weight, computed locally (no collective). That is the
corresponding part of the whole weight's mask as long as no group of m is cut by a shard boundary
(`sharding_problem`); it is cached apart from the forward's mask.

With `SparsityConfig.mask_update_interval = k > 1` the key is instead the layer's step counter
divided by k, the weight's shape and a count of state dicts loaded into the weight: the mask is
re-chosen from the weights once every k optimizer steps counted by `nm_hf.after_optimizer_step` and
when new weights are loaded (a resume then puts the saved mask back, `restore_mask`); other writes
(decoupled decay, `mark_weights_updated`) keep it, and it survives a deep copy of the layer or a move
of its weight to another device or dtype.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ..config import SparsityConfig
from ..masks import nm_mask, nm_mask_and_apply, nm_mask_transposable, pruned_nonzero
from ..methods import SparsityMethod, get_method

__all__ = ["SparseLayerMixin", "mark_weights_updated", "optimizer_steps", "is_sharded", "local_tensor",
           "shard_range", "add_mask_listener", "settle_mask_listeners", "is_sparse_layer"]

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` (a parameter sharded by FSDP2 / tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (detached), else the tensor itself detached."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.detach().to_local()
    return tensor.detach()

def shard_range(tensor: torch.Tensor, dim: int) -> range:
    """The indices along `dim` that this rank's part of `tensor` holds (all of them for a tensor not sharded).

    Chunks follow `torch.chunk` (FSDP2, DTensor `Shard`), as in `SparseLayerMixin.sharding_problem`; a dim
    sharded over several mesh dims is chunked in mesh order. Strided sharding (`_StridedShard`, FSDP2 over
    tensor parallelism) gives a rank no contiguous range: ValueError.
    """
    dim %= tensor.ndim
    start, size = 0, tensor.shape[dim]
    if not is_sharded(tensor):
        return range(start, size)
    from torch.distributed.tensor import Shard

    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate() or placement.is_partial() or getattr(placement, "dim", None) is None:
            continue
        if placement.dim % tensor.ndim != dim:
            continue
        if type(placement) is not Shard:  # (`_StridedShard` is no `is_shard()` in torch 2.13: asked by its dim)
            raise ValueError(f"a weight sharded as {placement} along dim {dim} holds no contiguous range on a rank")
        chunk = -(-size // tensor.device_mesh.size(mesh_dim))
        offset = 0 if coordinate is None else min(coordinate[mesh_dim] * chunk, size)
        start, size = start + offset, min(chunk, size - offset)
    return range(start, start + size)


_STEPS = [0]


#: a number per weight tensor object the cache keys were made for (held weakly, off the tensors and the layers):
#: a new tensor at the address of a freed one has the same version (0), so address and version alone would let
#: it hit the caches of the tensor it replaces (`torch.func.functional_call` with a fresh weight per call).
#: id(tensor) -> (weak reference to that tensor, its number): an entry whose reference no longer gives back the
#: very tensor asked about (dead, or another object now at that id) is replaced, and a dead tensor's entry is
#: removed by its reference's callback. (A plain dict looked up by id: `WeakIdKeyDictionary.get` builds a
#: reference object per lookup, and every training forward of every layer asks.)
_TENSOR_NUMBERS: dict[int, tuple[weakref.ref, int]] = {}
_NEXT_TENSOR_ID = itertools.count()


def _forget_tensor_number(key: int, ref: weakref.ref, numbers: dict = _TENSOR_NUMBERS) -> None:
    entry = numbers.get(key)  # (the dict bound at definition: callbacks may run as the interpreter exits)
    if entry is not None and entry[0] is ref:
        del numbers[key]


def _tensor_number(tensor: torch.Tensor) -> int:
    """`_tensor_id` for eager callers (and those already outside compiled graphs)."""
    key = id(tensor)
    entry = _TENSOR_NUMBERS.get(key)
    if entry is not None and entry[0]() is tensor:
        return entry[1]
    number = next(_NEXT_TENSOR_ID)
    _TENSOR_NUMBERS[key] = (weakref.ref(tensor, functools.partial(_forget_tensor_number, key)), number)
    return number


_tensor_id = torch.compiler.disable(_tensor_number)


def optimizer_steps() -> int:
    """Number of torch optimizer steps taken in this process (part of every mask-cache key)."""
    return _STEPS[0]


def _after_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


# Global: runs after `step()` of every torch.optim.Optimizer (wrapped ones included, e.g. accelerate's).
register_optimizer_step_post_hook(_after_any_optimizer_step)


#: who wants to hear of a layer's new mask: layer -> callbacks (kept off the layers, so that deepcopying or
#: pickling a model never carries them along)
_MASK_LISTENERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def add_mask_listener(layer: SparseLayerMixin,
                      callback: Callable[[SparseLayerMixin, torch.Tensor | None], None]) -> RemovableHandle:
    """Call `callback(layer, mask)` each time `layer` re-chooses its (unsharded) mask, e.g. in a training
    forward, and `callback(layer, None)` just before the layer changes otherwise than by a training step
    (`settle_mask_listeners`); the `SparsityTracker` counts mask flips this way without a pass of its own
    over the weights. `handle.remove()` stops it."""
    callbacks = _MASK_LISTENERS.setdefault(layer, OrderedDict())
    handle = RemovableHandle(callbacks)
    callbacks[handle.id] = callback
    return handle


def _tell_listeners_now(layer: SparseLayerMixin, mask: torch.Tensor | None) -> None:
    callbacks = _MASK_LISTENERS.get(layer)
    if callbacks:
        for callback in tuple(callbacks.values()):
            callback(layer, mask)


# a compiled forward breaks its graph where it re-chooses a mask anyway (`nm_mask`)
_tell_listeners = torch.compiler.disable(_tell_listeners_now)


def settle_mask_listeners(layer: SparseLayerMixin) -> None:
    """Tell `layer`'s mask listeners that its weights are about to change otherwise than by a training step
    (a state dict loaded, `finalize` baking them): one waiting for the layer's next mask takes it now."""
    _tell_listeners(layer, None)


def is_sparse_layer(layer: Any) -> bool:
    """True while `layer` is a sparse layer (False once `finalize` has made it dense again)."""
    return isinstance(layer, SparseLayerMixin) and "nm_method" in vars(layer)


def mark_weights_updated(layers: Iterable[SparseLayerMixin]) -> None:
    """Invalidate the cached masks of `layers` after writing their weights outside an optimizer step.

    Optimizer steps and `load_state_dict` are seen automatically; call this after writing weights
    some other way (e.g. through `.data`).
    """
    for layer in layers:
        increment_version(layer.weight)
        layer._nm_generation = layer.__dict__.get("_nm_generation", 0) + 1


def note_weights_loaded(layer: SparseLayerMixin) -> None:
    """A state dict was just loaded into `layer`'s weight: masks of every kind are chosen again (a periodic
    mask too: the one in use belonged to the old weights) and FSDP2's re-gathered tensor is seen as new."""
    layer._nm_generation = layer.__dict__.get("_nm_generation", 0) + 1
    layer._nm_loads = layer.__dict__.get("_nm_loads", 0) + 1


class SparseLayerMixin:
    """N:M settings, method and mask bookkeeping shared by every sparse layer kind."""

    #: dimension of `weight` that holds the layer's input features (groups of m run along it)
    group_dim: int = 1
    #: dimension of `weight` that indexes experts (a fused expert tensor: one matrix per expert, per-expert
    #: method state such as S-STE's scales), None for a single weight matrix; set from the layer kind
    #: (`LayerKind.expert_dim_for`)
    expert_dim: int | None = None
    #: True for layers that stand for a Parameter of another module (expert weights): their targeted
    #: name is the Parameter's, and its state-dict key is that name (`nm_hf.record.weight_key`)
    is_parameter_target: bool = False
    nm_n: int
    nm_m: int
    #: name of the registered method (see `method` for the object)
    nm_method: str
    nm_method_args: dict[str, Any]
    nm_decay: float
    nm_decay_mode: str
    #: multiplies the gradient-mode decay; SparseTrainer sets 1/gradient_accumulation_steps
    nm_decay_scale: float
    #: masks N:M along rows and columns of every m x m block (`nm_mask_transposable`)
    nm_transposable: bool
    #: the mask is re-chosen every this many counted optimizer steps
    nm_mask_interval: int
    #: optimizer steps counted by `nm_hf.after_optimizer_step` (restore with `nm_hf.set_training_step`)
    nm_step: int
    #: per-layer state a method keeps (e.g. S-STE's scale); saved by `nm_hf.sparse_training_state`
    nm_method_state: dict[str, Any]

    _NM_ATTRIBUTES = ("nm_n", "nm_m", "nm_method", "nm_method_args", "nm_decay", "nm_decay_mode",
                      "nm_decay_scale", "nm_transposable", "nm_mask_interval", "nm_step", "nm_method_state",
                      "_nm_mask_cache", "_nm_mask_key", "_nm_weight_is_masked", "_nm_eval_weight", "_nm_eval_key", "_nm_dense_class",
                      "_nm_steps_seen", "_nm_step_changes", "_nm_warned_uncounted", "_nm_generation", "_nm_loads",
                      "_nm_shard_mask", "_nm_shard_key", "_nm_method_cache")

    def nm_setup(self, config: SparsityConfig) -> None:
        """Attach `config`'s settings to this layer (called by `sparsify` after the class swap)."""
        self.nm_n, self.nm_m = config.n, config.m
        self.nm_method = config.method
        self.nm_method_args = dict(config.method_args)
        self.nm_decay = config.effective_decay
        self.nm_decay_mode = config.decay_mode
        self.nm_decay_scale = 1.0
        self.nm_transposable = config.transposable
        self.nm_mask_interval = config.mask_update_interval
        self.nm_step = 0
        self.nm_method_state = {}
        self._nm_mask_cache: torch.Tensor | None = None
        self._nm_mask_key: tuple | None = None
        self._nm_weight_is_masked = False  # the weight equals weight * cached mask bit for bit (same key)
        self._nm_eval_weight: torch.Tensor | None = None
        self._nm_eval_key: tuple | None = None
        self._nm_steps_seen: int | None = None
        self._nm_step_changes = 0
        self._nm_warned_uncounted = False
        self._nm_generation = 0
        self._nm_loads = 0
        self._nm_shard_mask: torch.Tensor | None = None
        self._nm_shard_key: tuple | None = None
        self._nm_method_cache: Any = None  # a method's unsaved data derived from nm_method_state (S-STE's scales)

    def nm_teardown(self) -> None:
        """Remove every N:M attribute (the layer is about to become its dense class again)."""
        for name in self._NM_ATTRIBUTES:
            self.__dict__.pop(name, None)

    @property
    def method(self) -> SparsityMethod:
        return get_method(self.nm_method)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        loads_weight = f"{prefix}weight" in state_dict  # not, e.g., a PEFT adapter's keys alone
        if loads_weight:
            settle_mask_listeners(self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if loads_weight:
            note_weights_loaded(self)  # FSDP2 and periodic masks: see the module docstring

    def _weight_key(self, w: torch.Tensor | None = None) -> tuple | None:
        """The cache key of `w` (default: `self.weight`, which callers that hold it pass)."""
        if w is None:
            w = self.weight
        if w.is_inference():  # no version counter: in-place changes cannot be seen, never reuse
            return None
        version = w._version
        number = _tensor_id(w) if torch.compiler.is_compiling() else _tensor_number(w)
        if is_sharded(w):
            w = local_tensor(w)  # the DTensor's own counter sees in-place updates, its local tensor's does not
        return (_STEPS[0], self.__dict__.get("_nm_generation", 0), version, number, w.data_ptr(), w.device, w.dtype,
                tuple(w.shape))

    def _mask_key(self, weight: torch.Tensor | None = None) -> tuple | None:
        interval = self.nm_mask_interval
        if interval == 1:
            return self._weight_key(weight)
        # the mask moves only every `interval` counted steps, not with the weights; it is state the weights
        # cannot rebuild mid-interval, so a copy of the layer (copy.deepcopy) or a weight moved to another
        # device or dtype keeps it (moved along in `current_mask_and_masked`) until the next refresh; new
        # weights loaded from a state dict get a mask of their own
        return ("interval", self.nm_step // interval, tuple(self.weight.shape), self.__dict__.get("_nm_loads", 0))

    @property
    def pattern(self) -> str:
        return f"{self.nm_n}:{self.nm_m}"

    @property
    def is_masked(self) -> bool:
        """False for methods whose forward is dense (patched for bookkeeping only)."""
        return self.method.masks_forward

    def cached_mask(self) -> torch.Tensor | None:
        """The last mask computed (possibly stale), or None."""
        return self.__dict__.get("_nm_mask_cache")

    def sharding_problem(self, shape: tuple[int, ...], parts: dict[int, int]) -> str | None:
        """Why a weight of `shape` split into `parts[d]` chunks along dim d cannot be masked shard by shard.

        None when every shard boundary falls between groups of m (and between m x m blocks for
        transposable masks): the dims that hold no group are free. Chunks follow `torch.chunk`
        (FSDP2, DTensor `Shard`): boundaries at multiples of ceil(size / parts).
        """
        if self.mask_is_periodic:
            return (f"mask_update_interval={self.nm_mask_interval} is not supported with sharded weights (the "
                    "mask in use is chosen from the whole weight at its last refresh); use 1")
        ndim = len(shape)
        grouped = self._grouped_dims(ndim)
        for dim, count in parts.items():
            if count <= 1 or dim % ndim not in grouped:
                continue
            chunk = -(-shape[dim] // count)
            if chunk % self.nm_m:
                return (f"weight {tuple(shape)} sharded {count} ways along dim {dim % ndim}, which holds its groups "
                        f"of m={self.nm_m}, gives chunks of {chunk} rows, not a multiple of {self.nm_m}: groups would "
                        "straddle shard boundaries")
        return None

    def _grouped_dims(self, ndim: int) -> set[int]:
        """The dims of an `ndim`-D weight that hold its groups of m (both matrix dims for m x m blocks)."""
        grouped = {self.group_dim % ndim}
        if self.nm_transposable:
            grouped |= {ndim - 2, ndim - 1}
        return grouped

    def check_sharding(self, weight: torch.Tensor | None = None) -> None:
        """Raise ValueError when the (sharded) weight cannot be masked shard by shard (`sharding_problem`)."""
        weight = self.weight if weight is None else weight
        if not is_sharded(weight):
            return
        parts: dict[int, int] = {}
        for mesh_dim, placement in enumerate(weight.placements):
            if placement.is_partial():
                raise ValueError(f"{type(self).__name__}: a weight with a Partial placement cannot be masked")
            if placement.is_shard():
                parts[placement.dim] = parts.get(placement.dim, 1) * weight.device_mesh.size(mesh_dim)
            elif not placement.is_replicate():  # strided sharding (torch 2.13's `_StridedShard` is no `is_shard()`)
                dim = getattr(placement, "dim", None)
                if dim is None or dim % weight.ndim in self._grouped_dims(weight.ndim):
                    raise ValueError(f"{type(self).__name__}: a weight sharded as {placement} along the dim that "
                                     "holds its groups cannot be masked shard by shard")
        problem = self.sharding_problem(tuple(weight.shape), parts)
        if problem:
            raise ValueError(f"{type(self).__name__}: {problem}")

    def weight_shard_range(self, dim: int) -> range:
        """The indices along `dim` of this rank's part of the weight (`shard_range`): which slices of a
        method's per-slice state (S-STE's per-expert betas) this rank's shard uses."""
        return shard_range(self.weight, dim)

    def _sharded_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask of this rank's shard as a DTensor placed like `weight` (no collective)."""
        key = self._weight_key()
        cached = self.__dict__.get("_nm_shard_mask")
        if key is None or cached is None or self.__dict__.get("_nm_shard_key") != key:
            self.check_sharding(weight)
            with torch.inference_mode(False):
                mask = self.compute_mask(local_tensor(weight))
            cached = DTensor.from_local(mask, weight.device_mesh, weight.placements, run_check=False,
                                        shape=weight.shape, stride=weight.stride())
            self._nm_shard_mask, self._nm_shard_key = cached, key
        return cached

    def current_mask(self) -> torch.Tensor:
        """The N:M mask in use (for unmasked methods: the mask the weights would have).

        For a sharded weight (outside an FSDP2 forward): this rank's part, as a DTensor placed like it.
        """
        return self.current_mask_and_masked(want_masked=False)[0]

    @torch.compiler.disable  # the cache lookup is Python state: one graph break per layer, not one per step of it
    def current_mask_and_masked(self, want_masked: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`current_mask()`, and `apply_mask(weight, mask)` when this call re-chose the mask in the same pass
        over the weight, or `self.weight` itself while the method found it equal to that bit for bit (None
        otherwise: the caller masks the weight itself). For training forwards."""
        weight = self.weight
        if is_sharded(weight):
            return self._sharded_mask(weight), None
        # the state is read and written through the instance dict (what `nm_setup` set; nn.Module's
        # `__setattr__` would only end there too, after its checks): this runs in every training forward
        state = self.__dict__
        key = self._mask_key(weight)
        masked = None
        cache = state.get("_nm_mask_cache")
        fresh = key is None or state.get("_nm_mask_key") != key or cache is None
        if fresh:
            # never cache an inference tensor: a later training forward could not save it for backward
            with torch.inference_mode(False):
                detached = weight.detach()
                cache, masked = self.choose_mask(detached, want_masked)
            state["_nm_mask_cache"] = cache
            # already N:M with +0.0 pruned entries: the weight is its own masked copy while the key holds
            state["_nm_weight_is_masked"] = masked is detached and not self.mask_is_periodic
            state["_nm_mask_key"] = key
            _tell_listeners_now(self, cache)  # this method is already outside compiled graphs
        elif cache.device != weight.device:  # a periodic mask follows its weight's moves
            if weight.is_meta:  # a shape probe (functional_call with meta weights) must not lose the mask
                return cache.to("meta"), None
            cache = state["_nm_mask_cache"] = cache.to(weight.device)
        # the re-check reads the weight: only for callers that will use it unmasked (not the tracker's lookups)
        if want_masked and state.get("_nm_weight_is_masked") and (fresh or self._weight_still_masked()):
            masked = weight
        return cache, masked

    @torch.compiler.disable
    def _weight_still_masked(self) -> bool:
        """The flag again on a cache hit: a write the key cannot see (through `.data`, numpy, FSDP2's
        all-gather refilled at the same address) must not turn into an unmasked forward. One read of the
        weight and the mask on CPU; elsewhere (a device check would synchronise) the caller masks."""
        weight = self.weight.detach()
        return weight.is_cpu and not pruned_nonzero(weight, self._nm_mask_cache, signed_zeros=True)

    def compute_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask this layer chooses for `weight` (its own or one from a state dict), uncached."""
        return self.choose_mask(weight)[0]

    def choose_mask(self, weight: torch.Tensor, want_masked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`compute_mask(weight)`, and with `want_masked` the masked `weight` where one pass can make both
        (the mask ranks the weight itself), and `weight` itself where it is already masked; else None."""
        unchanged = self.method.unchanged_mask(self, weight)
        if unchanged is not None:  # a bare mask (the hook's first form) makes no claim about the weight
            mask, exact = (unchanged, False) if isinstance(unchanged, torch.Tensor) else unchanged
            return mask, (weight if exact else None)
        ranking = self.method.ranking_weight(self, weight)
        if self.nm_transposable:
            return nm_mask_transposable(ranking, self.nm_n, self.nm_m, dim=self.group_dim), None
        if want_masked and ranking is weight:
            return nm_mask_and_apply(weight, self.nm_n, self.nm_m, dim=self.group_dim)
        return nm_mask(ranking, self.nm_n, self.nm_m, dim=self.group_dim), None

    @property
    def mask_is_periodic(self) -> bool:
        """True when the mask is re-chosen only every `nm_mask_interval` steps (it lags the weights)."""
        return self.nm_mask_interval > 1

    def restore_mask(self, mask: torch.Tensor) -> None:
        """Use `mask` (a saved periodic mask) until the next refresh of a periodic mask."""
        self._nm_mask_cache = mask.contiguous()
        self._nm_mask_key = self._mask_key()
        self._nm_weight_is_masked = False
        self.forget_eval_weight()

    def set_step(self, step: int) -> None:
        """Set the counted optimizer steps (`nm_hf.set_training_step`); the schedule and masks follow."""
        self.nm_step = int(step)
        self.forget_eval_weight()

    def forget_eval_weight(self) -> None:
        """Drop the cached eval weight (after a change it cannot see: step, method state)."""
        self._nm_eval_weight, self._nm_eval_key = None, None

    @torch.compiler.disable  # Python bookkeeping: traced, its reads of nm_step would recompile the layer every step
    def warn_if_steps_uncounted(self) -> None:
        """Warn once when optimizer steps happen but `nm_hf.after_optimizer_step` never counts them.

        Only layers whose behaviour follows the counted steps call this (a periodic mask, a scheduled
        method), in training forwards. It fires when this layer's training forwards have seen the
        process's optimizer step count change twice while its own count stayed 0 (steps of other
        models between its forwards alone do not).
        """
        if self.nm_step or self._nm_warned_uncounted:
            return
        seen = _STEPS[0]
        if seen == self._nm_steps_seen:
            return
        self._nm_steps_seen = seen
        self._nm_step_changes += 1
        if self._nm_step_changes >= 3:  # the first forward, then two optimizer steps later
            self._nm_warned_uncounted = True
            what = (f"mask_update_interval={self.nm_mask_interval}" if self.mask_is_periodic
                    else f"method {self.nm_method!r}")
            warnings.warn(f"optimizer steps are being taken but nm_hf.after_optimizer_step(model, lr) has not been "
                          f"called: {what} counts steps through it, so the mask/schedule is not moving; call it "
                          "after every optimizer step (SparseTrainer does)", UserWarning, stacklevel=4)

    def restamp_mask(self) -> None:
        """Declare the cached mask still valid after an in-place change that cannot alter it."""
        if is_sharded(self.weight):
            if self.__dict__.get("_nm_shard_mask") is not None and self.__dict__.get("_nm_shard_key") is not None:
                self._nm_shard_key = self._weight_key()
            return
        if self._nm_mask_cache is not None and self._nm_mask_key is not None:
            self._nm_mask_key = self._mask_key()
            self._nm_weight_is_masked = False  # the change may have written pruned entries; checked again next time

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The N:M weight the layer computes with outside training (`method.bake`: `weight * mask` for
        most methods), detached; what `finalize` writes. The dense weight for unmasked methods."""
        if not self.is_masked:
            return self.weight.detach()
        weight = self.weight
        if is_sharded(weight):  # bake this rank's shard with its mask: groups lie within shards
            baked = self.method.bake(self, local_tensor(weight), local_tensor(self.current_mask()))
            return DTensor.from_local(baked, weight.device_mesh, weight.placements, run_check=False,
                                      shape=weight.shape, stride=weight.stride())
        return self.method.bake(self, weight.detach(), self.current_mask())

    @torch.compiler.disable
    def cached_eval_weight(self) -> torch.Tensor:
        """`effective_weight()`, cached while the weights and the mask do not change (eval without gradients)."""
        weight_key = self._weight_key()
        key = None if weight_key is None else (weight_key, self._mask_key())
        if key is None or self._nm_eval_key != key or self._nm_eval_weight is None:
            self._nm_eval_weight = self.effective_weight()
            self._nm_eval_key = key
        return self._nm_eval_weight

    def train(self, mode: bool = True):
        if mode:  # the eval cache would only go stale and hold memory
            self._nm_eval_weight, self._nm_eval_key = None, None
        self.__dict__.pop("weight", None)  # a forward tensor an interrupted reader left exposed (`layers.reads`)
        return super().train(mode)

    def forward_tensor(self) -> torch.Tensor:
        """The weight this layer computes with now, in the stored layout of `weight`: the method's forward weight
        (`W * mask` with its gradient rule, S-STE's weight, ...) in training, autograd-aware; the cached N:M weight
        in eval without gradients; the dense weight for unmasked methods and dense training phases. What a module
        reading the weight directly sees while it runs (`nm_hf.layers.reads`), and what expert weights expose."""
        return self.forward_tensor_and_mask()[0]

    def forward_tensor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_tensor()` and the mask it was computed with in training (None when no mask was applied)."""
        weight = self.weight
        if not self.is_masked:
            return weight, None
        if not self.training and not torch.is_grad_enabled():
            return self.cached_eval_weight(), None
        method = self.method
        if method.dense_training_forward(self):
            return weight, None
        if method.uses_step or self.nm_mask_interval > 1:
            self.warn_if_steps_uncounted()
        mask = self.current_mask()
        return method.forward_weight(self, weight, mask), mask

    def nm_extra_repr(self) -> str:
        options = ", transposable" if self.nm_transposable else ""
        if self.mask_is_periodic:
            options += f", mask every {self.nm_mask_interval} steps"
        return f", n:m={self.pattern}, method={self.nm_method}{options}" + self.method.extra_repr(self)
