"""The `nm_sparsity` record in `config.json`: the one module that reads, builds and checks it.

A record is a plain dict stored on `model.config` (so `save_pretrained` writes it and plain
`from_pretrained` keeps it). It holds the user's `SparsityConfig` settings plus what only a saved
model knows:

- `targeted_modules`: names of the targeted layers (module names; a parameter name for kinds that
  are not a module swap), in model order;
- `ignored_modules`: linear-like layers left dense (heads, exclusions, sizes not divisible by m), and
  expert weights in a layout nm_hf has none for (`<experts module>.<parameter>`);
- `ignored_reasons` (only when some have one): `{name: why}` for ignored layers that could not be
  sparse as they are (an input size not divisible by m under `target_modules="all"`, a grouped
  convolution, a weight the model reads without calling the layer, an unsupported expert layout);
- `parameter_targets` (only when there are some): the targeted names that are Parameters rather than
  modules (mixture-of-experts expert weights such as `model.layers.0.mlp.experts.gate_up_proj`): their
  state-dict key is the name itself, a module's is `<name>.weight` (`weight_key`). Records without it
  target modules only;
- `group_dims`: for each targeted name, the dimension of its stored weight that holds the input
  features (the N:M groups run along it). Older records have `conv1d_modules` instead (layers
  whose groups run along dim 0); the oldest have neither and are read by model type;
- `state`: "training" (the saved weights are the dense training weights) or "finalized" (masks
  baked in: the weights themselves are N:M);
- `sparsity`: measured fraction of zeros in the targeted weights (finalized records);
- `compressed`: the compressed-format marker (`nm_hf.checkpoint` writes and reads it).
"""

from __future__ import annotations

import copy
import gc
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .config import SparsityConfig

__all__ = [
    "CONFIG_KEY",
    "RECORD_ONLY_KEYS",
    "STATE_TRAINING",
    "STATE_FINALIZED",
    "COMPRESSED_KEY",
    "RecordError",
    "read_record",
    "require_record",
    "write_record",
    "own_config",
    "remove_record",
    "build_record",
    "config_from_record",
    "record_group_dims",
    "weight_key",
    "record_parameters",
    "record_weight_keys",
    "is_compressed",
    "training_state_hint",
    "with_compressed_marker",
    "without_compressed_marker",
]

#: attribute of `model.config` (and key in config.json) holding the record
CONFIG_KEY = "nm_sparsity"
STATE_TRAINING = "training"
STATE_FINALIZED = "finalized"
#: key of the compressed-format marker inside the record
COMPRESSED_KEY = "compressed"
#: keys that describe a saved model rather than user settings (never part of a SparsityConfig)
RECORD_ONLY_KEYS = ("targeted_modules", "ignored_modules", "ignored_reasons", "parameter_targets", "group_dims",
                    "conv1d_modules", "state", "sparsity", COMPRESSED_KEY)
#: keys every record must have
_REQUIRED = ("n", "m", "targeted_modules")

#: oldest records (no group_dims, no conv1d_modules): GPT-2-family model types and their Conv1D names
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
_CONV1D_LAYER_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})

_NOT_SAVED_BY_NM_HF = ("the model was not saved by nm_hf (nm_hf.sparsify, train, nm_hf.finalize, then "
                       "save_pretrained)")


class RecordError(ValueError):
    """A missing or malformed `nm_sparsity` record."""


def _config_of(source: Any) -> Any:
    """`source` is a model (has `.config`), a transformers config, or a config.json dict."""
    if isinstance(source, Mapping):
        return source
    config = getattr(source, "config", None)
    if config is not None and not isinstance(source, Mapping) and hasattr(source, "named_modules"):
        return config
    return source


def read_record(source: Any) -> dict[str, Any] | None:
    """The record of a model, a transformers config or a config.json dict; None when there is none."""
    config = _config_of(source)
    record = config.get(CONFIG_KEY) if isinstance(config, Mapping) else getattr(config, CONFIG_KEY, None)
    return record if isinstance(record, dict) else None


