"""Click commands for the PyTorch half (data, download, train, export, eval).

Importing this module must not import torch: commands import it inside their bodies, so that
`llama2nb sample` works where torch is not installed. Help shows every flag's effective default
in Click's one `[default: ...]` style, taken from the code that applies it (TrainConfig and
the presets for `train`), never written by hand.
"""

from __future__ import annotations

import functools
import os
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import DataError, Llama2nbError
from ..tokenizer import TOKENIZER_SEARCH
from .data import TINYSTORIES_DIR
from .settings import MODEL_FIELDS, PRESETS, TrainConfig, config_from


def _clean_errors(fn):
    """Turn the project's user errors (Llama2nbError) and OSErrors about files into one-line
    Click errors (no traceback, exit 1); anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Llama2nbError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if getattr(e, "filename", None):
                raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except ImportError as e:
            raise click.ClickException(f"this command needs the training extras ({e.name} is missing): "
                                       "pip install 'llama2nb[train]'") from None

    return wrapper


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console)


CTX_OPTION = click.option("--ctx", type=click.IntRange(min=1), default=None, metavar="N",
                          show_default="the model's context length (GGUF files often declare large ones)",
                          help="Cap the context at N positions: the KV cache is allocated for N.")
DATA_DIR_OPTION = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
                               show_default=True, help="Data directory (see `llama2nb data --help`).")


# ----------------------------------------------------------------------------------------------
# data


@click.group("data")
def data_group() -> None:
    """Prepare training data: download TinyStories, train a vocabulary, pretokenize.

    \b
    Layout of the data directory (default data/):
      TinyStories_all_data/data00.json ...   data download
      tok512.model, tok512.bin               data train-vocab --vocab-size 512
      tok512/meta.json                       data pretokenize --vocab-size 512
      tok512/train-000.bin ..., val-000.bin  (uint16 token ids; uint32 past 65,535 tokens)
    """


@data_group.command("download")
@DATA_DIR_OPTION
@_clean_errors
def data_download(data_dir: Path) -> None:
    """Download TinyStories (roneneldan/TinyStories on the Hugging Face hub) and extract its
    JSON shards into DATA_DIR/TinyStories_all_data/."""
    from ..hub import download_tinystories

    target = download_tinystories(data_dir / TINYSTORIES_DIR)
    click.echo(f"{len(list(target.glob('*.json')))} shards in {target}")


def _input_stories(data_dir: Path, texts: tuple[Path, ...], max_shards: int | None) -> list[str]:
    from .data import read_stories, tinystories_shards

    files = list(texts) or tinystories_shards(data_dir)[:max_shards]
    stories: list[str] = []
    for f in files:
        stories.extend(read_stories(f))
    return stories


@data_group.command("train-vocab")
@click.option("--vocab-size", type=click.IntRange(min=260, max=1 << 20), required=True,
              help="Vocabulary size (at least 256 byte pieces + 3 specials + 1).")
@click.option("--text", "texts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Train on these text files instead of the TinyStories shards (repeatable).")
@click.option("--num-shards", type=click.IntRange(min=1), default=10, show_default=True,
              help="TinyStories shards to train on (llama2.c uses the first 10).")
@DATA_DIR_OPTION
@_clean_errors
def data_train_vocab(vocab_size: int, texts, num_shards: int, data_dir: Path) -> None:
    """Train a SentencePiece BPE vocabulary (byte fallback, split digits) as llama2.c does;
    writes DATA_DIR/tokN.model and its llama2.c export DATA_DIR/tokN.bin."""
    from .vocab import train_vocab

    stories = _input_stories(data_dir, texts, num_shards)
    click.echo(f"training a {vocab_size}-token vocabulary on {len(stories):,} stories ...", err=True)
    model, bin_path = train_vocab(stories, vocab_size, data_dir / f"tok{vocab_size}.model")
    click.echo(f"wrote {model} and {bin_path}")


@data_group.command("pretokenize")
@click.option("--vocab-size", type=click.IntRange(min=1), help="Use DATA_DIR/tokN.model (from train-vocab).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this SentencePiece .model instead (e.g. the Llama 2 tokenizer.model).")
@click.option("--text", "texts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Training text files instead of the TinyStories shards (repeatable).")
@click.option("--val-text", "val_texts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="Validation text files (repeatable). Without them, the last "
              "--val-fraction of the --text stories is held out.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.5, min_open=True), default=0.05, show_default=True,
              help="Share of the --text stories held out for validation when no --val-text is given.")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Tokenizer processes.")
@DATA_DIR_OPTION
@_clean_errors
def data_pretokenize(vocab_size, tokenizer, texts, val_texts, val_fraction, workers, data_dir: Path) -> None:
    """Encode stories (BOS + ids each) into uint16 shards DATA_DIR/<tokenizer>/{train,val}-NNN.bin.

    Inputs: the TinyStories JSON shards (shard 0 becomes validation, as in llama2.c), or text
    files given with --text / --val-text whose stories are separated by `<|endoftext|>` lines
    (TinyStories-train.txt's layout) or, in files without such lines, by blank lines.
    """
    import numpy as np

    from .data import encode_stories, shard_dtype, tokenizer_model_path, write_meta, write_shard

    if val_texts and not texts:
        raise click.UsageError("--val-text needs --text (the TinyStories shards bring their own validation shard)")
    model_path = tokenizer_model_path(data_dir, vocab_size, str(tokenizer) if tokenizer else None)
    sp = _sentencepiece(model_path, vocab_size)
    vocab = sp.get_piece_size()
    dtype = shard_dtype(vocab)
    out_dir = data_dir / model_path.stem
    jobs = _shard_jobs(data_dir, texts, val_texts, val_fraction)
    total_tokens = 0
    with _progress(_console()) as progress:
        for name, stories in jobs:
            task = progress.add_task(name, total=len(stories))
            tokens = encode_stories(stories, model_path, dtype, workers=workers,
                                    advance=lambda n, t=task: progress.advance(t, n))
            write_shard(out_dir / f"{name}.bin", tokens)
            total_tokens += len(tokens)
    write_meta(out_dir, model_path, vocab, sp.bos_id(), dtype)
    click.echo(f"wrote {len(jobs)} shards, {total_tokens:,} tokens ({np.dtype(dtype).name}) to {out_dir}")


def _sentencepiece(model_path: Path, vocab_size: int | None):
    import sentencepiece as spm

    if not model_path.is_file():
        raise DataError(f"{model_path}: expected a SentencePiece model (run `llama2nb data train-vocab "
                        f"--vocab-size {vocab_size}` first), found nothing")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model_path))
    except Exception:  # sentencepiece raises bare RuntimeError/OSError on bad protos
        raise DataError(f"{model_path}: expected a SentencePiece model, found unreadable data") from None
    return sp


def _shard_jobs(data_dir: Path, texts, val_texts, val_fraction: float) -> list[tuple[str, list[str]]]:
    """(shard name, its stories): --text files as train-000 and --val-text files (or the last
    --val-fraction of the --text stories) as val-000; else the TinyStories shards, the first as
    val-000 as llama2.c does."""
    from .data import read_stories, tinystories_shards

    if not texts:
        shards = tinystories_shards(data_dir)
        return [("val-000", read_stories(shards[0]))] + [(f"train-{i:03d}", read_stories(s))
                                                          for i, s in enumerate(shards[1:])]
    train_stories = [s for f in texts for s in read_stories(f)]
    if val_texts:
        return [("train-000", train_stories), ("val-000", [s for f in val_texts for s in read_stories(f)])]
    if len(train_stories) < 2:
        raise DataError(f"{texts[0]}: expected at least 2 stories to hold one out for validation, found "
                        f"{len(train_stories)} (or pass --val-text)")
    n_val = max(1, int(len(train_stories) * val_fraction))
    return [("train-000", train_stories[:-n_val]), ("val-000", train_stories[-n_val:])]


# ----------------------------------------------------------------------------------------------
# download


@click.command("download")
@click.argument("name")
@click.argument("filename", required=False)
@_clean_errors
def download(name: str, filename: str | None) -> None:
    """Download a published llama2.c model and its tokenizer into the Hugging Face cache:
    stories15M, stories42M, stories110M (Llama 2 tokenizer) or stories260K (its own 512-token
    one); `llama2nb sample NAME` then finds them by name, offline. With FILENAME, NAME is a Hub
    repository and FILENAME a model file in it (a GGUF, say: `llama2nb download
    TheBloke/Llama-2-7B-Chat-GGUF llama-2-7b-chat.Q4_0.gguf`), checked once downloaded."""
    from ..hub import canonical_name, download_file, download_model

    if filename is not None:
        from ..files import read_config

        path = download_file(name, filename)
        config = read_config(path)  # a model file llama2nb can read, or the loader's one-line error
        click.echo(f"model: {path} (dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size})")
        click.echo(f"sample with: llama2nb sample {path}")
        return
    checkpoint, tokenizer = download_model(name)
    click.echo(f"checkpoint: {checkpoint}\ntokenizer:  {tokenizer}")
    click.echo(f"sample with: llama2nb sample {canonical_name(name)}")


# ----------------------------------------------------------------------------------------------
# train

_TRAIN_OPTIONS = [
    # (flag, field, type, help); every default is TrainConfig's, or the --preset's
    ("--out-dir", "out_dir", click.Path(file_okay=False), "Output directory: ckpt.pt, model.bin, loss.csv, loss.png."),
    ("--data", "data", click.Path(file_okay=False), "Shard directory from `data pretokenize`."),
    ("--eval-interval", "eval_interval", click.IntRange(min=1), "Evaluate and save every N iterations."),
    ("--log-interval", "log_interval", click.IntRange(min=1), "Update the progress line every N iterations."),
    ("--eval-iters", "eval_iters", click.IntRange(min=1), "Batches per evaluation."),
    ("--eval-only/--no-eval-only", "eval_only", None, "Evaluate once and stop."),
    ("--always-save-checkpoint/--no-always-save-checkpoint", "always_save_checkpoint", None,
     "Write model.bin at every evaluation, not only when val loss improves."),
    ("--vocab-size", "vocab_size", click.IntRange(min=0), "Vocabulary size (0: the data's, from its meta.json)."),
    ("--dim", "dim", click.IntRange(min=2), "Model width."),
    ("--n-layers", "n_layers", click.IntRange(min=1), "Layers."),
    ("--n-heads", "n_heads", click.IntRange(min=1), "Query heads."),
    ("--n-kv-heads", "n_kv_heads", click.IntRange(min=1), "Key/value heads (grouped-query attention)."),
    ("--multiple-of", "multiple_of", click.IntRange(min=1), "Round the SwiGLU width up to a multiple of this."),
    ("--hidden-dim", "hidden_dim", click.IntRange(min=0), "SwiGLU width (0: from dim and multiple-of)."),
    ("--max-seq-len", "max_seq_len", click.IntRange(min=2), "Context length."),
    ("--dropout", "dropout", click.FloatRange(0.0, 1.0, max_open=True), "Dropout."),
    ("--shared-classifier/--no-shared-classifier", "shared_classifier", None, "Tie output and embedding weights."),
    ("--batch-size", "batch_size", click.IntRange(min=1), "Micro-batch size."),
    ("--gradient-accumulation-steps", "gradient_accumulation_steps", click.IntRange(min=1),
     "Micro-batches per iteration (over all DDP processes)."),
    ("--learning-rate", "learning_rate", click.FloatRange(min=0.0), "Peak learning rate."),
    ("--max-iters", "max_iters", click.IntRange(min=0), "Total iterations."),
    ("--weight-decay", "weight_decay", click.FloatRange(min=0.0), "AdamW weight decay."),
    ("--beta1", "beta1", click.FloatRange(0.0, 1.0, max_open=True), "AdamW beta1."),
    ("--beta2", "beta2", click.FloatRange(0.0, 1.0, max_open=True), "AdamW beta2."),
    ("--grad-clip", "grad_clip", click.FloatRange(min=0.0), "Clip gradients at this norm (0: off)."),
    ("--decay-lr/--no-decay-lr", "decay_lr", None, "Warmup + cosine decay (else constant)."),
    ("--warmup-iters", "warmup_iters", click.IntRange(min=0), "Linear warmup iterations."),
    ("--lr-decay-iters", "lr_decay_iters", click.IntRange(min=0), "Cosine decay length (0: max-iters)."),
    ("--min-lr", "min_lr", click.FloatRange(min=0.0), "Learning rate at the end of the decay."),
    ("--device", "device", click.STRING, "auto, cpu, cuda, cuda:N, mps."),
    ("--dtype", "dtype", click.Choice(["float32", "bfloat16", "float16"]), "Compute dtype."),
    ("--compile/--no-compile", "compile", None, "torch.compile the model."),
    ("--seed", "seed", click.INT, "Seed for initialization and data order."),
]


def _train_options(fn):
    """The flags of TrainConfig's fields, each defaulting to the field's default (shown in help)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for flag, name, type_, help_ in reversed(_TRAIN_OPTIONS):
        fn = click.option(flag, name, type=type_, default=defaults[name], show_default=True, help=help_)(fn)
    return fn


def _preset_defaults(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--preset is eager: its values become the other flags' defaults (Click's default_map), so
    `train --preset NAME --help` shows them, and flags given still override them."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **PRESETS[value]}
    return value


def _given(ctx: click.Context, options: dict) -> dict:
    """The flags typed on the command line (not TrainConfig's or the preset's defaults)."""
    return {k: v for k, v in options.items()
            if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def _resumed_config(out_dir: str, given: dict) -> tuple[TrainConfig, dict]:
    """The run's own settings from OUT_DIR/ckpt.pt with the flags given now on top (model shape
    flags must match), and the loaded state."""
    from .train import load_resume_state

    state = load_resume_state(out_dir)
    stored = {f.name: state["config"][f.name] for f in fields(TrainConfig) if f.name in state["config"]}
    for name in MODEL_FIELDS:
        if name in given and given[name] != stored.get(name):
            raise click.ClickException(f"--{name.replace('_', '-')}: expected the resumed run's value "
                                       f"{stored.get(name)} (from {out_dir}/ckpt.pt), found {given[name]}")
    stored.update(given)
    stored["out_dir"] = str(out_dir)  # where the run is now, even if it was moved
    return TrainConfig(**stored), state


@click.command("train", context_settings={"max_content_width": 100})
@click.option("--preset", type=click.Choice(list(PRESETS), case_sensitive=False), is_eager=True,
              callback=_preset_defaults,
              help="Model and optimizer settings: tiny (tests), or llama2.c's 260K/15M/42M/110M runs. Without "
                   "one, the defaults shown: llama2.c's 15M run. `train --preset NAME --help` shows a preset's.")
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its ckpt.pt, exactly.")
@click.option("--stop-after", type=click.IntRange(min=1),
              help="Stop after N iterations of this invocation (ckpt.pt is written); continue with --resume.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_train_options
@click.pass_context
@_clean_errors
def train_command(ctx: click.Context, preset, resume, stop_after, quiet, **options) -> None:
    """Train a Llama 2 model on pretokenized shards (llama2.c's train.py).

    Flags override the preset; with --resume, the run's own settings from ckpt.pt are used and
    flags given now override them (model shape flags must match). Distributed:
    `torchrun --standalone --nproc_per_node=N -m llama2nb.training train ...` (gloo on CPU,
    nccl on GPU).
    """
    from .train import train

    given = _given(ctx, options)
    state = None
    if resume:
        cfg, state = _resumed_config(given.get("out_dir", TrainConfig.out_dir), given)
    else:
        cfg = config_from(preset, given)
    console = _console()
    summary = train(cfg, resume=resume, console=console, progress=not quiet, stop_after=stop_after, state=state)
    if int(os.environ.get("RANK", 0)) == 0 and not cfg.eval_only:
        out = Path(cfg.out_dir)
        files = ", ".join(str(out / n) for n in ("model.bin", "ckpt.pt", "loss.csv", "loss.png") if (out / n).exists())
        console.print(f"done: iteration {summary['iter_num']}, best val loss {summary['best_val_loss']:.4f}; {files}")


# ----------------------------------------------------------------------------------------------
# export


@click.command("export")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "container", type=click.Choice(["llama2c", "gguf"]), default=None,
              show_default="GGUF for a .gguf suffix, else llama2.c", help="OUT's container.")
@click.option("--type", "type_", type=click.Choice(["f32", "f16", "q8_0", "q4_0"]), default=None,
              show_default="f32, or for llama2.c the one --version implies",
              help="Tensor type: any of these for GGUF; f32 or q8_0 for llama2.c.")
@click.option("--version", "version", type=click.IntRange(0, 2), default=None, show_default="0",
              help="llama2.c: 0 legacy fp32, 1 fp32 with header, 2 Q8_0 int8.")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              show_default="64, 32 or 16, the largest dividing dim and hidden_dim",
              help="Q8_0 group size for --version 2; must divide dim and hidden_dim.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              show_default="the source's, or 4096 (Llama 2's) for Meta's files, which record none",
              help="Context length written in the header.")
