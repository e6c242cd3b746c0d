#!/bin/bash
# Issue 17 pilots: the fast preset at one --time-budget, variants side by side (alternated per seed), fp32 as the
# README's frontier table, warm decode cache, one run at a time.
# Usage: bash pilot.sh OUT BUDGET "SEEDS" "name:flags" "name:flags" ...
set -u
OUT=$1; BUDGET=$2; SEEDS=$3; shift 3
grep -m1 "model name" /proc/cpuinfo; grep -o -m1 "avx512_bf16" /proc/cpuinfo || echo "no avx512_bf16"; date
for seed in $SEEDS; do
  for variant in "$@"; do
    name=${variant%%:*}; flags=${variant#*:}
    reslab train --preset fast --data /work/shared/data/cifar10-jpeg --time-budget $BUDGET --precision fp32 \
      --seed $seed $flags --out $OUT/$name-seed$seed > $OUT-$name-seed$seed.log 2>&1
    python - "$OUT/$name-seed$seed" "$name" "$seed" "$BUDGET" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if l.startswith('{"epoch')]
m = rows[-1]
print(f"{sys.argv[4]} min {sys.argv[2]:14s} seed {sys.argv[3]}: steps {m['step']}, train acc {100 * m['train_acc']:.2f} %, "
      f"test acc {100 * m['test_acc']:.2f} %, result at {m['wall_seconds']:.0f} s")
PY
  done
done
date
