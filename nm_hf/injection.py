"""Put sparse layers into a model (`sparsify`) and take them out again (`finalize`).

Injection is checked completely before anything is touched: every problem found is reported in one
error that names the layers and the fix, and the model is left exactly as it was (an interrupt
midway, Ctrl-C included, rolls back too). Layers are converted in place by switching their class
(same object, same Parameters, same hooks), so parameter names, layouts and weight tying are
untouched. A module whose own code reads a sparse layer's `weight` instead of calling the layer gets hooks
that show it the masked weight while it runs (`nm_hf.layers.reads`); `finalize` removes them. Which modules
can convert, and along which dimension, is the layer-kind registry's business (`nm_hf.layers.kinds`); what
the method does is the method registry's (`nm_hf.methods`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .layers import (
    SparseLayerMixin,
    Target,
    family_kind,
    iter_targets,
    layer_kind_for,
    layer_kind_of_sparse,
    sparse_layers_of,
)
from .layers.base import is_sharded, settle_mask_listeners
from .layers.experts import (
    EXPERT_PARAMETERS,
    NAMED_EXPERTS,
    STACKED_EXPERTS,
    router_layers,
    unsupported_experts,
)
from .layers.read_scan import direct_weight_reads
from .layers.reads import expose_weight_reads, remove_weight_reads
from .methods import available_methods, get_method
from .record import (
    STATE_FINALIZED,
    STATE_TRAINING,
    build_record,
    config_from_record,
    own_config,
    read_record,
    remove_record,
    weight_key,
    write_record,
)

__all__ = ["sparsify", "finalize", "iter_sparse_layers", "find_target_modules", "is_sparsified",
           "after_optimizer_step", "apply_decoupled_decay", "SparsifyError", "sparsity_config_of",
           "baked_weights", "unwrap_model", "model_group_dims", "ignored_layers", "current_record",
           "set_training_step", "training_step", "sparse_training_state", "load_sparse_training_state",
           "ignored_reasons", "parameter_targets"]

logger = logging.getLogger(__name__)

#: name components of task heads that "all-linear" leaves dense (their outputs are logits/labels)
HEAD_NAMES = frozenset({"lm_head", "classifier", "classification_head", "score", "qa_outputs",
                        "pre_classifier", "cls", "head"})


class SparsifyError(ValueError):
    """A model/config combination `sparsify` refuses; the model was not modified."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile(...)`, DDP / DataParallel wrappers (any nesting), else `model`."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def iter_sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayerMixin]]:
    """(name, layer) for every sparse layer in `model` (wrappers unwrapped), in module order.

    The name is the targeted name: the module's, or `<module>.<parameter>` for parameter kinds
    (mixture-of-experts expert weights, whose layer object is owned by the experts module).
    """
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, SparseLayerMixin):  # `sparse_layers_of`'s first case, without a generator per module
            yield name, module
        elif module.__dict__.get("nm_parts"):
            yield from sparse_layers_of(name, module)


def is_sparsified(model: nn.Module) -> bool:
    return any(True for _ in iter_sparse_layers(model))


def _is_layer(module: nn.Module) -> bool:
    """A layer of a registered kind (subclasses included): what selectors and records talk about."""
    return family_kind(module) is not None


def _targets_by_name(model: nn.Module) -> dict[str, Target]:
    """Every weight of a registered kind, by targeted name (module name, or `<module>.<parameter>`)."""
    return {target.name: target for target in iter_targets(model)}


def _entry_hits(units: dict[str, Target], name: str) -> list[str]:
    """Targeted names a selected module name stands for: itself, or the Parameters it owns (experts)."""
    if name in units:
        return [name]
    return [u for u, target in units.items()
            if target.parameter is not None and (target.module_name == name or u.startswith(name + "."))]


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _tieable_output_layers(model: nn.Module) -> set[int]:
    """Layers whose weight a (nested) transformers model declares tie-able to an input embedding (the targets of
    its class's `_tied_weights_keys` whose source is an `nn.Embedding` weight), whether or not this config ties
    them: output heads such as FSMT's untied `decoder.output_projection`, which `get_output_embeddings` misses."""
    found: set[int] = set()
    for sub in model.modules():
        declared = getattr(type(sub), "_tied_weights_keys", None)
        if not isinstance(declared, dict) or not declared:
            continue
        params = dict(sub.named_parameters(remove_duplicate=False))
        owners = {f"{name}.{p}" if name else p: module for name, module in sub.named_modules(remove_duplicate=False)
                  for p in module._parameters}
        for target, source in declared.items():
            if not (isinstance(target, str) and isinstance(source, str)):
                continue
            sources = [owners.get(n) for n in params if re.search("^" + source, n)]
            if not any(isinstance(m, nn.Embedding) for m in sources):
                continue
            found.update(id(owners[n]) for n in params if re.search("^" + target, n) and n in owners)
    return found


