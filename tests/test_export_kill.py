"""Kill an export and a training run in the middle of a write: the target is always the old file
or the complete new one, never torn.

No timing: the child process runs the real command with a hook (DRIVER) that stops it at a
chosen point of the atomic write, says so on stdout and waits there; the test reads that line,
then kills. The points: mid-write (some bytes of the temp file written) and just before the
rename (the temp file complete). SIGKILL leaves the old target and the temp file as the only
debris; SIGINT lets the writer clean up, leaving the old target and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2nb.files.llama2c import read_checkpoint
from llama2nb.training.model import ModelArgs, Transformer
from tests.conftest import default_ctrl_c
from tests.test_training_helpers import prepare_data

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

# Runs `python -m llama2nb.training ARGS` with two hooks, each waiting forever once reached:
# PAUSE_BEFORE_RENAME=NAME stops os.replace(temp, .../NAME); PAUSE_AFTER_BYTES=N stops a file
# opened by llama2nb.atomic for writing once N bytes are in it.
DRIVER = r"""
import os, runpy, sys, threading
import llama2nb.atomic as atomic

def wait_here(what, temp):
    print(f"PAUSED {what} {os.path.abspath(temp)}", flush=True)
    threading.Event().wait()

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == os.environ.get("PAUSE_BEFORE_RENAME"):
        wait_here("rename", src)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace

class Paused:
    def __init__(self, f, limit):
        self.f, self.limit, self.written = f, limit, 0
    def write(self, data):
        n = self.f.write(data)
        self.written += n
        if self.written >= self.limit:
            self.f.flush()
            wait_here("write", self.f.name)
        return n
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self.f, name)

def paused_open(file, mode="r", *args, **kwargs):
    f = open(file, mode, *args, **kwargs)
    limit = os.environ.get("PAUSE_AFTER_BYTES")
    return Paused(f, int(limit)) if limit and mode in ("w", "wb") else f
atomic.open = paused_open

sys.argv = ["llama2nb.training", *sys.argv[1:]]
runpy.run_module("llama2nb.training", run_name="__main__")
"""


def start(args: list[str], cwd: Path, **pause: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **pause)
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)


def run_through(args: list[str], cwd: Path) -> None:
    """Run the command to its end, unpaused: in this process, as test_training.py and
    test_export.py run theirs (a process of its own only matters to a run that is killed)."""
    from click.testing import CliRunner

    from llama2nb.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output + repr(result.exception)


def wait_for_pause(proc: subprocess.Popen) -> tuple[str, Path]:
    """Block until the child reports where it stopped: ("rename" | "write", temp file)."""
    for line in proc.stdout:
        if line.startswith("PAUSED "):
            what, temp = line.split(maxsplit=2)[1:]
            return what, Path(temp.strip())
    proc.wait()
    raise AssertionError(f"the child ended (exit {proc.returncode}) without reaching the pause: {proc.stderr.read()}")


def stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    return code


def debris(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("export-kill")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=32))
    torch.save({"model": model.state_dict(), "model_args": model.args.to_dict()}, folder / "ckpt.pt")
    run_through(["export", "ckpt.pt", "full.bin", "--version", "1"], folder)
    return {"folder": folder, "size": (folder / "full.bin").stat().st_size}


OLD = b"the old file, which must survive intact"


@pytest.mark.parametrize("pause,sig,temp_left", [
    ({"PAUSE_AFTER_BYTES": "4096"}, signal.SIGKILL, "torn"),
    ({"PAUSE_BEFORE_RENAME": "model.bin"}, signal.SIGKILL, "complete"),
    ({"PAUSE_AFTER_BYTES": "4096"}, signal.SIGINT, None),
], ids=["kill-mid-write", "kill-before-rename", "interrupt-mid-write"])
def test_interrupted_export_leaves_the_old_file(exported, pause, sig, temp_left):
    folder, size = exported["folder"], exported["size"]
    out = folder / "model.bin"
    out.write_bytes(OLD)
    proc = start(["export", "ckpt.pt", "model.bin", "--version", "1"], folder, **pause)
    what, temp = wait_for_pause(proc)
    assert temp.parent == folder and temp.name.startswith(".model.bin.tmp-") and temp.is_file()
    assert what == ("write" if "PAUSE_AFTER_BYTES" in pause else "rename")
    assert out.read_bytes() == OLD  # the target is untouched while the temp file is written
    code = stop(proc, sig)
    assert out.read_bytes() == OLD
    if temp_left is None:  # an exception (Ctrl-C) removes the temp file
        assert code != 0 and debris(folder) == []
        return
    assert code == -signal.SIGKILL and debris(folder) == [temp.name]
    written = temp.stat().st_size
    assert 4096 <= written < size if temp_left == "torn" else written == size
    temp.unlink()


def test_uninterrupted_export_replaces_the_file(exported):
    folder = exported["folder"]
    (folder / "model.bin").write_bytes(OLD)
    run_through(["export", "ckpt.pt", "model.bin", "--version", "1"], folder)
    assert (folder / "model.bin").read_bytes() == (folder / "full.bin").read_bytes()
    assert debris(folder) == []


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A finished one-iteration run (ckpt.pt, model.bin, loss.csv) to resume from."""
    root = tmp_path_factory.mktemp("kill-train")
    shards = prepare_data(root / "d", n_train=150, n_val=20)["shards"]
    out = root / "run"
    run_through(["train", "--preset", "tiny", "--data", str(shards), "--out-dir", str(out), "--eval-iters", "1",
                 "--eval-interval", "1", "--quiet", "--batch-size", "2", "--max-seq-len", "32", "--warmup-iters", "0",
                 "--always-save-checkpoint", "--max-iters", "1"], root)
    return out


@pytest.mark.parametrize("name", ["ckpt.pt", "model.bin", "loss.csv"])
def test_killed_training_keeps_each_file_whole_and_resumes(tmp_path, first_run, name):
    """A resumed run killed as it renames NAME in its first save (at iteration 2: ckpt.pt, then
    model.bin, then loss.csv): NAME and the files after it are the old ones, the ones before it
    the complete new ones; the run resumes from what survived."""
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    files = ("ckpt.pt", "model.bin", "loss.csv")
    before = {n: (out / n).read_bytes() for n in files}
    proc = start(["train", "--resume", "--out-dir", str(out), "--max-iters", "50"], tmp_path,
                 PAUSE_BEFORE_RENAME=name)
    what, temp = wait_for_pause(proc)
    assert what == "rename" and temp.name.startswith(f".{name}.tmp-")
    assert stop(proc, signal.SIGKILL) == -signal.SIGKILL
    assert debris(out) == [temp.name]
    temp.unlink()
    killed_at = files.index(name)
    for n in files:
        assert ((out / n).read_bytes() == before[n]) == (files.index(n) >= killed_at), n
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["iter_num"] == (2 if killed_at > 0 else 1)
    read_checkpoint(out / "model.bin")
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("iter,") and all(line.count(",") == 4 for line in lines)
    run_through(["train", "--resume", "--out-dir", str(out), "--max-iters", str(state["iter_num"] + 1)], tmp_path)
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == state["iter_num"] + 1
