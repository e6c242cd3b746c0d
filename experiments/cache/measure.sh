#!/bin/bash
# Issue 15 measurements, one job at a time, side by side: the tree before the issue's work ($BEFORE, a worktree),
# the original decoder ($ORIG), and this tree. Usage: bash measure.sh > results-DATE.txt 2>&1
set -u
BEFORE=${BEFORE:-/tmp/old}    # git worktree add /tmp/old d663965
ORIG=${ORIG:-/tmp/orig}       # git worktree add /tmp/orig a070027 (full decode + resize)
NEW=$(git rev-parse --show-toplevel)
CIFAR=/work/shared/data/cifar10-jpeg
PHOTOS=/tmp/big/photos
HERE=$NEW/docs/results/cache
grep -m1 "model name" /proc/cpuinfo; grep -o -m1 "avx512_bf16" /proc/cpuinfo || echo "no avx512_bf16"; nproc; date
[ -d $PHOTOS/test ] || python $NEW/experiments/decode/gen.py test 20

echo "== cold decode (empty cache folder each time)"
for tree in $ORIG $BEFORE $NEW; do
  for job in "$CIFAR train 32" "$PHOTOS train 256"; do
    echo -n "$(basename $tree): "; PYTHONPATH=$tree/src python $NEW/experiments/decode/measure.py $job
  done
done

echo "== warm start: process start to the first training step (fast preset, CIFAR-10 JPEG copy, warm cache)"
for tree in $BEFORE $NEW; do
  export RESLAB_CACHE=/tmp/rc-warm-$(basename $tree); rm -rf /tmp/ws-m
  PYTHONPATH=$tree/src python -m reslab train --preset fast --data $CIFAR --steps 1 --accuracy-marks '[]' --out /tmp/ws-m/warm >/dev/null 2>&1
  echo "$(basename $tree):"; PYTHONPATH=$tree/src python $HERE/warm_start.py 5 -- python -m reslab train --preset fast \
    --data $CIFAR --epochs 1 --log-every 1 --accuracy-marks '[]' --out /tmp/ws-m/x
done

echo "== epoch time, 500 photos (98 MB decoded at 256 px) over a 50 MB memory budget: resnet18, photo defaults"
export RESLAB_CACHE=/tmp/rc-epoch; rm -rf $RESLAB_CACHE /tmp/ws-e
for cfg in "new memory" "new auto" "new stream" "before stream"; do
  set -- $cfg; tree=$NEW; [ $1 = before ] && tree=$BEFORE
  RESLAB_MEMORY_BUDGET=50M PYTHONPATH=$tree/src python -m reslab train --data $PHOTOS --arch resnet18 --epochs 3 \
    --loader $2 --out /tmp/ws-e/$1-$2 > /tmp/ws-e-$1-$2.log 2>&1
  echo "$1 --loader $2: epoch seconds $(python -c "import json,sys; print([round(json.loads(l)['seconds'],1) for l in open('/tmp/ws-e/$1-$2/metrics.jsonl')])")"
done

echo "== fast preset, --time-budget 2.5, seed 0, fp32, warm cache"
for tree in $BEFORE $NEW; do
  export RESLAB_CACHE=/tmp/rc-warm-$(basename $tree); rm -rf /tmp/ws-f
  /usr/bin/time -f "$(basename $tree): command %e s" env PYTHONPATH=$tree/src python -m reslab train --preset fast \
    --data $CIFAR --time-budget 2.5 --precision fp32 --seed 0 --out /tmp/ws-f/run 2>&1 | grep -E "budget|epoch [0-9]+ \||command" | tail -3
  python -c "import json; m=[json.loads(l) for l in open('/tmp/ws-f/run/metrics.jsonl') if l.startswith('{\"epoch')][-1]; print('steps', m['step'], 'test acc', m['test_acc'], 'result at', m['wall_seconds'], 's')"
done
date
