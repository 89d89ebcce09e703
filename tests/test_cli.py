"""`llama2nb sample` and `llama2nb info`: Click's runner for the modes and every error case,
subprocesses for what only a real process shows (Ctrl-C, a closed pipe, an ASCII terminal, and
that torch is never imported)."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama2nb import cli
from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import random_weights
from llama2nb.tokenizer import write_bin
from llama2nb.testmodels import byte_vocab

from .conftest import LLAMA2_BIN, LLAMA2_MODEL, REPO, default_ctrl_c, requires
from .sampling_fixtures import tiny_config, tiny_vocab, write_tiny_model

CLI = [sys.executable, "-c", "from llama2nb.cli import main; main(prog_name='llama2nb')"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli"), seq_len=128)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def sample(runner: CliRunner, *args: str, input: str | None = None):
    return runner.invoke(cli.main, ["sample", *args], input=input, catch_exceptions=False)


def assert_one_line_error(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    if code == 1:
        assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ----------------------------------------------------------------------------------------------
# generate and chat


def test_generate_streams_text_to_stdout_and_stats_to_stderr(runner, tiny):
    result = sample(runner, str(tiny), "-i", "Once upon a time", "-s", "42", "-n", "20")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Once upon a time")
    assert result.stdout.endswith("\n")
    assert "tok/s" in result.stderr and "seed 42" in result.stderr and "JIT compile" in result.stderr
    assert "tok/s" not in result.stdout
    again = sample(runner, str(tiny), "-i", "Once upon a time", "-s", "42", "-n", "20")
    assert again.stdout == result.stdout  # same seed, same story


def test_generate_flags(runner, tiny):
    greedy = sample(runner, str(tiny), "-t", "0", "-n", "0")
    assert greedy.exit_code == 0 and "note:" not in greedy.stderr  # -n 0 = seq_len, no clamping
    clamped = sample(runner, str(tiny), "-t", "0", "-n", "1000")
    assert clamped.exit_code == 0 and "note:" in clamped.stderr and "1000" in clamped.stderr
    assert clamped.stdout == greedy.stdout
    extras = sample(runner, str(tiny), "-s", "3", "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.2",
                    "-p", "0.5", "-t", "0.8", "--no-fastmath")
    assert extras.exit_code == 0, extras.output


def test_chat_mode_reads_turns_from_piped_stdin(runner, tiny):
    result = sample(runner, str(tiny), "-m", "chat", "-y", "be kind", "-s", "5", "-n", "0",
                    input="hello\n\nthe cat\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "User: hello" in out and "Assistant: " in out
    assert "tok/s" in result.stderr or "no token" in result.stderr


def test_chat_mode_with_first_prompt_and_immediate_eof(runner, tiny):
    result = sample(runner, str(tiny), "-m", "chat", "-i", "hi", "-s", "5", input="")
    assert result.exit_code == 0, result.output
    assert "Assistant: " in result.stdout and "Traceback" not in result.output


def test_chat_names_the_limit_that_ends_it(runner, tiny):
    result = sample(runner, str(tiny), "-m", "chat", "-n", "40", "-s", "1", input="Hi\nTell me a story\nBye\n")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "the -n limit of 40 positions" in notes[0] and "(raise -n)" in notes[0], notes
    assert "40 positions" in result.stderr.splitlines()[-1]


def test_chat_first_turn_that_does_not_fit_is_an_error(runner, tiny):
    result = sample(runner, str(tiny), "-m", "chat", "-n", "10", "-i", "Tell me a long story about a cat", input="")
    assert_one_line_error(result, "first turn: expected at most 9 tokens", "the -n limit of 10 positions", "found")
    result = sample(runner, str(tiny), "-m", "chat", "-n", "10", input="Tell me a long story about a cat\n")
    assert_one_line_error(result, "first turn: expected at most 9 tokens")


def test_summary_counts_in_plain_words(runner, tiny):
    one = sample(runner, str(tiny), "-n", "1", "-s", "1").stderr.splitlines()[-1]
    assert one.startswith("1 token sampled in 1 position (1 prompt incl. BOS)" + cli._View(interactive=False).sep), one
    empty = sample(runner, str(tiny), "-m", "chat", "-s", "1", input="").stderr.splitlines()[-1]
    assert empty.startswith("0 tokens sampled in 0 positions") and "prompt" not in empty and "tok/s" not in empty


def test_summary_fits_the_terminal_between_its_parts(runner, tiny, monkeypatch):
    def shapes(parts):  # the parts with their figures blanked (they vary run to run)
        return [re.sub(r"[\d.]+", "#", part) for part in parts]

    plain = sample(runner, str(tiny), "-n", "8", "-s", "1234567890").stderr.splitlines()  # a log: one line
    monkeypatch.setattr(cli, "_terminal_width", lambda stream: 40)
    lines = sample(runner, str(tiny), "-n", "8", "-s", "1234567890").stderr.splitlines()
    assert len(plain) == 1 and len(lines) > 1 and all(len(line) <= 40 for line in lines[1:]), lines
    sep = cli._View(interactive=False).sep
    assert any(line.endswith("seed 1234567890") for line in lines)  # a part is never cut
    assert shapes(p for line in lines for p in line.split(sep)) == shapes(plain[0].split(sep))
    assert cli._fit(["a" * 50, "b", "c"], " | ", 10) == "a" * 50 + "\nb | c"  # too long alone: its own line


def test_terminal_view_uses_rich_with_a_summary(runner, tiny, monkeypatch):
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)
    result = sample(runner, str(tiny), "-i", "Once upon a time", "-s", "42", "-n", "20")
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    assert "Once upon a time" in result.stdout
    assert "tok/s" in result.stdout  # on a terminal the summary is part of the display


def test_info(runner, tiny):
    result = runner.invoke(cli.main, ["info", str(tiny)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in ["version 0", "dim 16", "hidden_dim 32", "2 layers", "2 heads", "seq_len 128",
                     "parameters", "shared", "KV cache", "group size", f"{tiny.stat().st_size:,} bytes"]:
        assert fragment in out, fragment
    assert "f32: float32 multiply-adds" in out  # an fp32 file


def test_info_names_the_int8_matmul_this_cpu_runs(runner, tiny_models):
    from llama2nb.kernels import simd

    out = runner.invoke(cli.main, ["info", str(tiny_models["v2-unshared-gqa"])]).stdout  # group size 32
    assert "q8_0(group_size=32)" in out
    assert ("VNNI vpdpbusd" if simd.VNNI else "portable int8 loops") in out


# ----------------------------------------------------------------------------------------------
# Errors: usage errors (exit 2) for flags, one line (exit 1) for files and inputs


@pytest.mark.parametrize("args,fragment", [
    (["-t", "-1"], "temperature"), (["-t", "nan"], "temperature"), (["-t", "inf"], "temperature"),
    (["-p", "1.5"], "topp"), (["-p", "-0.1"], "topp"), (["-n", "-1"], "steps"), (["-m", "poem"], "mode"),
    (["-s", "-3"], "seed"), (["--top-k", "-1"], "top-k"), (["--min-p", "2"], "min-p"),
    (["--repetition-penalty", "0"], "repetition-penalty"), (["-n", "many"], "steps"), (["--threads", "0"], "threads"),
    (["-t", "1e39"], "float32's largest"), (["--repetition-penalty", "1e39"], "float32's largest"),
    (["--repetition-penalty", "1e-50"], "repetition_penalty: expected a number > 0"),  # 0 in float32
])
def test_out_of_range_flags(runner, tiny, args, fragment):
    result = sample(runner, str(tiny), *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and "Traceback" not in result.output


def test_temperature_too_small_for_float32_samples_greedily(runner, tiny):
    greedy = sample(runner, str(tiny), "-t", "0", "-n", "30", "-s", "1")
    tiny_t = sample(runner, str(tiny), "-t", "1e-38", "-n", "30", "-s", "1")
    assert tiny_t.exit_code == 0, tiny_t.output
    assert tiny_t.stdout == greedy.stdout and "Error" not in tiny_t.stderr


def test_more_threads_than_cores_is_warned_about(runner, tiny, monkeypatch):
    assert cli.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(cli, "usable_cores", lambda: 1)
    result = sample(runner, str(tiny), "--threads", "2", "-n", "4", "-s", "1")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --threads 2 is more than the 1 core this process may use: far slower than --threads 1",
                     "note: threads: this model reads 0.0 MiB a token, too little to split across threads "
                     "(under 32 MiB): running on one"]
    assert "note:" not in sample(runner, str(tiny), "--threads", "1", "-n", "4", "-s", "1").stderr


def test_programming_errors_keep_their_traceback(runner, tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("pos: expected a position in 0..127, found 128")  # the engine's check of its callers

    monkeypatch.setattr(importlib.import_module("llama2nb.generate"), "generate", broken)
    result = runner.invoke(cli.main, ["sample", str(tiny), "-n", "4"])
    assert isinstance(result.exception, ValueError) and "Error:" not in result.stderr


def test_os_errors_about_the_users_files_are_one_line(runner, tiny, monkeypatch):
    from llama2nb.forward import Transformer

    def denied(path, **options):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Transformer, "load", staticmethod(denied))
    assert_one_line_error(sample(runner, str(tiny)), f"Error: {tiny}: Permission denied")

    def fileless(path, **options):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Transformer, "load", staticmethod(fileless))
    result = runner.invoke(cli.main, ["sample", str(tiny)])
    assert isinstance(result.exception, OSError) and "Error:" not in result.stderr


def test_missing_checkpoint_and_tokenizer(runner, tiny, tmp_path):
    assert_one_line_error(sample(runner, str(tmp_path / "nope.bin")), "nope.bin", "no such")
    assert_one_line_error(sample(runner, "stories999M"), "stories999M", "llama2nb download")
    assert_one_line_error(sample(runner, str(tmp_path)), "directory")
    assert_one_line_error(sample(runner, str(tiny), "-z", str(tmp_path / "tok.bin")), "tok.bin", "no such")
    lonely = tmp_path / "lonely" / "model.bin"
    lonely.parent.mkdir()
    lonely.write_bytes(tiny.read_bytes())
    monkey_bundled = cli.BUNDLED_DIR
    try:
        cli.BUNDLED_DIR = tmp_path / "no-bundle"
        assert_one_line_error(sample(runner, str(lonely)), "no tokenizer", "-z")
    finally:
        cli.BUNDLED_DIR = monkey_bundled


def test_no_bundled_model_says_how_to_get_one(runner, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "BUNDLED_MODEL", tmp_path / "model.bin")
    assert_one_line_error(sample(runner), "llama2nb download stories15M", "llama2nb train")


def test_tokenizer_of_another_model(runner, tiny, tmp_path):
    pieces, scores = byte_vocab([" a", " b"])
    write_bin(tmp_path / "other.bin", pieces, scores)
    err = assert_one_line_error(sample(runner, str(tiny), "-z", str(tmp_path / "other.bin")), "other.bin")
    model_vocab = len(tiny_vocab()[0])
    assert f"expected {model_vocab}" in err and f"found {len(pieces)}" in err


def test_bad_files(runner, tiny, tmp_path):
    (tmp_path / "garbage.bin").write_bytes(os.urandom(1000))
    assert_one_line_error(sample(runner, str(tmp_path / "garbage.bin"), "-z", str(tiny.parent / "tokenizer.bin")),
                          "garbage.bin")
    (tmp_path / "cut.bin").write_bytes(tiny.read_bytes()[:-100])
    assert_one_line_error(sample(runner, str(tmp_path / "cut.bin"), "-z", str(tiny.parent / "tokenizer.bin")),
                          "cut.bin", "file size")
    (tmp_path / "bad-tok.bin").write_bytes((tiny.parent / "tokenizer.bin").read_bytes()[:-3])
    assert_one_line_error(sample(runner, str(tiny), "-z", str(tmp_path / "bad-tok.bin")), "bad-tok.bin")
    assert_one_line_error(runner.invoke(cli.main, ["info", str(tmp_path / "cut.bin")]), "cut.bin")
    assert_one_line_error(runner.invoke(cli.main, ["info", str(tmp_path / "none.bin")]), "none.bin")


def test_prompt_longer_than_seq_len(runner, tiny):
    err = assert_one_line_error(sample(runner, str(tiny), "-i", " ".join(["the cat"] * 80)), "prompt", "128")
    assert "161" in err  # BOS + 160 tokens


def test_unencodable_prompt(runner, tiny):
    assert_one_line_error(sample(runner, str(tiny), "-i", "lone \ud800"), "surrogate")


# ----------------------------------------------------------------------------------------------
# Real processes


def run_cli(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, env=env, cwd=REPO, **kwargs)


def test_sample_and_info_never_import_torch(tiny):
    code = textwrap.dedent(f"""
        import sys
        from llama2nb.cli import main
        for args in (["info", {str(tiny)!r}], ["sample", {str(tiny)!r}, "-n", "5"]):
            try:
                main(args)
            except SystemExit as e:
                assert not e.code, e.code
        assert "torch" not in sys.modules, "torch was imported"
        print("torch-free")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch-free" in done.stdout