def _head_module_ids(model: nn.Module) -> set[int]:
    """The output embedding, layers declared tie-able to an input embedding (`_tieable_output_layers`) and every
    module outside the model's backbone (`model.base_model`, when it is a part of the model: the task heads of a
    `...For<Task>` class, whatever their names, e.g. GPT-2's `multiple_choice_head` or Electra's
    `discriminator_predictions`), and mixture-of-experts routers kept as plain linears (`router_layers`):
    "all-linear" never targets them."""
    heads = _tieable_output_layers(model)
    heads.update(id(model.get_submodule(name)) for name in router_layers(model))
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    backbone = getattr(model, "base_model", model)
    if isinstance(backbone, nn.Module) and backbone is not model:
        inside = {id(module) for module in backbone.modules()}
        heads.update(id(module) for module in model.modules() if id(module) not in inside)
    return heads


def _computed_weight(weight: torch.Tensor) -> bool:
    """True for a weight that is no Parameter: recomputed by a forward pre-hook (the hook-based
    `torch.nn.utils.weight_norm`, `spectral_norm`) from Parameters of other names. Masking it works
    until `finalize`, whose baked weight the next forward overwrites and the state dict never holds."""
    return not isinstance(weight, nn.Parameter)


def _expose_direct_reads(model: nn.Module, layers: list[SparseLayerMixin]) -> None:
    """Hook the modules that read the weight of one of `layers` directly, so that the read sees the masked weight
    while they run (`nm_hf.layers.reads.expose_weight_reads`)."""
    ids = {id(layer) for layer in layers if isinstance(layer, nn.Module)}
    if not ids:
        return
    for reader_name, reads in direct_weight_reads(model).items():
        reader = model.get_submodule(reader_name)
        paths = [path for path in reads if id(reader.get_submodule(".".join(path))) in ids]
        if paths:
            expose_weight_reads(reader, paths, name=reader_name)
            for path in paths:
                logger.info("nm_hf.sparsify: %s's weight is read directly by %s: it sees the masked weight while "
                            "that module runs", ".".join(filter(None, (reader_name, *path))), reads[path])


def _unsupported_expert_weights(model: nn.Module) -> dict[str, str]:
    """`{<experts module>.<parameter>: experts class name}` for the expert weights nm_hf has no layout for
    (`nm_hf.layers.experts.unsupported_experts`): never targeted, they stay dense."""
    modules = dict(model.named_modules())
    return {f"{name}.{param}" if name else param: type(modules[name]).__name__
            for name, params in unsupported_experts(model).items() for param in params}


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _select(model: nn.Module, selector: str | tuple[str, ...], field: str) -> tuple[list[str], list[str]]:
    """Names of layers matched by `selector`, plus problems (unknown names, non-layer hits)."""
    problems: list[str] = []
    named = dict(model.named_modules())
    units = _targets_by_name(model)
    if isinstance(selector, str):
        pattern = re.compile(selector)
        hits = [n for n, target in units.items()
                if pattern.fullmatch(n) or (target.parameter is not None and pattern.fullmatch(target.module_name))]
        if not hits:
            problems.append(f"{field}={selector!r} (regex, full match) matched no linear layer")
        return hits, problems
    hits: list[str] = []
    for entry in selector:
        matched = [n for n in [*named, *(u for u in units if u not in named)] if n and _name_matches(n, entry)]
        if not matched:
            problems.append(f"{field} entry {entry!r} matched no module (names look like {_example_names(model)})")
            continue
        for n in matched:
            found = _entry_hits(units, n)
            if not found and n in named and isinstance(getattr(named[n], "base_layer", None), nn.Module) \
                    and isinstance(getattr(named[n], "adapter_layer_names", None), tuple):
                problems.append(f"{field} entry {entry!r} matched {n!r}, a PEFT {type(named[n]).__name__} adapter "
                                f"layer: name the layer under it ({n + '.base_layer'!r}), or sparsify the base "
                                "model before get_peft_model")
            elif not found and n in named and (params := unsupported_experts(model).get(n)):
                problems.append(f"{field} entry {entry!r} matched {n!r}, {type(named[n]).__name__} experts whose "
                                f"Parameters {', '.join(params)} are in a layout nm_hf has none for "
                                f"({_KNOWN_EXPERTS}): they stay dense")
            elif not found and n in named:
                problems.append(f"{field} entry {entry!r} matched {n!r}, a {type(named[n]).__name__}, "
                                "not a linear layer")
            hits += [h for h in found if h not in hits]
    return hits, problems


