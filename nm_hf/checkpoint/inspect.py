"""Per-layer sparsity of a saved checkpoint, read from its files (`nm-hf inspect`).

With an `nm_sparsity` record the targeted layers, the pattern and the group dims come from it
(`nm_hf.record.record_group_dims`). Without one (a checkpoint made by another tool) a pattern must
be given; the layers checked are then the ones named, or every linear weight of a registered kind
(`nm_hf.layers`: nn.Linear, GPT-2 Conv1D, the 3-D expert Parameters of mixture-of-experts blocks)
except the output head, found on a meta-device skeleton of the model (no memory, no weights).
Expert weights are checked where they lie on disk: fused (`experts.gate_up_proj`, gpt_oss, llama4)
or per expert (`experts.{e}.w1.weight`, Mixtral), found with the model's own save-time conversion
(`nm_hf.checkpoint.layout`). A compressed checkpoint is verified whole: every tensor's checksum, not
only the targeted ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..layers import family_kind
from ..layers.experts import EXPERT_PARAMETERS, router_layers
from ..record import (
    RecordError,
    is_compressed,
    read_record,
    record_group_dims,
    record_weight_keys,
    require_record,
    weight_key,
)
from ..report import SparsityReport, layer_sparsity
from .compressed import check_compressed_record, compressed_file, iter_compressed_tensors, read_header
from .directory import (
    CONFIG_NAME,
    CheckpointError,
    checkpoint_dir,
    checkpoint_group_dims,
    dense_weight_files,
    file_inside,
    open_safetensors,
    read_json,
)
from .layout import record_layout, skeleton

__all__ = ["inspect_checkpoint", "parse_pattern"]


def parse_pattern(pattern: str | tuple[int, int], label: str = "pattern") -> tuple[int, int]:
    """(n, m) from "N:M" (or a pair), checked 1 <= n <= m; errors start with `label` (the CLI: "--pattern")."""
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match:
            raise CheckpointError(f"{label} {pattern!r} is not of the form N:M (e.g. 2:4)")
        n, m = int(match[1]), int(match[2])
    else:
        n, m = (int(x) for x in pattern)
    if not 1 <= n <= m:
        raise CheckpointError(f"{label} {n}:{m}: need 1 <= N <= M")
    return n, m


def _refuse_if_no_layer_fits(sizes: Sequence[int], n: int, m: int, directory: Path) -> None:
    """A pattern whose m divides no checked layer's input size cannot hold anywhere: say that, not "violated"."""
    if sizes and all(size % m for size in sizes):
        shown = ", ".join(map(str, sorted(set(sizes))))
        raise CheckpointError(f"{directory}: pattern {n}:{m} cannot hold in any checked layer: no input size is "
                              f"divisible by m={m} (sizes: {shown}); choose an m that divides them")


def _skeleton(directory: Path) -> nn.Module | None:
    """The model of config.json built on the meta device (no memory), or None if transformers cannot build it."""
    return skeleton(directory)


def _key_in(name: str, keys: set[str], prefix: str) -> str | None:
    """The state-dict key of layer `name`'s weight, allowing for a base-model prefix added or dropped."""
    candidates = [weight_key(name)]
    if prefix:
        candidates.append(weight_key(name.removeprefix(prefix + ".")) if name.startswith(prefix + ".")
                          else weight_key(f"{prefix}.{name}"))
    return next((c for c in candidates if c in keys), None)


def _is_expert_key(key: str) -> bool:
    """A fused expert Parameter's key (`...experts.gate_up_proj`): no `.weight` suffix to strip."""
    return key.rsplit(".", 1)[-1] in EXPERT_PARAMETERS


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting `layers.2` before `layers.10` (file headers list keys as strings)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name))


def _layer_names(keys: set[str]) -> list[str]:
    return sorted((k.removesuffix(".weight") if k.endswith(".weight") else k
                   for k in keys if k.endswith(".weight") or _is_expert_key(k)), key=_natural_key)


def _in_model_order(keys: list[str], record: dict[str, Any]) -> list[str]:
    """`keys` in the record's (model) order; keys it does not list (per-expert matrices saved in another
    layout) after them, numbers compared as numbers."""
    position = {key: i for i, key in enumerate(record_weight_keys(record).values())}
    return sorted(keys, key=lambda key: (position.get(key, len(position)), _natural_key(key)))


def _expert_targets(skeleton: nn.Module | None) -> dict[str, int]:
    """`{<experts module>.<parameter>: input dim}` of the skeleton's 3-D expert Parameters."""
    targets: dict[str, int] = {}
    for name, module in skeleton.named_modules() if skeleton is not None else ():
        kind = family_kind(module)
        if name and kind is not None and kind.parameter_targets and kind.refusal(module) is None:
            for parameter in kind.target_parameters(module):
                targets[f"{name}.{parameter}"] = kind.group_dim_for(module, parameter)
    return targets