# A seed with which write_tiny_model's model samples BOS (which ends the story) only after 18,184
# positions, seconds of sampling: with seed 1 it did after 1,316 (0.1 s), and a loaded machine
# could deliver Ctrl-C after the story had ended.
LONG_STORY_SEED = "9"


def test_ctrl_c_prints_the_summary_and_exits_130(tmp_path):
    # a long context so the run is still going when the signal arrives
    folder = tmp_path / "long"
    model = write_tiny_model(folder, seq_len=200_000)
    proc = subprocess.Popen([*CLI, "sample", str(model), "-n", "0", "-s", LONG_STORY_SEED], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, preexec_fn=default_ctrl_c)
    try:
        assert proc.stdout.read(20)  # sampling has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "tok/s" in err and "interrupted" in err
    assert out.endswith(b"\n")  # the story's last line is ended on a pipe too


def test_ctrl_c_summary_survives_a_reader_killed_by_the_same_ctrl_c(monkeypatch, capsys):
    """`llama2nb sample | cat` and Ctrl-C: cat dies too, so ending stdout's line fails with
    EPIPE; the summary goes to stderr all the same."""
    import io

    from llama2nb.generate import Generation

    class DeadPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        flush = write

    view = cli._View(interactive=False)
    view._mid_line = True  # the story was mid-line
    run = Generation(lambda r: iter(()), steps=10)
    run.stats.sampled_tokens, run.stats.positions = 3, 4
    monkeypatch.setattr(sys, "stdout", DeadPipe())
    view.interrupted(run)
    err = capsys.readouterr().err
    assert err.startswith("3 tokens sampled in 4 positions") and err.rstrip().endswith("interrupted"), err


