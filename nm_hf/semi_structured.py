"""2:4 inference on NVIDIA sparse tensor cores through `torch.sparse.to_sparse_semi_structured`.

PyTorch's semi-structured tensors need: a CUDA device of compute capability 8.0+, 2-D contiguous
fp16/bf16 weights in [out, in] layout whose 2:4 groups run along the input dimension, and both
dimensions multiples of the backend's tile (cuSPARSELt: 16 x 16 for fp16/bf16; CUTLASS: 32 x 64).
`semi_structured_problems` checks one layer from its shape/dtype/device alone (a pure function, so
plans can be checked on a CPU machine); `to_semi_structured` checks every layer before it converts any.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .injection import finalize, is_sparsified, iter_sparse_layers, unwrap_model
from .layers import as_out_in, family_kind, iter_targets
from .masks import nm_group_counts
from .record import CONFIG_KEY, read_record

__all__ = ["SemiStructuredError", "SemiStructuredLinear", "semi_structured_problems", "check_semi_structured", "to_semi_structured",
           "SEMI_STRUCTURED_DTYPES", "left_dense"]

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
#: (rows, cols) every sparse weight dimension must be a multiple of, per backend (torch 2.x values;
#: read from torch at run time when available)
_FALLBACK_TILES = {"cusparselt": (16, 16), "cutlass": (32, 64)}


class SemiStructuredError(ValueError):
    """The model cannot be converted to semi-structured 2:4 weights; it was not modified."""


def _tile(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    classes = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
    cls = getattr(torch.sparse, classes[backend], None)
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is not None:
        return int(constraints.sparse_min_rows), int(constraints.sparse_min_cols)
    return _FALLBACK_TILES[backend]


def default_backend() -> str:
    """The backend `to_sparse_semi_structured` will use: cuSPARSELt unless CUTLASS is forced or missing."""
    forced = getattr(getattr(torch.sparse, "SparseSemiStructuredTensor", None), "_FORCE_CUTLASS", False)
    available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
    return "cutlass" if forced or not available else "cusparselt"


def semi_structured_problems(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    *,
    capability: tuple[int, int] | None = (8, 0),
    n: int = 2,
    m: int = 4,
    backend: str = "cusparselt",
) -> list[str]:
    """Why a weight of this shape ([out, in]), dtype and device cannot become a 2:4 semi-structured tensor.

    Returns [] when it can. `capability` is the CUDA device's compute capability (None: unknown).
    """
    problems = []
    if (n, m) != (2, 4):
        problems.append(f"{name}: pattern {n}:{m}; sparse tensor cores only run 2:4")
    if device_type != "cuda":
        problems.append(f"{name}: weight is on {device_type}; semi-structured sparse kernels are CUDA-only "
                        "(move the model with .to('cuda') first)")
    elif capability is not None and tuple(capability) < (8, 0):
        problems.append(f"{name}: CUDA compute capability {capability[0]}.{capability[1]}; 2:4 sparse tensor "
                        "cores need 8.0+ (Ampere or newer)")
    elif capability is not None and backend == "cutlass" and capability[0] != 8:
        # PyTorch's CUTLASS 2:4 kernels are built for sm_8x only (seen failing on an H200, 9.0)
        problems.append(f"{name}: CUDA compute capability {capability[0]}.{capability[1]}; PyTorch's CUTLASS "
                        "2:4 kernels run on 8.x only: use backend='cusparselt'")
    if dtype not in SEMI_STRUCTURED_DTYPES:
        problems.append(f"{name}: dtype {dtype}; convert the model to float16 or bfloat16 first")
    if len(shape) != 2:
        problems.append(f"{name}: weight has {len(shape)} dimensions; only 2-D weights are supported")
    else:
        rows, cols = _tile(backend, dtype if dtype in SEMI_STRUCTURED_DTYPES else torch.float16)
        out_features, in_features = shape
        if out_features % rows or in_features % cols:
            problems.append(f"{name}: weight [out={out_features}, in={in_features}] is not a multiple of the "
                            f"{backend} tile ({rows} x {cols}); exclude this layer from sparsification")
    return problems


class SemiStructuredLinear(nn.Linear):
    """An `nn.Linear` holding a semi-structured weight: it multiplies a 2-D view of its input.

    PyTorch's semi-structured tensors implement `mm`/`addmm`, but `F.linear` on a 3-D input whose leading
    dimensions cannot be folded without a copy decomposes into a batched matmul they refuse (`expand`),
    which is what batched `generate` hit on an H200. Flattening first always takes the `mm` path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = nn.functional.linear(rows, self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def _is_2d(layer: Any) -> bool:
    return isinstance(layer, nn.Module) and getattr(layer, "weight", None) is not None and layer.weight.ndim == 2


def left_dense(model: nn.Module) -> dict[str, str]:
    """`{name: why}` for the sparse targets `to_semi_structured` leaves as they are: PyTorch's semi-structured
    tensors are 2-D linear weights, so convolutions and mixture-of-experts expert weights (3-D, or DBRX's 2-D
    stacked ones, sliced by the experts forward) keep their (N:M) dense weights."""
    model = unwrap_model(model)
    experts: set[str] = set()
    if is_sparsified(model):
        layers = dict(iter_sparse_layers(model))
        experts = {name for name, layer in layers.items() if layer.is_parameter_target}
    else:
        record = read_record(model) or {}
        targets = {target.name: target for target in iter_targets(model)}
        layers = {name: targets[name].weight for name in record.get("targeted_modules", []) if name in targets}
        experts = {name for name in layers if targets[name].parameter is not None}
    out = {}
    for name, layer in layers.items():
        weight = layer.weight if hasattr(layer, "weight") else layer
        if weight.ndim != 2:
            out[name] = f"{weight.ndim}-D weight; semi-structured sparse tensors are 2-D (left dense, still N:M)"
        elif name in experts:
            out[name] = ("expert weight sliced per expert by its experts module's forward; semi-structured sparse "
                         "tensors replace linear weights only (left dense, still N:M)")
    return out


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, effective weight in [out, in] layout) for every 2-D layer to convert."""
    skipped = left_dense(model)
    if is_sparsified(model):
        out = []
        for name, layer in iter_sparse_layers(model):
            if name not in skipped:
                out.append((name, layer, as_out_in(layer, layer.effective_weight())))
        return out
    record = read_record(model)
    if record is None:
        raise SemiStructuredError(f"{type(model).__name__} has no sparse layers and no '{CONFIG_KEY}' record: "
                                  "nothing to convert (sparsify, train and finalize it with nm_hf first)")
    modules = dict(model.named_modules())
    out = []
    for name in record.get("targeted_modules", []):
        if name in skipped:
            continue
        module = modules.get(name)
        if module is None or family_kind(module) is None:
            kind = "missing" if module is None else type(module).__name__
            raise SemiStructuredError(f"layer {name!r} from the sparsity record is {kind}, not a layer kind nm_hf "
                                      "knows (nn.Linear, Conv1D)")
        out.append((name, module, as_out_in(module, module.weight.detach())))
    return out


def _record_pattern(model: nn.Module) -> tuple[int, int]:
    if is_sparsified(model):
        _, layer = next(iter_sparse_layers(model))
        return layer.nm_n, layer.nm_m
    record = read_record(model)
    if record is None:
        raise SemiStructuredError(f"{type(model).__name__} has no sparse layers and no '{CONFIG_KEY}' record: "
                                  "nothing to convert (sparsify, train and finalize it with nm_hf first)")
    return int(record["n"]), int(record["m"])


def check_semi_structured(model: nn.Module, *, assume_cuda: bool = False, backend: str | None = None) -> list[str]:
    """Every problem that stops `to_semi_structured(model)`; [] if none.

    `assume_cuda=True` checks shapes, dtypes and the 2:4 pattern as if the weights were on a CUDA
    8.0+ device (plan the conversion on a CPU machine); the backend then defaults to cuSPARSELt,
    which PyTorch's CUDA builds use.
    """
    backend = backend or ("cusparselt" if assume_cuda else default_backend())
    model = unwrap_model(model)
    n, m = _record_pattern(model)
    problems = []
    if (n, m) != (2, 4):
        problems.append(f"the model is {n}:{m} sparse; sparse tensor cores only run 2:4")
    for name, layer, weight in _candidates(model):
        if isinstance(layer, nn.Module) and not getattr(layer, "is_masked", True):
            problems.append(f"{name}: method {layer.nm_method!r} does not mask the weights: they are not 2:4")
            continue
        device_type = "cuda" if assume_cuda else weight.device.type
        capability = None
        if device_type == "cuda" and not assume_cuda and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(weight.device)
        problems += semi_structured_problems(name, tuple(weight.shape), weight.dtype, device_type,
                                             capability=capability, backend=backend)
        if weight.ndim == 2 and weight.shape[1] % 4 == 0:
            bad = int((nm_group_counts(weight, 4, dim=1) > 2).sum())
            if bad:
                problems.append(f"{name}: {bad} groups of 4 input weights have more than 2 non-zeros")
    return problems


@torch.no_grad()
def to_semi_structured(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Give every 2:4 layer a `torch.sparse` semi-structured weight for CUDA inference, in place.

    Works on a finalized model (the layers listed in its nm_sparsity record) or a model with live
    sparse layers (finalized first). All layers are checked before any is changed; on a problem a
    `SemiStructuredError` lists every layer at fault and the model is untouched. GPT-2 `Conv1D`
    layers become `nn.Linear` (transposed weight). The result is for inference only (no gradients).
    """
    outer, model = model, unwrap_model(model)
    problems = check_semi_structured(model, backend=backend)
    if problems:
        raise SemiStructuredError(f"cannot convert {type(model).__name__} to 2:4 semi-structured weights "
                                  "(the model was not modified):\n  - " + "\n  - ".join(problems))
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    converted = []
    try:  # the backend is chosen when a tensor is created; restore the global flag afterwards
        if backend is not None:
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        for name, module, weight in _candidates(model):
            out_in = family_kind(module).group_dim == module.weight.ndim - 1  # stored [out, in] already
            converted.append((name, module, out_in, weight, to_sparse_semi_structured(weight.contiguous())))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    if is_sparsified(model):  # same module objects, plain classes again
        finalize(model)
    modules = dict(model.named_modules())
    for name, module, out_in, weight, sparse in converted:
        if not out_in:  # [in, out] kinds (GPT-2 Conv1D): an nn.Linear takes their place
            linear = SemiStructuredLinear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                                          device="meta")
            linear.weight = nn.Parameter(sparse, requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, linear)
        else:
            module.weight = nn.Parameter(sparse, requires_grad=False)
            kind = family_kind(module)
            if isinstance(module, nn.Linear) and kind is not None and kind.matches(module):
                # nn.Linear or a subclass the layer kind knows computes the same map (FalconLinear)
                module.__class__ = SemiStructuredLinear
    return outer


def describe(model: nn.Module) -> dict[str, Any]:
    """Counts of semi-structured and dense linear weights, and the N:M targets left dense (not 2-D), for logs
    and the benchmark."""
    from torch.sparse import SparseSemiStructuredTensor

    sparse = sum(1 for mod in model.modules()
                 if isinstance(mod, nn.Linear) and isinstance(mod.weight, SparseSemiStructuredTensor))
    dense = sum(1 for mod in model.modules() if family_kind(mod) is not None and _is_2d(mod)) - sparse
    return {"semi_structured_layers": sparse, "dense_linear_layers": dense, "left_dense": left_dense(model)}
