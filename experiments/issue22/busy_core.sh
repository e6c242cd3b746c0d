#!/bin/bash
# Issue 22: with one of the two cores kept busy by another process (a one-thread matrix-product loop), does the
# default `reslab train` pick the faster thread count by itself? Three 90-second budgeted runs of the fast preset
# (bf16 where the CPU has it), one after another: default threads (the start-up probe decides), --threads 1, --threads 2.
#   bash experiments/issue22/busy_core.sh OUT
set -u
OUT=$1; mkdir -p "$OUT"
DATA=${RESLAB_CIFAR10_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data/cifar10-jpeg}
python -c "import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)
while True: a @ a" &
BUSY=$!
trap 'kill $BUSY' EXIT
sleep 2
for name in default:"" threads1:"--threads 1" threads2:"--threads 2"; do
  IFS=: read -r n flags <<< "$name"
  reslab train --preset fast --data "$DATA" --time-budget 1.5 --accuracy-marks '[]' $flags --out "$OUT/$n" \
    > "$OUT/$n.log" 2>&1
  python - "$OUT/$n" "$n" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if l.startswith('{"epoch')]
steps, secs = rows[-1]["step"], sum(r["seconds"] for r in rows)
cfg = open(sys.argv[1] + "/config.yaml").read()
threads = [l for l in cfg.splitlines() if l.startswith("threads:")][0]
print(f"{sys.argv[2]:9s} {threads}: {steps} steps, {steps * 256 / secs:.0f} img/s in training, "
      f"test acc {rows[-1]['test_acc']:.4f}", flush=True)
PY
  grep -h "^measured" "$OUT/$n.log" || true
done
