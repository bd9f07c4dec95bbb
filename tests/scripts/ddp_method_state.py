"""Two-rank SparseTrainer run whose ranks build the model from different seeds, for
tests/test_trainer_multiprocess.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_method_state.py OUT_DIR

S-STE computes its scale at `sparsify` from each rank's own initial weights; DDP then copies rank 0's
weights to every rank, and SparseTrainer must give every rank rank 0's scale too. Each rank writes
OUT_DIR/rank{i}.json with its layers' method states and a hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import iter_sparse_layers  # noqa: E402
from nm_hf.trainer import SparseTrainer  # noqa: E402
from tiny_models import lm_rows, tiny_model  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    data = lm_rows(16, 16, seed=0)
    # a different initialisation on each rank (a model built from a config without a common seed)
    model = tiny_model("gpt2", seed=int(os.environ["RANK"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=2, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="no", learning_rate=1e-2, optim="adamw_torch",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=data, sparsity_config=SparsityConfig(method="s-ste"))
    trainer.train()
    weights = hashlib.sha256()
    for value in trainer.model.state_dict().values():
        weights.update(value.detach().numpy().tobytes())
    record = {
        "rank": trainer.args.process_index,
        "method_states": [layer.nm_method_state for _, layer in iter_sparse_layers(trainer.model)],
        "weight_hash": weights.hexdigest(),
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
