#!/bin/bash
# Issue 17 pilot: alternating against random flips in the fast preset at the 2.5-minute budget, seeds 0 and 1,
# fp32 (as the README's frontier table), warm decode cache, one run at a time, alternated.
# Usage: bash flips.sh OUT > log
set -u
OUT=${1:-/tmp/flips}
grep -m1 "model name" /proc/cpuinfo; grep -o -m1 "avx512_bf16" /proc/cpuinfo || echo "no avx512_bf16"; date
for seed in 0 1; do
  for flip in random alternate; do
    reslab train --preset fast --data /work/shared/data/cifar10-jpeg --time-budget 2.5 --precision fp32 \
      --seed $seed --flip $flip --out $OUT/$flip-seed$seed > $OUT-$flip-seed$seed.log 2>&1
    python - "$OUT/$flip-seed$seed" "$flip" "$seed" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if l.startswith('{"epoch')]
m = rows[-1]
print(f"flip {sys.argv[2]:9s} seed {sys.argv[3]}: steps {m['step']}, test acc {100 * m['test_acc']:.2f} %, "
      f"result at {m['wall_seconds']:.0f} s")
PY
  done
done
date
