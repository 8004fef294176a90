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

options=("$@")
run() {  # run METRICS SCRIPT [ARGS...]: the baseline, with the options, unless its metrics file is there
    local metrics="$out/$data/$1"
    shift
    if [ -e "$metrics" ]; then echo "baselines/reproduce.sh: $metrics exists, skipping"; else
        python "$@" --data "$data" --seeds 42 43 44 "${options[@]}"; fi
}
# the papers' SASRec at the teacher's defaults (the options after the name are the baselines', bar --out)
if [ -e "$out/$data/teacher_bce.pt" ]; then echo "baselines/reproduce.sh: $out/$data/teacher_bce.pt exists, skipping"; else
    python 02_teacher.py --data "$data" --out "$out" --loss bce --name teacher_bce; fi
run delrec_metrics.json baselines/delrec.py
run delrec_no_stage1_metrics.json baselines/delrec.py --no-stage1
run llm_trsr_hierarchical_metrics.json baselines/llm_trsr.py --paradigm hierarchical
run llm_trsr_recurrent_metrics.json baselines/llm_trsr.py --paradigm recurrent
tables="$(python baselines/table.py --data "$data" --out "$out")"
printf '%s\n' "$tables" > "$out/$data/baselines.md.tmp" && mv "$out/$data/baselines.md.tmp" "$out/$data/baselines.md"
printf '%s\n' "$tables"
echo "baselines/reproduce.sh: $data in $((SECONDS - start)) s; tables in $out/$data/baselines.md"
