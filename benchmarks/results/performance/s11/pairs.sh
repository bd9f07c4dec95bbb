#!/bin/bash
# Quiet window s11: LM pairs (dense vs sr-ste 2:4), the new code (main, NEW) and the code before the
# per-layer overhead cuts (OLD worktree at 72aa994) alternating, then more of the new.
S=/work/main/benchmarks/results/performance/s11/recipe_pairs
mkdir -p $S
pair() {  # pair TREE NAME
  cd $1
  uptime > $S/$2.load
  PYTHONPATH=$1 /work/main/.venv/bin/python benchmarks/results_table.py language_modeling recipes/configs/lm_python_docs.yaml \
    --runs dense:2:4 sr-ste:2:4 --jobs 2 --threads 1 --output_root /work/main/runs/s11_pairs/$2 --no_results_file \
    -- --max_steps 400 --warmup_steps 40 --eval_steps 200 > $S/$2.txt 2>&1
  uptime >> $S/$2.load
}
NEW=/work/main OLD=/tmp/s11/old
pair $NEW lm_sr-ste_2_4_new_run1; pair $OLD lm_sr-ste_2_4_old_run1
pair $NEW lm_sr-ste_2_4_new_run2; pair $OLD lm_sr-ste_2_4_old_run2
pair $NEW lm_sr-ste_2_4_new_run3; pair $OLD lm_sr-ste_2_4_old_run3
pair $NEW lm_sr-ste_2_4_new_run4; pair $NEW lm_sr-ste_2_4_new_run5; pair $NEW lm_sr-ste_2_4_new_run6
