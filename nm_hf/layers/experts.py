"""Mixture-of-experts expert weights: the fused 3-D Parameters of a transformers 5 experts module.

transformers 5 stores the experts of a MoE block as 3-D Parameters (`gate_up_proj`, `down_proj`, ...)
of shape `[num_experts, out, in]`, or `[num_experts, in, out]` when the class is decorated with
`use_experts_implementation(is_transposed=True)` (gpt_oss) or is Llama4's undecorated
`Llama4TextExperts`. The forward runs through `config._experts_implementation` ("eager",
"batched_mm", "grouped_mm", ...), which reads the Parameters directly, never an `nn.Linear`.
Experts classes whose fused Parameters have other names are listed in `NAMED_EXPERTS` (JetMoE's
`JetMoeParallelExperts.weight`, `[E, out, in]`, read by its own forward as `F.linear(x, self.weight[e])`),
with their layout in `_UNDECORATED`.

Experts classes that keep each expert weight as a 2-D Parameter stacking the experts' matrices along dim 0
(`[E * rows, cols]`) are listed in `STACKED_EXPERTS` with, per Parameter, its input dimension: DBRX's
`DbrxExperts.forward` reads `self.mlp.w1` / `v1` / `w2` (`[E * ffn, hidden]`, owned by its child
`DbrxExpertGLU`) as `.view(E, ffn, hidden)[e]` and computes `x @ w1_e.T`, `x @ v1_e.T` (input: dim 1) and
`h @ w2_e` (input: dim 0, groups of M rows inside each expert's ffn rows). Their targets are named by the
Parameter's path from the experts module (`experts.mlp.w1`, its state-dict key), and the masked tensors are
exposed on the child that owns them while the experts module's forward runs.

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

The masked tensor is not kept for backward. An experts implementation saves what it computes with
(grouped_mm the whole tensor, eager one slice per expert), which would keep a full `W * mask` copy of
every expert weight alive from forward to backward (the dense model saves the Parameter itself, for
free). For methods on the default `W * mask` path the experts forward runs under saved-tensor hooks
that store, in place of any view of that tensor, where the view lies; backward recomputes just that
part as `apply_mask(W, mask)` from the dense Parameter and the mask (already kept by `MaskedWeight`),
bit for bit what forward used. Writing the weight or the mask in place between forward and backward
is then an error (the dense model's matmuls refuse that too). The hooks stand aside under other
saved-tensor hooks (non-reentrant activation checkpointing, `save_on_cpu`: those already decide what
is kept) and while torch.compile traces.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..masks import apply_mask
from .base import SparseLayerMixin, note_weights_loaded, settle_mask_listeners

__all__ = ["EXPERT_PARAMETERS", "NAMED_EXPERTS", "STACKED_EXPERTS", "ExpertWeight", "SparseExpertsMixin",
           "expert_parameters", "experts_transposed", "router_layers", "sparse_experts_class", "stacked_layout",
           "unsupported_experts"]

#: names of the fused expert matrices transformers uses
EXPERT_PARAMETERS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
#: experts classes whose fused `[num_experts, ., .]` Parameters have names of their own (besides
#: `EXPERT_PARAMETERS`): class name -> names
NAMED_EXPERTS: dict[str, tuple[str, ...]] = {"JetMoeParallelExperts": ("weight",)}
#: experts classes without `use_experts_implementation` whose layout is known: name -> transposed
_UNDECORATED = {"Llama4TextExperts": True, "JetMoeParallelExperts": False}
#: experts classes whose forward reads 2-D Parameters stacking one matrix per expert along dim 0 (`[E * rows, cols]`,
#: expert e's rows `e * rows:(e + 1) * rows`): class name -> {Parameter path from the experts module: input dim}
STACKED_EXPERTS: dict[str, dict[str, int]] = {"DbrxExperts": {"mlp.w1": 1, "mlp.v1": 1, "mlp.w2": 0}}


def stacked_layout(module: nn.Module) -> dict[str, int] | None:
    """`{Parameter path: input dim}` when `module` is an experts class of `STACKED_EXPERTS`, else None."""
    return _class_entry(module, STACKED_EXPERTS)


def _class_entry(module: nn.Module, table: dict[str, Any]) -> Any:
    """`table`'s entry for `module`'s class or its nearest base class listed there, else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def parameter_holder(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module owning Parameter `path` of `module`, the Parameter's own name): `module` itself for a plain
    name, a submodule for a dotted path (DBRX's `mlp.w1`)."""
    prefix, _, name = path.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), name


def _num_experts(module: nn.Module) -> int | None:
    num_experts = getattr(module, "num_experts", None)
    return None if isinstance(num_experts, bool) or not isinstance(num_experts, int) else num_experts


def expert_rows(module: nn.Module) -> int | None:
    """Rows per expert of a stacked layout's `[E * rows, cols]` Parameters (`STACKED_EXPERTS`), else None."""
    layout, count = stacked_layout(module), _num_experts(module)
    if layout is None or not count:
        return None
    sizes = {_stacked_weight(module, path).shape[0] // count for path in expert_parameters(module)}
    return sizes.pop() if len(sizes) == 1 else None


def _stacked_weight(module: nn.Module, path: str) -> nn.Parameter | None:
    try:
        holder, name = parameter_holder(module, path)
    except AttributeError:
        return None
    return holder._parameters.get(name)


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of `module`'s expert Parameters, in registration order: its 3-D ones (`[num_experts, ., .]`) named as
    transformers names them (`EXPERT_PARAMETERS`) or as its class's entry of `NAMED_EXPERTS` says, or for a stacked
    layout (`STACKED_EXPERTS`) the paths of its 2-D `[num_experts * rows, cols]` ones."""
    num_experts = _num_experts(module)
    if num_experts is None:
        return []
    layout = stacked_layout(module)
    if layout is not None:
        return [path for path in layout if (value := _stacked_weight(module, path)) is not None and value.ndim == 2
                and value.shape[0] > num_experts and value.shape[0] % num_experts == 0]
    names = (*EXPERT_PARAMETERS, *(_class_entry(module, NAMED_EXPERTS) or ()))
    return [name for name, value in module._parameters.items()
            if name in names and value is not None and value.ndim == 3 and value.shape[0] == num_experts]


#: attributes holding a mixture-of-experts expert count, on an experts module or in a model's (sub-)config
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _expert_counts(config: Any, depth: int = 0) -> set[int]:
    """Expert counts (> 1) a config declares, sub-configs included (DBRX: `ffn_config.moe_num_experts`)."""
    fields = config if isinstance(config, dict) else getattr(config, "__dict__", None)
    if not isinstance(fields, dict) or depth > 3:
        return set()
    counts = {value for key, value in fields.items() if key in _EXPERT_COUNTS and _is_count(value)}
    for value in fields.values():
        if isinstance(value, dict) or hasattr(value, "to_dict"):
            counts |= _expert_counts(value, depth + 1)
    return counts


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def _unsupported_expert_parameters(module: nn.Module, counts: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Expert weights of `module` that `expert_parameters` has no layout for, so they stay dense.

    An experts module is one whose class name says "Expert"; its expert weights are the Parameters it owns
    holding a matrix per expert: 3-D with a leading dimension a multiple of an expert count E (the module's
    own `num_experts`-like attribute, or one of `counts`, the model config's), or 2-D `[k * E, .]` with k > 1
    (DBRX's `w1`/`v1`/`w2`, `[E * ffn, hidden]`; a 2-D `[E, .]` is a vector per expert, e.g. a bias).
    """
    if "expert" not in type(module).__name__.lower():
        return []
    numbers = set(counts) | {value for key in _EXPERT_COUNTS if _is_count(value := getattr(module, key, None))}
    known = set(expert_parameters(module))
    found = []
    for name, value in module._parameters.items():
        if value is None or name in known or value.ndim < 2:
            continue
        rows = value.shape[0]
        if any(rows and rows % count == 0 and (value.ndim > 2 or rows > count) for count in numbers):
            found.append(name)
    return found


def router_layers(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers of a mixture-of-experts model that give one output per expert (an expert
    count of `model.config`) or a single one: routers kept as plain linears (DBRX's and JetMoE's `router.layer`)
    and scalar gates (Qwen2-MoE's `shared_expert_gate`), which `"all-linear"` leaves dense like the router classes
    of other models."""
    counts = _expert_counts(getattr(model, "config", None))
    if not counts:
        return []
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (module.out_features in counts or module.out_features == 1)]


def unsupported_experts(model: nn.Module) -> dict[str, list[str]]:
    """`{module name: Parameter names}` for the experts modules of `model` whose expert weights nm_hf has no layout
    for (`_unsupported_expert_parameters`, with the expert counts of `model.config`): they stay dense."""
    counts = _expert_counts(getattr(model, "config", None))
    known = {id(module.get_parameter(path)) for module in model.modules() if stacked_layout(module) is not None
             for path in expert_parameters(module)}
    found = {}
    for name, module in model.named_modules():
        params = [p for p in _unsupported_expert_parameters(module, counts) if id(module._parameters[p]) not in known]
        if params:
            found[name] = params
    return found


def experts_transposed(module: nn.Module) -> bool | None:
    """True for `[E, in, out]` storage, False for `[E, out, in]`, None when it cannot be told."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    flag = _class_entry(module, _UNDECORATED)
    if flag is not None:
        return flag
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

    def __init__(self, owner: nn.Module, parameter: str, group_dim: int, expert_dim: int | None) -> None:
        self.owner = owner  # the experts module, whose forward reads the Parameter
        self.parameter = parameter  # its path from `owner` (`gate_up_proj`; DBRX: `mlp.w1`)
        self.holder, self.attribute = parameter_holder(owner, parameter)  # the module owning it, its own name
        self.group_dim = group_dim
        self.expert_dim = expert_dim

    @property
    def weight(self) -> nn.Parameter:
        return self.holder._parameters[self.attribute]

    @property
    def training(self) -> bool:
        return self.owner.training

    def forward_tensor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_tensor()` and, when that tensor is `apply_mask(weight, mask)` in autograd (the default
        `W * mask` path, contiguous plain tensors), the mask: backward can recompute it instead of saving it."""
        weight = self.weight
        tensor, mask = super().forward_tensor_and_mask()
        if mask is None:
            return tensor, None
        method = self.method
        recomputable = (method.fused_forward and tensor.requires_grad and not torch.compiler.is_compiling()
                        and type(tensor) is torch.Tensor
                        and type(weight) in _PLAIN_TYPES and type(mask) is torch.Tensor
                        and tensor.is_contiguous() and weight.is_contiguous() and mask.is_contiguous()
                        and tensor.storage_offset() == 0 and tensor.numel() > 0)
        return tensor, mask if recomputable else None

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.weight.shape))
        return f"ExpertWeight({self.parameter}: {shape}, group_dim={self.group_dim}{self.nm_extra_repr()})"


class SparseExpertsMixin:
    """Mixed in front of an experts class: its forward computes with the sparse layers' forward tensors."""

    nm_parts: dict[str, ExpertWeight]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if any(part.holder._modules.get("parametrizations") is not None for part in self.nm_parts.values()):
            _refuse_parametrized(self)
        exposed: list[ExpertWeight] = []
        recomputable: dict[int, _Recomputable] = {}
        try:
            for part in self.nm_parts.values():
                tensor, mask = part.forward_tensor_and_mask()
                part.holder.__dict__[part.attribute] = tensor  # on the Parameter's owner: a child for DBRX
                exposed.append(part)
                if mask is not None:
                    recomputable[tensor.untyped_storage().data_ptr()] = _Recomputable(part, tensor, mask)
            if recomputable and _may_push_saved_tensors_hooks():
                with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(recomputable)):
                    return super().forward(*args, **kwargs)
            return super().forward(*args, **kwargs)
        finally:
            for part in exposed:
                part.holder.__dict__.pop(part.attribute, None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        loaded = [part for name, part in self.nm_parts.items() if f"{prefix}{name}" in state_dict]
        for part in loaded:
            settle_mask_listeners(part)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for part in loaded:
            note_weights_loaded(part)

    def train(self, mode: bool = True):
        if mode:  # the eval caches would only go stale and hold memory
            for part in self.nm_parts.values():
                part.forget_eval_weight()
        return super().train(mode)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}: n:m={part.pattern}, method={part.nm_method}" for name, part in self.nm_parts.items())
        base = super().extra_repr()
        return f"{base}, {parts}" if base else parts


def _refuse_parametrized(module: nn.Module) -> None:
    """Raise when a sparse expert Parameter is reparametrized (`torch.nn.utils.parametrize`).

    A parametrization moves the Parameter to `parametrizations.<name>.original` and puts a class property
    in front of the instance attribute this forward exposes, so the experts would compute with the
    parametrized dense tensor, never the N:M one. PEFT's LoRA on expert Parameters
    (`LoraConfig(target_parameters=...)`) registers such a parametrization around every forward.
    """
    wrapped = [name for name, part in module.nm_parts.items()
               if part.attribute in (part.holder._modules.get("parametrizations") or {})]
    if wrapped:
        raise TypeError(
            f"{type(module).__name__}: the N:M expert weight(s) {', '.join(repr(n) for n in wrapped)} are "
            "reparametrized (torch.nn.utils.parametrize, e.g. PEFT LoRA with target_parameters=[...]); the "
            "parametrization would replace the masked weight, so the experts would not compute N:M. Put LoRA on "
            "the linear layers only (target_modules), or keep these expert weights dense "
            "(SparsityConfig(exclude_modules=[...]))")


#: tensor types whose storage the saved-tensor hooks may read (subclasses such as DTensor are left alone)
_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


class _Recomputable:
    """A masked forward tensor `apply_mask(part.weight, mask)` and the versions it was computed at."""

    __slots__ = ("part", "weight", "mask", "dtype", "device", "versions")

    def __init__(self, part: ExpertWeight, tensor: torch.Tensor, mask: torch.Tensor) -> None:
        self.part, self.weight, self.mask = part, part.weight, mask
        self.dtype, self.device = tensor.dtype, tensor.device
        self.versions = (self.weight._version, mask._version)

    def recompute(self, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
        """The view (`offset`, `size`, `stride`) of the masked tensor, computed on just the elements it spans."""
        weight, mask = self.weight, self.mask
        if (weight._version, mask._version) != self.versions:
            raise RuntimeError(
                f"{type(self.part.owner).__name__}.{self.part.parameter}: the expert weight or its mask was modified "
                "in place between the forward and the backward pass; the sparse experts recompute W * mask in "
                "backward from them (it is not saved), so backward would use other weights than forward did")
        if 0 in size:
            return torch.empty_strided(size, stride, dtype=self.dtype, device=self.device)
        span = 1 + sum((length - 1) * step for length, step in zip(size, stride, strict=True))
        with torch.no_grad():
            part = apply_mask(weight.detach().view(-1)[offset:offset + span], mask.view(-1)[offset:offset + span])
        return part.as_strided(size, stride)


class _SavedView:
    """Stored for backward in place of a view of a masked forward tensor: which tensor and where."""

    __slots__ = ("source", "offset", "size", "stride")

    def __init__(self, source: _Recomputable, tensor: torch.Tensor) -> None:
        self.source, self.offset = source, tensor.storage_offset()
        self.size, self.stride = tuple(tensor.shape), tensor.stride()


def _may_push_saved_tensors_hooks() -> bool:
    """True when the experts forward may run under its own saved-tensor hooks.

    Not while torch.compile traces, not where hooks are disabled (functorch transforms) and not under
    other hooks (non-reentrant activation checkpointing, `save_on_cpu`): the innermost hooks replace
    the outer ones, which would then miss the experts' activations.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    autograd = torch._C._autograd
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if enabled is not None and not enabled():
        return False
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


def _recompute_hooks(sources: dict[int, _Recomputable]):
    """(pack, unpack) saved-tensor hooks that keep a view of a masked forward tensor as a `_SavedView`.

    Everything else is kept as autograd would (detached, with its version checked on unpack, since
    autograd skips its own in-place check for tensors saved through hooks).
    """

    def pack(tensor: torch.Tensor) -> Any:
        if type(tensor) in _PLAIN_TYPES and tensor.numel():
            source = sources.get(tensor.untyped_storage().data_ptr())
            if source is not None and tensor.dtype == source.dtype and tensor.device == source.device:
                return _SavedView(source, tensor)
        return tensor.detach(), tensor._version

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _SavedView):
            return packed.source.recompute(packed.offset, packed.size, packed.stride)
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError(
                f"one of the tensors an experts forward saved for backward (shape {tuple(tensor.shape)}) was modified "
                f"by an in-place operation: version {tensor._version}, expected {version}")
        return tensor

    return pack, unpack


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
