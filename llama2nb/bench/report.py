"""The bench's results as the user sees them: the report (JSON), its Markdown table and a chart.

The report is plain data (rows as dicts of their settings and measurements), so the table and the
chart can be rendered again from a saved latest.json. Columns: one per generation length (tg) and
prompt length (pp) measured, then the weights' bytes per token, the DRAM roof, the prompt's
arithmetic rate against the core's peak, compile seconds and peak RSS. A row measured over a length that is not a column (pure
Python's short run) shows in the first tg column, labelled with its length. The roof shown is that
of the first tg column the row measured (the 7B shape's own length, say). The llama.cpp ratios pair
rows on the same file with the same thread count. Each kernel family's cold compile is a table of
its own.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_path, atomic_write
from .roofs import kv_positions_read
from .worker import generation_key, prefill_key

if TYPE_CHECKING:
    from .rows import Row

SECTIONS = (("flags", "The flag story (stories15M shape)"), ("models", "Models"),
            ("gguf", "GGUF files (the same random weights)"))


def build_report(rows: list[Row], startup: list[dict], bandwidths: list[float], machine: str,
                 generation: tuple, prefill: tuple, peaks: dict | None = None,
                 compile_families: list[dict] = ()) -> dict:
    report = {"machine": machine, "bandwidth_gbs": [min(bandwidths), max(bandwidths)], "peaks": peaks or {},
              "date": time.strftime("%Y-%m-%d %H:%M"), "tg": list(generation), "pp": list(prefill),
              "rows": [{"section": r.section, "label": r.label, "path": str(r.path), "fastmath": r.fastmath,
                        "env": r.env, "engine": r.engine, "threads": r.threads, "tg": list(r.tg), "pp": list(r.pp),
                        **r.result} for r in rows],
              "startup": startup, "compile_families": list(compile_families)}
    report["markdown"] = markdown_table(report)
    return report


def median_spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}" if values[0] < 10 else f"{values[0]:.0f}"
    med, spread = statistics.median(values), (max(values) - min(values)) / 2
    return f"{med:.1f} ± {spread:.1f}" if med < 10 else f"{med:.0f} ± {spread:.0f}"


def shown_generation(row: dict, generation: list[int]) -> int | None:
    """The generation length a row's roof and its bar show: the first column's, else the row's
    first length it measured (a short run that is no column, or a shape's own length); None if
    it measured none."""
    candidates = [generation[0]] + list(row.get("tg", []))
    return next((n for n in candidates if generation_key(n) in row), None)


def row_cells(row: dict, generation: list[int], prefill: list[int], peaks: dict | None = None) -> list[str]:
    """The row's cells after its label, in the table's column order."""
    columns = [generation_key(n) for n in generation] + [prefill_key(n) for n in prefill]
    cells = [median_spread(row.get(c, [])) for c in columns]
    shown = shown_generation(row, generation)
    if shown is not None and shown not in generation:
        cells[0] = f"{median_spread(row[generation_key(shown)])} ({shown} tokens)"
    compile_s = f"{row['compile_s']:.2f}" if "compile_s" in row else "–"
    rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "–"
    megabytes = f"{row['bytes_per_token'] / 1e6:.1f}" if "bytes_per_token" in row else "–"
    return cells + [megabytes, roof_cell(row, shown), compute_cell(row, prefill, peaks or {}), compile_s, rss]


def compute_cell(row: dict, prefill: list[int], peaks: dict) -> str:
    """The first prompt column's arithmetic rate, GFLOP/s (int8 rows: GOP/s), and its share of
    the core's peak (FMA for fp32, VNNI for int8) where the peak was measured."""
    key = prefill_key(prefill[0]) if prefill else None
    if key not in row or "flops_per_token" not in row:
        return "–"
    rate = statistics.median(row[key]) * row["flops_per_token"] / 1e9
    peak = peaks.get("vnni_gops" if row.get("int8") else "fma_gflops")
    return f"{rate:.0f}" + (f" ({rate / peak:.0%})" if peak else "")


def roof_cell(row: dict, shown: int | None) -> str:
    roof = row.get("roof", "–")
    if isinstance(roof, dict):
        fraction = roof.get(generation_key(shown)) if shown is not None else None
        return "–" if fraction is None else f"{fraction:.0%}"
    return roof


def markdown_table(report: dict) -> str:
    generation, prefill = report["tg"], report["pp"]
    columns = [generation_key(n) for n in generation] + [prefill_key(n) for n in prefill]
    lines = [header_line(report), ""]
    for section, title in SECTIONS:
        lines += [f"**{title}**", "", "| configuration | " + " | ".join(columns)
                  + f" | MB/token | DRAM roof | {prefill_key(prefill[0]) if prefill else 'pp'} GFLOP/s (peak) "
                  "| compile s | peak RSS MB |",
                  "|---|" + "---:|" * (len(columns) + 5)]
        lines += [f"| {row['label']} | " + " | ".join(row_cells(row, generation, prefill, report.get("peaks"))) + " |"
                  for row in report["rows"] if row["section"] == section]
        lines.append("")
    lines += versus_llamacpp(report)
    lines += family_table(report.get("compile_families", []))
    lines += ["**Start-up** (fresh process to first logits)", "", "| model | warm cache s | cold cache s |",
              "|---|---:|---:|"]
    lines += [f"| {s['model']} | {s['ttft_warm_s']:.2f} | {s['ttft_cold_s']:.2f} |" for s in report["startup"]]
    lines += ["", footer(generation[0])]
    return "\n".join(lines)


def versus_llamacpp(report: dict) -> list[str]:
    """llama2nb's rate over llama.cpp's on the same file with the same thread count, per column:
    the ratio of the medians of rows measured in this run (empty without llama.cpp rows). Rows in
    another environment (the portable path) are not paired."""
    generation, prefill = report["tg"], report["pp"]
    columns = [generation_key(n) for n in generation] + [prefill_key(n) for n in prefill]
    pairs = llamacpp_pairs(report["rows"])
    if not pairs:
        return []
    version = report.get("llamacpp") or "?"
    lines = [f"**llama2nb / llama.cpp** (llama-cpp-python {version}, same file, same loop, same threads on as "
             "many cores)", "", "| file | threads | " + " | ".join(columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for ours, other in pairs:
        cells = [f"{statistics.median(ours[c]) / statistics.median(other[c]):.2f}x" if ours.get(c) and other.get(c)
                 else "–" for c in columns]
        lines.append(f"| {ours['label']} | {ours.get('threads', 1)} | " + " | ".join(cells) + " |")
    return lines + [""]


def llamacpp_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(llama2nb row, llama.cpp row) on the same file with the same thread count, in table order."""
    theirs = {(row.get("path"), row.get("threads", 1)): row for row in rows if row.get("engine") == "llama.cpp"}
    return [(row, theirs[(row.get("path"), row.get("threads", 1))]) for row in rows
            if row.get("engine", "llama2nb") == "llama2nb" and not row.get("env")
            and (row.get("path"), row.get("threads", 1)) in theirs]


def family_table(families: list[dict]) -> list[str]:
    """Compile seconds per kernel family from an empty Numba cache (bench/families.py)."""
    if not families:
        return []
    cores = max((f.get("cores", 1) for f in families), default=1)
    more = f" | on {cores} cores" if cores > 1 else ""
    lines = ["**Compile seconds per kernel family, cold cache** (a fresh process, an empty Numba cache: what a "
             "first run of a model of these formats waits for; on several cores its kernels compile in parallel "
             "processes)", "", f"| kernel family | environment | compiled on | on 1 core{more} |",
             "|---|---|---|---:|" + ("---:|" if more else "")]
    for f in families:
        several = f" | {f['compile_s_cores']:.2f}" if "compile_s_cores" in f else (" | –" if more else "")
        lines.append(f"| {f['family']} | {f['env'] or '–'} | {f['file']} | {f['compile_s']:.2f}{several} |")
    return lines + [""]


def header_line(report: dict) -> str:
    low, high = report["bandwidth_gbs"]
    measured = f"{low:.1f} GB/s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f} GB/s"
    peaks = report.get("peaks") or {}
    compute = ""
    if peaks.get("fma_gflops"):
        compute = f"; fp32 FMA peak {peaks['fma_gflops']:.0f} GFLOP/s"
        if peaks.get("vnni_gops"):
            compute += f", int8 VNNI peak {peaks['vnni_gops']:.0f} GOP/s"
    return (f"Machine: {report['machine']}; single-core read bandwidth {measured} (best of 1/2/4/8 streams, "
            f"measured before each run of a row with a DRAM roof){compute}; {report['date']}. tok/s as median ± half-range over "
            "runs; compile time excluded.")


def footer(steps: int) -> str:
    """What the roof column means, for the generation length the table's first column shows."""
    return (f"MB/token: the weights one token reads, each tensor in its own format. DRAM roof (models larger than "
            f"the last-level cache): {generation_key(steps)} tok/s x bytes read per token (the weights, and the KV-cache "
            f"rows attention reads, {kv_positions_read(steps):g} positions on average) / the bandwidth "
            "measured just before that run; the median over runs, each run of these rows a process of its "
            "own (a row without that column: its own first tg length's roof). Mapped: the weights are the file's page-cache pages, mapped in 2 MB pages where Linux "
            "allows (llama2nb/mapping.py); in memory: a copy in RAM (--in-memory).")


def save_report(report: dict, out_dir: Path) -> None:
    """latest.json/.md and a dated copy of each, and latest.png where matplotlib is installed."""
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
    """Generation tok/s of every row that measured it, one bar each, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generation = report["tg"]
    shown = [(row, shown_generation(row, generation)) for row in report["rows"]]
    shown = [(row, n) for row, n in shown if n is not None]
    values = [statistics.median(row[generation_key(n)]) for row, n in shown]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.5))
    colors = ["#888888" if row["section"] == "flags" else "#3366aa" for row, _ in shown]
    ax.barh(range(len(shown)), values, color=colors)
    ax.set_yticks(range(len(shown)), [row["label"] for row, _ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"generation tok/s ({generation_key(generation[0])}, log scale)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=7)
    ax.set_title(f"llama2nb, one core: {report['machine'].split(',')[0]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
