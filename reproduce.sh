#!/usr/bin/env bash
# P2Rec under the papers' protocol beside ours, on one dataset that 01_prepare.py has prepared:
#   bash reproduce.sh beauty                    # options after the name go to every stage: --out DIR, --device cuda:1
# Stages 02-04 with their defaults (teacher, user-level SFT, the tuned and the base LLM's item embeddings), then
# {ce, bce} x {SASRec, GRU4Rec} x {vanilla, P2Rec (enhanced), categories, base-llm} x seeds 42 43 44, every run
# stopping on its own; where items have titles (ml-100k), also text and P2Rec-text, fused by init, add and align.
# Ends with out/<dataset>/results.md (lifts over vanilla, full-ranking and sampled metrics, best epochs) and
# results.png. Run it again after an interruption: finished stages are skipped (their artifact
# exists; delete it to redo one) and the interrupted one resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
data="${1:?usage: bash reproduce.sh DATASET [--out DIR] [--device DEVICE]}"
shift
out=out
for ((i = 1; i < $#; i++)); do [ "${!i}" = "--out" ] && j=$((i + 1)) && out="${!j}"; done
start=$SECONDS

stage() {  # stage ARTIFACT SCRIPT [ARGS...]: run the script unless its artifact is there
    local artifact="$out/$data/$1"
    shift
    if [ -e "$artifact" ]; then echo "reproduce.sh: $artifact exists, skipping $1"; else python "$@" --data "$data"; fi
}
stage teacher.pt 02_teacher.py "$@"
stage sft_head.pt 03_sft.py "$@"
stage item_emb.pt 04_embed.py "$@"
stage item_emb_base.pt 04_embed.py --base "$@"
variants=vanilla,enhanced,categories,base-llm
if python -c "import json, sys; sys.exit(not json.load(open(sys.argv[1])).get('item_titles'))" "$out/$data/dataset.json"; then
    # Beyond the paper's ID-only setting, where items have titles: their text through the base LLM, and P2Rec's SFT
    # naming items by title; each fused three ways.
    stage item_emb_text.pt 04_embed.py --text "$@"
    stage sft_head_title.pt 03_sft.py --item-repr title "$@"
    stage item_emb_title.pt 04_embed.py --titles "$@"
    variants+=,text,text+add,text+align,p2rec-text,p2rec-text+add,p2rec-text+align
fi
stage results.json 05_student.py --loss ce,bce --variants $variants --seeds 42 43 44 "$@"
echo "reproduce.sh: $data in $((SECONDS - start)) s; tables in $out/$data/results.md"
