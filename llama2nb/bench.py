"""`llama2nb bench`: llama-bench-style speed measurements, side by side in one run.

Every measurement runs in a fresh worker process pinned to one core, with the environment that
defines its row (NUMBA_OPT, NUMBA_DISABLE_JIT, its own Numba cache folder), and reports JSON on
stdout. Timing does not depend on weight values, so the stories15M/42M/110M shapes are random
weights written once into a cache folder by the project's own writer.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .files.llama2c import write_checkpoint
from .testmodels import random_weights
from .config import ModelConfig

SHAPES = {  # llama2.c's published models (Llama 2 vocabulary)
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024),
}
BUNDLED = Path(__file__).resolve().parent / "checkpoints" / "model.bin"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2nb" / "bench"


def ensure_models(cache_dir: Path, shapes: list[str], log=print) -> dict[str, Path]:
    """Random-weight v0 and v2 checkpoints of each shape, written once into cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in shapes:
        config = SHAPES[name]
        v0, v2 = cache_dir / f"stories{name}-random.bin", cache_dir / f"stories{name}-random-q8.bin"
        if not (v0.exists() and v2.exists()):
            log(f"writing random-weight stories{name} checkpoints into {cache_dir} (once)")
            weights = random_weights(config, seed=0)
            write_checkpoint(v0, config, weights)
            write_checkpoint(v2, replace(config, version=2, group_size=config.q8_group_size), weights)
        paths[name], paths[name + "-q8"] = v0, v2
    tokenizer = cache_dir / "tokenizer-32000.bin"
    if not tokenizer.exists():
        write_placeholder_tokenizer(tokenizer, 32000)
    paths["tokenizer"] = tokenizer
    return paths


def write_placeholder_tokenizer(path: Path, vocab_size: int) -> None:
    """A llama2.c tokenizer.bin of the right size for run.c/runq.c on random-weight models
    (which only need to decode): <unk> <s> </s>, the 256 byte pieces, then filler pieces."""
    import struct

    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    pieces += [f" t{i}".encode() for i in range(vocab_size - len(pieces))]
    with atomic_write(path) as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, piece in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(piece)) + piece)


# ----------------------------------------------------------------------------------------------
# The worker: one process, one configuration, pinned to one core.


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def time_generation(model, steps: int) -> float:
    """Greedy generation from BOS over `steps` positions; tok/s timed from the second token."""
    token, started = 1, 0.0
    for pos in range(steps):
        if pos == 1:
            started = time.perf_counter()
        token = int(np.argmax(model.forward(token, pos)))
    return (steps - 1) / (time.perf_counter() - started)


def time_prefill(model, n: int) -> float:
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, n)
    started = time.perf_counter()
    model.prefill(tokens)
    return n / (time.perf_counter() - started)


