"""Saved sparse checkpoints: reading directories, the compressed format, inspection and reloading.

One module per concern, importing one way (codec <- directory <- compressed <- inspect / reload):

- `codec`: position codes, tensor compression, checksums and header checks (no file I/O);
- `directory`: reading a checkpoint directory (config.json, weight files, safetensors index, the
  files that travel with a model), every file resolved inside the directory;
- `compressed`: the compressed format (save, load, convert; its spec is the module docstring);
- `inspect`: per-layer sparsity read from the files (`nm-hf inspect`);
- `reload`: `load_sparse` / `restore_sparsity` (re-patching a saved model for more training).
"""

from .compressed import (
    WEIGHTS_NAME,
    compress_checkpoint,
    decompress_checkpoint,
    iter_compressed_tensors,
    load_compressed,
    load_compressed_state_dict,
    save_compressed,
)
from .directory import CheckpointError
from .inspect import inspect_checkpoint
from .reload import load_sparse, restore_sparsity

__all__ = [
    "CheckpointError",
    "WEIGHTS_NAME",
    "compress_checkpoint",
    "decompress_checkpoint",
    "inspect_checkpoint",
    "iter_compressed_tensors",
    "load_compressed",
    "load_compressed_state_dict",
    "load_sparse",
    "restore_sparsity",
    "save_compressed",
]
