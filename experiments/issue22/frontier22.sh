#!/bin/bash
# Issue 22's frontier: the fast preset against the peer recipe, side by side on the 2-core machine, one core each,
# bf16. Lane A runs one `reslab train --preset fast --time-budget B` process per budget and seed (so each time is a
# whole command, imports included), lane B the peer fit to the same budgets in the same order, so runs of one budget
# overlap in time. Then `reslab compare` with the same options reuses the finished runs and writes the table.
#   AB_DIR=... bash experiments/issue22/frontier22.sh OUT "2.5 5 10" "0 1" "1.0 3.5 8.4"
set -u
OUT=$1; BUDGETS=$2; SEEDS=$3; PEER_EPOCHS=($4)
DATA=${RESLAB_CIFAR10_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data/cifar10-jpeg}
FLAGS=(--preset fast --threads 1 --precision bf16 --accuracy-marks '[]' --data "$DATA")
mkdir -p "$OUT/reslab"
(
  for b in $BUDGETS; do for s in $SEEDS; do
    [ -f "$OUT/reslab/${b}min-seed$s/model.safetensors" ] || reslab train "${FLAGS[@]}" --time-budget "$b" \
      --seed "$s" --out "$OUT/reslab/${b}min-seed$s" > "$OUT/reslab/${b}min-seed$s.log" 2>&1
  done; done
) &
jobs=()
i=0
for b in $BUDGETS; do for s in $SEEDS; do jobs+=("peer:${PEER_EPOCHS[$i]}:32:peer-${b}min-$s"); done; i=$((i + 1)); done
bash "$(dirname "$0")/lane22.sh" "$OUT/peer" "${jobs[@]}" > "$OUT/peer.txt" 2>&1
wait
reslab compare "${FLAGS[@]}" --budgets "$(echo $BUDGETS | tr ' ' ,)" --seeds "$(echo $SEEDS | tr ' ' ,)" \
  --out "$OUT/reslab" > "$OUT/compare.log" 2>&1
