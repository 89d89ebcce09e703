"""`llama2nb bench`: end to end on tiny shapes (every row measured, files written, C rows parsed),
and its parts apart: the model files, the roof for any generation length, measuring a row
(probe before each run), and the report's rendering."""

from __future__ import annotations

import json
import stat
from dataclasses import replace

import pytest
from click.testing import CliRunner

import llama2nb.bench as bench
from llama2nb.bench import families as bench_families
from llama2nb.bench import llamacpp
from llama2nb.bench import measure as bench_measure
from llama2nb.bench import models, probes, roofs
from llama2nb.bench import rows as bench_rows
from llama2nb.bench.report import markdown_table, shown_generation
from llama2nb.bench.rows import GENERATION, PREFILL, Row
from llama2nb.cli import main
from llama2nb.files.llama2c import read_config
from llama2nb.kernels import simd
from llama2nb.tokenizer import Tokenizer

from .conftest import TINY

FAKE_RUNC = """#!/bin/sh
# stands in for llama2.c's run: checks its arguments, prints run.c's closing line
[ -f "$1" ] && [ "$2" = "-z" ] && [ -f "$3" ] || exit 3
echo "once upon a time"
echo "achieved tok/s: 123.456000" >&2
"""
# The Llama 2 vocabulary size; rows of 64 and 96: Q8_0 in groups of 32, the kernel family the tiny
# Q8_0 models of the other tests use too (conftest.TINY_MODELS)
TINY_LLAMA = replace(TINY, dim=64, hidden_dim=96, vocab_size=32000, seq_len=256)