@click.option("--hf", "hf", is_flag=True, help="SOURCE is a Hugging Face Llama directory "
              "(config.json + *.safetensors or pytorch_model*.bin).")
@click.option("--meta", "meta", is_flag=True, help="SOURCE is a Meta Llama directory "
              "(params.json + consolidated.NN.pth).")
@click.option("-z", "--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              show_default="a GGUF SOURCE's own, else tokenizer.model or tokenizer.bin beside SOURCE",
              help="The vocabulary a GGUF OUT carries.")
@_clean_errors
def export_command(source: Path, out: Path, container: str | None, type_: str | None, version: int | None,
                   group_size: int | None, seq_len: int | None, hf: bool, meta: bool, tokenizer: Path | None) -> None:
    """Export SOURCE to OUT, tensor by tensor (a 7B model in a few hundred MB of memory): a
    llama2.c checkpoint, or a GGUF file for a .gguf OUT (or --format gguf). SOURCE: a training
    run directory or its ckpt.pt, a llama2.c .bin, a GGUF file, a Hugging Face directory or a
    Meta directory (detected; or forced with --hf / --meta). Only ckpt.pt, .pth and .bin
    weights need torch."""
    from ..export import ExportOptions, export

    if hf and meta:
        raise click.UsageError("--hf and --meta: expected one of them, found both")
    options = ExportOptions(version, group_size, type_, container, tokenizer)
    console = _console()
    with _export_progress(console) as progress:
        message = export(source, out, "hf" if hf else "meta" if meta else None, options, seq_len, progress)
    click.echo(message)


