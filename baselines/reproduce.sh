#!/usr/bin/env bash
# DELRec and LLM-TRSR beside popularity, the SASRec teacher, the papers' SASRec and the P2Rec student, on one dataset
# that 01_prepare.py and 02_teacher.py have prepared (05_student.py too, for the student's row):
#   bash baselines/reproduce.sh beauty           # options after the name go to every run: --prefixes 5, --out DIR
# First the papers' SASRec, the teacher's model trained with their loss (bce, one sampled negative per position),
# the baseline both papers report beating; then DELRec with and without stage 1 (the paper's ablation), LLM-TRSR's
# hierarchical and recurrent paradigms, seeds 42 43 44 each (--seeds after the name overrides them), at each
# script's defaults for the device (full scale on a GPU). Ends with their tables, printed and in
# out/<dataset>/baselines.md. Run it again after an interruption: finished runs are skipped (their metrics file
# exists; delete it to redo one) and the interrupted one resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:?usage: bash baselines/reproduce.sh DATASET [--out DIR] [options for every run]}"
shift
out=out
for ((i = 1; i < $#; i++)); do [ "${!i}" = "--out" ] && j=$((i + 1)) && out="${!j}"; done
start=$SECONDS

run() {  # run FILE COMMAND...: the command, unless out/<dataset>/FILE, what it writes last, is there
    local file="$out/$data/$1"
    shift
    if [ -e "$file" ]; then echo "baselines/reproduce.sh: $file exists, skipping"; else "$@"; fi
}
every=(--data "$data" --seeds 42 43 44 "$@")  # after the seeds: the user's options, a --seeds among them, win
# the papers' SASRec at the teacher's defaults (the options after the name are the baselines', bar --out)
run teacher_bce.pt python 02_teacher.py --data "$data" --out "$out" --loss bce --name teacher_bce
run delrec_metrics.json python baselines/delrec.py "${every[@]}"
run delrec_no_stage1_metrics.json python baselines/delrec.py --no-stage1 "${every[@]}"
run llm_trsr_hierarchical_metrics.json python baselines/llm_trsr.py --paradigm hierarchical "${every[@]}"
run llm_trsr_recurrent_metrics.json python baselines/llm_trsr.py --paradigm recurrent "${every[@]}"
tables="$(python baselines/table.py --data "$data" --out "$out")"
printf '%s\n' "$tables" > "$out/$data/baselines.md.tmp" && mv "$out/$data/baselines.md.tmp" "$out/$data/baselines.md"
printf '%s\n' "$tables"
echo "baselines/reproduce.sh: $data in $((SECONDS - start)) s; tables in $out/$data/baselines.md"
