"""Two-rank SparseTrainer run for tests/test_trainer_multiprocess.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_sparse_train.py OUT_DIR

Each rank writes OUT_DIR/rank{i}.json with hashes of its masks and weights, its tracker history, its
log history and how many times it wrote the history file; the baked model goes to OUT_DIR/final.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import iter_sparse_layers  # noqa: E402
from nm_hf.tracker import SparsityTracker  # noqa: E402
from nm_hf.trainer import SparseTrainer  # noqa: E402
from tiny_models import lm_rows, tiny_model  # noqa: E402

HISTORY_WRITES = 0
_save = SparsityTracker.save


def _counting_save(self, path):
    global HISTORY_WRITES
    HISTORY_WRITES += 1
    return _save(self, path)


SparsityTracker.save = _counting_save


def main() -> None:
    out = Path(sys.argv[1])
    data = lm_rows(32, 16, seed=0)
    model = tiny_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=4,
                             logging_steps=2, save_strategy="steps", save_steps=3, learning_rate=1e-2,
                             optim="adamw_torch", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=data,
                            sparsity_config=SparsityConfig(method="sr-ste", decay=0.1, decay_mode="decoupled"))
    trainer.train()
    trainer.save_model(str(out / "final"))  # every rank calls it; the main process writes the baked model

    masks, weights = hashlib.sha256(), hashlib.sha256()
    for _, layer in iter_sparse_layers(trainer.model):
        masks.update(layer.current_mask().numpy().tobytes())
    for value in trainer.model.state_dict().values():
        weights.update(value.detach().numpy().tobytes())
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "mask_hash": masks.hexdigest(),
        "weight_hash": weights.hexdigest(),
        "history": trainer.sparsity_tracker.history,
        "log_history": trainer.state.log_history,
        "history_writes": HISTORY_WRITES,
    }
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