class _export_progress:
    """A Rich progress bar over tensors and bytes while an export writes (on a terminal only);
    the context manager gives the writers' progress callback, or None."""

    def __init__(self, console) -> None:
        self.console, self.bar, self.task = console, None, None

    def __enter__(self):
        if not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
            TransferSpeedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("export", total=None)
        return self.update

    def update(self, tensor: str, done: int, total: int, written: int, total_bytes: int) -> None:
        self.bar.update(self.task, description=f"tensor {done}/{total} {tensor}", completed=written, total=total_bytes)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@click.command("export-tokenizer")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_clean_errors
def export_tokenizer_command(model: Path, out: Path) -> None:
    """Write a SentencePiece MODEL in llama2.c's tokenizer.bin layout to OUT."""
    from ..tokenizer import sentencepiece_to_bin

    sentencepiece_to_bin(model, out)
    click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# eval


@click.command("eval")
@click.argument("checkpoint")
@click.option("--text", "text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Text to score (stories split as `data pretokenize` splits them).")
@click.option("-z", "--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              show_default=f"a downloaded model's own, else the first of {TOKENIZER_SEARCH} (as `sample`)",
              help="tokenizer.bin, .model or .gguf.")
@click.option("--max-tokens", type=click.IntRange(min=2), show_default="all", help="Score only the first N tokens.")
@click.option("--seq-len", type=click.IntRange(min=1), show_default="the model's seq_len", help="Window length.")
@click.option("--fastmath/--no-fastmath", default=True, show_default=True,
              help="Full fastmath kernels, as `sample` uses; --no-fastmath for IEEE arithmetic.")
