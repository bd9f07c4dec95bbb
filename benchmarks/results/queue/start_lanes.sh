#!/usr/bin/env bash
# Start both lanes of the results protocol from a checkout of main (run from the repository root):
#   bash benchmarks/results/queue/start_lanes.sh [WORKTREE]   (default ../results-wt)
# Creates WORKTREE at the grid's code 565a289 with worktree-565a289.patch when missing, with the results files
# copied into it (its runs are appended to its copies; copy them back to record), and its .venv, then starts
# lane A and lane B (benchmarks/results_queue.sh) in the background. Output: WORKTREE/runs/queue.log.
set -eu
root=$(git rev-parse --show-toplevel)
worktree=${1:-$root/../results-wt}
if [ ! -d "$worktree" ]; then
    git -C "$root" worktree add --detach "$worktree" 565a289
    git -C "$worktree" apply "$root/benchmarks/results/queue/worktree-565a289.patch"
    # only into a new worktree: an existing one may hold runs finished but not yet copied back
    cp "$root"/benchmarks/results/translation.json "$root"/benchmarks/results/language_modeling.json \
        "$worktree/benchmarks/results/"
fi
worktree=$(realpath "$worktree")
if pgrep -f "results_queue\.sh [^ ]+ ${worktree}\$" > /dev/null; then
    echo "lanes already running for $worktree" >&2; exit 1
fi
make -C "$worktree" install
for lane in A B; do
    nohup setsid bash "$root/benchmarks/results_queue.sh" "$root/benchmarks/results/queue/lane$lane.txt" \
        "$worktree" > /dev/null 2>&1 &
    sleep 20  # the lanes' first runs start apart
done
echo "lanes started; log: $worktree/runs/queue.log"
