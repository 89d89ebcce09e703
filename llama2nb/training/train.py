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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write
from ..errors import DataError, TrainingError
from ..files.llama2c import write_checkpoint
from .data import read_meta, shard_files
from .model import ModelArgs, Transformer
from .settings import TrainConfig


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


def _open_shard(path: Path, dtype: np.dtype) -> np.memmap:
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise DataError(f"{path}: expected a non-empty whole number of {dtype.name} tokens, found {size} bytes")
    return np.memmap(path, dtype=dtype, mode="r")


class ChunkStream:
    """The non-overlapping (seq_len + 1)-token chunks of a split's shards, read from memmaps."""

    def __init__(self, shard_dir: str, split: str, seq_len: int, dtype: np.dtype):
        self.shards = [_open_shard(p, dtype) for p in shard_files(shard_dir, split)]
        if not self.shards:
            raise DataError(f"{shard_dir}: expected {split}-*.bin shards (run `llama2nb data pretokenize`), found none")
        self.seq_len = seq_len
        counts = [max(0, len(s) // seq_len - 1) for s in self.shards]
        self.n_chunks = int(sum(counts))
        if self.n_chunks == 0:
            total = sum(len(s) for s in self.shards)
            raise DataError(f"{shard_dir}: {split} split: expected at least {2 * seq_len} tokens for "
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
        raise TrainingError(f"{path}: --resume: expected a ckpt.pt from an earlier run, found nothing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainingError(f"{path}: expected a llama2nb training checkpoint, found unreadable data ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# Setting up a run


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _setup_ddp(device: str) -> Dist:
    """The process group torchrun asks for (RANK in the environment), else one process."""
    if int(os.environ.get("RANK", -1)) < 0:
        return Dist()
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def _pick_device(requested: str) -> tuple[str, Dist, str]:
    """(device, processes, device type) for --device: auto takes CUDA where there is one, and
    each DDP process on CUDA its local GPU. TrainingError for a device this torch cannot use."""
    device = requested
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dd = _setup_ddp(device)
    if dd.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dd.local_rank}"
        torch.cuda.set_device(device)
    try:
        device_type = torch.device(device).type  # cpu, cuda, mps
    except (RuntimeError, ValueError):
        raise TrainingError(f"--device: expected auto, cpu, cuda, cuda:N or mps, found {device!r}") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device: expected a device this torch can use, found {device!r} (no CUDA available)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"--device: expected a device this torch can use, found {device!r} (no MPS available)")
    return device, dd, device_type


def _micro_batches(cfg: TrainConfig, dd: Dist) -> int:
    """Micro-batches per iteration in each process: --gradient-accumulation-steps counts them
    over all processes, so it must divide among them."""
    if cfg.gradient_accumulation_steps % dd.world:
        raise TrainingError(f"--gradient-accumulation-steps: expected a multiple of the {dd.world} processes, "
                            f"found {cfg.gradient_accumulation_steps}")
    return cfg.gradient_accumulation_steps // dd.world


def _vocab_from_data(cfg: TrainConfig, meta: dict) -> None:
    """vocab_size 0 takes the data's; a smaller one than the data's cannot embed its ids."""
    if not cfg.vocab_size:
        cfg.vocab_size = meta["vocab_size"]
    if cfg.vocab_size < meta["vocab_size"]:
        raise TrainingError(f"--vocab-size: expected at least the data's vocabulary ({meta['vocab_size']} in "
                            f"{cfg.data}/meta.json), found {cfg.vocab_size}")


@dataclass
class Run:
    """One training run: what its steps (train_step, evaluate_and_save, save_run) share."""

    cfg: TrainConfig
    dd: Dist
    device: str
    device_type: str
    args: ModelArgs
    raw_model: Transformer
    model: torch.nn.Module  # raw_model, compiled and/or wrapped for DDP: what the updates run
    optimizer: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler
    train_stream: ChunkStream
    val_stream: ChunkStream
    micro_batches: int  # per iteration in this process
    iter_num: int = 0
    best_val: float = math.inf
    history: list[dict] = field(default_factory=list)
    resumed_at: int | None = None  # the iteration a --resume started from

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def tokens_per_iter(self) -> int:
        return self.micro_batches * self.dd.world * self.cfg.batch_size * self.cfg.max_seq_len


def setup(cfg: TrainConfig, state: dict | None) -> Run:
    """Everything a run needs: device and processes, data, model, optimizer; with `state` (a
    ckpt.pt's contents), the model, optimizer, iteration, history and RNG state it saved. The
    seeding order is llama2.c's: the seed, the model's initialization, then (fresh runs) the
    seed plus the rank, so dropout differs per process."""
    device, dd, device_type = _pick_device(cfg.device)
    meta = read_meta(cfg.data)
    _vocab_from_data(cfg, meta)
    micro_batches = _micro_batches(cfg, dd)
    train_stream = ChunkStream(cfg.data, "train", cfg.max_seq_len, meta["dtype"])
    val_stream = ChunkStream(cfg.data, "val", cfg.max_seq_len, meta["dtype"])
    torch.manual_seed(cfg.seed)
    args = model_args(cfg)
    args.to_config().validate("model shape")  # heads dividing dim, kv heads dividing heads, ...
    raw_model = Transformer(args).to(device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    run = Run(cfg, dd, device, device_type, args, raw_model, raw_model, optimizer,
              contextlib.nullcontext() if ptdtype == torch.float32
              else torch.autocast(device_type=device_type, dtype=ptdtype),
              torch.amp.GradScaler(device_type, enabled=(cfg.dtype == "float16")),
              train_stream, val_stream, micro_batches)
    if state is not None:
        _restore(run, state)
    else:
        torch.manual_seed(cfg.seed + dd.rank)
    run.model = _wrapped(run)
    return run


def _restore(run: Run, state: dict) -> None:
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.iter_num, run.best_val, run.history = state["iter_num"], state["best_val_loss"], state["history"]
    run.resumed_at = run.iter_num
    torch.set_rng_state(state["rng"]["torch"])
    if run.device_type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _wrapped(run: Run) -> torch.nn.Module:
    """The model the updates run: torch.compile'd with --compile, in DDP over several processes."""
    model = torch.compile(run.raw_model) if run.cfg.compile else run.raw_model
    if run.dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[run.dd.local_rank] if run.device_type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------------------------
# The steps


def batch(run: Run, stream: ChunkStream, salt: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = stream.batch(run.cfg.seed, salt, index, run.cfg.batch_size)
    return x.to(run.device), y.to(run.device)


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split: the same batches at every evaluation."""
    run.raw_model.eval()
    out = {}
    for name, stream, salt in (("train", run.train_stream, 1), ("val", run.val_stream, 2)):
        losses = []
        for k in range(run.cfg.eval_iters):
            x, y = batch(run, stream, salt, k)
            with run.autocast:
                _, loss = run.raw_model(x, y)
            losses.append(loss.item())
        out[name] = float(np.mean(losses))
    run.raw_model.train()
    return out


def train_step(run: Run) -> tuple[float, float]:
    """One iteration's update (gradient accumulation over micro-batches, clipping, AdamW);
    returns its learning rate and its loss, averaged over the processes."""
    cfg, dd = run.cfg, run.dd
    lr = get_lr(cfg, run.iter_num)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(run.micro_batches):
        x, y = batch(run, run.train_stream, 0, (run.iter_num * run.micro_batches + micro) * dd.world + dd.rank)
        last = micro == run.micro_batches - 1
        with run.model.no_sync() if dd.world > 1 and not last else contextlib.nullcontext():
            with run.autocast:
                _, loss = run.model(x, y)
                loss = loss / run.micro_batches
            run.scaler.scale(loss).backward()
        total += loss.item()
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if dd.world > 1:
        t = torch.tensor([total], device=run.device)
        torch.distributed.all_reduce(t)
        total = t.item() / dd.world
    return lr, total


def record_step(run: Run, lr: float, loss: float) -> None:
    """Log the iteration in the history (beside its evaluation, if it had one) and count it."""
    row = run.history[-1] if run.history and run.history[-1]["iter"] == run.iter_num else None
    if row is None:
        run.history.append({"iter": run.iter_num, "lr": lr, "loss": loss})
    else:
        row.update(lr=lr, loss=loss)
    run.iter_num += 1


def save_run(run: Run, write_model: bool) -> None:
    """ckpt.pt (everything --resume needs), model.bin when `write_model`, loss.csv/.png."""
    ckpt = {
        "model": _plain_state_dict(run.raw_model),
        "optimizer": run.optimizer.state_dict(),
        "model_args": run.args.to_dict(),
        "config": asdict(run.cfg),
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val,
        "history": run.history,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if run.device_type == "cuda" else None},
    }
    with atomic_path(run.out_dir / "ckpt.pt") as tmp:
        torch.save(ckpt, tmp)
    if write_model:
        write_checkpoint(run.out_dir / "model.bin", run.args.to_config(version=0), run.raw_model.export_weights())
    save_loss_files(run.out_dir, run.history)


def evaluate_and_save(run: Run, console) -> None:
    """Evaluate at the current iteration, log it, and (unless --eval-only) save: model.bin too
    when val loss improved, or always with --always-save-checkpoint (as llama2.c, best_val is
    then the latest val loss); never at iteration 0, before any update."""
    losses = estimate_loss(run)
    it = run.iter_num
    row = next((r for r in run.history if r["iter"] == it), None)
    if row is None:
        row = {"iter": it}
        run.history.append(row)
    row["eval_train"], row["eval_val"] = losses["train"], losses["val"]
    improved = losses["val"] < run.best_val or run.cfg.always_save_checkpoint
    if improved:
        run.best_val = losses["val"]
    console.print(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + (f" -> {run.out_dir / 'model.bin'}" if improved and it > 0 else ""))
    if not run.cfg.eval_only:
        save_run(run, write_model=improved and it > 0)


def eval_due(cfg: TrainConfig, it: int, resumed_at: int | None) -> bool:
    """Whether to evaluate before the update of iteration `it`: with --eval-only always (once:
    it is all that run does); else every eval_interval iterations and at max_iters, except at
    the iteration a --resume starts from, which its ckpt.pt was saved at right after evaluating
    there (or at a --stop-after iteration where no evaluation was due)."""
    if cfg.eval_only:
        return True
    if it == resumed_at:
        return False
    return it % cfg.eval_interval == 0 or it == cfg.max_iters


# ----------------------------------------------------------------------------------------------
# The loop


class _Progress:
    """Throughput (an exponential moving average of tokens/s over iterations) and, when shown,
    a Rich progress bar updated every log_interval iterations."""

    def __init__(self, run: Run, console, show: bool):
        self.run = run
        self.last = time.perf_counter()
        self.tok_rate = 0.0
        self.bar = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(bar_width=15), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TextColumn("ETA"), TimeRemainingColumn(),
                                console=console, transient=False)
            self.task = self.bar.add_task("", total=run.cfg.max_iters, completed=run.iter_num)
            self.bar.start()

    def step(self, lr: float, loss: float) -> None:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        rate = self.run.tokens_per_iter / dt if dt > 0 else 0.0
        self.tok_rate = rate if self.tok_rate == 0 else 0.9 * self.tok_rate + 0.1 * rate
        it, cfg = self.run.iter_num, self.run.cfg
        if self.bar is not None and (it % cfg.log_interval == 0 or it == cfg.max_iters):
            self.bar.update(self.task, completed=it, description=f"loss {loss:.3f} lr {lr:.1e} {self.tok_rate:,.0f} tok/s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _describe(run: Run) -> str:
    a = run.args
    return (f"model: {run.raw_model.n_params():,} parameters: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
            f"({a.kv_heads} kv), hidden {a.ffn_dim}, vocab {a.vocab_size}, seq {a.max_seq_len}; "
            f"{run.tokens_per_iter:,} tokens per iteration; device {run.device}, dtype {run.cfg.dtype}"
            + (f", {run.dd.world} processes" if run.dd.world > 1 else ""))


def _evaluate_everywhere(run: Run, console) -> None:
    """The master process evaluates and saves; the others wait for it."""
    if run.dd.master:
        evaluate_and_save(run, console)
    if run.dd.world > 1:
        torch.distributed.barrier()


def train(cfg: TrainConfig, resume: bool = False, console=None, progress: bool = True,
          stop_after: int | None = None, state: dict | None = None) -> dict:
    """Run (or continue, with `resume`: from `state` or OUT_DIR/ckpt.pt) a training run; returns
    a summary dict. `stop_after` ends the run after that many iterations of this call, writing
    ckpt.pt, so that a later `resume` continues it."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if resume and state is None:
        state = load_resume_state(cfg.out_dir)
    run = setup(cfg, state if resume else None)
    if run.dd.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        console.print(_describe(run))
    line = _Progress(run, console, show=run.dd.master and progress)
    start = run.iter_num
    try:
        while True:
            if eval_due(cfg, run.iter_num, run.resumed_at):
                _evaluate_everywhere(run, console)
            if cfg.eval_only or run.iter_num >= cfg.max_iters:
                break
            if stop_after is not None and run.iter_num - start >= stop_after:
                if run.dd.master:
                    save_run(run, write_model=False)
                break
            lr, loss = train_step(run)
            record_step(run, lr, loss)
            line.step(lr, loss)
    finally:
        line.stop()
        if run.dd.world > 1:
            torch.distributed.destroy_process_group()
    return _summary(run, line.tok_rate)


def _summary(run: Run, tok_rate: float) -> dict:
    train_losses = [r["loss"] for r in run.history if r.get("loss") is not None]
    return {"iter_num": run.iter_num, "best_val_loss": run.best_val, "history": run.history,
            "first_loss": train_losses[0] if train_losses else None,
            "last_loss": train_losses[-1] if train_losses else None,
            "tokens_per_iter": run.tokens_per_iter, "tok_per_s": tok_rate}