def interrupted_on_a_terminal(args: list[str], on_pty: set[str], ready) -> tuple[subprocess.Popen, str]:
    """Run the CLI with the named streams ("stdin", "stdout", "stderr") on a pseudo-terminal,
    the others piped, send SIGINT once `ready(proc, pty)` returns; the process, and all the
    terminal received."""
    import pty

    master, slave = pty.openpty()
    streams = {name: slave if name in on_pty else default
               for name, default in (("stdin", subprocess.DEVNULL), ("stdout", subprocess.PIPE),
                                     ("stderr", subprocess.PIPE))}
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, preexec_fn=default_ctrl_c, **streams)
    os.close(slave)
    try:
        ready(proc, master)
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # the signal fell in a gap (see the chat prompt test)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    finally:
        proc.kill()
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc, b"".join(chunks).decode(errors="replace")


def test_terminal_stderr_loading_line_is_cleared_and_ctrl_c_starts_a_new_line(tmp_path):
    """stdout to a file, stderr on a terminal: "loading ..." shows while the kernels load, then
    is erased; after Ctrl-C (whose ^C the terminal echoes) the summary starts a line of its own."""
    model = write_tiny_model(tmp_path / "long", seq_len=200_000)
    proc, err = interrupted_on_a_terminal(["sample", str(model), "-n", "0", "-s", LONG_STORY_SEED], {"stderr"},
                                          lambda proc, pty: proc.stdout.read(20))
    assert proc.returncode == 130, err
    loading = err.index("loading model.bin, compiling kernels")
    cleared = err.index("\r\x1b[K", loading)
    assert re.match(r"\r\x1b\[K\r?\n\d+ tokens sampled in \d+ positions", err[cleared:]), repr(err[cleared:])