def worker(spec: dict) -> dict:
    """Measure one row: spec has path, fastmath, threads, runs, tg (list), pp (list)."""
    from .forward import Transformer

    if spec.get("threads", 1) == 1:
        pin_to_one_core()
    result: dict = {}
    started = time.perf_counter()
    model = Transformer.load(spec["path"], fastmath=spec["fastmath"], threads=spec.get("threads", 1),
                             warm_up=not spec.get("pure_python"), in_memory=spec.get("in_memory", False))
    result["load_s"] = time.perf_counter() - started
    result["compile_s"] = model.compile_seconds
    seq_len = model.config.seq_len
    for steps in spec.get("tg", []):
        if steps <= seq_len:
            result[f"tg{steps}"] = [time_generation(model, steps) for _ in range(spec["runs"])]
    for n in spec.get("pp", []):
        if n <= seq_len:
            result[f"pp{n}"] = [time_prefill(model, n) for _ in range(spec["runs"])]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: a child keeps
    the high-water mark of the parent it was forked from across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_level_cache_bytes() -> int:
    """The L3 (or largest) cache's size from sysfs; 0 where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=0)


def first_token_worker(path: str, fastmath: str) -> None:
    """Report seconds from interpreter start to the first logits (for time-to-first-token)."""
    from .forward import Transformer

    model = Transformer.load(path, fastmath=fastmath, warm_up=False)
    model.forward(1, 0)
    print(json.dumps({"compiled_at": time.time()}))


PROBE_GIB = 1.0  # the bandwidth probe's array: 32x the last-level cache here


def probe_bandwidth() -> float:
    """Single-core read bandwidth now, GB/s, from a fresh process pinned like the rows."""
    return run_worker(["bandwidth", str(PROBE_GIB)])["bandwidth_gbs"]


def bandwidth_worker(gib: float = PROBE_GIB, runs: int = 5) -> dict:
    """Single-core streaming read of a large array, GB/s (best of `runs`)."""
    import numba

    pin_to_one_core()

    @numba.njit(fastmath=True)
    def stream(a):
        total = np.float32(0.0)
        for i in range(a.shape[0]):
            total += a[i]
        return total

    a = np.ones(int(gib * 2**30) // 4, np.float32)
    stream(a[:1024])
    best = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        stream(a)
        best = max(best, a.nbytes / (time.perf_counter() - started) / 1e9)
    return {"bandwidth_gbs": best}


def run_worker(args: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    command = [sys.executable, "-m", "llama2nb.bench", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmark worker {' '.join(args[:3])} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_to_first_token(path: Path, fastmath: str, cache_dir: Path | None) -> float:
    """Wall time of a fresh process from spawn to first logits; cache_dir=None: Numba's usual
    cache (warm after a first run), else that folder."""
    env = {"NUMBA_CACHE_DIR": str(cache_dir)} if cache_dir else {}
    started = time.time()
    finished = run_worker(["first-token", str(path), fastmath], env)["compiled_at"]
    return finished - started


def run_c(binary: str, path: Path, tokenizer: Path, steps: int, runs: int) -> list[float]:
    """run.c / runq.c's own 'achieved tok/s' (timed from the second token, as ours)."""
    rates = []
    for _ in range(runs):
        done = subprocess.run(["taskset", "-c", str(max(os.sched_getaffinity(0))), binary, str(path), "-z",
                               str(tokenizer), "-t", "0", "-n", str(steps)], capture_output=True, text=True,
                              timeout=600)
        found = re.search(r"achieved tok/s:\s*([0-9.]+)", done.stderr + done.stdout)
        if not found:
            raise RuntimeError(f"{binary}: no 'achieved tok/s' in its output (exit {done.returncode})")
        rates.append(float(found.group(1)))
    return rates


# ----------------------------------------------------------------------------------------------
# The driver: rows, table, files.


@dataclass
class Row:
    section: str
    label: str
    path: Path
    fastmath: str = "full"
    env: dict = field(default_factory=dict)
    tg: tuple = (128, 256)
    pp: tuple = (128, 256)
    runs: int = 3
    pure_python: bool = False
    threads: int = 1
    in_memory: bool = False
    c_binary: str | None = None
    result: dict = field(default_factory=dict)


def median_spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}" if values[0] < 10 else f"{values[0]:.0f}"
    med, spread = statistics.median(values), (max(values) - min(values)) / 2
    return f"{med:.1f} ± {spread:.1f}" if med < 10 else f"{med:.0f} ± {spread:.0f}"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import numba

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}, "
            f"Numba {numba.__version__}, one core pinned")


def build_rows(paths: dict, shapes: list[str], runs: int, runc: str | None, runq: str | None,
               threads: int) -> list[Row]:
    rows: list[Row] = []
    story = "15M" if "15M" in shapes else shapes[0]
    base = paths[story]
    # The gcc-flag story, in Numba's terms, on one model
    rows += [
        Row("flags", "pure Python (NUMBA_DISABLE_JIT=1)", base, "off", {"NUMBA_DISABLE_JIT": "1"}, tg=(3,), pp=(),
            runs=1, pure_python=True),
        Row("flags", "NUMBA_OPT=0, no fastmath", base, "off", {"NUMBA_OPT": "0"}, tg=(128,), pp=(128,), runs=runs),
        Row("flags", "opt 3, no fastmath (≈ -O3)", base, "off", tg=(128,), pp=(128,), runs=runs),
        Row("flags", "reassoc + contract (≈ -funsafe-math)", base, "reassoc", tg=(128,), pp=(128,), runs=runs),
        Row("flags", "full fastmath (≈ -Ofast)", base, "full", tg=(128,), pp=(128,), runs=runs),
        Row("flags", "int8 Q8_0, full fastmath", paths[story + "-q8"], "full", tg=(128,), pp=(128,), runs=runs),
    ]
    if runc:
        rows.append(Row("flags", f"run.c ({Path(runc).name})", base, tg=(128,), pp=(), runs=runs, c_binary=runc))
    if runq:
        rows.append(Row("flags", f"runq.c ({Path(runq).name})", paths[story + "-q8"], tg=(128,), pp=(), runs=runs,
                        c_binary=runq))
    # Every model: fp32 and int8, generation and prefill
    if BUNDLED.exists():
        rows.append(Row("models", "bundled model, fp32", BUNDLED, runs=runs))
    for name in shapes:
        rows.append(Row("models", f"stories{name} shape, fp32", paths[name], runs=runs))
        rows.append(Row("models", f"stories{name} shape, fp32, in memory", paths[name], runs=runs, in_memory=True))
        rows.append(Row("models", f"stories{name} shape, int8", paths[name + "-q8"], runs=runs))
        if runc:
            rows.append(Row("models", f"stories{name} shape, run.c", paths[name], pp=(), runs=runs, c_binary=runc))
        if runq:
            rows.append(Row("models", f"stories{name} shape, runq.c", paths[name + "-q8"], pp=(), runs=runs,
                            c_binary=runq))
        if threads > 1:
            rows.append(Row("models", f"stories{name} shape, fp32, {threads} threads", paths[name], runs=runs,
                            threads=threads))
    return rows


