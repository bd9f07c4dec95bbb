"""Sparsity-preserving LoRA: `preserve_sparsity(peft_model)` masks every LoRA delta with the N:M mask under it.

A LoRA adapter on an N:M layer adds a dense delta `B @ A`: merged into the weight
(`merge_and_unload()`), it fills the pruned positions and the pattern is gone. After
`preserve_sparsity`, each adapter on an N:M base layer computes `x @ ((B @ A) * scaling * M)^T`
instead, where `M` is the base layer's own mask (`current_mask()`: every non-zero weight, plus the
lowest-index zeros in groups that have fewer than n non-zeros, as nm_hf's tie rule picks them). The
adapter therefore only ever changes weights inside the mask, so `merge_and_unload()` leaves weights
that obey the pattern, and the merged model computes what the adapter model computed (up to float
rounding of the sum).

The base layers must be live nm_hf sparse layers whose weights already obey the pattern (pruned
entries exactly zero): a model from `nm_hf.load_sparse(...)`, `nm_hf.prune(...)`, or `nm_hf.sparsify`
with method "fixed". The masking is installed as a PEFT LoRA variant (the extension point DoRA uses)
on the adapters present when it is called: call it again after adding or loading another adapter,
and after `PeftModel.from_pretrained` (the adapter files are plain LoRA weights, nothing nm_hf-specific).
Costs: each masked adapter forms its dense `[out, in]` delta once per forward (memory and time of one
weight matrix per layer, like a sparse layer's masked weight).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SparseLayerMixin, as_out_in, mark_weights_updated
from .masks import apply_mask

__all__ = ["preserve_sparsity", "MaskedLoraVariant", "is_sparsity_preserving"]


def _import_peft() -> Any:
    try:
        import peft
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ImportError("nm_hf.peft needs the peft package: pip install peft (nm_hf is tested with peft 0.21)"
                          ) from err
    return peft, LoraLayer, LoraLinear


def _base_mask(module: nn.Module) -> torch.Tensor:
    """The N:M mask of the LoRA layer's base layer, in the base weight's stored layout."""
    return module.get_base_layer().current_mask()


def _masked_delta(module: nn.Module, adapter: str, mask: torch.Tensor, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """`(B @ A) * scaling` times the mask, as [out, in] (autograd flows to A and B)."""
    weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if dtype is not None:
        weight_a, weight_b = weight_a.to(dtype), weight_b.to(dtype)
    delta = (weight_b @ weight_a) * module.scaling[adapter]
    return delta.masked_fill(~as_out_in(module.get_base_layer(), mask), 0)


class MaskedLoraVariant:
    """The PEFT LoRA variant `preserve_sparsity` installs: forward and merges with the masked delta.

    PEFT calls these hooks in place of its vanilla LoRA code (forward, merge, unmerge, mixed-batch
    forward). No parameters of its own, so the adapter's files stay plain LoRA.
    """

    def supports_lora_conversion(self) -> bool:
        return False  # the masked delta is not low-rank: no exact conversion to vanilla LoRA

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create (installed by `preserve_sparsity`, not by a LoraConfig)."""

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        lora_b = module.lora_B[active_adapter]
        delta = _masked_delta(module, active_adapter, _base_mask(module))
        bias = lora_b.bias * module.scaling[active_adapter] if lora_b.bias is not None else None
        return result + F.linear(module.lora_dropout[active_adapter](x), delta, bias)

    @staticmethod
    @torch.no_grad()
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        mask = _base_mask(module)
        merged = orig_weight.clone()
        as_out_in(module.get_base_layer(), merged).add_(
            _masked_delta(module, active_adapter, mask, torch.float32).to(merged.dtype))
        _remember_merge_mask(module, active_adapter, mask)
        return merged  # PEFT assigns it to the weight's .data (a new tensor: the mask caches see it)

    @staticmethod
    @torch.no_grad()
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        mask = _base_mask(module)
        as_out_in(module.get_base_layer(), orig_weight.data).add_(
            _masked_delta(module, active_adapter, mask, torch.float32).to(orig_weight.dtype))
        _remember_merge_mask(module, active_adapter, mask)
        mark_weights_updated([module.get_base_layer()])  # written in place, outside an optimizer step

    @staticmethod
    @torch.no_grad()
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        masks = module.__dict__.get("_nm_merge_masks") or {}
        mask = masks.pop(active_adapter, None)
        if mask is None:
            mask = _base_mask(module)
        unmerged = orig_weight.clone()
        as_out_in(module.get_base_layer(), unmerged).sub_(
            _masked_delta(module, active_adapter, mask, torch.float32).to(unmerged.dtype))
        return unmerged


def _remember_merge_mask(module: nn.Module, adapter: str, mask: torch.Tensor) -> None:
    """Unmerge must subtract exactly what merge added: keep the mask used (only while merged)."""
    module.__dict__.setdefault("_nm_merge_masks", {})[adapter] = mask


def is_sparsity_preserving(peft_model: nn.Module) -> bool:
    """True when every LoRA adapter on an N:M layer of `peft_model` is masked (`preserve_sparsity` ran)."""
    _, lora_layer, _ = _import_peft()
    lora_layers = [m for m in peft_model.modules() if isinstance(m, lora_layer)]
    if any(_on_nm_expert_parameter(m) for m in lora_layers):
        return False  # LoRA on an N:M expert Parameter is never masked (see preserve_sparsity)
    layers = [m for m in lora_layers if _on_nm_layer(m)]
    return bool(layers) and all(isinstance(m.lora_variant.get(a), MaskedLoraVariant)
                                for m in layers for a in m.lora_A)


