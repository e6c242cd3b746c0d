"""One line for a finished run directory of the lane scripts: steps, epochs, train and test accuracy, when.

Usage: python experiments/summarize_run.py RUN NAME SEED BUDGET [PREFIX]"""

import json
import sys

run, name, seed, budget = sys.argv[1:5]
prefix = sys.argv[5] + " " if len(sys.argv) > 5 else ""
with open(run + "/metrics.jsonl") as f:
    m = [json.loads(line) for line in f if line.startswith('{"epoch')][-1]
print(f"{prefix}{budget} min {name:18s} seed {seed}: steps {m['step']}, epochs {m['epoch']}, train acc "
      f"{100 * m['train_acc']:.2f} %, test acc {100 * m['test_acc']:.2f} %, result at {m['wall_seconds']:.0f} s",
      flush=True)