def measure_row(row: Row, runs: int, paths: dict, cache_dir: Path) -> dict:
    """`runs` runs of one row: a worker process, or the user's llama2.c binary."""
    if row.c_binary:
        return {f"tg{n}": run_c(row.c_binary, row.path, paths["tokenizer"], n, runs) for n in row.tg}
    spec = {"path": str(row.path), "fastmath": row.fastmath, "runs": runs, "tg": list(row.tg),
            "pp": list(row.pp), "threads": row.threads, "pure_python": row.pure_python,
            "in_memory": row.in_memory}
    env = dict(row.env)
    if "NUMBA_OPT" in env:  # its own cache folder: Numba's cache key does not include the opt level
        env["NUMBA_CACHE_DIR"] = str(cache_dir / "numba-opt0")
    return run_worker(["worker", json.dumps(spec)], env)


def merge_runs(into: dict, new: dict) -> None:
    """Add one process's measurements to a row's: lists of rates grow, costs keep their worst."""
    for key, value in new.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = max(into.get(key, value), value)


def run_benchmark(shapes: list[str], runs: int = 3, cache_dir: Path | None = None, runc: str | None = None,
                  runq: str | None = None, threads: int = 1, out_dir: Path = Path("benchmarks/results"),
                  log=print) -> dict:
    from .files.llama2c import read_config

    cache_dir = cache_dir or default_cache_dir()
    paths = ensure_models(cache_dir, shapes, log)
    cache_bytes = last_level_cache_bytes()
    rows = build_rows(paths, shapes, runs, runc, runq, threads)
    for row in rows:
        log(f"  {row.section}: {row.label}")
        config = read_config(row.path)
        streams = config.version != 2 and config.weight_bytes_per_token > cache_bytes
        # A row that gets a roof runs each time in its own process right after a bandwidth probe:
        # this shared machine's bandwidth drifts by 10-15% within minutes, and a ratio means
        # something only when both of its sides are measured together.
        for _ in range(row.runs if streams else 1):
            if streams:
                row.result.setdefault("bandwidth_gbs", []).append(probe_bandwidth())
            merge_runs(row.result, measure_row(row, 1 if streams else row.runs, paths, cache_dir))
        tg = row.result.get("tg128") or row.result.get("tg3") or []
        if config.version == 2 or not tg:
            continue
        if streams:
            # attention reads positions 0..pos of every layer's K and V rows: 64.5 on average in tg128
            kv_bytes = config.n_layers * 2 * config.kv_dim * 4 * (128 + 1) / 2
            read = config.weight_bytes_per_token + kv_bytes
            row.result["roof"] = statistics.median(
                tok_s * read / (gbs * 1e9) for tok_s, gbs in zip(tg, row.result["bandwidth_gbs"]))
        else:
            row.result["roof"] = "in cache"  # the weights fit in the last-level cache: no DRAM roof
    bandwidths = [gbs for row in rows for gbs in row.result.get("bandwidth_gbs", [])]
    if not bandwidths:
        bandwidths.append(probe_bandwidth())
    # start-up: time to first token in a fresh process, warm and cold Numba cache
    startup = []
    for name, path in [("bundled", BUNDLED)] * BUNDLED.exists() + [(n, paths[n]) for n in shapes]:
        log(f"  start-up: {name}")
        with tempfile.TemporaryDirectory() as cold:
            cold_s = time_to_first_token(path, "full", Path(cold))
        time_to_first_token(path, "full", None)  # make sure the usual cache is warm
        warm_s = statistics.median(time_to_first_token(path, "full", None) for _ in range(runs))
        startup.append({"model": name, "ttft_warm_s": warm_s, "ttft_cold_s": cold_s})
    report = {"machine": machine_description(), "bandwidth_gbs": [min(bandwidths), max(bandwidths)],
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "rows": [{"section": r.section, "label": r.label, "path": str(r.path), "fastmath": r.fastmath,
                        "env": r.env, **r.result} for r in rows], "startup": startup}
    report["markdown"] = markdown_table(report)
    save_report(report, out_dir)
    return report


