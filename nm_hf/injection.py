"""Put sparse layers into a model (`sparsify`) and take them out again (`finalize`).

Injection is checked completely before anything is touched: every problem found is reported in one
error that names the layers and the fix, and the model is left exactly as it was. Layers are
converted in place by switching their class (same object, same Parameters, same hooks), so
parameter names, layouts and weight tying are untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import CONFIG_KEY, SparsityConfig
from .layers import DENSE_CLASS_FOR, SPARSE_CLASS_FOR, SparseLayerMixin

__all__ = ["sparsify", "finalize", "iter_sparse_layers", "find_target_modules", "is_sparsified",
           "apply_decoupled_decay", "SparsifyError", "sparsity_config_of"]

#: nn.Linear subclasses in transformers that only re-implement the same affine map (safe to convert)
PLAIN_LINEAR_SUBCLASSES = frozenset({"FalconLinear"})

#: name components of task heads that "all-linear" leaves dense (their outputs are logits/labels)
HEAD_NAMES = frozenset({"lm_head", "classifier", "classification_head", "score", "qa_outputs",
                        "pre_classifier", "cls", "head"})


class SparsifyError(ValueError):
    """A model/config combination `sparsify` refuses; the model was not modified."""


def iter_sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayerMixin]]:
    """(name, layer) for every sparse layer in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLayerMixin):
            yield name, module


def is_sparsified(model: nn.Module) -> bool:
    return any(True for _ in iter_sparse_layers(model))


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _sparse_class(module: nn.Module) -> type | None:
    """The sparse class to convert `module` to, or None if it is not a plain projection."""
    if type(module) in SPARSE_CLASS_FOR:
        return SPARSE_CLASS_FOR[type(module)]
    if isinstance(module, nn.Linear) and type(module).__name__ in PLAIN_LINEAR_SUBCLASSES:
        return SPARSE_CLASS_FOR[nn.Linear]
    return None


def _input_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _head_module_ids(model: nn.Module) -> set[int]:
    """Modules "all-linear" never targets: the output embedding and anything sharing an embedding's weight."""
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    return ids


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _select(model: nn.Module, selector: str | list[str], field: str) -> tuple[list[str], list[str]]:
    """Names of linear-like modules matched by `selector`, plus problems (unknown names, non-linear hits)."""
    problems: list[str] = []
    named = dict(model.named_modules())
    if isinstance(selector, str):
        pattern = re.compile(selector)
        hits = [n for n, mod in named.items() if n and _is_linear_like(mod) and pattern.fullmatch(n)]
        if not hits:
            problems.append(f"{field}={selector!r} (regex, full match) matched no linear layer")
        return hits, problems
    hits: list[str] = []
    for entry in selector:
        matched = [n for n in named if n and _name_matches(n, entry)]
        if not matched:
            problems.append(f"{field} entry {entry!r} matched no module (names look like {_example_names(model)})")
            continue
        for n in matched:
            if not _is_linear_like(named[n]):
                problems.append(f"{field} entry {entry!r} matched {n!r}, a {type(named[n]).__name__}, "
                                "not a linear layer")
            elif n not in hits:
                hits.append(n)
    return hits, problems


def _example_names(model: nn.Module, k: int = 3) -> str:
    names = [n for n, mod in model.named_modules() if n and _is_linear_like(mod)][:k]
    return ", ".join(repr(n) for n in names) or "(no linear layers)"


def find_target_modules(model: nn.Module, config: SparsityConfig) -> list[str]:
    """Names of the layers `sparsify(model, config)` would convert; raises `SparsifyError` on any problem."""
    targets, problems = _resolve_targets(model, config)
    if problems:
        raise SparsifyError(_format_problems(model, problems))
    return targets


