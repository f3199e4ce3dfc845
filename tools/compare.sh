#!/usr/bin/env bash
# make compare: the article's "full fine-tuning vs LoRA" (section 2.1), measured.
# Trains the same style (data/) on the same model both ways, in separate
# processes, and prints trainable parameters, peak memory (RSS), time per
# step and final loss side by side.
#   tools/compare.sh [STEPS] [MODEL]      (defaults: 60, models/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-60}
model=${2:-models/tiny}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(data/ --model "$model" --steps "$steps" --batch 4 --seed 1 --threads 2)
echo "full fine-tuning vs LoRA on $model, data/, $steps steps of batch 4, $(nproc) cores"
[ -f data/sdlora_args.txt ] && echo "(data/sdlora_args.txt applies to both: with --te the text encoder trains too, fully or by LoRA)"
./train "${common[@]}" --full --lr 1e-4 --out "$out/full" 2> "$out/full.log" || { cat "$out/full.log"; exit 1; }
./train "${common[@]}" --lr 1e-3 --rank 4 --alpha 4 --targets qv --out "$out/lora" 2> "$out/lora.log" || { cat "$out/lora.log"; exit 1; }
printf '\n| %-28s | %14s | %14s |\n' "" "full" "LoRA (qv, r=4)"
printf '|%s|%s|%s|\n' "------------------------------" "----------------" "----------------"
get() { sed -n 's/.*summary: .*'"$2"' \([^,]*\).*/\1/p' "$out/$1.log"; }
for k in "trainable parameters:trainable" "peak memory (RSS, MB):peak_rss_mb" "seconds per step:s_per_step" "final loss (smoothed):final_loss"; do
  label=${k%%:*}; key=${k##*:}
  printf '| %-28s | %14s | %14s |\n' "$label" "$(get full "$key")" "$(get lora "$key")"
done