def _select(entries: Sequence[str], keys: set[str], directory: Path, extra: Sequence[str] = ()) -> list[str]:
    """Layer names (from the file's keys, and `extra` names saved in another layout) matching `entries`
    exactly or as a dotted suffix."""
    names = _layer_names(keys)
    names += [name for name in extra if name not in names]
    chosen: list[str] = []
    for entry in entries:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise CheckpointError(f"{directory}: layer {entry!r} matched no weight in the checkpoint "
                                  f"(names look like {', '.join(names[:3])})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _default_layers(skeleton: nn.Module | None, keys: set[str], directory: Path) -> tuple[list[str], dict[str, int]]:
    """Every linear layer (module kinds selected by "all-linear") but the output head and mixture-of-experts
    routers, with its group dim."""
    if skeleton is None:
        raise CheckpointError(f"{directory}: transformers cannot build the model of {CONFIG_NAME} to find its "
                              "linear layers; name them with layers=[...] (nm-hf inspect --layers ...)")
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    experts = _expert_targets(skeleton)
    routers = set(router_layers(skeleton))  # left dense by "all-linear" too
    names, dims = [], {}
    for name, module in skeleton.named_modules():
        kind = family_kind(module)
        if not name or kind is None or module is head or name in routers or not kind.linear \
                or not kind.matches(module):
            continue  # what "all-linear" converts (not a subclass with its own forward: Llama4's router)
        if kind.parameter_targets:  # expert weights: fused on disk under their own key, or found per expert later
            for parameter in kind.target_parameters(module):
                target = f"{name}.{parameter}"
                if target in experts:
                    names.append(target)
                    dims[target] = experts[target]
            continue
        key = _key_in(name, keys, prefix)
        if key is not None:
            layer = key.removesuffix(".weight")
            names.append(layer)
            dims[layer] = kind.group_dim
    if not names:
        raise CheckpointError(f"{directory}: no linear layer of the model has a weight in the checkpoint")
    return names, dims


def _dims_for(names: list[str], skeleton: nn.Module | None, config: dict[str, Any], directory: Path,
              keys: set[str]) -> dict[str, int]:
    """Group dims of named layers: the skeleton's layer kinds, else the record rules by model type."""
    fallback = record_group_dims({"targeted_modules": names}, config)
    experts = _expert_targets(skeleton)
    fused = [name for name in names if name in keys and name not in experts]
    if fused:  # a 3-D weight: [E, out, in] or [E, in, out] is the model class's to say
        raise CheckpointError(f"{directory}: cannot tell the input dimension of expert weight {fused[0]!r} (not an "
                              "expert Parameter of the model transformers builds from config.json)")
    if skeleton is None:
        return fallback
    modules = dict(skeleton.named_modules())
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    dims = {}
    for name in names:
        if name in experts:
            dims[name] = experts[name]
            continue
        module = modules.get(name) or modules.get(name.removeprefix(prefix + ".")) or modules.get(f"{prefix}.{name}")
        kind = family_kind(module) if module is not None else None
        dims[name] = kind.group_dim if kind is not None else fallback[name]
    return dims


def inspect_checkpoint(path: str | os.PathLike, *, pattern: str | tuple[int, int] | None = None,
                       layers: Sequence[str] | None = None) -> tuple[SparsityReport, dict[str, Any] | None]:
    """(per-layer report, nm_sparsity record or None) of a saved model, read from its files.

    `pattern` ("N:M") overrides the record's pattern and is required without a record; `layers`
    (names, exact or dotted suffix) overrides the record's targeted layers, and without a record
    defaults to every linear layer but the output head. Compressed checkpoints are verified whole.
    A pattern whose m divides no checked layer's input size is refused (CheckpointError): it says
    nothing about the weights.
    """
    directory = checkpoint_dir(path)
    config = read_json(file_inside(directory, CONFIG_NAME, "the model config"), "the model config")
    record = read_record(config)
    if record is None and pattern is None:
        try:
            require_record(config, where=directory / CONFIG_NAME, error=CheckpointError)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; to check a checkpoint made by another tool pass a pattern "
                                  "(nm-hf inspect --pattern N:M)") from None
    if record is not None:
        record = require_record(config, where=directory / CONFIG_NAME, error=CheckpointError)
    n, m = parse_pattern(pattern) if pattern is not None else (int(record["n"]), int(record["m"]))
    report = SparsityReport()
    sizes: list[int] = []  # input sizes (along the group dim) of the checked weights

    if record is not None and is_compressed(record):
        check_compressed_record(directory, record)
        # the targets as stored: their state-dict keys, or the keys save_pretrained wrote them under
        # (per-expert matrices of fused experts), which the header marks as N:M with their group dim
        targeted = _in_model_order(_compressed_nm_keys(directory), record)
        wanted = _compressed_selection(layers, record, config, targeted, directory) if layers else targeted
        rows: dict[str, Any] = {}
        for key, tensor, entry in iter_compressed_tensors(directory):  # every tensor is verified
            if key in wanted:
                if entry.group_dim is None:
                    raise CheckpointError(f"{directory}: {key!r} is not stored N:M in the compressed file")
                rows[key] = layer_sparsity(key.removesuffix(".weight"), tensor, n, m, entry.group_dim)
                sizes.append(tensor.shape[entry.group_dim])
        missing = [k for k in wanted if k not in rows]
        if missing:
            raise CheckpointError(f"{directory}: targeted weights missing from the compressed file: {missing[:5]}")
        _refuse_if_no_layer_fits(sizes, n, m, directory)
        report.layers.extend(rows[k] for k in wanted)
        return report, record

    located: dict[str, Path] = {}
    for file in dense_weight_files(directory):
        with open_safetensors(file) as handle:
            located.update(dict.fromkeys(handle.keys(), file))
    keys = set(located)
    model = _skeleton(directory) if record is None else None
    try:
        names, dims = _names_and_dims(record, config, layers, keys, model, directory)
    except RecordError as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from None
    keys_of = record_weight_keys(record) if record is not None else {}
    # Parameters (keys without `.weight`): the record's, the skeleton's expert weights, fused keys on disk
    experts = _expert_targets(model) if record is None else {}
    parameters = {name for name in names if keys_of.get(name) == name or name in experts or name in keys}

    def key_of(name: str) -> str:
        return keys_of.get(name) or weight_key(name, name in parameters)

    disk: dict[str, dict[str, int | None]] = {}
    saved_elsewhere = {name: dims[name] for name in names if key_of(name) not in located}
    if saved_elsewhere:  # per-expert matrices of fused experts: the model's own save-time conversion finds them
        layout_record = {**(record or {"m": m}), "targeted_modules": list(saved_elsewhere),
                         "parameter_targets": [name for name in saved_elsewhere if name in parameters]}
        disk = record_layout(layout_record, saved_elsewhere, keys, model=model, directory=directory)
    for name in names:
        stored = disk.get(name) or {key_of(name): dims[name]}
        for key, dim in stored.items():
            if key not in located:
                raise CheckpointError(f"{directory}: targeted weight {key!r} is not in the checkpoint files")
            with open_safetensors(located[key]) as handle:
                tensor = handle.get_tensor(key)
            row = name if len(stored) == 1 and key == key_of(name) else key.removesuffix(".weight")
            if dim is None:
                raise CheckpointError(f"{directory}: {key!r} ({name!r} as saved) does not hold whole groups of {m} "
                                      "along any dimension")
            if not -tensor.ndim <= dim < tensor.ndim:
                raise CheckpointError(f"{directory}: group dim {dim} of {name!r} does not fit its weight "
                                      f"{key!r} of shape {list(tensor.shape)}")
            report.layers.append(layer_sparsity(row, tensor, n, m, dim))
            sizes.append(tensor.shape[dim])
    _refuse_if_no_layer_fits(sizes, n, m, directory)
    return report, record