def _on_nm_layer(module: nn.Module) -> bool:
    base = module.get_base_layer()
    return isinstance(base, SparseLayerMixin) and base.is_masked


def _on_nm_expert_parameter(module: nn.Module) -> bool:
    """A LoRA layer on an N:M expert Parameter (PEFT's ParamWrapper, `LoraConfig(target_parameters=...)`)."""
    parameter = getattr(module, "parameter_name", None)
    parts = module.get_base_layer().__dict__.get("nm_parts") or {}
    return parameter in parts and parts[parameter].is_masked


def _names(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _record_hint(peft_model: nn.Module, lora_layer: type) -> str:
    if any(isinstance(m, SparseLayerMixin) and m.is_masked for m in peft_model.modules()):
        adapted = [name for name, m in peft_model.named_modules() if isinstance(m, lora_layer)]
        if not adapted:
            return ("it has N:M layers but no LoRA layer: add the adapter first (peft.get_peft_model), then call "
                    "preserve_sparsity on the PEFT model")
        return (f"it has N:M layers, but the LoRA layers ({_names(adapted)}) sit on none of them: target the "
                "N:M layers in LoraConfig(target_modules=...)")
    unmasked = sorted({m.nm_method for m in peft_model.modules() if isinstance(m, SparseLayerMixin)})
    if unmasked:
        return (f"its sparse layers use method {', '.join(map(repr, unmasked))}, whose forward is dense (no N:M mask "
                "to keep): build the base model with a masking method instead (e.g. nm_hf.prune(dense_model, "
                "SparsityConfig(method='fixed')))")
    config = getattr(peft_model, "config", None)
    if config is not None and getattr(config, "nm_sparsity", None) is not None:
        return ("its config has an nm_sparsity record but its layers are plain: load the base model with "
                "nm_hf.load_sparse(path) (not plain from_pretrained) before adding the adapter")
    return ("the base model has no live N:M layers: sparsify it first (nm_hf.load_sparse, nm_hf.prune, or "
            "nm_hf.sparsify with method='fixed'), then add the adapter")


@torch.no_grad()
def preserve_sparsity(peft_model: nn.Module) -> nn.Module:
    """Mask every LoRA delta on an N:M base layer with that layer's mask, in place; returns `peft_model`.

    Checked for every layer before anything changes (one `ValueError` lists the problems): the adapter
    layer must be a plain LoRA `Linear` (no DoRA or other variant; nn.Linear and GPT-2 Conv1D bases),
    not merged, not on an N:M expert Parameter (`LoraConfig(target_parameters=...)`), and the base
    weights must already obey their pattern (pruned entries zero: load with `nm_hf.load_sparse`, prune
    with `nm_hf.prune`, or sparsify with method "fixed"). Calling it again
    masks adapters added since; masked ones are left as they are.
    """
    _, lora_layer, lora_linear = _import_peft()
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"preserve_sparsity needs a PEFT model (torch.nn.Module), got {type(peft_model).__name__}")
    layers = [(name, module) for name, module in peft_model.named_modules()
              if isinstance(module, lora_layer) and _on_nm_layer(module)]
    on_experts = [name for name, module in peft_model.named_modules()
                  if isinstance(module, lora_layer) and _on_nm_expert_parameter(module)]
    if not layers and not on_experts:
        raise ValueError(f"preserve_sparsity: no LoRA adapter of {type(peft_model).__name__} sits on an N:M "
                         f"layer; {_record_hint(peft_model, lora_layer)}")
    problems: dict[str, list[str]] = {}
    if on_experts:
        problems["LoRA on N:M expert Parameters (target_parameters): their deltas cannot be masked, and the sparse "
                 "experts cannot compute with a reparametrized weight; adapt the linear layers only "
                 "(target_modules), or keep the expert weights dense"] = on_experts
    for name, module in layers:
        base = module.get_base_layer()
        if not isinstance(module, lora_linear):
            problems.setdefault(f"{type(module).__name__} LoRA layers: only LoRA on linear layers (nn.Linear, "
                                "GPT-2 Conv1D) can be masked", []).append(name)
            continue
        variants = {type(v).__name__ for v in module.lora_variant.values() if not isinstance(v, MaskedLoraVariant)}
        if variants:
            problems.setdefault(f"adapters with a LoRA variant ({', '.join(sorted(variants))}, e.g. DoRA): only plain "
                                "LoRA deltas can be masked", []).append(name)
        if module.merged:
            problems.setdefault("merged adapters: call unmerge_adapter() first", []).append(name)
        if apply_mask(base.weight.detach(), base.current_mask(), keep=False).any():
            problems.setdefault(f"non-zero pruned entries in the base weight (the dense training weights of "
                                f"{base.nm_method!r}), which a merged adapter could not keep at zero: prune first "
                                "(nm_hf.prune, or nm_hf.finalize then nm_hf.load_sparse)", []).append(name)
    if problems:
        lines = [f"{what}: {_names(names)}" for what, names in problems.items()]
        raise ValueError(f"preserve_sparsity refused {type(peft_model).__name__} (nothing was changed):\n  - "
                         + "\n  - ".join(lines))
    variant = MaskedLoraVariant()
    for _, module in layers:
        for adapter in module.lora_A:
            module.lora_variant.setdefault(adapter, variant)
    return peft_model
