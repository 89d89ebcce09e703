"""The training loop: llama2.c's train.py as a function, with exact resume and DDP.

Batches are a pure function of (seed, iteration, micro-step, rank): every epoch walks a seeded
permutation of all non-overlapping (seq_len + 1)-token chunks of the training shards, and
DDP rank r takes every world-th batch of that stream. So the data position is the iteration
number, and `--resume` (model, AdamW state, iteration, RNG states from ckpt.pt) continues a run
exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write
from ..files.llama2c import write_checkpoint
from .data import read_meta, shard_files
from .model import ModelArgs, Transformer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data: str = "data/tok512"  # a shard directory written by `llama2nb data pretokenize`
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 100
    eval_only: bool = False
    always_save_checkpoint: bool = False
    # model
    vocab_size: int = 0  # 0: from the shard directory's meta.json
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 6
    multiple_of: int = 32
    hidden_dim: int = 0  # 0: from dim and multiple_of
    max_seq_len: int = 256
    dropout: float = 0.0
    shared_classifier: bool = True
    # optimization
    batch_size: int = 128
    gradient_accumulation_steps: int = 4
    learning_rate: float = 5e-4
    max_iters: int = 100000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    decay_lr: bool = True
    warmup_iters: int = 1000
    lr_decay_iters: int = 0  # 0: max_iters
    min_lr: float = 0.0
    # system
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    seed: int = 1337


PRESETS: dict[str, dict] = {
    # for tests and quick checks: trains in seconds on one CPU core
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                 batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, max_iters=60,
                 warmup_iters=5, eval_interval=20, eval_iters=4, weight_decay=0.0, dropout=0.0),
    # llama2.c's stories260K run
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4, max_seq_len=512,
                 batch_size=128, gradient_accumulation_steps=1, learning_rate=1e-3, dropout=0.05,
                 weight_decay=0.01, max_iters=100000, beta2=0.99, warmup_iters=1000,
                 eval_interval=2000, eval_iters=100),
    # llama2.c's train.py defaults (stories15M)
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32, max_seq_len=256,
                batch_size=128, gradient_accumulation_steps=4),
    "42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=32, max_seq_len=1024,
                batch_size=32, gradient_accumulation_steps=16),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=32, max_seq_len=1024,
                 batch_size=32, gradient_accumulation_steps=16),
}

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "max_seq_len",
                "vocab_size", "shared_classifier")


def config_from(preset: str | None, overrides: dict) -> TrainConfig:
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
    return TrainConfig(**values)


def model_args(cfg: TrainConfig) -> ModelArgs:
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim or None, multiple_of=cfg.multiple_of,
                     max_seq_len=cfg.max_seq_len, dropout=cfg.dropout, shared_classifier=cfg.shared_classifier)


def get_lr(cfg: TrainConfig, it: int) -> float:
    """llama2.c's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * it / cfg.warmup_iters
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# Data