def test_ctrl_c_at_the_chat_prompt_puts_the_summary_below_it(tiny):
    def at_the_prompt(proc, pty):
        seen = b""
        while not seen.endswith(b"User: "):
            seen += os.read(pty, 1)
        # readline prints the prompt before it waits: a signal in between is noted but wakes
        # nothing (a CPython race no typing person hits), so give it a moment
        time.sleep(0.5)

    proc, rest = interrupted_on_a_terminal(["sample", str(tiny), "-m", "chat", "-s", "1"], {"stdin", "stdout"},
                                           at_the_prompt)
    assert proc.returncode == 130, rest
    assert re.match(r"\r?\n(\x1b\[[0-9;]*m)*0 tokens sampled in 0 positions", rest), repr(rest)


def test_closed_stdout_ends_quietly(tiny):
    proc = subprocess.Popen([*CLI, "sample", str(tiny), "-n", "0", "-s", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    first = proc.stdout.read(5)  # `| head -c 5`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert first
    assert "Traceback" not in err and "Error" not in err, err
    assert proc.returncode in (0, 141), (proc.returncode, err)  # 0 if it finished before the close


def test_ascii_terminal_still_works(tiny):
    env = dict(os.environ, PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C")
    done = run_cli("sample", str(tiny), "-i", "café 日本 🦙", "-n", "20", "-s", "4", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"caf? ??"), done.stdout[:40]
    assert b"Traceback" not in done.stderr


@requires(LLAMA2_BIN)
@requires(LLAMA2_MODEL)
@pytest.mark.parametrize("tokenizer", [LLAMA2_BIN, LLAMA2_MODEL], ids=["bin", "model"])
def test_llama2_tokenizer_on_a_random_32000_vocab_model(runner, tmp_path, tokenizer):
    config = tiny_config(32000, seq_len=24)
    write_checkpoint(tmp_path / "m.bin", config, random_weights(config, seed=1))
    result = sample(runner, str(tmp_path / "m.bin"), "-z", str(tokenizer), "-i", "Once upon a time", "-s", "42")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Once upon a time") and "24 positions" in result.stderr


def test_control_characters_never_reach_a_terminal():
    assert cli._for_terminal("a\x1b[31mb\x07c\td\ne\x9bf\rg") == "a[31mbc\td\nefg"
    assert cli._for_terminal("café 日本 🦙") == "café 日本 🦙"


def test_model_names_resolve_through_the_hub_cache(runner, tiny, monkeypatch):
    from llama2nb import hub

    monkeypatch.setattr(hub, "resolve_model", lambda name: (tiny, tiny.parent / "tokenizer.bin")
                        if name == "stories15M" else None)
    result = sample(runner, "stories15M", "-n", "8", "-s", "1")
    assert result.exit_code == 0, result.output
    assert "8 positions" in result.stderr
    assert runner.invoke(cli.main, ["info", "stories15M"]).exit_code == 0
    assert_one_line_error(sample(runner, "stories42M"), "stories42M", "llama2nb download stories42M")


def test_live_view_shows_the_end_of_the_story_as_the_full_render_does():
    import io

    from rich.console import Console

    view = cli._View(interactive=True)
    tail = cli._Tail(view)
    words = "Once upon a time there was a little girl named Lily who loved the sun".split()
    view.text_parts = [" " + words[i % len(words)] + ("\n" if i % 97 == 0 else "") for i in range(5000)]
    shown_console = Console(file=io.StringIO(), width=80, height=20)
    shown_console.print(tail)
    shown = [line.rstrip() for line in shown_console.file.getvalue().splitlines()[:-1]]  # minus the status
    full_console = Console(file=io.StringIO(), width=80)
    full_console.print("".join(view.text_parts), markup=False, highlight=False)
    full = [line.rstrip() for line in full_console.file.getvalue().splitlines()]
    assert len(shown) == 19 and shown == full[-19:]