@CTX_OPTION
@_clean_errors
def eval_command(checkpoint: str, text: Path, tokenizer: Path | None, max_tokens, seq_len, fastmath: bool,
                 ctx: int | None) -> None:
    """Mean loss per token and perplexity of a CHECKPOINT (llama2.c .bin, GGUF, or a known
    model name) on a text file, computed by the Numba engine."""
    from .. import Transformer
    from ..files import read_config
    from ..tokenizer import Tokenizer, find_tokenizer
    from .data import read_stories
    from .evaluate import encode_text, evaluate, windows

    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        from ..hub import resolve_model

        found = resolve_model(checkpoint)
        if found is None:
            raise click.ClickException(f"{checkpoint}: expected a checkpoint file or a downloaded model name "
                                       "(llama2nb download NAME), found neither")
        ckpt_path, known_tok = found
        tokenizer = tokenizer or known_tok
    vocab = read_config(ckpt_path).vocab_size  # the header only: a missing tokenizer fails before compiling
    tok = Tokenizer.load(tokenizer or find_tokenizer(ckpt_path, vocab), vocab_size=vocab)
    model = Transformer.load(ckpt_path, fastmath="full" if fastmath else "off", ctx=ctx)
    ids = encode_text(read_stories(text), tok)
    if max_tokens:
        ids = ids[:max_tokens]
    n = min(seq_len or model.config.seq_len, model.config.seq_len)
    console = _console()
    with _progress(console) as progress:
        task = progress.add_task("eval", total=sum(len(w) - 1 for w in windows(ids, n)))
        result = evaluate(model, ids, n, advance=lambda k: progress.advance(task, k))
    click.echo(f"{ckpt_path}: {result.n_tokens:,} tokens in {result.n_windows} windows of <= {n}: "
               f"loss {result.loss:.6f} nats/token, perplexity {result.perplexity:.4f}")


TRAINING_COMMANDS: list[click.Command] = [data_group, download, train_command, export_command,
                                          export_tokenizer_command, eval_command]