def markdown_table(report: dict) -> str:
    low, high = report["bandwidth_gbs"]
    measured = f"{low:.1f} GB/s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f} GB/s"
    lines = [f"Machine: {report['machine']}; single-core read bandwidth {measured} (measured before each "
             f"fp32 run); {report['date']}. tok/s as median ± half-range over runs; compile time excluded.", ""]
    columns = ["tg128", "tg256", "pp128", "pp256"]
    for section, title in (("flags", "The flag story (stories15M shape)"), ("models", "Models")):
        lines += [f"**{title}**", "", "| configuration | " + " | ".join(columns) + " | fp32 roof | compile s | peak RSS MB |",
                  "|---|" + "---:|" * (len(columns) + 3)]
        for row in (r for r in report["rows"] if r["section"] == section):
            cells = [median_spread(row.get(c, [])) for c in columns]
            if row.get("tg3"):
                cells[0] = f"{median_spread(row['tg3'])} (3 tokens)"
            roof = row.get("roof", "–")
            roof = f"{roof:.0%}" if isinstance(roof, float) else roof
            compile_s = f"{row['compile_s']:.2f}" if "compile_s" in row else "–"
            rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "–"
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {roof} | {compile_s} | {rss} |")
        lines.append("")
    lines += ["**Start-up** (fresh process to first logits)", "", "| model | warm cache s | cold cache s |",
              "|---|---:|---:|"]
    lines += [f"| {s['model']} | {s['ttft_warm_s']:.2f} | {s['ttft_cold_s']:.2f} |" for s in report["startup"]]
    lines.append("")
    lines.append("fp32 roof: tg128 tok/s x bytes read per token (the weights, and the KV-cache rows attention "
                 "reads, 64.5 positions on average) / the bandwidth measured just before that run; the median "
                 "over runs, each run of these rows a process of its own. Mapped: the weights are the file's "
                 "page-cache pages, mapped in 2 MB pages where Linux allows (llama2nb/mapping.py); in memory: "
                 "a copy in RAM (--in-memory).")
    return "\n".join(lines)


def save_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{stamp}", "latest"):
        with atomic_write(out_dir / f"{name}.json", "w") as f:
            json.dump(report, f, indent=1)
        with atomic_write(out_dir / f"{name}.md", "w") as f:
            f.write(report["markdown"] + "\n")
    try:
        save_chart(report, out_dir / "latest.png")
    except ImportError:
        print("matplotlib is not installed (pip install 'llama2nb[train]'): no chart written", file=sys.stderr)


def save_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    rows = [r for r in report["rows"] if r.get("tg128") or r.get("tg3")]
    labels = [r["label"] for r in rows]
    values = [statistics.median(r.get("tg128") or r.get("tg3")) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    colors = ["#888888" if r["section"] == "flags" else "#3366aa" for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("generation tok/s (tg128, log scale)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=7)
    ax.set_title(f"llama2nb, one core: {report['machine'].split(',')[0]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    """Worker entry points: `python -m llama2nb.bench worker SPEC | first-token PATH FM | bandwidth GIB`."""
    kind = argv[0]
    if kind == "worker":
        result = worker(json.loads(argv[1]))
    elif kind == "first-token":
        first_token_worker(argv[1], argv[2])
        return
    elif kind == "bandwidth":
        result = bandwidth_worker(float(argv[1]) if len(argv) > 1 else PROBE_GIB)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
