"""SparseTrainer under DDP: two gloo ranks on CPU through `accelerate launch --multi_gpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nm_hf.plot import PLOT_FILE
from nm_hf.record import CONFIG_KEY
from nm_hf.tracker import HISTORY_FILE, TRACKER_STATE_FILE, SparsityTracker

SCRIPT = Path(__file__).parent / "scripts" / "ddp_sparse_train.py"
METHOD_STATE_SCRIPT = Path(__file__).parent / "scripts" / "ddp_method_state.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _launch(script: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_DISABLE_RICH": "1"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_ranks_keep_identical_masks_and_write_history_once(tmp_path):
    _launch(SCRIPT, tmp_path)

    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["model_wrapped"] == "DistributedDataParallel" for r in ranks)
    assert ranks[0]["mask_hash"] == ranks[1]["mask_hash"]
    assert ranks[0]["weight_hash"] == ranks[1]["weight_hash"]
    # metrics are computed locally on each rank and agree, without any collective
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [r["step"] for r in ranks[0]["history"]] == [2, 4, 6]
    assert ranks[0]["history"][0]["sad"] > 0
    train_logs = [log for log in ranks[0]["log_history"] if "loss" in log]
    assert [log["sparsity/sad"] for log in train_logs] == [r["sad"] for r in ranks[0]["history"]]
    # files come from the main process only
    assert ranks[0]["history_writes"] > 0 and ranks[1]["history_writes"] == 0
    run = tmp_path / "run"
    doc = SparsityTracker.load_history(run / HISTORY_FILE)
    assert doc["records"] == ranks[0]["history"]
    assert (run / PLOT_FILE).is_file()
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        assert (run / ckpt / TRACKER_STATE_FILE).is_file() and (run / ckpt / HISTORY_FILE).is_file()
    final = tmp_path / "final"
    record = json.loads((final / "config.json").read_text())[CONFIG_KEY]
    assert record["state"] == "finalized" and record["sparsity"] == 0.5
    assert sorted(p.name for p in final.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_ranks_built_from_different_seeds_share_the_main_process_method_state(tmp_path):
    """S-STE's scale comes from each rank's initial weights at sparsify; DDP copies rank 0's weights, and
    SparseTrainer gives every rank rank 0's scale, so the ranks train the same forward."""
    _launch(METHOD_STATE_SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["weight_hash"] == ranks[1]["weight_hash"]
    assert all("scale" in state for state in ranks[0]["method_states"])
    assert ranks[0]["method_states"] == ranks[1]["method_states"]
