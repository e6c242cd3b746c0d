#!/bin/bash
# Issue 17, second round: one "lane" of fast-preset runs, one after another, each on ONE core (--threads 1, fp32).
# Two lanes run side by side on the 2-core AVX512 EPYC: measured with `reslab bench --preset fast --arch resnet9s
# --batch_size 256 --precision fp32 --channels_last true --threads 1`, two at once give 699-702 img/s each, the rate
# the 2-core AVX2-only machine of the issue's targets trained at (200,000 images in ~270 s = ~740 img/s).
# Usage: bash lane.sh OUT "BUDGET:SEED:NAME:FLAGS" ...   (FLAGS may be empty; one summary line per run)
set -u
OUT=$1; shift
for job in "$@"; do
  IFS=: read -r budget seed name flags <<< "$job"
  dir=$OUT/$name-$budget-seed$seed
  [ -f $dir/model.safetensors ] || reslab train --preset fast --data /work/shared/data/cifar10-jpeg \
    --time-budget $budget --precision fp32 --threads 1 --seed $seed $flags --out $dir > $dir.log 2>&1
  python "$(dirname "$0")/../summarize_run.py" "$dir" "$name" "$seed" "$budget"
done
