"""nm_hf: N:M fine-grained structured sparsity (SR-STE) for Hugging Face Transformers."""

from .checkpoint import (
    CheckpointError,
    load_compressed,
    load_compressed_state_dict,
    load_sparse,
    save_compressed,
)
from .config import SparsityConfig
from .cpu_memory import keep_freed_memory
from .hub import push_to_hub
from .injection import (
    SparsifyError,
    after_optimizer_step,
    apply_decoupled_decay,
    finalize,
    find_target_modules,
    is_sparsified,
    iter_sparse_layers,
    load_sparse_training_state,
    set_training_step,
    sparse_training_state,
    sparsify,
)
from .layers import SparseConv1D, SparseLinear, mark_weights_updated
from .masks import check_nm, nm_mask, nm_mask_transposable
from .prune import PruneError, prune
from .report import SparsityReport, sparsity_report
from .save_warning import DenseSaveWarning  # importing it installs the dense-save warning
from .semi_structured import to_semi_structured
from .tracker import HISTORY_FILE, SparsityTracker

# Trainer classes import `transformers.Trainer` (slow); `nm_hf.plot` is also `python -m nm_hf.plot`, which
# warns if importing the package already imported it: both load on first use.
_LAZY = {"SparseTrainer": "trainer", "SparseSeq2SeqTrainer": "trainer", "SparseTrainerMixin": "trainer",
         "create_sparse_optimizer": "trainer",
         "SparsityArguments": "arguments", "PLOT_FILE": "plot", "plot_runs": "plot"}
_LAZY_MODULES = ("plot", "trainer")


def __getattr__(name: str):
    """Load the lazy names above (and the `plot` / `trainer` submodules) on first use."""
    if name in _LAZY or name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(f".{_LAZY.get(name, name)}", __name__)
        return module if name in _LAZY_MODULES else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "HISTORY_FILE",
    "PLOT_FILE",
    "SparseSeq2SeqTrainer",
    "SparseTrainer",
    "SparseTrainerMixin",
    "create_sparse_optimizer",
    "SparsityArguments",
    "SparsityTracker",
    "mark_weights_updated",
    "plot_runs",
    "CheckpointError",
    "DenseSaveWarning",
    "PruneError",
    "prune",
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
    "after_optimizer_step",
    "apply_decoupled_decay",
    "check_nm",
    "finalize",
    "find_target_modules",
    "is_sparsified",
    "iter_sparse_layers",
    "keep_freed_memory",
    "nm_mask_transposable",
    "load_sparse_training_state",
    "set_training_step",
    "sparse_training_state",
    "nm_mask",
    "sparsify",
    "sparsity_report",
]