class ChunkStream:
    """The non-overlapping (seq_len + 1)-token chunks of a split's shards, read from memmaps."""

    def __init__(self, shard_dir: str, split: str, seq_len: int, dtype: np.dtype):
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in shard_files(shard_dir, split)]
        if not self.shards:
            raise ValueError(f"{shard_dir}: expected {split}-*.bin shards (run `llama2nb data pretokenize`), found none")
        self.seq_len = seq_len
        counts = [max(0, len(s) // seq_len - 1) for s in self.shards]
        self.n_chunks = int(sum(counts))
        if self.n_chunks == 0:
            total = sum(len(s) for s in self.shards)
            raise ValueError(f"{shard_dir}: {split} split: expected at least {2 * seq_len} tokens for "
                             f"seq_len {seq_len}, found {total}")
        self.starts = np.cumsum([0] + counts)
        self._perm: dict[tuple, np.ndarray] = {}

    def chunk(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        start = (index - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def permutation(self, seed: int, epoch: int, salt: int) -> np.ndarray:
        key = (seed, epoch, salt)
        if key not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[key] = np.random.default_rng([seed, salt, epoch]).permutation(self.n_chunks)
        return self._perm[key]

    def batch(self, seed: int, salt: int, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` of the stream: chunks index*B .. index*B+B-1 of the epochs'
        concatenated permutations."""
        rows = []
        for k in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(k, self.n_chunks)
            rows.append(self.chunk(int(self.permutation(seed, epoch, salt)[pos])))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------
# Saving


def _plain_state_dict(model: torch.nn.Module) -> dict:
    sd = model.state_dict()
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}


def save_loss_files(out_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["iter", "lr", "train_loss", "eval_train_loss", "eval_val_loss"])
    for row in history:
        writer.writerow([row["iter"]] + [("" if row.get(k) is None else f"{row[k]:.6g}" if k == "lr" else
                                          f"{row[k]:.8f}") for k in ("lr", "loss", "eval_train", "eval_val")])
    with atomic_write(out_dir / "loss.csv", "w") as f:
        f.write(buf.getvalue())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [(r["iter"], r["loss"]) for r in history if r.get("loss") is not None]
    if steps:
        ax.plot(*zip(*steps), lw=0.8, alpha=0.7, label="train (per iteration)")
    for key, label in (("eval_train", "train (eval)"), ("eval_val", "val (eval)")):
        pts = [(r["iter"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def load_resume_state(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"{path}: --resume: expected a ckpt.pt from an earlier run, found nothing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: expected a llama2nb training checkpoint, found unreadable data ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _setup_ddp(device: str) -> Dist:
    if int(os.environ.get("RANK", -1)) < 0:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    return d


def train(cfg: TrainConfig, resume: bool = False, console=None, progress: bool = True,
          stop_after: int | None = None, state: dict | None = None) -> dict:
    """Run (or continue, with `resume`: from `state` or OUT_DIR/ckpt.pt) a training run; returns
    a summary dict. `stop_after` ends the run after that many iterations of this call, writing
    ckpt.pt, so that a later `resume` continues it."""
    from rich.console import Console

    console = console or Console(stderr=True)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dd = _setup_ddp(device)
    if dd.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dd.local_rank}"
        torch.cuda.set_device(device)
    try:
        device_type = torch.device(device).type  # cpu, cuda, mps
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected auto, cpu, cuda, cuda:N or mps, found {device!r}") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device this torch can use, found {device!r} (no CUDA available)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device: expected a device this torch can use, found {device!r} (no MPS available)")
    out_dir = Path(cfg.out_dir)

    if resume and state is None:
        state = load_resume_state(out_dir)
    if not resume:
        state = None
    meta = read_meta(cfg.data)
    if not cfg.vocab_size:
        cfg.vocab_size = meta["vocab_size"]
    if cfg.vocab_size < meta["vocab_size"]:
        raise ValueError(f"--vocab-size: expected at least the data's vocabulary ({meta['vocab_size']} in "
                         f"{cfg.data}/meta.json), found {cfg.vocab_size}")
    if cfg.gradient_accumulation_steps % dd.world:
        raise ValueError(f"--gradient-accumulation-steps: expected a multiple of the {dd.world} processes, "
                         f"found {cfg.gradient_accumulation_steps}")
    grad_accum = cfg.gradient_accumulation_steps // dd.world
    tokens_per_iter = grad_accum * dd.world * cfg.batch_size * cfg.max_seq_len

    train_stream = ChunkStream(cfg.data, "train", cfg.max_seq_len, meta["dtype"])
    val_stream = ChunkStream(cfg.data, "val", cfg.max_seq_len, meta["dtype"])

    torch.manual_seed(cfg.seed)
    args = model_args(cfg)
    args.to_config().validate("model shape")  # heads dividing dim, kv heads dividing heads, ...
    model = Transformer(args).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    iter_num, best_val, history = 0, float("inf"), []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        iter_num, best_val, history = state["iter_num"], state["best_val_loss"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if device_type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    else:
        torch.manual_seed(cfg.seed + dd.rank)  # dropout differs per rank, as llama2.c does
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dd.local_rank] if device_type == "cuda" else None)

    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    ctx = (contextlib.nullcontext() if ptdtype == torch.float32
           else torch.autocast(device_type=device_type, dtype=ptdtype))
    scaler = torch.amp.GradScaler(device_type, enabled=(cfg.dtype == "float16"))

    def batch(stream: ChunkStream, salt: int, index: int):
        x, y = stream.batch(cfg.seed, salt, index, cfg.batch_size)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        raw_model.eval()
        out = {}
        for name, stream, salt in (("train", train_stream, 1), ("val", val_stream, 2)):
            losses = []
            for k in range(cfg.eval_iters):
                x, y = batch(stream, salt, k)  # the same batches at every evaluation
                with ctx:
                    _, loss = raw_model(x, y)
                losses.append(loss.item())
            out[name] = float(np.mean(losses))
        raw_model.train()
        return out

    def save(it: int, improved: bool) -> None:
        ckpt = {
            "model": _plain_state_dict(raw_model),
            "optimizer": optimizer.state_dict(),
            "model_args": args.to_dict(),
            "config": asdict(cfg),
            "iter_num": it,
            "best_val_loss": best_val,
            "history": history,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else None},
        }
        with atomic_path(out_dir / "ckpt.pt") as tmp:
            torch.save(ckpt, tmp)
        if improved:
            write_checkpoint(out_dir / "model.bin", args.to_config(version=0), raw_model.export_weights())
        save_loss_files(out_dir, history)

    def do_eval(it: int) -> None:
        nonlocal best_val
        losses = estimate_loss()
        row = next((r for r in history if r["iter"] == it), None)
        if row is None:
            row = {"iter": it}
            history.append(row)
        row["eval_train"], row["eval_val"] = losses["train"], losses["val"]
        improved = losses["val"] < best_val or cfg.always_save_checkpoint
        if improved:
            best_val = min(best_val, losses["val"]) if not cfg.always_save_checkpoint else losses["val"]
        console.print(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      + (f" -> {out_dir / 'model.bin'}" if improved and it > 0 else ""))
        if not cfg.eval_only:
            save(it, improved and it > 0)

    if dd.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"model: {raw_model.n_params():,} parameters: dim {args.dim}, {args.n_layers} layers, "
                      f"{args.n_heads} heads ({args.kv_heads} kv), hidden {args.ffn_dim}, vocab {args.vocab_size}, "
                      f"seq {args.max_seq_len}; "
                      f"{tokens_per_iter:,} tokens per iteration; device {device}, dtype {cfg.dtype}"
                      + (f", {dd.world} processes" if dd.world > 1 else ""))

    bar = None
    if dd.master and progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(bar_width=15), MofNCompleteColumn(),
                       TextColumn("{task.description}"), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                       transient=False)
        task = bar.add_task("", total=cfg.max_iters, completed=iter_num)
        bar.start()
    start_iter = iter_num
    t_last, tok_rate = time.perf_counter(), 0.0
    try:
        while True:
            # evaluate before the update of iteration iter_num (the state a resume starts from);
            # a resumed run has already evaluated and saved at its first iteration
            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and \
                    not (resume and iter_num == start_iter and not cfg.eval_only):
                if dd.master:
                    do_eval(iter_num)
                if dd.world > 1:
                    torch.distributed.barrier()
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break
            if stop_after is not None and iter_num - start_iter >= stop_after:
                if dd.master:
                    save(iter_num, False)
                break
            lr = get_lr(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(grad_accum):
                x, y = batch(train_stream, 0, (iter_num * grad_accum + micro) * dd.world + dd.rank)
                sync = contextlib.nullcontext()
                if dd.world > 1 and micro < grad_accum - 1:
                    sync = model.no_sync()
                with sync:
                    with ctx:
                        _, loss = model(x, y)
                        loss = loss / grad_accum
                    scaler.scale(loss).backward()
                total += loss.item()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if dd.world > 1:
                t = torch.tensor([total], device=device)
                torch.distributed.all_reduce(t)
                total = t.item() / dd.world
            if history and history[-1]["iter"] == iter_num:  # the row of this iteration's eval
                history[-1].update(lr=lr, loss=total)
            else:
                history.append({"iter": iter_num, "lr": lr, "loss": total})
            iter_num += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            rate = tokens_per_iter / dt if dt > 0 else 0.0
            tok_rate = rate if tok_rate == 0 else 0.9 * tok_rate + 0.1 * rate
            if bar is not None and (iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters):
                bar.update(task, completed=iter_num,
                           description=f"loss {total:.3f} lr {lr:.1e} {tok_rate:,.0f} tok/s")
    finally:
        if bar is not None:
            bar.stop()
        if dd.world > 1:
            torch.distributed.destroy_process_group()
    train_losses = [r["loss"] for r in history if r.get("loss") is not None]
    return {"iter_num": iter_num, "best_val_loss": best_val, "history": history,
            "first_loss": train_losses[0] if train_losses else None,
            "last_loss": train_losses[-1] if train_losses else None,
            "tokens_per_iter": tokens_per_iter, "tok_per_s": tok_rate}
