"""`llama2nb train`: the tiny preset learns, resume is exact, a 2-process torchrun matches one
process, and the outputs (ckpt.pt, model.bin, loss.csv, loss.png) are there."""

from __future__ import annotations

import csv
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llama2nb.cli import main
from llama2nb.files.llama2c import read_checkpoint
from llama2nb.training.settings import config_from
from llama2nb.training.train import get_lr
from tests.test_training_helpers import prepare_data

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_data(tmp_path_factory.mktemp("train-data"))


def read_losses(out_dir: Path) -> list[dict]:
    with open(out_dir / "loss.csv") as f:
        return list(csv.DictReader(f))


def run(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)


def test_tiny_preset_loss_falls(data, tmp_path):
    out = tmp_path / "out"
    run(["train", "--preset", "tiny", "--data", str(data["shards"]), "--out-dir", str(out),
         "--max-iters", "40", "--eval-interval", "20", "--quiet"])
    rows = read_losses(out)
    train_losses = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert len(train_losses) == 40
    first, last = np.mean(train_losses[:3]), np.mean(train_losses[-3:])
    print(f"tiny preset: train loss {first:.3f} -> {last:.3f} over 40 iterations")
    assert last < first - 1.5  # ln(300) = 5.7 at the start
    vals = [float(r["eval_val_loss"]) for r in rows if r["eval_val_loss"]]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.5
    for name in ("ckpt.pt", "model.bin", "loss.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = read_checkpoint(out / "model.bin")
    assert ckpt.config.version == 0 and ckpt.config.vocab_size == data["vocab"]
    assert not list(out.glob(".*tmp*")), "temp files left behind"


def test_resume_is_exact(data, tmp_path):
    """8 iterations straight == 4 + --resume + 4 (dropout on, gradient accumulation 2)."""
    common = ["--preset", "tiny", "--data", str(data["shards"]), "--max-iters", "8", "--eval-interval", "3",
              "--dropout", "0.1", "--gradient-accumulation-steps", "2", "--batch-size", "4", "--quiet"]
    run(["train", *common, "--out-dir", str(tmp_path / "a")])
    run(["train", *common, "--out-dir", str(tmp_path / "b"), "--stop-after", "4"])
    assert len([r for r in read_losses(tmp_path / "b") if r["train_loss"]]) == 4
    run(["train", "--resume", "--out-dir", str(tmp_path / "b"), "--quiet"])
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "eval_train_loss", "eval_val_loss", "lr"):
            assert (ra[key] == "") == (rb[key] == ""), (ra, rb)
            if ra[key]:
                assert abs(float(ra[key]) - float(rb[key])) <= 1e-6, (key, ra, rb)
    sa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert sa["iter_num"] == sb["iter_num"] == 8
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes()


def test_resume_refuses_other_shape(data, tmp_path):
    run(["train", "--preset", "tiny", "--data", str(data["shards"]), "--out-dir", str(tmp_path), "--max-iters", "1",
         "--quiet"])
    r = CliRunner().invoke(main, ["train", "--resume", "--out-dir", str(tmp_path), "--dim", "64"])
    assert r.exit_code == 1 and "--dim: expected the resumed run's value 32" in r.output
    assert "Traceback" not in r.output


def test_train_errors_are_one_line(data, tmp_path):
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: ") and "meta.json" in r.output
    r = CliRunner().invoke(main, ["train", "--resume", "--out-dir", str(tmp_path / "none")])
    assert r.exit_code == 1 and "ckpt.pt" in r.output
    torn = tmp_path / "torn"
    shutil.copytree(data["shards"], torn)
    (torn / "train-000.bin").write_bytes((torn / "train-000.bin").read_bytes()[:-1])
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(torn)])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: {torn / 'train-000.bin'}: expected a non-empty whole number of uint16 tokens, found "
        f"{(torn / 'train-000.bin').stat().st_size} bytes"]


def test_lr_schedule_matches_llama2c():
    cfg = config_from(None, dict(learning_rate=1e-3, warmup_iters=10, max_iters=110, min_lr=1e-4))
    assert get_lr(cfg, 0) == 0 and get_lr(cfg, 5) == pytest.approx(5e-4)
    assert get_lr(cfg, 10) == pytest.approx(1e-3)
    assert get_lr(cfg, 60) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(cfg, 110) == pytest.approx(1e-4) and get_lr(cfg, 500) == 1e-4