def _example_names(model: nn.Module, k: int = 3) -> str:
    names = [n for n, mod in model.named_modules() if n and _is_layer(mod)][:k]
    return ", ".join(repr(n) for n in names) or "(no linear layers)"


def find_target_modules(model: nn.Module, config: SparsityConfig) -> list[str]:
    """Names of the layers `sparsify(model, config)` would convert; raises `SparsifyError` on any problem."""
    model = unwrap_model(model)
    targets, problems = _resolve_targets(model, config)
    if problems:
        raise SparsifyError(_format_problems(model, problems))
    return targets


def _is_sparse_target(target: Target) -> bool:
    parts = target.module.__dict__.get("nm_parts") or {}
    return isinstance(target.module, SparseLayerMixin) or target.parameter in parts


def _adapter_layers(model: nn.Module) -> dict[str, str]:
    """PEFT adapter modules (LoRA's lora_A / lora_B, modules_to_save copies, ...) by name, with what they are.

    PEFT trains them; they are never N:M targets (`nm_hf.peft.preserve_sparsity` keeps merged LoRA deltas
    N:M instead). Found without importing peft: a PEFT tuner layer lists them in `adapter_layer_names`.
    """
    prefixes: dict[str, str] = {}
    for name, module in model.named_modules():
        attrs = getattr(module, "adapter_layer_names", None)
        if isinstance(attrs, tuple):
            for attr in attrs:
                prefixes[f"{name}.{attr}" if name else attr] = f"{attr} of the PEFT {type(module).__name__} {name!r}"
    found = {}
    for name, _ in model.named_modules():
        parts = name.split(".")
        owner = next((prefixes[p] for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if p in prefixes),
                     None)
        if owner is not None:
            found[name] = owner
    return found


def _saved_originals(model: nn.Module) -> dict[str, str]:
    """Modules under `original_module` of a PEFT `modules_to_save` wrapper, by name, with their wrapper's name.

    The wrapper's forward runs its trainable copy (`modules_to_save`), which `sparsify` never converts: a sparse
    original would only run with the adapters disabled, and the copy would train and merge dense.
    """
    wrappers = [name for name, module in model.named_modules()
                if "modules_to_save" in (getattr(module, "adapter_layer_names", None) or ())
                and isinstance(getattr(module, "original_module", None), nn.Module)]
    found = {}
    for wrapper in wrappers:
        prefix = f"{wrapper}.original_module" if wrapper else "original_module"
        for name, _ in model.named_modules():
            if name == prefix or name.startswith(prefix + "."):
                found[name] = wrapper
    return found


def _preset_targets(model: nn.Module, config: SparsityConfig, units: dict[str, Target]) -> list[str]:
    """Targets of "all-linear" (linear kinds) / "all" (every kind, input sizes divisible by m only)."""
    heads = _head_module_ids(model)
    adapters = {**_adapter_layers(model), **_saved_originals(model)}
    tied = _embedding_weights(model)
    every = config.target_modules == "all"
    return [
        n for n, target in units.items()
        if target.kind.matches(target.module) and not _is_sparse_target(target)
        and (every or target.kind.linear)
        and not (every and target.input_features % config.m)
        and id(target.module) not in heads
        and id(target.weight) not in tied
        and not _computed_weight(target.weight)
        and not HEAD_NAMES.intersection(target.module_name.split("."))
        and target.module_name not in adapters
    ]


def ignored_reasons(model: nn.Module, config: SparsityConfig, targets: list[str]) -> dict[str, str]:
    """Why layers that are not targeted were left dense, for those with a reason beyond being a head or
    excluded: under `"all-linear"` and `"all"`, an expert weight in a layout nm_hf has none for; under `"all"`
    also a grouped convolution, an input size not divisible by m."""
    if config.target_modules not in ("all", "all-linear"):
        return {}
    chosen = set(targets)
    model = unwrap_model(model)
    units = _targets_by_name(model)
    reasons = {}
    for name, cls in _unsupported_expert_weights(model).items():
        reasons[name] = _unsupported_expert_reason(cls)
    for name, target in units.items():
        if name in chosen or name in reasons or config.target_modules != "all":
            continue
        refusal = target.refusal
        if refusal is not None:
            reasons[name] = refusal
        elif _computed_weight(target.weight):
            reasons[name] = _COMPUTED_WEIGHT
        elif target.input_features % config.m:
            reasons[name] = f"{target.input_features} input features are not divisible by m={config.m}"
    return reasons


