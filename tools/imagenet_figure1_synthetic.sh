#!/usr/bin/env bash
# Figure 1 / Table 1 of the bLViT paper, end to end on the generated ImageFolder (minutes on a CPU):
# one tiny model per family trained from scratch by tools/train.py (configs/imagenet/quickstart.yaml,
# 12 epochs), then all of them side by side by `blvit-eval imagenet` (table + PNG in $OUT).
# The real Table 1 is the same eval command on ImageNet with the official / trained checkpoints (README).
set -euo pipefail
DATA=${DATA:-data/synthetic/imagefolder}
OUT=${OUT:-outputs/table20}
RUNS=${RUNS:-runs/figure1_synthetic}
[ -d "$DATA/train" ] || blvit-synthetic --out "$(dirname "$DATA")"   # writes <out>/imagefolder
VIT="img_size: 64, patch_size: 8, num_classes: 4, embed_dim: 64, depth: 4, num_heads: 4"
declare -A KWARGS=(
  [deit_tiny_patch16_224]="{$VIT}"
  [evit_base_patch16_224]="{$VIT, reorganize_layers: [1, 3], keep_rate: 0.5}"
  [dynamicvit_base_patch16_224]="{$VIT, prune_layers: [1, 3], keep_ratio: 0.7}"
  [evovit_base_patch16_224]="{$VIT, prune_start: 1, stage_starts: [1, 3], keep_rate: 0.5, global_pool: avg}"
  [efficientvit_m5]="{img_size: 128, num_classes: 4}"
  [blvit_base_tiny_patch16_224]="{$VIT, e_embed_dim: 32, e_num_heads: 2, blvit_layers: [1, 2, 3], predictor_layers: [1, 3], keep_ratio: 0.25}"
)
SPECS=()
for name in deit_tiny_patch16_224 evit_base_patch16_224 dynamicvit_base_patch16_224 evovit_base_patch16_224 \
            efficientvit_m5 blvit_base_tiny_patch16_224; do
  [ -f "$RUNS/$name/checkpoints/best.pth" ] ||   # trained already: kept (delete $RUNS to start over)
    python tools/train.py --config configs/imagenet/quickstart.yaml data.root="$DATA" output_dir="$RUNS/$name" \
      train.epochs=12 model.name=$name "model.kwargs=${KWARGS[$name]}"
  size=""; [ "$name" = efficientvit_m5 ] && size="@img_size=128"
  SPECS+=(--model "$name$size:$RUNS/$name/checkpoints/best.pth")
done
blvit-eval imagenet --data "$DATA" "${SPECS[@]}" --workers 0 --batch-size 16 --out "$OUT/figure1_synthetic.json"
