"""Kill an export and a training run in the middle of a write (SIGKILL while the temp file is
being written): the target is always the old file or the complete new one, never torn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama2nb.files.llama2c import read_checkpoint
from llama2nb.training.model import ModelArgs, Transformer
from tests.test_training_helpers import prepare_data

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "llama2nb.training", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when_writing(proc: subprocess.Popen, folder: Path, prefixes: tuple[str, ...], delay: float,
                      timeout: float = 120) -> str | None:
    """SIGKILL `proc` `delay` seconds after a temp file (.NAME.tmp-PID) for one of `prefixes`
    appears in `folder`; returns that temp file's name (None if the process ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            names = []
        hit = next((n for n in names if any(n.startswith(f".{p}.tmp-") for p in prefixes)), None)
        if hit:
            if delay:
                time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return hit
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError("no temp file appeared")


def test_kill_export_mid_write(tmp_path):
    torch.manual_seed(0)
    # ~30 MB of fp32 weights: writing takes long enough to be caught in the middle
    model = Transformer(ModelArgs(dim=256, n_layers=8, n_heads=8, vocab_size=4096, max_seq_len=64))
    torch.save({"model": model.state_dict(), "model_args": model.args.to_dict()}, tmp_path / "ckpt.pt")
    out = tmp_path / "model.bin"
    old = b"the old file, which must survive intact"
    caught = 0
    for trial, (version, delay) in enumerate([(0, 0.0), (2, 0.0), (1, 0.01)]):
        out.write_bytes(old)
        proc = start(["export", "ckpt.pt", "model.bin", "--version", str(version)], tmp_path)
        hit = kill_when_writing(proc, tmp_path, ("model.bin",), delay)
        data = out.read_bytes()
        if hit is None:  # finished before the kill: then it must be complete
            assert read_checkpoint(out).config.version == version
            continue
        caught += 1
        assert proc.returncode == -signal.SIGKILL
        if data != old:  # the rename had happened: the new file, whole
            assert read_checkpoint(out).config.version == version
        (tmp_path / hit).unlink(missing_ok=True)  # the torn temp file is the only debris
    print(f"export killed mid-write {caught} of 3 times; old file intact or new file whole each time")
    assert caught >= 2
    # and an uninterrupted export replaces the file and leaves no temp file behind
    proc = start(["export", "ckpt.pt", "model.bin", "--version", "1"], tmp_path)
    assert proc.wait() == 0, proc.stderr.read()
    assert read_checkpoint(out).config.version == 1
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_kill_training_mid_write(tmp_path):
    data = prepare_data(tmp_path / "d", n_train=150, n_val=20)
    out = tmp_path / "run"
    # a model big enough (~3M parameters, ckpt.pt ~ 36 MB with AdamW state) to be caught mid-save
    common = ["train", "--data", str(data["shards"]), "--out-dir", str(out), "--dim", "256", "--n-layers", "4",
              "--n-heads", "4", "--n-kv-heads", "4", "--max-seq-len", "32", "--batch-size", "2",
              "--gradient-accumulation-steps", "1", "--eval-iters", "1", "--eval-interval", "1", "--quiet",
              "--warmup-iters", "0"]
    proc = start([*common, "--max-iters", "1"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    before = {n: (out / n).read_bytes() for n in ("ckpt.pt", "model.bin", "loss.csv")}
    caught = 0
    for delay in (0.0, 0.02):
        proc = start(["train", "--resume", "--out-dir", str(out), "--max-iters", "50"], tmp_path)
        hit = kill_when_writing(proc, out, ("ckpt.pt", "model.bin", "loss.csv", "loss.png"), delay, timeout=300)
        assert hit is not None, proc.stderr.read()
        caught += 1
        # every file is the old one or a complete new one
        state = torch.load(out / "ckpt.pt", weights_only=False)
        assert state["iter_num"] >= 1 and set(state["model"]) == set(before_keys(before))
        read_checkpoint(out / "model.bin")
        lines = (out / "loss.csv").read_text().splitlines()
        assert lines[0].startswith("iter,") and all(line.count(",") == 4 for line in lines)
        for n in os.listdir(out):
            if ".tmp-" in n:
                (out / n).unlink()
    print(f"training killed mid-write {caught} times; ckpt.pt, model.bin, loss.csv intact each time")
    assert caught == 2
    # the run resumes from what survived
    proc = start(["train", "--resume", "--out-dir", str(out), "--max-iters", str(state["iter_num"] + 1)], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()


def before_keys(before: dict) -> set:
    import io

    return set(torch.load(io.BytesIO(before["ckpt.pt"]), weights_only=False)["model"])
