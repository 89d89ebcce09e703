"""Old against new in one sitting: python scripts/ab_speed.py TREE_A TREE_B FILE...

For each model file, alternates A B A B (ROUNDS rounds, 4 by default), each run a fresh process
pinned to core 1 that loads the model from its tree with full fastmath and times greedy-style
generation (best of 3 passes over 128 positions) and a 256-token prefill; prints the medians and
the median of the paired B/A ratios. A shared machine's speed drifts within minutes: only ratios
taken side by side like this mean anything.
"""
import json, os, subprocess, sys, statistics
WORKER = r'''
import sys, time, json, numpy as np
sys.path.insert(0, sys.argv[1])
from llama2nb import Transformer
m = Transformer.load(sys.argv[2], fastmath="full")
n = int(sys.argv[3])
best_tg = best_pp = 0
for _ in range(3):
    t = time.perf_counter()
    for pos in range(n):
        m.forward(1, pos)
    best_tg = max(best_tg, n / (time.perf_counter() - t))
    toks = np.random.default_rng(0).integers(0, m.config.vocab_size, min(256, m.config.seq_len))
    t = time.perf_counter()
    m.prefill(toks)
    best_pp = max(best_pp, len(toks) / (time.perf_counter() - t))
print(json.dumps([best_tg, best_pp]))
'''
trees, files = sys.argv[1:3], sys.argv[3:]
rounds = int(os.environ.get("ROUNDS", 4))
for f in files:
    res = {t: [] for t in trees}
    for r in range(rounds):
        for t in trees:
            out = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", WORKER, t, f, "128"],
                                 capture_output=True, text=True, cwd="/tmp")
            if out.returncode:
                print(out.stderr[-2000:]); sys.exit(1)
            res[t].append(json.loads(out.stdout.strip().splitlines()[-1]))
    a, b = (res[t] for t in trees)
    tg = statistics.median(y[0] / x[0] for x, y in zip(a, b))
    pp = statistics.median(y[1] / x[1] for x, y in zip(a, b))
    print(f"{f.split('/')[-1]:24s} A tg {statistics.median(x[0] for x in a):8.1f} B tg {statistics.median(x[0] for x in b):8.1f}"
          f"  B/A {tg:.3f} | A pp {statistics.median(x[1] for x in a):8.1f} B pp {statistics.median(x[1] for x in b):8.1f} B/A {pp:.3f}", flush=True)