#: the expert layouts nm_hf knows, for the reason an unknown one stays dense
_KNOWN_EXPERTS = ("it supports fused [num_experts, out, in] / [num_experts, in, out] Parameters "
                  + ", ".join(EXPERT_PARAMETERS)
                  + "".join(f", {cls}.{name}" for cls, names in NAMED_EXPERTS.items() for name in names)
                  + " and the stacked [num_experts * rows, cols] ones of "
                  + ", ".join(STACKED_EXPERTS))


def _unsupported_expert_reason(cls: str) -> str:
    return f"an expert weight of {cls}, a layout nm_hf has none for ({_KNOWN_EXPERTS})"


def _log_ignored(model: nn.Module, reasons: dict[str, str]) -> None:
    """Log why layers were left dense: one line per layer, one per experts class for unsupported expert weights
    (a line per weight would repeat the same reason for every layer of the model)."""
    unsupported = _unsupported_expert_weights(model)
    for name, reason in reasons.items():
        if name not in unsupported:
            logger.warning("nm_hf.sparsify: %s left dense: %s", name, reason)
    by_class: dict[str, dict[str, list[str]]] = {}
    for name in reasons:
        if name in unsupported:
            module, _, param = name.rpartition(".")
            by_class.setdefault(unsupported[name], {}).setdefault(module, []).append(param)
    for cls, modules in by_class.items():
        first, params = next(iter(modules.items()))
        more = f" (+{len(modules) - 1} more)" if len(modules) > 1 else ""
        logger.warning("nm_hf.sparsify: %s experts %r%s left dense: Parameters %s hold its expert weights in a layout "
                       "nm_hf has none for (%s)", cls, first, more, ", ".join(params), _KNOWN_EXPERTS)


_COMPUTED_WEIGHT = ("its weight is not a Parameter but recomputed in every forward by a hook (the hook-based "
                    "torch.nn.utils.weight_norm / spectral_norm): finalize could not bake the N:M weights into it")


def _resolve_targets(model: nn.Module, config: SparsityConfig) -> tuple[list[str], list[str]]:
    units = _targets_by_name(model)
    if config.target_modules in ("all-linear", "all"):
        targets = _preset_targets(model, config, units)
        problems: list[str] = []
    else:
        targets, problems = _select(model, config.target_modules, "target_modules")
    if config.exclude_modules is not None:
        excluded, exclude_problems = _select(model, config.exclude_modules, "exclude_modules")
        problems += exclude_problems
        targets = [n for n in targets if n not in set(excluded)]
    order = {n: i for i, n in enumerate(units)}
    targets = sorted(targets, key=order.__getitem__)
    if not targets and not problems:
        problems.append("no layer left to sparsify (target_modules/exclude_modules selected nothing)")

    embedding_weights = _embedding_weights(model)
    adapters = _adapter_layers(model)
    originals = _saved_originals(model)
    indivisible: dict[str, str] = {}  # name -> its problem line, for layers whose input size m does not divide
    sizes: set[int] = set()
    for name in targets:
        target = units[name]
        mod = target.module
        short = name.rsplit('.', 1)[-1]
        hint = f"add {short!r} or {name!r} to exclude_modules" if short != name else f"add {name!r} to exclude_modules"
        if target.module_name in adapters:
            problems.append(f"{name!r} is {adapters[target.module_name]}, a PEFT adapter layer: sparsify the base "
                            "model before adding adapters, and keep merged LoRA deltas N:M with "
                            "nm_hf.peft.preserve_sparsity")
            continue
        if target.module_name in originals:
            problems.append(f"{name!r} is in PEFT's modules_to_save ({originals[target.module_name]!r}): its forward "
                            "runs a trainable copy that would stay dense; sparsify the base model before "
                            f"get_peft_model (the copy of a sparse layer is sparse), or {hint}")
            continue
        if _is_sparse_target(target):
            problems.append(f"{name!r} is already sparse (the model was sparsified before)")
            continue
        if target.refusal is not None:
            problems.append(f"{name!r} is {target.refusal}; {hint}")
            continue
        kind = layer_kind_for(mod) if target.parameter is None else target.kind
        if kind is None or not kind.matches(mod):
            problems.append(f"{name!r} is a {type(mod).__name__}, a subclass with its own behaviour, "
                            f"not a plain {target.kind.dense_class.__name__}; {hint}")
            continue
        weight = target.weight
        if weight.is_meta or weight.device.type == "meta":
            problems.append(f"{name!r} has its weight on the meta device; load real weights first "
                            "(sparsify after from_pretrained, without init_empty_weights)")
            continue
        if _computed_weight(weight):
            problems.append(f"{name!r}: {_COMPUTED_WEIGHT}; remove the hook first (torch.nn.utils.remove_weight_norm) "
                            f"or {hint}")
            continue
        if not weight.dtype.is_floating_point:
            problems.append(f"{name!r} has {weight.dtype} weights (quantized?); N:M needs floating-point "
                            f"weights; {hint}")
            continue
        in_features = target.input_features
        if in_features % config.m:
            indivisible[name] = f"{name!r} has {in_features} input features, not divisible by m={config.m}; {hint}"
            sizes.add(in_features)
            problems.append(indivisible[name])
        elif config.transposable and target.output_features % config.m:
            problems.append(f"{name!r} has {target.output_features} output features, not divisible by m={config.m} "
                            f"(transposable masks tile the weight in {config.m}x{config.m} blocks); {hint}")
        if id(weight) in embedding_weights:
            problems.append(f"{name!r} shares its weight with an embedding (tied weights); {hint}")
        if "forward" in mod.__dict__:
            problems.append(f"{name!r} has an instance-level forward (accelerate hooks / device_map "
                            "offloading?); sparsify the model before dispatching it")
    if len(targets) > 1 and len(indivisible) == len(targets):
        # excluding every layer leaves nothing: the pattern is what does not fit, say it once (a single target
        # keeps its own line, which names it)
        first = problems.index(indivisible[targets[0]])
        problems = [p for p in problems if p not in indivisible.values()]
        problems.insert(first, f"the input size of every targeted layer ({', '.join(map(str, sorted(sizes)))}) is "
                               f"not divisible by m={config.m}: choose an m that divides them")
    return targets, problems