def _resolve_targets(model: nn.Module, config: SparsityConfig) -> tuple[list[str], list[str]]:
    named = dict(model.named_modules())
    if config.target_modules == "all-linear":
        heads = _head_module_ids(model)
        tied = _embedding_weights(model)
        targets = [
            n for n, mod in named.items()
            if n and _sparse_class(mod) is not None
            and id(mod) not in heads
            and id(mod.weight) not in tied
            and not HEAD_NAMES.intersection(n.split("."))
        ]
        problems: list[str] = []
    else:
        targets, problems = _select(model, config.target_modules, "target_modules")
    if config.exclude_modules is not None:
        excluded, exclude_problems = _select(model, config.exclude_modules, "exclude_modules")
        problems += exclude_problems
        targets = [n for n in targets if n not in set(excluded)]
    order = {n: i for i, n in enumerate(named)}
    targets = sorted(targets, key=order.__getitem__)
    if not targets and not problems:
        problems.append("no layer left to sparsify (target_modules/exclude_modules selected nothing)")

    embedding_weights = _embedding_weights(model)
    for name in targets:
        mod = named[name]
        hint = f"add {name.rsplit('.', 1)[-1]!r} or {name!r} to exclude_modules"
        if isinstance(mod, SparseLayerMixin):
            problems.append(f"{name!r} is already sparse (the model was sparsified before)")
            continue
        if _sparse_class(mod) is None:
            problems.append(f"{name!r} is a {type(mod).__name__}, a subclass with its own behaviour, "
                            f"not a plain nn.Linear/Conv1D; {hint}")
            continue
        weight = mod.weight
        if weight.is_meta or weight.device.type == "meta":
            problems.append(f"{name!r} has its weight on the meta device; load real weights first "
                            "(sparsify after from_pretrained, without init_empty_weights)")
            continue
        if not weight.dtype.is_floating_point:
            problems.append(f"{name!r} has {weight.dtype} weights (quantized?); N:M needs floating-point "
                            f"weights; {hint}")
            continue
        in_features = _input_features(mod)
        if in_features % config.m:
            problems.append(f"{name!r} has {in_features} input features, not divisible by m={config.m}; {hint}")
        if id(weight) in embedding_weights:
            problems.append(f"{name!r} shares its weight with an embedding (tied weights); {hint}")
        if "forward" in mod.__dict__:
            problems.append(f"{name!r} has an instance-level forward (accelerate hooks / device_map "
                            "offloading?); sparsify the model before dispatching it")
    return targets, problems


def _format_problems(model: nn.Module, problems: list[str]) -> str:
    head = f"cannot sparsify {type(model).__name__} (the model was not modified):"
    return head + "".join(f"\n  - {p}" for p in problems)


def sparsify(model: nn.Module, config: SparsityConfig | dict[str, Any] | None = None) -> nn.Module:
    """Convert the targeted linear layers of `model` to N:M sparse layers, in place; returns `model`.

    Everything is checked first (unknown names, nothing matched, sizes not divisible by m,
    non-float or meta weights, layers already sparse, tied embeddings); on any problem a
    `SparsifyError` lists them all and the model is unchanged. The config (and the targeted layer
    names) is recorded on `model.config` so `save_pretrained` stores it in config.json.
    """
    if config is None:
        config = SparsityConfig()
    elif isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    elif not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_sparsified(model):
        first = next(iter_sparse_layers(model))[0]
        raise SparsifyError(f"cannot sparsify {type(model).__name__}: it already has sparse layers "
                            f"(e.g. {first!r}); call nm_hf.finalize(model) first to start over")

    targets, problems = _resolve_targets(model, config)
    if problems:
        raise SparsifyError(_format_problems(model, problems))

    # the record first: a config that refuses attributes must fail before any layer is converted
    previous_record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    try:
        _record_config(model, config, targets, state="training")
    except (AttributeError, TypeError) as err:
        raise SparsifyError(f"cannot sparsify {type(model).__name__}: model.config does not accept the "
                            f"'{CONFIG_KEY}' record ({err}); the model was not modified") from err
    named = dict(model.named_modules())
    try:
        for name in targets:
            module = named[name]
            dense_class = type(module)
            module.__class__ = _sparse_class(module)
            module._nm_setup(config)
            module._nm_dense_class = dense_class
    except BaseException:
        _undo_conversion(model, named, targets, previous_record)
        raise
    # method "fixed": one-shot magnitude pruning; pruned weights are zeroed now and get no gradient
    # afterwards, so the mask recomputed from the weights stays the one chosen here
    for name in targets:
        named[name]._nm_prune_now()
    return model


