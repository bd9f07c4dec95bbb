"""One-shot N:M pruning of a pretrained dense model: `nm_hf.prune(model, config, criterion=...)`.

Three criteria choose which n of every m weights (along each layer's input dimension) survive:

- `"magnitude"`: the largest |W| (what `fixed` and ASP do); no data.
- `"wanda"` (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  the largest |W_ij| * ||X_j||_2, where ||X_j||_2 is the norm of input feature j over the calibration
  tokens reaching the layer. Weights only change by being zeroed.
- `"sparsegpt"` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot"): per layer, columns are visited left to right in blocks; at the first column of each
  group of m the group's mask is chosen from the current weights by w^2 / [H^-1]_cc^2 (H = 2 X X^T of
  the layer's calibration inputs, dampened), and the error of every pruned weight is spread over the
  not yet visited columns with the inverse Hessian (its upper Cholesky factor), which minimises the
  layer's output error ||W X - W' X||^2 given the mask.

The calibration criteria go block by block (the list of decoder layers, in order): the inputs of a
block are the outputs of the blocks before it *after* they were pruned, and the layers inside a block
see the block's dense sub-layers (all statistics of a block are gathered before any of its layers is
pruned), as in both papers. Padded positions (`attention_mask == 0`) are left out of the statistics.

Everything is checked before the model changes (criterion, config, targets, blocks, calibration data,
which is run through the dense model up to the last block with targets then, to record what each block
receives besides its hidden states: models such as Gemma 2/3, GPT-OSS or Qwen with sliding windows give
each block the attention mask and rotary embeddings of its own attention type); an error or interrupt
while pruning restores the weights.
Afterwards the model is sparsified with `config` (`nm_hf.sparsify`): the record says
`state="training"`, `fixed` keeps the pruned mask frozen (the ASP recipe: one-shot prune, fine-tune),
`sr-ste` and the other recomputing methods continue from the pruned weights (their first mask is the
pruned pattern, since the pruned weights are zero).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .injection import SparsifyError, find_target_modules, is_sparsified, sparsify, unwrap_model
from .layers import Target, as_out_in, iter_targets
from .masks import nm_mask, nm_mask_transposable
from .methods import get_method

__all__ = ["prune", "CRITERIA", "PruneError"]

#: the pruning criteria `prune` accepts
CRITERIA = ("magnitude", "wanda", "sparsegpt")
#: criteria that need calibration data
CALIBRATED = frozenset({"wanda", "sparsegpt"})


class PruneError(ValueError):
    """A pruning request `prune` refuses; the model was not modified."""


class _Captured(Exception):
    """Raised by the first block's pre-hook: the calibration forward stops there."""


def _as_config(config: SparsityConfig | Mapping[str, Any] | None) -> SparsityConfig:
    if config is None:
        return SparsityConfig()
    if isinstance(config, SparsityConfig):
        return config
    if isinstance(config, Mapping):
        return SparsityConfig.from_dict(dict(config))
    raise TypeError(f"config must be a SparsityConfig or a dict, got {type(config).__name__}")


def _keep_mask(scores: torch.Tensor, config: SparsityConfig, dim: int) -> torch.Tensor:
    """Which weights stay: the n largest scores of every group of m along `dim` (transposable if configured)."""
    if config.transposable:
        return nm_mask_transposable(scores, config.n, config.m, dim=dim)
    return nm_mask(scores, config.n, config.m, dim=dim)


# --------------------------------------------------------------------------- checks


