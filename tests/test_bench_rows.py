"""`llama2nb bench`'s rows beyond one core and the stories shapes, without timing anything: the
Llama 2 7B shape (its lengths, its streamed files, its roof, on a small stand-in shape), N-thread
rows paired with llama.cpp's of the same thread count, the portable path's environment and its
own Numba cache names, and the cold compile of each kernel family."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numba
import pytest

from llama2nb.bench import families, llamacpp, models, probes, roofs, worker
from llama2nb.bench import measure as bench_measure
from llama2nb.bench.models import ModelFiles
from llama2nb.bench.report import family_table, llamacpp_pairs, markdown_table, shown_generation, versus_llamacpp
from llama2nb.bench.rows import (GENERATION, PORTABLE_ENV, PORTABLE_LABEL, PREFILL, Row, build_rows, columns,
                                 shape_lengths)
from llama2nb.bench.startup import startup_models
from llama2nb.cli import main
from llama2nb.files import read_config
from llama2nb.kernels import jit

from .conftest import TINY

STAND_IN = replace(TINY, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=4, vocab_size=300, seq_len=64)


# ----------------------------------------------------------------------------------------------
# The 7B shape


def test_the_7b_shape_is_llama_2_7b_with_its_own_short_lengths():
    c = models.SHAPES["7B"]
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (4096, 11008, 32, 32, 32, 32000)
    assert c.seq_len >= 2048 and c.q8_group_size == 64 and "7B" in models.QUANTIZED_ONLY
    assert shape_lengths("7B") == ((31,), (64,)) and shape_lengths("110M") == (GENERATION, PREFILL)
    default = next(p.default for p in main.commands["bench"].params if p.name == "shapes")
    assert "7B" not in default.split(",") and "7B" in models.SHAPES  # opt-in


def test_columns_add_a_shape_s_own_lengths():
    assert columns(["15M", "110M"]) == (GENERATION, PREFILL)
    assert columns(["7B"]) == ((31,), (64,))
    assert columns(["110M", "7B"]) == ((*GENERATION, 31), (*PREFILL, 64))


def fake_files(tmp_path: Path) -> ModelFiles:
    """File names only: building rows reads nothing."""
    gguf = {name: {t: tmp_path / f"{name}-{t}.gguf" for t in ("Q8_0", "Q4_0", "Q4_K_M")} for name in ("110M", "7B")}
    return ModelFiles(fp32={"110M": tmp_path / "110M.bin"}, q8={"110M": tmp_path / "110M-q8.bin", "7B": tmp_path / "7B.bin"},
                      tokenizer=tmp_path / "tok.bin", bundled=None, gguf=gguf,
                      written_by={gguf["7B"]["Q8_0"]: "llama2nb's writer"})


def test_a_quantized_only_shape_has_int8_rows_at_its_own_lengths_and_no_flag_rows(tmp_path):
    files = fake_files(tmp_path)
    rows = build_rows(files, ["7B"], 2, runc="run", runq="runq", threads=1)
    assert [r.section for r in rows if r.section == "flags"] == []  # no fp32 file to tell the flag story on
    models_rows = [r for r in rows if r.section == "models"]
    assert [r.label for r in models_rows] == ["Llama 2 7B shape, int8", "Llama 2 7B shape, runq.c"]
    assert all(r.tg == (31,) for r in rows) and models_rows[0].pp == (64,) and models_rows[1].pp == ()
    assert "Llama 2 7B shape, Q8_0 GGUF (llama2nb's writer)" in [r.label for r in rows]
    mixed = build_rows(files, ["110M", "7B"], 2, None, None, threads=2)
    assert {r.path for r in mixed if r.section == "flags"} <= {files.fp32["110M"], files.q8["110M"]}
    assert "Llama 2 7B shape, int8, 2 threads" in [r.label for r in mixed]  # int8: it has no fp32 file
    assert startup_models(files, ["110M", "7B"]) == [("110M", files.fp32["110M"])]


def test_threads_give_every_gguf_file_n_thread_rows_for_both_engines(tmp_path):
    files = fake_files(tmp_path)
    rows = [r for r in build_rows(files, ["110M"], 1, None, None, threads=2, llamacpp=True) if r.section == "gguf"]
    for path in files.gguf["110M"].values():
        on_file = {(r.engine, r.threads) for r in rows if r.path == path and not r.env}
        assert on_file == {("llama2nb", 1), ("llama.cpp", 1), ("llama2nb", 2), ("llama.cpp", 2)}
    assert "stories110M shape, Q4_0 GGUF, llama.cpp, 2 threads" in [r.label for r in rows]
    one = build_rows(files, ["110M"], 1, None, None, threads=1, llamacpp=True)
    assert {r.threads for r in one} == {1}


def test_portable_rows_run_the_first_stories_shape_s_q8_0_and_q4_0_for_avx2(tmp_path):
    files = fake_files(tmp_path)
    rows = build_rows(files, ["7B", "110M"], 1, None, None, threads=2, llamacpp=True, portable=True)
    portable = [r for r in rows if r.section == "gguf" and r.env]
    assert [r.label for r in portable] == [f"stories110M shape, Q8_0 GGUF, {PORTABLE_LABEL}",
                                           f"stories110M shape, Q4_0 GGUF, {PORTABLE_LABEL}"]
    assert all(r.env == PORTABLE_ENV and r.engine == "llama2nb" and r.threads == 1 for r in portable)
    features = set(PORTABLE_ENV["NUMBA_CPU_FEATURES"].split(","))
    assert PORTABLE_ENV["NUMBA_CPU_NAME"] == "haswell" and {"+avx2", "+fma", "+f16c"} <= features
    assert not any("avx512" in f or "vnni" in f for f in features)  # Numba keeps the host's features unless told
    assert not [r for r in build_rows(files, ["110M"], 1, None, None, 1) if r.section == "gguf" and r.env]
    only_7b = build_rows(files, ["7B"], 1, None, None, 1, portable=True)  # a 7B token: seconds on that path
    assert not [r for r in only_7b if r.env]


def test_a_target_cpu_gets_kernel_cache_names_of_its_own(monkeypatch):
    native = jit._sources_hash()
    monkeypatch.setattr(numba.config, "CPU_NAME", PORTABLE_ENV["NUMBA_CPU_NAME"])
    monkeypatch.setattr(numba.config, "CPU_FEATURES", PORTABLE_ENV["NUMBA_CPU_FEATURES"])
    portable = jit._sources_hash()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2")
    assert len({native, portable, jit._sources_hash()}) == 3


def test_a_worker_s_environment_can_remove_a_variable(monkeypatch):
    seen = {}

    def fake_run(command, env, **kwargs):
        seen.update(env)
        return type("Done", (), {"returncode": 0, "stdout": '{"ok": 1}\n', "stderr": ""})()

    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx512f")
    monkeypatch.setattr(worker.subprocess, "run", fake_run)
    assert worker.run_worker(["row", "{}"], {"NUMBA_CPU_FEATURES": None, "NUMBA_CPU_NAME": "haswell"}) == {"ok": 1}
    assert "NUMBA_CPU_FEATURES" not in seen and seen["NUMBA_CPU_NAME"] == "haswell"


def test_n_threads_run_on_n_cores():
    cores = sorted(os.sched_getaffinity(0))
    assert worker.pinned_cores(1) == {worker.pinned_core()}
    assert worker.pinned_cores(2) == set(cores[-2:]) and worker.pinned_cores(10_000) == set(cores)


def test_the_llamacpp_worker_follows_the_row_s_threads(monkeypatch):
    made, pinned = {}, []

    class FakeModel:
        def __init__(self, path, n_ctx, n_batch, threads=1):
            made.update(path=path, n_ctx=n_ctx, threads=threads)

        def close(self):
            pass

    monkeypatch.setattr(llamacpp, "LlamaCppModel", FakeModel)
    monkeypatch.setattr(llamacpp, "pin_to_cores", pinned.append)
    llamacpp.llamacpp_worker({"path": "m.gguf", "runs": 1, "tg": [], "pp": [], "threads": 2})
    assert made["threads"] == 2 and pinned == [2]


# ----------------------------------------------------------------------------------------------
# The 7B plumbing on a stand-in shape: streamed files, labels, the roof


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    monkeypatch.setitem(models.SHAPES, "7B", STAND_IN)
    monkeypatch.setattr(models, "BUNDLED", tmp_path / "absent.bin")

    def whole_model(*args, **kwargs):
        raise AssertionError("a quantized-only shape is streamed, never held whole")

    monkeypatch.setattr(models, "random_weights", whole_model)
    return tmp_path / "cache"


def test_7b_files_are_streamed_q8_0_and_q4_0_written_by_llama2nb(stand_in, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: None)
    files = models.ensure_models(stand_in, ["7B"], lambda message: None)
    assert files.fp32 == {} and set(files.gguf["7B"]) == {"Q8_0", "Q4_0"}
    q8 = read_config(files.q8["7B"])
    assert (q8.version, q8.group_size, q8.dim) == (2, STAND_IN.q8_group_size, STAND_IN.dim)
    assert {models.file_config(p).dim for p in files.gguf["7B"].values()} == {STAND_IN.dim}
    assert set(files.written_by.values()) == {"llama2nb's writer"}
    labels = [r.label for r in build_rows(files, ["7B"], 1, None, None, 1) if r.section == "gguf"]
    assert labels == ["Llama 2 7B shape, Q8_0 GGUF (llama2nb's writer)", "Llama 2 7B shape, Q4_0 GGUF (llama2nb's writer)"]
    assert sum(p.stat().st_size for p in stand_in.glob("*.gguf")) < 3 * files.q8["7B"].stat().st_size


def test_7b_q4_0_comes_from_llama_cpp_s_quantizer_by_requantizing_the_q8_0_file(stand_in, monkeypatch):
    calls = []

    def fake_quantize(source, out, ftype, requantize=False):
        calls.append((Path(source).name, ftype, requantize))
        shutil.copyfile(source, out)

    monkeypatch.setattr(llamacpp, "available", lambda: "0.0")
    monkeypatch.setattr(llamacpp, "quantize", fake_quantize)
    files = models.ensure_models(stand_in, ["7B"], lambda message: None)
    assert calls == [("llama2-7B-random-Q8_0-llama2nb.gguf", models.GGUF_TYPES["Q4_0"][0], True)]
    assert files.written_by[files.gguf["7B"]["Q4_0"]] == "llama.cpp's quantizer, from the Q8_0 file"
    # Q4_K_M only when asked for: requantized from the Q8_0 file the same way
    files = models.ensure_models(stand_in, ["7B"], lambda message: None, gguf_types=("Q4_0", "Q4_K_M"))
    assert calls[1:] == [("llama2-7B-random-Q8_0-llama2nb.gguf", models.GGUF_TYPES["Q4_K_M"][0], True)]
    assert files.written_by[files.gguf["7B"]["Q4_K_M"]] == "llama.cpp's quantizer, from the Q8_0 file"
    labels = [r.label for r in build_rows(files, ["7B"], 1, None, None, 1) if r.section == "gguf"]
    assert labels[-1] == "Llama 2 7B shape, Q4_K_M GGUF (llama.cpp's quantizer, from the Q8_0 file)"


def test_7b_q4_k_m_is_left_out_with_a_line_without_llama_cpp(stand_in, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: None)
    said = []
    files = models.ensure_models(stand_in, ["7B"], said.append, gguf_types=("Q4_K_M",))
    assert set(files.gguf["7B"]) == {"Q8_0", "Q4_0"}
    assert said[-1] == "Llama 2 7B shape Q4_K_M: no quantizer for it here (pip install llama-cpp-python): left out"


def test_a_7b_row_gets_its_dram_roof_at_its_own_length(stand_in, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: None)
    files = models.ensure_models(stand_in, ["7B"], lambda message: None)
    bandwidths = iter([2.0, 4.0])
    monkeypatch.setattr(probes, "probe_bandwidth", lambda: {"bandwidth_gbs": next(bandwidths), "bandwidth_by_streams": {}})
    monkeypatch.setattr(bench_measure, "run_worker", lambda args, env: {
        **{f"tg{n}": [5.0] for n in json.loads(args[1])["tg"]}, "compile_s": 0.1, "family": "q8_0"})
    row = next(r for r in build_rows(files, ["7B"], 2, None, None, 1) if r.label == "Llama 2 7B shape, int8")
    bench_measure.measure_row(row, files, stand_in, cache_bytes=0)
    weights = models.file_bytes_per_token(row.path)
    expected = roofs.roof_fraction([5.0, 5.0], [2.0, 4.0], roofs.bytes_read_per_token(read_config(row.path), weights, 31))
    assert row.result["roof"] == {"tg31": pytest.approx(expected)}
    shown = {**row.result, "section": "models", "label": row.label, "tg": [31], "pp": [64]}
    report = {"machine": "m", "bandwidth_gbs": [2.0, 4.0], "date": "d", "tg": [128, 256, 31], "pp": [128, 256, 64],
              "rows": [shown], "startup": []}
    cells = [c.strip() for c in next(line for line in markdown_table(report).splitlines()
                                     if line.startswith("| Llama 2 7B shape, int8 |")).strip("|").split("|")][1:]
    assert cells[2] == "5.0 ± 0.0" and cells[7] == f"{expected:.0%}"  # the tg31 column, and its roof
    assert shown_generation(shown, [128, 256, 31]) == 31 and shown_generation(shown, [31]) == 31


# ----------------------------------------------------------------------------------------------
# The report: llama.cpp pairs by thread count; compile seconds per family


def report_row(label, engine, threads, tg, env=None, path="a.gguf"):
    return {"section": "gguf", "label": label, "engine": engine, "threads": threads, "path": path, "env": env or {},
            "tg": [128], "pp": [], "tg128": [tg]}


def test_llamacpp_ratios_pair_rows_of_the_same_thread_count():
    rows = [report_row("ours", "llama2nb", 1, 300.0), report_row("theirs", "llama.cpp", 1, 200.0),
            report_row("ours, 2 threads", "llama2nb", 2, 500.0), report_row("theirs, 2 threads", "llama.cpp", 2, 250.0),
            report_row("ours, portable", "llama2nb", 1, 100.0, env=PORTABLE_ENV),
            report_row("other file", "llama2nb", 2, 100.0, path="b.gguf")]
    pairs = llamacpp_pairs(rows)
    assert [(a["label"], b["label"]) for a, b in pairs] == [("ours", "theirs"), ("ours, 2 threads", "theirs, 2 threads")]
    lines = versus_llamacpp({"tg": [128], "pp": [], "rows": rows, "llamacpp": "0.3.36"})
    assert "| ours | 1 | 1.50x |" in lines and "| ours, 2 threads | 2 | 2.00x |" in lines
    assert "same threads" in lines[0]


def family_row(label, family, bytes_per_token, env=None, engine="llama2nb", **kwargs):
    return Row("gguf", label, Path(f"{label}.bin"), env=env or {}, engine=engine,
               result={"family": family, "bytes_per_token": bytes_per_token, "compile_s": 0.1}, **kwargs)


def test_each_kernel_family_compiles_once_from_an_empty_cache_on_its_smallest_file(monkeypatch):
    rows = [family_row("big q8", "q8_0, fastmath full", 900), family_row("small q8", "q8_0, fastmath full", 100),
            family_row("q8 portable", "q8_0, fastmath full", 500, env=PORTABLE_ENV),
            family_row("pure", "f32, fastmath off", 10, pure_python=True),
            family_row("llama.cpp", "-", 10, engine="llama.cpp"), family_row("f32", "f32, fastmath full", 50, threads=2)]
    calls = []

    def fake_worker(args, env):
        spec = json.loads(args[1])
        assert os.listdir(env["NUMBA_CACHE_DIR"]) == []  # cold: an empty cache folder of its own
        calls.append((Path(spec["path"]).name, spec["threads"], spec["compile_cores"], spec["tg"], spec["pp"],
                      env.get("NUMBA_CPU_NAME")))
        return {"compile_s": 2.5 + len(calls), "family": "ignored"}

    monkeypatch.setattr(families, "run_worker", fake_worker)
    measured = families.measure_families(rows, lambda message: None, cores=1)
    assert calls == [("small q8.bin", 1, 1, [], [], None), ("q8 portable.bin", 1, 1, [], [], "haswell"),
                     ("f32.bin", 2, 1, [], [], None)]
    assert [(m["family"], m["env"], m["compile_s"]) for m in measured] == [
        ("q8_0, fastmath full", "", 3.5), ("q8_0, fastmath full", "NUMBA_CPU_NAME=haswell", 4.5),
        ("f32, fastmath full", "", 5.5)]
    table = "\n".join(family_table(measured))
    assert "**Compile seconds per kernel family, cold cache**" in table
    assert "| q8_0, fastmath full | NUMBA_CPU_NAME=haswell | q8 portable.bin | 4.50 |" in table
    assert family_table([]) == []
    calls.clear()  # with 4 cores: each family once more, compiling on all of them
    measured = families.measure_families(rows[:2], lambda message: None, cores=4)
    assert [call[2] for call in calls] == [1, 4]
    assert measured == [{"family": "q8_0, fastmath full", "env": "", "file": "small q8.bin", "compile_s": 3.5,
                         "compile_s_cores": 4.5, "cores": 4}]
    assert "| q8_0, fastmath full | – | small q8.bin | 3.50 | 4.50 |" in "\n".join(family_table(measured))


def test_a_family_name_tells_apart_what_compiles_apart():
    from llama2nb.forward import family_name
    from llama2nb.formats.f32 import F32
    from llama2nb.formats.gguf_kquants import Q6_K
    from llama2nb.formats.gguf_legacy import Q4_0
    from llama2nb.formats.q8_0 import Q8_0

    names = {family_name("full", frozenset({F32(), Q8_0(32)})), family_name("full", frozenset({F32(), Q8_0(64)})),
             family_name("off", frozenset({F32(), Q8_0(64)})), family_name("full", frozenset({F32()}), parallel=True),
             family_name("full", frozenset({F32()})), family_name("full", frozenset({Q4_0(), Q6_K()}))}
    assert len(names) == 6
    assert family_name(True, frozenset({Q6_K(), Q4_0()})).startswith("q4_0 + q6_k, fastmath full")
