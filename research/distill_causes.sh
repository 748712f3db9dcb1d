#!/usr/bin/env bash
# Candidate causes of the plugin's limited effect, compared on the held-out distillation loss per
# degree pair, at one short CPU budget each (400 steps of 32 images, seed 0):
#   base  - the evidence run's recipe (rank 2, the 900 distillation images);
#   base1 - the same with seed 1: how far two runs of one recipe differ by chance;
#   rank8 - four times the rank (is the plugin too small?);
#   half  - every other one of the 900 images (does the amount of data limit it?);
#   quarter - every fourth one (a third point for the amount of data);
#   feat  - L1 on the features the head reads instead of KL on ImageNet logits (the objective);
#   deitaug - DeiT's augmentation of the distillation images instead of the light one;
# and the ToCom paper's Table 5 ablations at the standard plugin's parameter count:
#   shared - one group for every unit of degree, rank 32 (16 groups x rank 2 in the standard one);
#   noinv  - separate groups for raising and lowering the degree, 32 groups of rank 1;
#   ce     - cross-entropy on the ImageNet labels instead of KL to the backbone at the source degree.
# Every plugin is then scored on the same measure, the held-out KL of each degree pair (a plugin
# trained on another loss records its own loss in its curve, which is not comparable).
# Needs `python -m research.paper all --stage data --shared ../shared` first (the split of the ImageNet sample).
# Usage: bash research/distill_causes.sh [OUT_DIR]   (12-18 minutes per run on 2 cores; a finished
# run is kept, so a rerun trains only what is missing)
set -eu
D=runs/evidence/paper-mini/distill-data
OUT=${1:-runs/causes}
# remade each time from the sorted image names, so a rerun links the same images; labels.txt (all 900
# labels) stays out: it would shift every other image into the half, and no run here reads labels
rm -rf "$OUT/half" "$OUT/quarter"
mkdir -p "$OUT/half" "$OUT/quarter"
i=0
for f in "$D"/train/*; do
  [ "$(basename "$f")" = labels.txt ] && continue
  if [ $((i % 2)) -eq 0 ]; then ln -sf "$(readlink -f "$f")" "$OUT/half/"; fi
  if [ $((i % 4)) -eq 0 ]; then ln -sf "$(readlink -f "$f")" "$OUT/quarter/"; fi
  i=$((i + 1))
done
common=(--checkpoint ../shared/weights/deit_tiny_patch16_224.safetensors --steps 400 --batch-size 32
        --lr 1e-3 --seed 0 --holdout "$D/holdout" --eval-every 100 --decode-once --workers 1
        --checkpoint-every 100)
for cfg in "base:$D/train:2:" "base1:$D/train:2:--seed 1" "rank8:$D/train:8:" "half:$OUT/half:2:" "quarter:$OUT/quarter:2:" "feat:$D/train:2:--loss feat" \
           "deitaug:$D/train:2:--preset paper" "shared:$D/train:32:--variant shared" \
           "noinv:$D/train:1:--variant no_inversion" "ce:$D/train:2:--loss ce"; do
  IFS=: read -r name data rank extra <<<"$cfg"
  [ -f "$OUT/$name.tocom.safetensors" ] && continue
  resume=()  # a killed run continues from its checkpoint
  [ -f "$OUT/$name.tocom.safetensors.run/last.ckpt" ] && resume=(--resume)
  # shellcheck disable=SC2086  # $extra is zero or two words; after common, so it overrides --seed
  python -m tocom distill deit_tiny_patch16_224 --data "$data" --rank "$rank" "${common[@]}" $extra "${resume[@]}" \
      --out "$OUT/$name.tocom.safetensors" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -1
done
python - "$OUT" "$D/holdout" <<'PY'
import sys
from pathlib import Path

import torch

from tocom.compensator import Compensator, DistillObjective
from tocom.data import eval_transform
from tocom.jobs.distill import LabelledFiles, holdout_hook
from tocom.models.loading import create_model

out, held = Path(sys.argv[1]), sys.argv[2]
model = create_model("deit_tiny_patch16_224", "../shared/weights/deit_tiny_patch16_224.safetensors").eval()
hook = holdout_hook(LabelledFiles(held, eval_transform(model)), [(0, 16), (16, 0), (0, 8), (8, 16)], 50)
torch.set_num_threads(2)
print("Held-out KL at the end of each run (KL whatever loss the run trained on; step 0 is compression alone)")
print("| run | 0->16 | 16->0 | 0->8 | 8->16 |\n|---|---|---|---|---|")
for name in ("none", "base", "base1", "rank8", "half", "quarter", "feat", "deitaug", "shared", "noinv", "ce"):
    plugin = Compensator.load(out / f"{'base' if name == 'none' else name}.tocom.safetensors")
    if name == "none":
        plugin.B.data.zero_()  # delta = B A = 0: compression alone
    scores = hook(DistillObjective(model, plugin, loss="kd"), 0)
    print(f"| {name} | " + " | ".join(f"{scores[f'loss_{a}_to_{b}']:.4f}"
                                      for a, b in ((0, 16), (16, 0), (0, 8), (8, 16))) + " |")
PY