def _find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The deepest `nn.ModuleList` whose items hold every targeted layer (the decoder layers)."""
    best = None
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not list_name or len(module) == 0:
            continue
        prefix = list_name + "."
        if all(name.startswith(prefix) for name in names):
            if best is None or len(list_name) > len(best[0]):
                best = (list_name, module)
    return best


def _check(model: nn.Module, config: SparsityConfig, criterion: str, calibration: Any, block_size: int,
           damping: float) -> tuple[list[Target], tuple[str, nn.ModuleList] | None]:
    if criterion not in CRITERIA:
        raise PruneError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if not get_method(config.method).masks_forward:
        raise PruneError(f"method {config.method!r} does not mask the forward pass: pruning for it would be undone "
                         "by nothing and used by nothing; choose a masking method (e.g. 'fixed' or 'sr-ste')")
    if is_sparsified(model):
        raise PruneError(f"{type(model).__name__} already has sparse layers: prune a dense model (nm_hf.finalize "
                         "then reload it, or start from the pretrained checkpoint)")
    if criterion in CALIBRATED and calibration is None:
        raise PruneError(f"criterion {criterion!r} needs calibration=<an iterable of model input batches> (e.g. a "
                         "few hundred tokenized training sequences)")
    if criterion in CALIBRATED and isinstance(calibration, Mapping):
        raise PruneError("calibration must be an iterable of batches (e.g. a list of tokenizer outputs), got one "
                         f"{type(calibration).__name__}: pass [batch]")
    if criterion not in CALIBRATED and calibration is not None:
        raise PruneError(f"criterion {criterion!r} uses no calibration data: pass calibration=None, or choose "
                         f"{' or '.join(sorted(CALIBRATED))}")
    if criterion == "sparsegpt":
        if not isinstance(block_size, int) or block_size < config.m or block_size % config.m:
            raise PruneError(f"block_size must be a positive multiple of m={config.m}, got {block_size!r}")
        if not (isinstance(damping, (int, float)) and 0 < damping < float("inf")):
            raise PruneError(f"damping must be a finite number > 0 (a fraction of the mean Hessian diagonal), got "
                             f"{damping!r}")
    try:
        names = find_target_modules(model, config)
    except SparsifyError as err:
        raise PruneError(str(err).replace("cannot sparsify", "cannot prune", 1)) from None
    by_name = {target.name: target for target in iter_targets(model)}
    targets = [by_name[name] for name in names]
    if criterion not in CALIBRATED:
        return targets, None
    unsupported = [t.name for t in targets if t.parameter is not None or not t.kind.linear]
    if unsupported:
        raise PruneError(f"criterion {criterion!r} handles linear layers (nn.Linear, GPT-2 Conv1D) only; "
                         f"{_few(unsupported)} are not: exclude them or use criterion='magnitude'")
    blocks = _find_blocks(model, names)
    if blocks is None:
        raise PruneError(f"criterion {criterion!r} prunes block by block, but the targeted layers of "
                         f"{type(model).__name__} are not all inside one list of blocks (decoder layers), e.g. "
                         f"{_few(names)}; exclude the layers outside it (heads, encoder-decoder models: one stack at "
                         "a time is not supported) or use criterion='magnitude'")
    return targets, blocks


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# --------------------------------------------------------------------------- calibration


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_inputs(batch: Any, device: torch.device, no_cache: bool) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise PruneError(f"each calibration batch must be a dict of model inputs (a tokenizer/collator output) or "
                         f"an input_ids tensor, got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if ids is not None and not (isinstance(ids, torch.Tensor) and ids.ndim >= 2):
        got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise PruneError(f"each calibration batch's input_ids must be a tensor [batch, length] (a tokenizer's "
                         f"return_tensors='pt'; calibration is an iterable of batches), got {got}")
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in batch.items() if key != "labels"}
    if no_cache:
        inputs["use_cache"] = False
    return inputs


def _token_mask(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return mask.bool()
    return None


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's call with its hidden states left out (`_with_hidden` puts the pruned model's back)."""
    if args:
        return (None, *args[1:]), kwargs
    return args, {key: value for key, value in kwargs.items() if key != "hidden_states"}


