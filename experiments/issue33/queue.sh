#!/usr/bin/env bash
# Issue 33's side-by-side runs, one at a time on the idle machine (every job alone: a second process on these 2 vCPUs
# collapses a 2-thread step). Each line of JOBS: "reslab BUDGET ARCH SEED" or "peer EPOCHS WIDTH".
# reslab runs with every default of the fast preset but the net (--arch, with the recipe the rule pairs with it) and
# no accuracy marks (so the whole command is training + final evaluation + save); the peer with 2 threads, bf16 unless
# AB_BF16=0 (CPUs without native bf16).
# Usage: AB_DIR=/tmp/ab bash experiments/issue33/queue.sh OUT JOBFILE
set -u
out=$1; jobs=$2; data=${RESLAB_CIFAR10_DIR:-../shared/data/cifar10-jpeg}
mkdir -p "$out"
while read -r kind a b c; do
  [ -z "$kind" ] && continue
  case $kind in
    reslab)
      name="reslab-${a}min-${b}-s${c}"
      extra=""
      [ "$b" != rule ] && extra="--arch $b --optimizer muon --whiten-bias-epochs 3"
      start=$(date +%s.%N)
      reslab train --preset fast --time-budget "$a" --data "$data" --seed "$c" $extra --accuracy-marks '[]' \
          --out "$out/$name" > "$out/$name.log" 2>&1
      end=$(date +%s.%N)
      acc=$(python -c "import json,sys; m=[json.loads(l) for l in open('$out/$name/metrics.jsonl')]; print([x for x in m if 'test_acc' in x][-1]['test_acc'])" 2>/dev/null)
      echo "$name acc $acc wall_s $(python -c "print(round($end-$start,1))") $(date +%H:%M)" >> "$out/summary.txt" ;;
    peer)
      name="peer-e${a}-w${b}"
      start=$(date +%s.%N)
      AB_BF16=${AB_BF16:-1} AB_THREADS=2 python ../shared/peer/airbench_cpu.py "$a" "$b" > "$out/$name.log" 2>&1
      end=$(date +%s.%N)
      echo "$name $(tail -1 "$out/$name.log") outer_wall_s $(python -c "print(round($end-$start,1))") $(date +%H:%M)" >> "$out/summary.txt" ;;
  esac
done < "$jobs"