def require_record(source: Any, where: str | os.PathLike | None = None,
                   error: type[Exception] = RecordError) -> dict[str, Any]:
    """The record of `source`, checked to have n, m and targeted_modules; `error` names `where` otherwise."""
    where = os.fspath(where) if where is not None else type(source).__name__
    record = read_record(source)
    if record is None:
        raise error(f"{where}: config has no '{CONFIG_KEY}' record: {_NOT_SAVED_BY_NM_HF}")
    for key in _REQUIRED:
        if key not in record:
            raise error(f"{where}: the '{CONFIG_KEY}' record has no {key!r}")
    n, m = record["n"], record["m"]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)):  # 2.5 or "2" is not what nm_hf writes
        raise error(f"{where}: the '{CONFIG_KEY}' record has a non-integer n or m ({n!r}, {m!r})")
    if not 1 <= n <= m or not isinstance(record["targeted_modules"], list):
        raise error(f"{where}: the '{CONFIG_KEY}' record is malformed (n={n}, m={m}, targeted_modules "
                    f"{type(record['targeted_modules']).__name__})")
    odd = [name for name in record["targeted_modules"] if not isinstance(name, str) or not name]
    if odd:  # a name is looked up as a module and a state-dict key: 1, None or [..] would fail far away
        raise error(f"{where}: the '{CONFIG_KEY}' record's targeted_modules holds {odd[0]!r}, not a layer name")
    return record


def write_record(model: Any, record: dict[str, Any]) -> None:
    """Store `record` on `model.config` (raises AttributeError/TypeError if the config refuses it)."""
    setattr(model.config, CONFIG_KEY, record)


def own_config(model: Any) -> Callable[[], None]:
    """Give `model` its own copy of its config before a record is written to it; returns the undo.

    transformers 5's `from_config` keeps the config object it is given (4.x copied it), so two models built
    from one config share it: a record written to one would reach the other (a dense baseline saved with a
    sparse model's record). Every submodule holding the same object (base models, attention layers) gets the
    copy too, and so does every model holding `model` (`sparsify(model.model)`: the parent found through
    `gc.get_referrers`, as nothing points from a module to its parent); sub-configs stay shared (the record
    lives on the top-level config only).
    """
    shared = getattr(model, "config", None)
    if shared is None or not hasattr(model, "modules"):
        return lambda: None
    inside = [module for module in model.modules() if module.__dict__.get("config") is shared]
    # one reference per holder's __dict__, plus what a local variable alone gives (`probe`: the count differs
    # between Python versions): nothing else holds the config (the usual `from_config(AutoConfig...)` inline),
    # so no other model or variable can see the record and the (costly) search below is not needed
    probe = object()
    if sys.getrefcount(shared) <= len(inside) + sys.getrefcount(probe):
        return lambda: None
    mine = copy.copy(shared)
    # the models holding `model` (sparsify(model.model), model.base_model) keep sharing its config: else
    # their config would lose the record and settings made on it (use_cache) would no longer reach `model`.
    # Two scans of the heap at most: the dicts holding the config, then the owners of those outside `model`.
    own_dicts = {id(module.__dict__) for module in inside}
    outside = [namespace for namespace in gc.get_referrers(shared)
               if isinstance(namespace, dict) and namespace.get("config") is shared and id(namespace) not in own_dicts]
    roots = [model]
    if outside:
        outside_ids = {id(namespace) for namespace in outside}
        roots += [owner for owner in gc.get_referrers(*outside)
                  if id(getattr(owner, "__dict__", None)) in outside_ids and hasattr(owner, "modules")
                  and any(sub is model for sub in owner.modules())]
    holders = list({id(module): module for root in roots for module in root.modules()
                    if module.__dict__.get("config") is shared}.values())
    for module in holders:
        module.__dict__["config"] = mine

    def undo() -> None:
        for module in holders:
            if module.__dict__.get("config") is mine:
                module.__dict__["config"] = shared

    return undo


def remove_record(model: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "__dict__"):
        config.__dict__.pop(CONFIG_KEY, None)


