"""nm_hf: N:M fine-grained structured sparsity (SR-STE) for Hugging Face Transformers."""

from .compressed import CheckpointError, load_compressed, load_compressed_state_dict, save_compressed
from .config import SparsityConfig
from .cuda import to_semi_structured
from .hub import load_sparse, push_to_hub
from .injection import (
    SparsifyError,
    apply_decoupled_decay,
    finalize,
    find_target_modules,
    is_sparsified,
    iter_sparse_layers,
    sparsify,
)
from .layers import SparseConv1D, SparseLinear
from .masks import check_nm, nm_mask
from .report import SparsityReport, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "load_compressed",
    "load_compressed_state_dict",
    "load_sparse",
    "push_to_hub",
    "save_compressed",
    "to_semi_structured",
    "SparsityConfig",
    "SparseConv1D",
    "SparseLinear",
    "SparsifyError",
    "SparsityReport",
    "apply_decoupled_decay",
    "check_nm",
    "finalize",
    "find_target_modules",
    "is_sparsified",
    "iter_sparse_layers",
    "nm_mask",
    "sparsify",
    "sparsity_report",
]