def test_presets_match_llama2c_shapes():
    from llama2nb.training.train import model_args

    expect = {"260K": (64, 5, 8, 4, 512), "15M": (288, 6, 6, 6, 256), "42M": (512, 8, 8, 8, 1024),
              "110M": (768, 12, 12, 12, 1024)}
    for name, (dim, layers, heads, kv, seq) in expect.items():
        cfg = config_from(name, {"vocab_size": 512 if name == "260K" else 32000})
        args = model_args(cfg)
        assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.max_seq_len) == (dim, layers, heads, kv, seq)
    assert model_args(config_from("260K", {"vocab_size": 512})).ffn_dim == 172  # stories260K.bin's hidden_dim
    assert model_args(config_from("15M", {"vocab_size": 32000})).ffn_dim == 768  # stories15M.bin's


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_torchrun_two_processes_match_one(data, tmp_path):
    """2 processes (gloo on CPU) with gradient accumulation 2 see the same batches as one process
    with accumulation 2, and average the same gradients: the losses agree."""
    common = ["train", "--preset", "tiny", "--data", str(data["shards"]), "--max-iters", "6",
              "--eval-interval", "3", "--gradient-accumulation-steps", "2", "--quiet"]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "llama2nb.training", *common,
                           "--out-dir", str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "2 processes" in proc.stderr
    run([*common, "--out-dir", str(tmp_path / "one")])
    ddp, one = read_losses(tmp_path / "ddp"), read_losses(tmp_path / "one")
    assert len(ddp) == len(one) == 7
    for rd, ro in zip(ddp, one):
        for key in ("train_loss", "eval_val_loss"):
            if ro[key]:
                assert abs(float(rd[key]) - float(ro[key])) < 1e-4, (key, rd, ro)


def evaluated(output: str) -> list[int]:
    return [int(i) for i in re.findall(r"iter (\d+): train loss", output)]


def test_eval_on_resume(data, tmp_path):
    """Evaluation comes before the update, every --eval-interval iterations and at --max-iters.
    A resumed run does not evaluate again at the iteration it starts from: its ckpt.pt was saved
    right after evaluating there, or at a --stop-after where none was due. --eval-only
    evaluates once wherever the run stands, and writes nothing."""
    common = ["--preset", "tiny", "--data", str(data["shards"]), "--max-iters", "6", "--eval-interval", "3",
              "--eval-iters", "1", "--batch-size", "2", "--quiet"]
    for stop, first_leg, second_leg in ((3, [0, 3], [6]), (2, [0], [3, 6])):
        out = tmp_path / f"stop{stop}"
        r = CliRunner().invoke(main, ["train", *common, "--out-dir", str(out), "--stop-after", str(stop)])
        assert r.exit_code == 0 and evaluated(r.output) == first_leg, r.output
        if stop == 2:
            before = (out / "ckpt.pt").read_bytes()
            r = CliRunner().invoke(main, ["train", "--resume", "--out-dir", str(out), "--eval-only", "--quiet"])
            assert r.exit_code == 0 and evaluated(r.output) == [2], r.output
            assert (out / "ckpt.pt").read_bytes() == before
        r = CliRunner().invoke(main, ["train", "--resume", "--out-dir", str(out), "--quiet"])
        assert r.exit_code == 0 and evaluated(r.output) == second_leg, r.output
        rows = read_losses(out)
        assert [int(row["iter"]) for row in rows if row["eval_val_loss"]] == [0, 3, 6]
        assert [int(row["iter"]) for row in rows if row["train_loss"]] == list(range(6))


def test_eval_due():
    from llama2nb.training.train import eval_due

    cfg = config_from("tiny", {"eval_interval": 3, "max_iters": 7})
    assert [it for it in range(8) if eval_due(cfg, it, None)] == [0, 3, 6, 7]
    assert [it for it in range(3, 8) if eval_due(cfg, it, 3)] == [6, 7]
    assert [it for it in range(4, 8) if eval_due(cfg, it, 4)] == [6, 7]
    cfg.eval_only = True
    assert eval_due(cfg, 4, 4) and eval_due(cfg, 5, None)