def _names_and_dims(record: dict[str, Any] | None, config: dict[str, Any], layers: Sequence[str] | None,
                    keys: set[str], model: nn.Module | None, directory: Path) -> tuple[list[str], dict[str, int]]:
    """(layer names to check, their group dims): `layers`, else the record's targets, else every linear layer."""
    if layers:
        in_record = list(record["targeted_modules"]) if record is not None else []
        # expert Parameters saved per expert are selectable by their in-memory name too
        parameter_names = ([name for name, key in record_weight_keys(record).items() if key == name]
                           if record is not None else list(_expert_targets(model)))
        names = _select(layers, keys, directory, parameter_names)
        dims = (record_group_dims(record, config) if record is not None and set(names) <= set(in_record)
                else _dims_for(names, model if record is None else _skeleton(directory), config, directory, keys))
        return names, dims
    if record is not None:
        return list(record["targeted_modules"]), record_group_dims(record, config)
    return _default_layers(model, keys, directory)


def _compressed_selection(layers: Sequence[str], record: dict[str, Any], config: dict[str, Any],
                          targeted: list[str], directory: Path) -> list[str]:
    """Stored N:M keys of the `layers` names: a key (fused expert Parameters), a key without its `.weight`,
    or a targeted Parameter saved under other keys (Mixtral's `experts.gate_up_proj` as `experts.{e}.w1/w3`)."""
    stored = set(targeted)
    elsewhere = {name: key for name, key in record_weight_keys(record).items() if key not in stored}
    saved_as: dict[str, list[str]] = {}
    if elsewhere:
        dims = checkpoint_group_dims(directory, record, config)
        layout = record_layout({**record, "targeted_modules": list(elsewhere)}, dims, stored, directory=directory)
        saved_as = {name: list(keys) for name, keys in layout.items() if keys}
    wanted: list[str] = []
    for name in _select(layers, stored, directory, list(saved_as)):
        keys = saved_as.get(name) or [name if name in stored else weight_key(name)]
        wanted += [key for key in keys if key not in wanted]
    return wanted


def _compressed_nm_keys(directory: Path) -> list[str]:
    """Keys a compressed file stores N:M (its header's "nm" entries), in file order."""
    path = compressed_file(directory)
    with open_safetensors(path) as handle:
        _, _, _, entries = read_header(path, handle)
    return [key for key, entry in entries.items() if entry.group_dim is not None]

