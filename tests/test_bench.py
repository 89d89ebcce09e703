"""`llama2nb bench` end to end on tiny shapes: every row measured, files written, C rows parsed."""

from __future__ import annotations

import json
import stat
from dataclasses import replace

from click.testing import CliRunner

from llama2nb import bench
from llama2nb.cli import main

from .conftest import TINY

FAKE_RUNC = """#!/bin/sh
# stands in for llama2.c's run: checks its arguments, prints run.c's closing line
[ -f "$1" ] && [ "$2" = "-z" ] && [ -f "$3" ] || exit 3
echo "once upon a time"
echo "achieved tok/s: 123.456000" >&2
"""


def test_bench_end_to_end(tmp_path, monkeypatch):
    tiny = replace(TINY, dim=64, hidden_dim=128, vocab_size=32000, seq_len=256)  # the Llama 2 vocabulary size
    monkeypatch.setattr(bench, "SHAPES", {"15M": tiny})
    monkeypatch.setattr(bench, "BUNDLED", tmp_path / "no-bundled-model.bin")
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 0)  # every fp32 row gets a roof
    monkeypatch.setattr(bench, "PROBE_GIB", 0.125)  # a quicker bandwidth probe
    runc = tmp_path / "run"
    runc.write_text(FAKE_RUNC)
    runc.chmod(runc.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["bench", "--models", "15M", "--runs", "2", "--runc", str(runc),
                                       "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "latest.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["pure Python (NUMBA_DISABLE_JIT=1)"]["tg3"][0] > 0
    for label in ("NUMBA_OPT=0, no fastmath", "opt 3, no fastmath (≈ -O3)", "full fastmath (≈ -Ofast)",
                  "int8 Q8_0, full fastmath"):
        assert len(rows[label]["tg128"]) == 2 and min(rows[label]["tg128"]) > 0 and rows[label]["pp128"]
    model_row = rows["stories15M shape, fp32"]
    assert {"tg128", "tg256", "pp128", "pp256", "compile_s", "peak_rss_mb", "roof"} <= set(model_row)
    # a row with a roof: one process per run, each after its own bandwidth probe, the ratio per pair
    assert len(model_row["tg128"]) == len(model_row["bandwidth_gbs"]) == len(model_row["pp256"]) == 2
    assert isinstance(model_row["roof"], float) and model_row["roof"] > 0
    assert "bandwidth_gbs" not in rows["int8 Q8_0, full fastmath"]  # no fp32 roof for int8
    assert rows["run.c (run)"]["tg128"] == [123.456, 123.456]
    assert min(report["bandwidth_gbs"]) > 0 and report["startup"][0]["ttft_warm_s"] > 0
    assert (out / "latest.png").stat().st_size > 1000 and "| stories15M shape, fp32 |" in (out / "latest.md").read_text()
    assert "| configuration |" in result.output


def test_bench_rejects_unknown_shapes():
    result = CliRunner().invoke(main, ["bench", "--models", "15M,7B"])
    assert result.exit_code == 2 and "expected some of 15M, 42M, 110M" in result.output


def test_group_size_follows_llama2c():
    assert bench.SHAPES["15M"].q8_group_size == 32  # 288 = 9 x 32: the bench measures what export writes
    assert bench.SHAPES["110M"].q8_group_size == 64
