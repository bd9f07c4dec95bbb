#!/usr/bin/env bash
# One lane of the results protocol (docs/results.md): runs the queue file's entries one after another.
#
#   bash benchmarks/results_queue.sh QUEUE_FILE WORKTREE
#
# QUEUE_FILE: one results_table.py argument line per run ('#' lines and blank lines are skipped), e.g.
#   translation recipes/configs/translation_multi30k.yaml --runs ste:2:4,learning_rate=1e-3
# The lane appends its fixed flags (--output_root by recipe, --resume, --jobs 1 --threads 1 and the saving
# flags after '--') unless the line has its own '--output_root'. WORKTREE: the checkout whose recipes and
# .venv run the protocol (the grid's code stays one commit for the whole protocol; see docs/results.md).
# On a fresh machine: bash benchmarks/results/queue/start_lanes.sh (worktree, .venv and both lanes).
set -u
queue=$(realpath "$1")
worktree=$(realpath "$2")
cd "$worktree" || exit 1
mkdir -p runs
log=runs/queue.log
# glibc keeps freed memory instead of returning it to the kernel (what the recipes' --keep_freed_memory does
# on later code): the same numbers, fewer page faults
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647
while true; do
    line=$(grep -v '^[[:space:]]*\(#\|$\)' "$queue" | head -n 1)
    line=${line%$'\r'}  # a queue file saved with CRLF endings
    [ -z "$line" ] && { echo "$(date -u +%FT%TZ) $queue: empty" >> "$log"; exit 0; }
    read -r -a words <<< "$line"
    case "${words[0]}" in
        translation) root=runs/mt; save=454 ;;
        language_modeling) root=runs/p3_lm; save=500 ;;
        *) echo "$(date -u +%FT%TZ) bad entry (recipe?): $line" >> "$log"; exit 1 ;;
    esac
    # the entry's own recipe flags (after its '--', if any) follow the lane's saving flags
    args=() extra=() after_dashes=0
    for word in "${words[@]}"; do
        if [ "$after_dashes" = 0 ] && [ "$word" = "--" ]; then after_dashes=1
        elif [ "$after_dashes" = 0 ]; then args+=("$word")
        else extra+=("$word"); fi
    done
    fixed=(--output_root "$root" --resume --jobs 1 --threads 1)
    if [[ " ${args[*]} " == *" --output_root "* || " ${args[*]} " == *" --output_root="* ]]; then
        fixed=(--resume --jobs 1 --threads 1)
    fi
    echo "$(date -u +%FT%TZ) start: $line" >> "$log"
    if .venv/bin/python benchmarks/results_table.py "${args[@]}" "${fixed[@]}" \
            -- --save_strategy steps --save_steps "$save" --save_total_limit 1 "${extra[@]}" >> "$log" 2>&1; then
        echo "$(date -u +%FT%TZ) done: $line" >> "$log"
    else
        echo "$(date -u +%FT%TZ) FAILED: $line" >> "$log"
    fi
    # the entry leaves the queue (first exact match only; the file may have been edited meanwhile)
    python3 - "$queue" "$line" <<'EOF'
import sys
path, line = sys.argv[1], sys.argv[2]
with open(path, newline="") as f:
    lines = f.read().splitlines(keepends=True)
for i, text in enumerate(lines):
    if text.rstrip("\r\n") == line:
        del lines[i]
        break
with open(path, "w", newline="") as f:
    f.write("".join(lines))
EOF
done
