#!/bin/bash
# Issue 22 pilots: one "lane" of whole-command runs, one after another, each on ONE core (--threads 1) in bf16, on
# the CIFAR-10 JPEG copy. Two lanes run side by side on the 2-core machine, so a reslab run and a peer run (or two
# reslab variants) share the machine's conditions.
#   bash experiments/issue22/lane22.sh OUT JOB...
#   JOB = reslab:BUDGET:SEED:NAME:FLAGS   (FLAGS may be empty; passed to `reslab train --preset fast`)
#       | peer:EPOCHS:WIDTH:NAME          (../shared/peer/airbench_cpu.py; AB_DIR must hold its tensors)
set -u
OUT=$1; shift
DATA=${RESLAB_CIFAR10_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data/cifar10-jpeg}
PEER=$(cd "$(dirname "$0")/../../.." && pwd)/shared/peer/airbench_cpu.py
mkdir -p "$OUT"
for job in "$@"; do
  IFS=: read -r kind a b name flags <<< "$job"
  if [ "$kind" = peer ]; then
    log=$OUT/$name.log
    [ -s "$log" ] && grep -q RESULT "$log" || AB_BF16=1 AB_THREADS=1 python "$PEER" "$a" "$b" > "$log" 2>&1
    echo "peer $name: $(grep RESULT "$log")"
    continue
  fi
  dir=$OUT/$name-$a-seed$b
  [ -f "$dir/model.safetensors" ] || reslab train --preset fast --data "$DATA" --time-budget "$a" --precision bf16 \
    --threads 1 --seed "$b" --accuracy-marks '[]' $flags --out "$dir" > "$dir.log" 2>&1
  python "$(dirname "$0")/../summarize_run.py" "$dir" "$name" "$b" "$a" reslab
done