def build_record(config: SparsityConfig, targeted: Iterable[str], group_dims: Mapping[str, int],
                 ignored: Iterable[str], state: str, *, parameters: Iterable[str] = (),
                 ignored_reasons: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A complete record from the user's settings and what the model says about its layers.

    `parameters`: the targeted names that are Parameters (parameter kinds), see `weight_key`.
    """
    if state not in (STATE_TRAINING, STATE_FINALIZED):
        raise ValueError(f"record state must be {STATE_TRAINING!r} or {STATE_FINALIZED!r}, got {state!r}")
    targeted = list(targeted)
    chosen = set(targeted)
    parameters = [name for name in parameters if name in chosen]
    record = {
        **config.to_dict(),
        "targeted_modules": targeted,
        "ignored_modules": list(ignored),
        "group_dims": {name: int(group_dims[name]) for name in targeted},
        "state": state,
    }
    if ignored_reasons:
        record["ignored_reasons"] = dict(ignored_reasons)
    if parameters:
        record["parameter_targets"] = parameters
    return {**record, **extra}


def config_from_record(record: Mapping[str, Any]) -> SparsityConfig:
    """The `SparsityConfig` a record was made with (its saved-model keys left out)."""
    return SparsityConfig.from_dict({k: v for k, v in record.items() if k not in RECORD_ONLY_KEYS})


def _model_types(config: Mapping[str, Any]) -> set[str]:
    types = {config.get("model_type")}
    types |= {v.get("model_type") for v in config.values() if isinstance(v, dict)}
    return {t for t in types if isinstance(t, str)}


def record_group_dims(record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Group dimension of each targeted weight, for records of every version.

    `group_dims` when present; else `conv1d_modules` (dim 0 for those, 1 for the rest); the oldest
    records (neither) are read by model type: GPT-2-family layers named c_attn/q_attn/c_proj/c_fc
    are Conv1D (dim 0), everything else nn.Linear (dim 1).
    """
    targeted = list(record["targeted_modules"])
    dims = record.get("group_dims")
    if isinstance(dims, dict):
        missing = [name for name in targeted if name not in dims]
        if missing:
            raise RecordError(f"the '{CONFIG_KEY}' record's group_dims lacks {missing[:3]}")
        bad = [name for name in targeted if isinstance(dims[name], bool) or not isinstance(dims[name], int)]
        if bad:
            raise RecordError(f"the '{CONFIG_KEY}' record's group_dims holds {dims[bad[0]]!r} for {bad[0]!r}, "
                              "not a dimension index")
        return {name: dims[name] for name in targeted}
    if isinstance(record.get("conv1d_modules"), list):
        conv1d = set(record["conv1d_modules"])
        return {name: 0 if name in conv1d else 1 for name in targeted}
    if config is None or not _model_types(config) & _CONV1D_MODEL_TYPES:
        return dict.fromkeys(targeted, 1)
    return {name: 0 if name.rsplit(".", 1)[-1] in _CONV1D_LAYER_NAMES else 1 for name in targeted}


def weight_key(name: str, parameter: bool = False) -> str:
    """State-dict key of a targeted name's weight: `<module>.weight` for module kinds, the name itself
    for a targeted Parameter (`parameter=True`; see `record_weight_keys` to read it off a record)."""
    return name if parameter else f"{name}.weight"


def record_parameters(record: Mapping[str, Any]) -> frozenset[str]:
    """The record's targeted names that are Parameters (none in records written before parameter kinds)."""
    names = record.get("parameter_targets")
    return frozenset(names) if isinstance(names, list) else frozenset()


def record_weight_keys(record: Mapping[str, Any]) -> dict[str, str]:
    """`{targeted name: state-dict key of its weight}` for a record of any version."""
    parameters = record_parameters(record)
    return {name: weight_key(name, name in parameters) for name in record["targeted_modules"]}


def is_compressed(record: Mapping[str, Any]) -> bool:
    return isinstance(record.get(COMPRESSED_KEY), dict)


def training_state_hint(record: Mapping[str, Any]) -> str:
    """Why saved weights break the record's pattern when it says state 'training' (a checkpoint saved before
    finalize holds the dense training weights); "" for any other state. Shared by `nm-hf compress` and `inspect`."""
    if record.get("state") != STATE_TRAINING:
        return ""
    return "the record says state='training' (dense training weights): save after nm_hf.finalize(model)"


def with_compressed_marker(record: Mapping[str, Any], marker: Mapping[str, Any]) -> dict[str, Any]:
    return {**record, COMPRESSED_KEY: dict(marker)}


def without_compressed_marker(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != COMPRESSED_KEY}
