"""The worker end of the bench's protocol: `python -m llama2nb.bench KIND ARGS...`.

Each kind measures one thing in this fresh process and prints one JSON object on the last line of
stdout, which worker.run_worker reads. A new probe or an engine to compare adds a kind here.
"""

from __future__ import annotations

import json
import sys

from .llamacpp import llamacpp_worker
from .probes import PROBE_GIB, bandwidth_worker, compute_worker
from .startup import first_token_worker
from .worker import measure_in_process

WORKERS = {
    "row": lambda spec: measure_in_process(json.loads(spec)),  # one row's runs, spec as JSON
    "llamacpp": lambda spec: llamacpp_worker(json.loads(spec)),  # llama.cpp on a GGUF, spec as a row's
    "first-token": first_token_worker,  # PATH FASTMATH
    "bandwidth": lambda gib=PROBE_GIB: bandwidth_worker(float(gib)),  # [GIB]
    "compute": lambda seconds="0.2": compute_worker(float(seconds)),  # [SECONDS]
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in WORKERS:
        raise SystemExit(f"usage: python -m llama2nb.bench {{{'|'.join(WORKERS)}}} ARGS...")
    print(json.dumps(WORKERS[argv[0]](*argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
