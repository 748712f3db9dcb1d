#!/usr/bin/env bash
# Candidate causes of the plugin's limited effect, compared on the held-out distillation loss per
# degree pair, at one short CPU budget each (400 steps of 32 images, seed 0):
#   base  - the evidence run's recipe (rank 2, the 900 distillation images);
#   rank8 - four times the rank (is the plugin too small?);
#   half  - every other one of the 900 images (does the amount of data limit it?).
# Needs `tocom experiment all --stage data` first (the split of the ImageNet sample).
# Usage: bash benchmarks/distill_causes.sh [OUT_DIR]   (about 12 minutes per run on 2 cores)
set -eu
D=runs/evidence/paper-mini/distill-data
OUT=${1:-runs/causes}
mkdir -p "$OUT/half"
i=0
for f in "$D"/train/*; do
  if [ $((i % 2)) -eq 0 ]; then ln -sf "$(readlink -f "$f")" "$OUT/half/"; fi
  i=$((i + 1))
done
common=(--checkpoint ../shared/weights/deit_tiny_patch16_224.safetensors --steps 400 --batch-size 32
        --lr 1e-3 --seed 0 --holdout "$D/holdout" --eval-every 100 --decode-once --workers 1
        --checkpoint-every 100)
for cfg in "base:$D/train:2" "rank8:$D/train:8" "half:$OUT/half:2"; do
  IFS=: read -r name data rank <<<"$cfg"
  [ -f "$OUT/$name.tocom.safetensors" ] && continue
  resume=()  # a killed run continues from its checkpoint
  [ -f "$OUT/$name.tocom.safetensors.run/last.ckpt" ] && resume=(--resume)
  python -m tocom distill deit_tiny_patch16_224 --data "$data" --rank "$rank" "${common[@]}" "${resume[@]}" \
      --out "$OUT/$name.tocom.safetensors" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -1
done
python - "$OUT" <<'PY'
import sys
from pathlib import Path

from tocom.compensator import Compensator

print("| run | step | 0->16 | 16->0 | 0->8 | 8->16 |\n|---|---|---|---|---|---|")
for name in ("base", "rank8", "half"):
    for p in Compensator.load(Path(sys.argv[1]) / f"{name}.tocom.safetensors").spec.recipe["holdout_curve"]:
        print(f"| {name} | {p['step']} | {p['loss_0_to_16']:.4f} | {p['loss_16_to_0']:.4f} | "
              f"{p['loss_0_to_8']:.4f} | {p['loss_8_to_16']:.4f} |")
PY