def _undo_conversion(model: nn.Module, named: dict, targets: list[str], previous_record: Any) -> None:
    for name in targets:
        module = named[name]
        if isinstance(module, SparseLayerMixin):
            dense_class = module.__dict__.get("_nm_dense_class", DENSE_CLASS_FOR[type(module)])
            module._nm_teardown()
            module.__class__ = dense_class
    model_config = getattr(model, "config", None)
    if model_config is not None:
        if previous_record is None:
            model_config.__dict__.pop(CONFIG_KEY, None)
        else:
            setattr(model_config, CONFIG_KEY, previous_record)


#: keys `_record_config` writes itself (dropped from a stored config before re-recording)
_RECORD_KEYS = ("targeted_modules", "ignored_modules", "conv1d_modules", "state", "sparsity")


def _record_config(model: nn.Module, config: SparsityConfig, targets: list[str], state: str,
                   **extra: Any) -> None:
    model_config = getattr(model, "config", None)
    if model_config is None:
        return
    record = {k: v for k, v in config.to_dict().items() if k not in _RECORD_KEYS}
    record.update({"targeted_modules": list(targets), **layer_layout(model, targets), "state": state, **extra})
    setattr(model_config, CONFIG_KEY, record)


def layer_layout(model: nn.Module, targets: Iterable[str]) -> dict[str, list[str]]:
    """The record's layer lists derived from the model: `ignored_modules` (linear layers left dense:
    heads, exclusions) and `conv1d_modules` (targeted layers stored [in, out], GPT-2 Conv1D, whose N:M
    groups run along dim 0)."""
    named = dict(model.named_modules())
    targets = list(targets)
    target_set = set(targets)
    return {
        "ignored_modules": [n for n, mod in named.items() if n and _is_linear_like(mod) and n not in target_set],
        "conv1d_modules": [n for n in targets if isinstance(named.get(n), Conv1D)],
    }


def sparsity_config_of(model: nn.Module) -> SparsityConfig:
    """The config a sparsified model runs with: its `nm_sparsity` record, else read off its layers."""
    stored = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(stored, dict):
        return SparsityConfig.from_dict(stored)
    _, layer = next(iter_sparse_layers(model))
    return SparsityConfig(n=layer.nm_n, m=layer.nm_m, method=layer.nm_method,
                          decay=layer.nm_decay, decay_mode=layer.nm_decay_mode)


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake `weight * mask` into the weights and put plain `nn.Linear`/`Conv1D` back, in place.

    Afterwards `save_pretrained` + plain `AutoModel*.from_pretrained` reload the model bit-exactly,
    and config.json records the pattern, the targeted layers and the measured sparsity.
    """
    layers = list(iter_sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no sparse layers to finalize (call nm_hf.sparsify first)")
    config = sparsity_config_of(model)
    zeros = total = 0
    for _, layer in layers:
        if layer.is_masked:
            layer.weight.masked_fill_(~layer.current_mask(), 0)
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    for _, layer in layers:
        dense_class = layer.__dict__.get("_nm_dense_class", DENSE_CLASS_FOR[type(layer)])
        layer._nm_teardown()
        layer.__class__ = dense_class
    _record_config(model, config, [name for name, _ in layers], state="finalized",
                   sparsity=round(zeros / max(total, 1), 6))
    return model


@torch.no_grad()
def apply_decoupled_decay(model: nn.Module, lr: float) -> int:
    """`W -= lr * decay * (1 - mask) * W` on every SR-STE layer in "decoupled" decay mode.

    Call it right after each optimizer step (SparseTrainer does). Returns the number of layers
    updated. Shrinking pruned weights cannot change the mask, so the cached mask stays valid.
    """
    count = 0
    for _, layer in iter_sparse_layers(model):
        if layer.nm_method != "sr-ste" or layer.nm_decay_mode != "decoupled" or not layer.nm_decay:
            continue
        mask = layer.current_mask()
        weight = layer.weight
        weight.sub_(weight.masked_fill(mask, 0), alpha=lr * layer.nm_decay)
        layer.restamp_mask()
        count += 1
    return count
