"""Seconds from process start to the first training step (a warm decode cache), read off the progress lines.

Usage: python warm_start.py REPEATS -- reslab train ARGS...   (the command must print step lines: --log-every 1)
"""
import subprocess
import sys
import time

repeats = int(sys.argv[1])
cmd = sys.argv[sys.argv.index("--") + 1:]
for _ in range(repeats):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = None
    for line in p.stderr:
        if line.startswith("step 1/"):
            first = time.perf_counter() - t0
            p.kill()
            break
    p.wait()
    print(f"first step at {first:.2f} s" if first else "no step line seen")