#: the start of the warning `sparsify` gives for a decay its method ignores (to filter it where it repeats one)
IGNORED_DECAY_WARNING = "SparsityConfig.decay="


def _warn_ignored_decay(config: SparsityConfig) -> None:
    """A decay set for a method that reads none (the method registry says: `uses_decay`) would silently do
    nothing: say so. 0 and the default are no choice of the user's, so they stay quiet."""
    default = SparsityConfig.__dataclass_fields__["decay"].default
    if get_method(config.method).uses_decay or config.decay in (0.0, default):
        return
    users = ", ".join(name for name in available_methods() if get_method(name).uses_decay)
    warnings.warn(f"{IGNORED_DECAY_WARNING}{config.decay:g} has no effect: method {config.method!r} uses no decay "
                  f"(methods that do: {users})", UserWarning, stacklevel=3)


def _format_problems(model: nn.Module, problems: list[str]) -> str:
    head = f"cannot sparsify {type(model).__name__} (the model was not modified):"
    return head + "".join(f"\n  - {p}" for p in problems)


def model_group_dims(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Input dimension of each named layer's weight, from the layer-kind registry."""
    model = unwrap_model(model)
    units = _targets_by_name(model)
    modules = dict(model.named_modules())
    dims = {}
    for name in names:
        if name not in units:
            what = type(modules[name]).__name__ if name in modules else "missing"
            raise ValueError(f"layer {name!r} is {what} in {type(model).__name__}, not a layer kind nm_hf knows")
        dims[name] = units[name].group_dim
    return dims


def parameter_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Which of `names` are Parameters (parameter kinds: expert weights) rather than modules."""
    units = _targets_by_name(unwrap_model(model))
    return [name for name in names if name in units and units[name].parameter is not None]


def ignored_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Layers of a registered kind that are not targeted (heads, exclusions), and expert weights nm_hf has no layout
    for (`<experts module>.<parameter>`), in model order: left dense."""
    model = unwrap_model(model)
    target_set = set(targets)
    units = _targets_by_name(model)
    names = [n for n in units if n not in target_set]
    unsupported = _unsupported_expert_weights(model)
    if not unsupported:
        return names
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    owner = {**{n: units[n].module_name for n in names}, **{n: n.rpartition(".")[0] for n in unsupported}}
    return sorted([*names, *unsupported], key=lambda n: order[owner[n]])


def current_record(model: nn.Module, config: SparsityConfig, targets: list[str], state: str,
                   **extra: Any) -> dict[str, Any]:
    """The record describing `model` sparsified with `config` on `targets`, in `state`."""
    model = unwrap_model(model)
    return build_record(config, targets, model_group_dims(model, targets), ignored_layers(model, targets),
                        state, parameters=parameter_targets(model, targets),
                        ignored_reasons=ignored_reasons(model, config, targets), **extra)


def _as_config(config: SparsityConfig | dict[str, Any] | None) -> SparsityConfig:
    if config is None:
        return SparsityConfig()
    if isinstance(config, dict):
        return SparsityConfig.from_dict(config)
    if isinstance(config, str):
        raise TypeError(f"config must be a SparsityConfig or a dict, got the string {config!r}: for a pattern "
                        f"use SparsityConfig.from_pattern({config!r})")
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")
    return config


def sparsify(model: nn.Module, config: SparsityConfig | dict[str, Any] | None = None) -> nn.Module:
    """Convert the targeted layers of `model` to N:M sparse layers, in place; returns `model`.

    Everything is checked first (unknown names, nothing matched, sizes not divisible by m,
    non-float, meta or hook-computed weights, layers already sparse, tied embeddings); on any problem a
    `SparsifyError` lists them all and the model is unchanged. The config (and the targeted layer
    names) is recorded on `model.config` so `save_pretrained` stores it in config.json. Compiled
    (`torch.compile`) and DDP-wrapped models are sparsified inside their wrapper, under the names
    of the inner model.
    """
    config = _as_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    if is_sparsified(inner):
        first = next(iter_sparse_layers(inner))[0]
        raise SparsifyError(f"cannot sparsify {type(inner).__name__}: it already has sparse layers "
                            f"(e.g. {first!r}); call nm_hf.finalize(model) first to start over")

    targets, problems = _resolve_targets(inner, config)
    if problems:
        raise SparsifyError(_format_problems(inner, problems))
    _warn_ignored_decay(config)

    units = _targets_by_name(inner)
    previous_record = read_record(inner)
    snapshots: dict[str, torch.Tensor] = {}
    restore_config = own_config(inner)  # the record must not reach other models built from the same config
    try:
        # the record first: a config that refuses attributes must fail before any layer is converted
        if getattr(inner, "config", None) is not None:
            try:
                write_record(inner, current_record(inner, config, targets, STATE_TRAINING))
            except (AttributeError, TypeError) as err:
                raise SparsifyError(f"cannot sparsify {type(inner).__name__}: model.config does not accept the "
                                    f"nm_sparsity record ({err}); the model was not modified") from err
        layers: dict[str, SparseLayerMixin] = {}
        for name in targets:
            target = units[name]
            layers[name] = target.kind.convert(target.module, target.parameter, config)
        # method hooks (e.g. "fixed" zeroes its pruned weights): keep copies so an interrupt can undo them; a
        # method without its own hook (sr-ste, ste, ...) changes nothing, and copying a 7B model's weights would
        # double their memory for nothing
        for name, layer in layers.items():
            if layer.method.has_prepare:
                snapshots[name] = layer.weight.detach().clone()
            layer.method.prepare(layer)
        _expose_direct_reads(inner, list(layers.values()))
    except BaseException:
        _undo_conversion(inner, units, targets, previous_record, snapshots)
        restore_config()
        raise
    _log_ignored(inner, ignored_reasons(inner, config, targets))
    return model


@torch.no_grad()
def _undo_conversion(model: nn.Module, units: dict[str, Target], targets: list[str], previous_record: Any,
                     snapshots: dict[str, torch.Tensor]) -> None:
    remove_weight_reads(model)
    # newest first: a Parameter shared by two targets gets back the copy taken before either changed it
    for name in reversed(targets):
        if name in snapshots:
            weight = units[name].weight
            # an inference tensor can be written in inference mode only (plain tensors under no_grad, as here)
            with torch.inference_mode() if weight.is_inference() else contextlib.nullcontext():
                weight.copy_(snapshots[name])
    for name in targets:
        target = units[name]
        layer = dict(sparse_layers_of(target.module_name, target.module)).get(name)
        if layer is not None:
            _restore_dense_class(layer)
    if getattr(model, "config", None) is not None:
        if previous_record is None:
            remove_record(model)
        else:
            write_record(model, previous_record)


def _restore_dense_class(layer: SparseLayerMixin) -> None:
    layer_kind_of_sparse(layer).restore(layer)


def sparsity_config_of(model: nn.Module) -> SparsityConfig:
    """The config a sparsified model runs with: its `nm_sparsity` record, else read off its layers."""
    record = read_record(unwrap_model(model))
    if record is not None:
        return config_from_record(record)
    _, layer = next(iter_sparse_layers(model))
    return SparsityConfig(n=layer.nm_n, m=layer.nm_m, method=layer.nm_method, decay=layer.nm_decay,
                          decay_mode=layer.nm_decay_mode, method_args=layer.nm_method_args,
                          transposable=layer.nm_transposable, mask_update_interval=layer.nm_mask_interval)


@torch.no_grad()
def baked_weights(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`{state-dict key: N:M weight}` for every sparse layer (its method's `bake`), without touching the model.

    The baked weight is `weight * mask` for most methods (`beta * S(W)` for S-STE). `weights` (state-dict
    key -> tensor) replaces the layers' own weights, e.g. a state dict gathered elsewhere; the mask is
    then chosen from it exactly as the layer would, except with `mask_update_interval > 1`, where the
    layer's mask in use (chosen at its last refresh, which these weights cannot reproduce) is applied.
    Unmasked methods give the weight unchanged. Used by `finalize` and by the trainer's baked saves.
    """
    baked = {}
    for name, layer in iter_sparse_layers(model):
        key = weight_key(name, layer.is_parameter_target)
        if weights is None:
            baked[key] = layer.effective_weight()
            continue
        if key not in weights:
            raise KeyError(f"sparse layer {name!r}: no {key!r} in the state dict to bake")
        weight = weights[key].detach()
        if layer.is_masked:
            mask = layer.current_mask() if layer.mask_is_periodic else None
            if mask is None or mask.shape != weight.shape or mask.device != weight.device:
                mask = layer.compute_mask(weight)
            weight = layer.method.bake(layer, weight.contiguous(), mask)
        baked[key] = weight
    return baked


def measured_sparsity(tensors: list[torch.Tensor]) -> float:
    """Fraction of exact zeros; sharded tensors (DTensor) are counted over all shards (a collective)."""
    zeros = sum(int(_full((t == 0).sum())) for t in tensors)
    total = sum(t.numel() for t in tensors)
    return round(zeros / max(total, 1), 6)


def _full(count: torch.Tensor) -> torch.Tensor:
    return count.full_tensor() if is_sharded(count) else count


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake the N:M weights (`weight * mask`; S-STE: `beta * S(W)`) in and put plain `nn.Linear`/`Conv1D` back.

    Afterwards `save_pretrained` + plain `AutoModel*.from_pretrained` reload the model bit-exactly,
    and config.json records the pattern, the targeted layers and the measured sparsity. A model sharded
    with FSDP2: every rank calls it (each bakes its own shards; the sparsity count is one collective), then
    rank 0 saves the full state dict (docs/distributed.md).
    """
    inner = unwrap_model(model)
    layers = list(iter_sparse_layers(inner))
    if not layers:
        raise ValueError(f"{type(inner).__name__} has no sparse layers to finalize (call nm_hf.sparsify first)")
    config = sparsity_config_of(inner)
    for _, layer in layers:  # e.g. a tracker still waiting for the last step's masks takes them now
        settle_mask_listeners(layer)
    baked = baked_weights(inner)
    names = [name for name, _ in layers]
    record = current_record(inner, config, names, STATE_FINALIZED,
                            sparsity=measured_sparsity(list(baked.values())))
    for name, layer in layers:
        layer.weight.copy_(baked[weight_key(name, layer.is_parameter_target)])
    remove_weight_reads(inner)
    for _, layer in layers:
        _restore_dense_class(layer)
    if getattr(inner, "config", None) is not None:
        write_record(inner, record)
    return model


@torch.no_grad()
def after_optimizer_step(model: nn.Module, lr: float) -> int:
    """Count one optimizer step on every sparse layer and run its method's hook (e.g. SR-STE's decoupled decay).

    Call it right after each optimizer step in a plain loop (SparseTrainer does it for you): the step
    count drives `mask_update_interval` and scheduled methods ("decaying-mask"). Returns the number of
    layers the hooks changed.
    """
    layers = list(iter_sparse_layers(model))
    _check_shards(layers)
    changed = 0
    for _, layer in layers:
        layer.nm_step += 1
        changed += bool(layer.method.after_optimizer_step(layer, lr))
    return changed


def _check_shards(layers: list[tuple[str, SparseLayerMixin]]) -> None:
    """Refuse sharded weights that cannot be masked shard by shard (`SparseLayerMixin.sharding_problem`) at the
    first step, not when `finalize` or the tracker first look at the shards: the forward sees whole all-gathered
    weights and never checks."""
    problems = []
    for name, layer in layers:
        if is_sharded(layer.weight):
            try:
                layer.check_sharding()
            except ValueError as err:
                problems.append(f"{name!r}: {err}")
    if problems:
        raise ValueError("after_optimizer_step: sharded sparse layers cannot be masked shard by shard (nothing was "
                         "counted): " + "; ".join(problems))


#: the older name of `after_optimizer_step` (the same function, kept importable): call one of them once per step
apply_decoupled_decay = after_optimizer_step


def _check_step(step: Any, what: str) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{what} must be an integer >= 0 (optimizer steps taken), got {step!r}")
    return step


def set_training_step(model: nn.Module, step: int) -> None:
    """Set every sparse layer's count of optimizer steps, e.g. to the checkpoint's step on resume.

    Scheduled methods ("decaying-mask") and `mask_update_interval` follow this count, which
    `after_optimizer_step` advances; a fresh `sparsify` starts it at 0.
    """
    step = _check_step(step, "set_training_step: step")
    layers = list(iter_sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no sparse layers (call nm_hf.sparsify first)")
    for _, layer in layers:
        layer.set_step(step)


def training_step(model: nn.Module) -> int:
    """The optimizer steps the sparse layers have counted (ValueError if they disagree)."""
    steps = {layer.nm_step for _, layer in iter_sparse_layers(model)}
    if len(steps) != 1:
        raise ValueError("the sparse layers have counted different numbers of steps: "
                         f"{sorted(steps) if steps else 'no sparse layers'}")
    return steps.pop()


#: version of the dict `sparse_training_state` returns
TRAINING_STATE_FORMAT = 1


def sparse_training_state(model: nn.Module) -> dict[str, Any]:
    """What a resume needs beyond the weights: the step count, each layer's method state, periodic masks.

    `{"format", "step", "layers": {name: {"method_state": {...}, "mask": bool tensor (only with
    mask_update_interval > 1: the mask in use cannot be recomputed from the weights)}}}`. Plain
    Python and tensors: save it with `torch.save`, restore it with `load_sparse_training_state`.
    """
    layers = list(iter_sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no sparse layers (call nm_hf.sparsify first)")
    state: dict[str, Any] = {"format": TRAINING_STATE_FORMAT, "step": training_step(model), "layers": {}}
    for name, layer in layers:
        entry: dict[str, Any] = {"method_state": dict(layer.nm_method_state)}
        if layer.mask_is_periodic:
            entry["mask"] = layer.current_mask().detach().cpu().clone()
        state["layers"][name] = entry
    return state


def load_sparse_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore `sparse_training_state(...)` into a model sparsified with the same config (after its weights).

    Everything is checked first (layer names, method states, mask shapes); on a mismatch a ValueError
    names the layer and the model is unchanged.
    """
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT or "layers" not in state:
        raise ValueError(f"not a sparse training state of format {TRAINING_STATE_FORMAT} (from "
                         "nm_hf.sparse_training_state)")
    step = _check_step(state.get("step"), "sparse training state: step")
    layers = dict(iter_sparse_layers(model))
    saved = state["layers"]
    missing, extra = sorted(set(layers) - set(saved)), sorted(set(saved) - set(layers))
    if missing or extra:
        raise ValueError(f"sparse training state does not match the model's sparse layers: missing {missing}, "
                         f"unexpected {extra}")
    checked: dict[str, tuple[dict[str, Any], torch.Tensor | None]] = {}
    for name, layer in layers.items():
        entry = saved[name]
        try:
            method_state = layer.method.check_state(layer, entry.get("method_state") or {})
        except ValueError as err:
            raise ValueError(f"sparse training state, layer {name!r}: {err}") from None
        mask = entry.get("mask")
        if layer.mask_is_periodic and mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != layer.weight.shape:
                raise ValueError(f"sparse training state, layer {name!r}: the mask must be a bool tensor of shape "
                                 f"{tuple(layer.weight.shape)}")
        checked[name] = (method_state, mask if layer.mask_is_periodic else None)
    for name, layer in layers.items():
        method_state, mask = checked[name]
        layer.nm_method_state = method_state
        layer.set_step(step)
        if mask is not None:
            layer.restore_mask(mask.to(layer.weight.device))