@torch.no_grad()
def _capture_block_inputs(model: nn.Module, block_list: nn.ModuleList, last: int, calibration: Iterable[Any]
                          ) -> list[tuple[list[tuple[tuple, dict]], torch.Tensor | None]]:
    """For each calibration batch: the (args, kwargs) blocks 0..`last` receive in the dense model, and its token mask.

    Block 0's call is kept whole; the later ones without their hidden states (those come from the pruned
    blocks before them), but with their own other inputs: the model may give each block a different
    attention mask or rotary embedding (its attention type: sliding window, local, global). No weight
    changes.
    """
    captured: list[tuple[list[tuple[tuple, dict]], torch.Tensor | None]] = []
    calls: dict[int, tuple[tuple, dict]] = {}

    def recorder(index: int) -> Any:
        def record(module, args, kwargs):
            if index not in calls:
                calls[index] = (args, kwargs) if index == 0 else _without_hidden(args, kwargs)
            if index == last:
                raise _Captured
        return record

    device = _device_of(model)
    no_cache = "use_cache" in inspect.signature(model.forward).parameters
    handles = [block_list[index].register_forward_pre_hook(recorder(index), with_kwargs=True)
               for index in range(last + 1)]
    try:
        for batch in calibration:
            inputs = _batch_inputs(batch, device, no_cache)
            calls.clear()
            try:
                model(**inputs)
            except _Captured:
                if len(calls) == last + 1:
                    captured.append(([calls[index] for index in range(last + 1)], _token_mask(inputs)))
                    continue
            raise PruneError(f"a calibration batch ran through {type(model).__name__} without calling each of its "
                             f"blocks 0..{last} in turn: cannot collect the blocks' inputs")
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise PruneError("calibration is empty: pass at least one batch of model inputs")
    if all(mask is not None and not mask.any() for _, mask in captured):
        raise PruneError("calibration has no token to measure: every position of every batch is padding "
                         "(attention_mask == 0)")
    return captured


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input as [tokens, features] in float32, padded positions left out (also from an input the
    model flattened to [batch * length, features], e.g. Qwen2-MoE's shared expert)."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    elif mask is not None and x.ndim == 2 and x.shape[0] == mask.numel():
        x = x[mask.reshape(-1).to(x.device)]
    return x.reshape(-1, x.shape[-1]).float()


class _Statistics:
    """Per-layer input statistics: the squared norm of each feature (wanda) or X X^T (sparsegpt)."""

    def __init__(self, features: int, device: torch.device, hessian: bool) -> None:
        self.count = 0
        self.squares = torch.zeros(features, device=device)
        self.xxt = torch.zeros(features, features, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        self.count += x.shape[0]
        if self.xxt is not None:
            self.xxt.addmm_(x.t(), x)
        else:
            self.squares.add_(x.square().sum(0))


def _statistics_hook(stats: _Statistics, current: dict[str, Any]) -> Any:
    """A forward hook adding the layer's input (minus the current batch's padding) to `stats`."""
    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        stats.add(_tokens(args[0], current.get("mask")))
    return hook


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# --------------------------------------------------------------------------- the criteria


@torch.no_grad()
def _prune_magnitude(target: Target, config: SparsityConfig) -> None:
    weight = target.weight
    weight.masked_fill_(~_keep_mask(weight.detach(), config, target.group_dim), 0)


@torch.no_grad()
def _prune_wanda(target: Target, stats: _Statistics, config: SparsityConfig) -> None:
    weight = as_out_in(target.module)  # a view: writes go to the layer's weight
    scores = weight.detach().abs().float() * stats.squares.sqrt().to(weight.device)[None, :]
    weight.masked_fill_(~_keep_mask(scores, config, dim=1), 0)


@torch.no_grad()
def _prune_sparsegpt(target: Target, stats: _Statistics, config: SparsityConfig, block_size: int,
                     damping: float) -> None:
    view = as_out_in(target.module)
    weight = view.detach().float().clone()  # [out, in]
    hessian = stats.xxt.to(weight.device) * (2.0 / max(stats.count, 1))
    dead = hessian.diagonal() == 0  # inputs that are always 0: their weights never matter
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        upper = torch.linalg.cholesky(inverse, upper=True)  # rows of the inverse Hessian, as OBS updates use them
    except torch.linalg.LinAlgError:
        raise RuntimeError(f"sparsegpt: the Hessian of {target.name!r} is not positive definite even with damping "
                           f"{damping:g}; pass a larger damping= or more calibration data") from None
    m = config.m
    columns = weight.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv_block = upper[start:end, start:end]
        diag = inv_block.diagonal()
        keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(end - start):
            if i % m == 0:  # choose this group's mask from the weights as updated so far
                scores = block[:, i:i + m].square() / diag[i:i + m].square()[None, :]
                keep[:, i:i + m] = _keep_mask(scores, config, dim=1)
            column = block[:, i]
            pruned = torch.where(keep[:, i], column, torch.zeros_like(column))
            error = (column - pruned) / diag[i]
            block[:, i:].sub_(error[:, None] * inv_block[i, i:][None, :])
            block[:, i] = pruned
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:].sub_(errors @ upper[start:end, end:])
    view.copy_(weight.to(view.dtype))


# --------------------------------------------------------------------------- prune


def prune(model: nn.Module, config: SparsityConfig | Mapping[str, Any] | None = None, criterion: str = "magnitude",
          calibration: Iterable[Any] | None = None, *, block_size: int = 128, damping: float = 0.01,
          progress: bool = True) -> nn.Module:
    """Prune `model` to `config`'s N:M pattern in place with `criterion`, then sparsify it with `config`.

    `calibration` (wanda, sparsegpt): an iterable of model input batches (dicts such as a tokenizer's or
    a collator's output, or input_ids tensors; "labels" are ignored), read once. `block_size` and
    `damping` (a fraction of the mean Hessian diagonal added to it) are SparseGPT's; `progress` shows a
    tqdm bar over the blocks. Returns `model`. Raises `PruneError` (a `ValueError`) before any change
    on a refused request; an error while pruning restores the weights.
    """
    config = _as_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    targets, blocks = _check(inner, config, criterion, calibration, block_size, damping)
    was_training = inner.training
    inner.eval()
    snapshots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_block = None if blocks is None else _by_block(blocks[0], targets)  # once: the capture and the pruning use it
    try:
        captured = None if blocks is None else _capture_block_inputs(inner, blocks[1], max(by_block), calibration)
        # nothing has changed up to here: from now on every change is undone on an error
        try:
            if blocks is None:
                for target in targets:
                    _snapshot(snapshots, target)
                    _prune_magnitude(target, config)
            else:
                _prune_blocks(blocks[1], by_block, captured, config, criterion, block_size, damping, progress,
                              snapshots)
            sparsify(inner, config)
        except BaseException:
            with torch.no_grad():
                for weight, saved in snapshots.values():
                    weight.copy_(saved.to(weight.device))
            raise
    finally:
        inner.train(was_training)
    return model


def _snapshot(snapshots: dict[str, tuple[torch.Tensor, torch.Tensor]], target: Target) -> None:
    """A CPU copy of a weight about to change (kept until `prune` returns, to undo an interrupted run)."""
    weight = target.weight
    snapshots[target.name] = (weight, weight.detach().to("cpu", copy=True))


def _prune_blocks(block_list: nn.ModuleList, by_block: dict[int, list[Target]], captured: list,
                  config: SparsityConfig, criterion: str, block_size: int, damping: float, progress: bool,
                  snapshots: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Wanda or SparseGPT, block by block; `by_block`: the targets per block index (`_by_block`, computed once
    by `prune`, which also sized the capture with it)."""
    from tqdm.auto import tqdm

    calls = [batch_calls for batch_calls, _ in captured]
    masks = [mask for _, mask in captured]
    last = max(by_block)
    hidden: list[torch.Tensor] = []
    for index in tqdm(range(last + 1), desc=f"nm_hf.prune ({criterion})", unit="block", disable=not progress):
        # block 0 as the model called it; later blocks: the pruned blocks' output and their own other inputs
        inputs = [batch_calls[0] for batch_calls in calls] if index == 0 else \
            [_with_hidden(*batch_calls[index], states) for batch_calls, states in zip(calls, hidden, strict=True)]
        block = block_list[index]
        layers = by_block.get(index, [])
        stats = {t.name: _Statistics(int(as_out_in(t.module).shape[1]), t.weight.device, criterion == "sparsegpt")
                 for t in layers}
        current: dict[str, Any] = {}
        handles = [t.module.register_forward_hook(_statistics_hook(stats[t.name], current)) for t in layers]
        try:
            with torch.no_grad():
                for (args, kwargs), mask in zip(inputs, masks, strict=True):
                    current["mask"] = mask
                    block(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        unreached = [t.name for t in layers if not stats[t.name].count]
        if unreached:  # no statistics: SparseGPT would zero the whole layer, Wanda keep arbitrary weights
            raise PruneError(f"criterion {criterion!r}: {_few(unreached)} received no calibration token when their "
                             "block ran (the forward does not call them); exclude them or use criterion='magnitude' "
                             "(the model was restored)")
        for target in layers:
            _snapshot(snapshots, target)
            if criterion == "wanda":
                _prune_wanda(target, stats[target.name], config)
            else:
                _prune_sparsegpt(target, stats[target.name], config, block_size, damping)
            stats[target.name] = None  # free the Hessian
        if index < last:
            with torch.no_grad():
                hidden = [_block_output(block(*args, **kwargs)) for args, kwargs in inputs]


def _by_block(list_name: str, targets: list[Target]) -> dict[int, list[Target]]:
    """The targets grouped by the index of the block (item of the list `list_name`) that holds them."""
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        index = int(target.module_name[len(list_name) + 1:].split(".", 1)[0])
        by_block.setdefault(index, []).append(target)
    return by_block