def test_bench_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(models.SHAPES, "15M", TINY_LLAMA)  # the dict the CLI checks names against, too
    monkeypatch.setattr(models, "BUNDLED", tmp_path / "no-bundled-model.bin")
    monkeypatch.setattr(probes, "PROBE_GIB", 0.125)  # a quicker bandwidth probe
    # Both ways a row is measured: the models rows as beyond the cache (a roof: each run in a
    # process of its own right after its own bandwidth probe), the flag and GGUF rows as in
    # cache (all their runs in one process, no probe)
    measure_row = bench.measure_row
    monkeypatch.setattr(bench, "measure_row", lambda row, files, cache_dir, cache_bytes: measure_row(
        row, files, cache_dir, 0 if row.section == "models" else 2**62))
    runc = tmp_path / "run"
    runc.write_text(FAKE_RUNC)
    runc.chmod(runc.stat().st_mode | stat.S_IEXEC)
    # one of the portable types stands for both (test_bench_rows.py checks that both get rows): a
    # portable row compiles a kernel family for another CPU that no other test needs
    monkeypatch.setattr(bench, "PORTABLE_TYPES", ("Q4_0",))
    monkeypatch.setattr(bench_rows, "PORTABLE_TYPES", ("Q4_0",))
    every_family = bench_families.family_rows  # one cold compile (fp32 with full fastmath) stands for all
    monkeypatch.setattr(bench_families, "family_rows", lambda rows: {
        key: row for key, row in every_family(rows).items() if key == ("f32, fastmath full", "")})
    out = tmp_path / "results"
    versus = ["--llamacpp"] if llamacpp.available() else []  # llama.cpp beside it where it is installed
    result = CliRunner().invoke(main, ["bench", "--models", "15M", "--runs", "2", "--runc", str(runc), "--gguf", "F32",
                                       *versus, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "latest.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["pure Python (NUMBA_DISABLE_JIT=1)"]["tg3"][0] > 0
    for label in ("NUMBA_OPT=0, no fastmath", "opt 3, no fastmath (≈ -O3)", "full fastmath (≈ -Ofast)",
                  "int8 Q8_0, full fastmath"):
        assert len(rows[label]["tg128"]) == 2 and min(rows[label]["tg128"]) > 0 and rows[label]["pp128"]
        assert rows[label]["roof"] == roofs.IN_CACHE and "bandwidth_gbs" not in rows[label]  # runs in one process
    model_row = rows["stories15M shape, fp32"]
    assert {"tg128", "tg256", "pp128", "pp256", "compile_s", "peak_rss_mb", "roof"} <= set(model_row)
    # a row with a roof: one process per run, each after its own bandwidth probe, the ratio per pair
    assert len(model_row["tg128"]) == len(model_row["bandwidth_gbs"]) == len(model_row["pp256"]) == 2
    assert set(model_row["roof"]) == {"tg128", "tg256"} and min(model_row["roof"].values()) > 0
    int8_row = rows["stories15M shape, int8"]  # a roof from its own bytes: a quarter of fp32's and a bit
    assert 0.25 < int8_row["bytes_per_token"] / model_row["bytes_per_token"] < 0.4 and int8_row["roof"]["tg128"] > 0
    assert len(int8_row["bandwidth_gbs"]) == 2 and "q8_0(group_size=32)" in int8_row["family"]
    assert rows["run.c (run)"]["tg128"] == [123.456, 123.456]
    assert min(report["bandwidth_gbs"]) > 0 and report["startup"][0]["ttft_warm_s"] > 0
    assert (out / "latest.png").stat().st_size > 1000 and "| stories15M shape, fp32 |" in (out / "latest.md").read_text()
    assert ("| configuration | tg128 | tg256 | pp128 | pp256 | MB/token | DRAM roof | pp128 GFLOP/s (peak) "
            "| compile s | peak RSS MB |") in result.output
    assert report["peaks"]["fma_gflops"] > 0 and model_row["flops_per_token"] == 2 * 2 * sum(
        r * c for r, c in TINY_LLAMA.matrix_shapes().values())  # 2 layers
    assert set(model_row["bandwidth_by_streams"][0]) == {"1", "2", "4", "8"}
    gguf_row = rows["stories15M shape, F32 GGUF"]  # the same weights through the GGUF reader
    assert gguf_row["bytes_per_token"] == model_row["bytes_per_token"] and min(gguf_row["tg128"]) > 0
    assert len(gguf_row["tg128"]) == 2 and gguf_row["roof"] == roofs.IN_CACHE
    portable = rows["stories15M shape, Q4_0 GGUF, portable (AVX2, no VNNI)"]  # on by default for the first shape
    assert min(portable["tg128"]) > 0 and "VNNI" not in portable["family"]
    assert "VNNI" in rows["stories15M shape, Q4_0 GGUF"]["family"] or not simd.VNNI
    [compiled] = report["compile_families"]  # the one family left to compile cold (see above)
    assert compiled["family"] == rows["stories15M shape, fp32"]["family"] and compiled["compile_s"] > 0
    assert "**Compile seconds per kernel family, cold cache**" in result.output
    if versus:
        assert min(rows["stories15M shape, F32 GGUF, llama.cpp"]["tg128"]) > 0
        assert "**llama2nb / llama.cpp**" in result.output and "| stories15M shape, F32 GGUF |" in result.output


def test_bench_rejects_unknown_shapes():
    result = CliRunner().invoke(main, ["bench", "--models", "15M,13B"])
    assert result.exit_code == 2 and "expected some of 15M, 42M, 110M, 7B" in result.output


def test_group_size_follows_llama2c():
    assert models.SHAPES["15M"].q8_group_size == 32  # 288 = 9 x 32: the bench measures what export writes
    assert models.SHAPES["110M"].q8_group_size == 64


# ----------------------------------------------------------------------------------------------
# The files


def test_model_files_written_once_with_the_export_group_size(tmp_path, monkeypatch):
    shape = replace(TINY, dim=96, hidden_dim=288, vocab_size=300)  # q8_group_size 32, not 64
    monkeypatch.setattr(models, "SHAPES", {"tiny": shape})
    monkeypatch.setattr(models, "BUNDLED", tmp_path / "absent.bin")
    logged: list[str] = []
    files = models.ensure_models(tmp_path, ["tiny"], logged.append)
    assert read_config(files.fp32["tiny"]).version == 0 and files.bundled is None
    q8 = read_config(files.q8["tiny"])
    assert (q8.version, q8.group_size) == (2, shape.q8_group_size) and shape.q8_group_size == 32
    tokenizer = Tokenizer.load(files.tokenizer, shape.vocab_size)
    assert tokenizer.vocab_size == 300 and tokenizer.decode([3 + ord("A")]) == "A"  # byte pieces in place
    models.ensure_models(tmp_path, ["tiny"], logged.append)
    assert len(logged) == 1  # the second call finds the files


def test_placeholder_vocab_fills_to_the_vocabulary_size():
    pieces, scores = models.placeholder_vocab(1000)
    assert len(pieces) == len(scores) == 1000 and len(set(pieces)) == 1000
    assert pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]


def test_parse_cache_size():
    assert probes.parse_cache_size("32768K\n") == 32 * 2**20
    assert probes.parse_cache_size("32M") == 32 * 2**20
    assert probes.parse_cache_size("1024") == 1024
    with pytest.raises(ValueError):
        probes.parse_cache_size("")


# ----------------------------------------------------------------------------------------------
# The roof


@pytest.mark.parametrize("steps", [2, 3, 100, 128, 256, 1000])
def test_bytes_read_per_token_counts_the_kv_rows_of_any_length(steps):
    kv_row = TINY.n_layers * 2 * TINY.kv_dim * 4  # K and V, fp32, every layer, one position
    expected = 12345 + kv_row * (steps + 1) / 2  # positions 0..pos, on average
    assert roofs.bytes_read_per_token(TINY, 12345, steps) == pytest.approx(expected)


def test_a_file_s_bytes_per_token_count_each_tensor_in_its_format(tiny_checkpoints):
    fp32 = models.file_bytes_per_token(tiny_checkpoints.fp32["tiny"])
    q8 = models.file_bytes_per_token(tiny_checkpoints.q8["tiny"])
    assert fp32 == TINY.weight_bytes_per_token  # the fp32 file: the header's own arithmetic
    gs = TINY.q8_group_size
    assert q8 == replace(TINY, version=2, group_size=gs).weight_bytes_per_token  # 1 + 4 / gs bytes a weight


def test_roof_pairs_each_run_with_the_probe_before_it():
    # run 1: 100 tok/s at 2 GB/s -> 0.5 of the roof; run 2: 200 tok/s at 1 GB/s -> 2.0
    assert roofs.roof_fraction([100.0, 200.0], [2.0, 1.0], 1e7) == pytest.approx(1.25)
    assert roofs.roof_fraction([100.0, 200.0], [1.0, 2.0], 1e7) == pytest.approx(1.0)


def test_generation_roofs_for_whatever_lengths_a_row_measures():
    result = {"tg16": [50.0, 60.0], "tg300": [40.0, 40.0], "pp16": [9.0, 9.0], "bandwidth_gbs": [1.0, 1.0]}
    got = roofs.generation_roofs(TINY, 5000, (16, 300, 4096), result)  # 4096: beyond the context, not measured
    assert set(got) == {"tg16", "tg300"}
    assert got["tg16"] == pytest.approx(55.0 * roofs.bytes_read_per_token(TINY, 5000, 16) / 1e9)
    assert got["tg300"] == pytest.approx(40.0 * roofs.bytes_read_per_token(TINY, 5000, 300) / 1e9)


def test_weights_beyond_the_cache_get_a_dram_roof_whatever_their_format():
    assert roofs.gets_dram_roof(1000, cache_bytes=0)
    assert not roofs.gets_dram_roof(1000, cache_bytes=1000)


# ----------------------------------------------------------------------------------------------
# Measuring a row (the worker and the probe stand in: no processes)


class FakeMachine:
    """Stands in for the worker processes and the bandwidth probe, recording their order."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.bandwidths = iter([2.0, 4.0, 8.0])
        monkeypatch.setattr(probes, "probe_bandwidth", self.probe)
        monkeypatch.setattr(bench_measure, "run_worker", self.worker)

    def probe(self) -> dict:
        self.calls.append("probe")
        best = next(self.bandwidths)
        return {"bandwidth_gbs": best, "bandwidth_by_streams": {"1": best / 2, "2": best}}

    def worker(self, args: list[str], env: dict) -> dict:
        spec = json.loads(args[1])
        self.calls.append(f"worker x{spec['runs']}")
        result = {f"tg{n}": [100.0] * spec["runs"] for n in spec["tg"]}
        return {**result, "compile_s": 0.5, "peak_rss_mb": 10.0 + len(self.calls)}


@pytest.fixture
def tiny_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SHAPES", {"tiny": TINY})
    return models.ensure_models(tmp_path, ["tiny"], lambda message: None)


def test_a_roofed_row_runs_each_time_after_its_own_probe(tiny_checkpoints, tmp_path, monkeypatch):
    machine = FakeMachine(monkeypatch)
    row = Row("models", "tiny", tiny_checkpoints.fp32["tiny"], tg=(8, 40), pp=(), runs=3)
    bench_measure.measure_row(row, tiny_checkpoints, tmp_path, cache_bytes=0)
    assert machine.calls == ["probe", "worker x1"] * 3
    assert row.result["bandwidth_gbs"] == [2.0, 4.0, 8.0] and row.result["tg40"] == [100.0] * 3
    assert row.result["peak_rss_mb"] == 16.0  # costs keep their worst
    config, weights = read_config(row.path), models.file_bytes_per_token(row.path)
    assert row.result["roof"] == {
        f"tg{n}": pytest.approx(roofs.roof_fraction([100.0] * 3, [2.0, 4.0, 8.0],
                                                    roofs.bytes_read_per_token(config, weights, n)))
        for n in (8, 40)}


def test_rows_in_cache_run_in_one_process_without_probes(tiny_checkpoints, tmp_path, monkeypatch):
    machine = FakeMachine(monkeypatch)
    fp32 = Row("models", "fp32", tiny_checkpoints.fp32["tiny"], tg=(8,), pp=(), runs=3)
    q8 = Row("models", "int8", tiny_checkpoints.q8["tiny"], tg=(8,), pp=(), runs=3)
    q8_bytes = models.file_bytes_per_token(tiny_checkpoints.q8["tiny"])
    bench_measure.measure_row(fp32, tiny_checkpoints, tmp_path, cache_bytes=2**30)
    bench_measure.measure_row(q8, tiny_checkpoints, tmp_path, cache_bytes=q8_bytes)  # fits: in cache
    assert machine.calls == ["worker x3", "worker x3"]
    assert fp32.result["roof"] == q8.result["roof"] == roofs.IN_CACHE


# ----------------------------------------------------------------------------------------------
# The report


def report_of(rows: list[dict], generation=GENERATION, prefill=PREFILL) -> dict:
    return {"machine": "a CPU, 2 cores", "bandwidth_gbs": [20.0, 30.0], "date": "2026-12-01 12:00",
            "peaks": {"fma_gflops": 200.0, "vnni_gops": 800.0},
            "tg": list(generation), "pp": list(prefill), "rows": rows,
            "startup": [{"model": "15M", "ttft_warm_s": 0.4, "ttft_cold_s": 3.2}]}


def table_row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_markdown_table_columns_cells_and_roofs():
    rows = [
        {"section": "flags", "label": "pure Python", "tg": [3], "pp": [], "tg3": [0.5], "roof": {"tg3": 0.004},
         "compile_s": 0.0, "peak_rss_mb": 150.0},
        {"section": "models", "label": "fp32", "tg": [128, 256], "pp": [128, 256], "tg128": [500.0, 520.0],
         "tg256": [480.0], "pp128": [4000.0], "pp256": [3900.0], "roof": {"tg128": 0.97, "tg256": 0.9},
         "compile_s": 0.17, "peak_rss_mb": 209.4, "flops_per_token": 25_000_000, "bytes_per_token": 61_000_000},
        {"section": "models", "label": "int8 prefill", "tg": [128], "pp": [128], "pp128": [8000.0],
         "flops_per_token": 50_000_000, "int8": True},
        {"section": "models", "label": "bundled", "tg": [128, 256], "pp": [128, 256], "tg128": [6000.0],
         "roof": "in cache"},
        {"section": "models", "label": "int8", "tg": [128, 256], "pp": [128, 256], "tg128": [1200.0]},
    ]
    markdown = markdown_table(report_of(rows))
    assert ("| configuration | tg128 | tg256 | pp128 | pp256 | MB/token | DRAM roof | pp128 GFLOP/s (peak) "
            "| compile s | peak RSS MB |") in markdown
    assert "single-core read bandwidth 20.0-30.0 GB/s (best of 1/2/4/8 streams" in markdown
    assert "fp32 FMA peak 200 GFLOP/s, int8 VNNI peak 800 GOP/s" in markdown
    assert table_row(markdown, "pure Python") == ["0.5 (3 tokens)", "–", "–", "–", "–", "0%", "–", "0.00", "150"]
    assert table_row(markdown, "fp32") == ["510 ± 10", "480", "4000", "3900", "61.0", "97%", "100 (50%)", "0.17",
                                           "209"]
    assert table_row(markdown, "int8 prefill")[6] == "400 (50%)"  # against the VNNI peak
    assert table_row(markdown, "bundled")[5] == "in cache" and table_row(markdown, "int8")[5] == "–"
    assert "| 15M | 0.40 | 3.20 |" in markdown
    assert "DRAM roof (models larger than the last-level cache): tg128 tok/s" in markdown
    assert "64.5 positions on average" in markdown


def test_markdown_table_follows_the_configured_lengths():
    rows = [{"section": "models", "label": "fp32", "tg": [64], "pp": [32], "tg64": [300.0], "pp32": [900.0],
             "roof": {"tg64": 0.5}}]
    markdown = markdown_table(report_of(rows, generation=(64,), prefill=(32,)))
    assert "| configuration | tg64 | pp32 | MB/token | DRAM roof | pp32 GFLOP/s (peak) |" in markdown
    assert table_row(markdown, "fp32") == ["300", "900", "–", "50%", "–", "–", "–"]
    assert "DRAM roof (models larger than the last-level cache): tg64 tok/s" in markdown
    assert "32.5 positions on average" in markdown


def test_shown_generation_prefers_the_first_column_then_a_short_run():
    assert shown_generation({"tg": [128, 256], "tg128": [1.0], "tg256": [1.0]}, [128, 256]) == 128
    assert shown_generation({"tg": [256], "tg256": [1.0]}, [128, 256]) == 256  # its own column's roof
    assert shown_generation({"tg": [3], "tg3": [1.0]}, [128, 256]) == 3
    assert shown_generation({"tg": [128], "pp128": [1.0]}, [128, 256]) is None
