"""Peak private memory and time of exporting a fake ~300M-parameter Meta checkpoint (2 bf16
shards; dim 2048, 4 layers, 16 heads, 4 kv heads, vocab 32000), against its fp32 size: issue
14's closing figure (goal: at most 35%, the interpreter and torch included).

    python scripts/export_memory.py [--control] [--tmp DIR]

Each export runs in a child process whose RssAnon this one samples every millisecond
(tests/memory_probe.py). --control also runs the whole-model path (every tensor gathered as
float32 before writing), the negative control of tests/test_big.py. Figures depend on the
machine's load: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.memory_probe import measure, write_fake_meta  # noqa: E402

SHAPE = dict(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4, vocab=32000)
GOAL = 0.35


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control", action="store_true", help="also measure the whole-model path")
    parser.add_argument("--tmp", type=Path, default=None, help="where the fake checkpoint and outputs go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "meta"
        started = time.perf_counter()
        params = write_fake_meta(folder, **SHAPE)
        fp32 = 4 * params
        print(f"fake Meta checkpoint: {params:,} parameters, 2 bf16 shards "
              f"({sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.0f} MiB), fp32 {fp32 / 2**20:.0f} MiB; "
              f"written in {time.perf_counter() - started:.1f} s")
        runs = [("stream", 1), ("stream", 2)] + ([("whole", 2)] if args.control else [])
        for mode, version in runs:
            out = Path(tmp) / f"{mode}-v{version}.bin"
            r = measure(mode, folder, out, version)
            share = r.peak_kb * 1024 / fp32
            verdict = "" if mode == "whole" else (" (goal met)" if share <= GOAL else f" (over the {GOAL:.0%} goal)")
            print(f"{mode:6} -> v{version}: peak RssAnon {r.peak_kb / 1024:.0f} MiB = {share:.1%} of fp32{verdict}; "
                  f"{r.grown_kb / 1024:.0f} MiB over the {r.baseline_kb / 1024:.0f} MiB of python + torch + "
                  f"llama2nb; {r.seconds:.1f} s ({out.stat().st_size / 2**20:.0f} MiB written)")
            out.unlink()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
