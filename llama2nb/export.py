"""`llama2nb export SOURCE OUT`: any model source, streamed tensor by tensor into one output file.

Contract. `open_source(path, kind)` detects what SOURCE is and opens it as a TensorSource
(files.source: a config, a tokenizer file if one was found, tensors read on demand):

- a training run's directory or its ckpt.pt (also llama2.c's own ckpt.pt): PyTorch loads it
  (a model small enough to train here fits in memory);
- a llama2.c .bin (v0, v1, v2) or a GGUF file: mapped, no torch (a GGUF carries its vocabulary);
- a Hugging Face directory (config.json; files.hf): safetensors mapped without torch, or
  pytorch_model*.bin mapped by torch;
- a Meta directory (params.json + consolidated.NN.pth; files.meta): mapped by torch.

`kind` ("hf" or "meta") forces the reading of a directory. `export()` then hands the source to
the writer of OUT's container (WRITERS: GGUF for a .gguf OUT or --format gguf, else llama2.c;
files.convert.target_for checks the options against it), which walks its own
layout once and pulls each tensor in row blocks: memory holds about one block, not the model,
so a 7B checkpoint exports in a few hundred MB. Every output is written to a temp name and
renamed.

A writer is `writer(out, source, options, progress) -> str` (a one-line description of what
was written): `options` an ExportOptions, `progress` files.llama2c.WriteProgress or None.
`write(out, source, options)` is the one route into them: `export` takes it from any source,
`llama2nb quantize` (and files.convert.convert) from `checkpoint_source`, a .bin or GGUF mapped
without torch, so both write the same bytes for the same input and options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .config import ModelConfig
from .errors import CheckpointError, UsageError
from .files.llama2c import WriteProgress, write_checkpoint
from .files.source import CheckpointSource, TensorSource

KINDS = ("run", "ckpt", "llama2c", "gguf", "hf", "meta")
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.bin")  # beside a source, in this order (then tokN.bin)


@dataclass(frozen=True)
class ExportOptions:
    version: int | None = None  # llama2.c: 0 legacy fp32 (the default), 1 fp32, 2 Q8_0
    group_size: int | None = None  # llama2.c v2's Q8_0 group size (None: the shape's policy)
    type: str | None = None  # the tensor type (--type): f32 | f16 | q8_0 | q4_0 for GGUF
    container: str | None = None  # "llama2c" or "gguf" (None: from OUT's suffix)
    tokenizer: Path | None = None  # the vocabulary a GGUF OUT carries (None: the source's)


# ----------------------------------------------------------------------------------------------
# Sources


def detect(path: Path, kind: str | None = None) -> str:
    """What SOURCE is (one of KINDS); `kind` forces hf or meta for a directory."""
    from .files.hf import is_hf_dir
    from .files.meta import is_meta_dir

    if kind is not None:
        if kind not in ("hf", "meta"):
            raise UsageError(f"{path}: source kind: expected hf or meta, found {kind}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: --{kind}: expected a {'Hugging Face' if kind == 'hf' else 'Meta'} model "
                                  "directory, found a file")
        return kind
    if path.is_dir():
        if is_meta_dir(path):
            return "meta"
        if is_hf_dir(path):
            return "hf"
        if (path / "ckpt.pt").is_file():
            return "run"
        raise CheckpointError(f"{path}: expected a training run (ckpt.pt), a Hugging Face (config.json) or a Meta "
                              "(params.json + consolidated.NN.pth) directory, found none of their files")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if path.suffix in (".pt", ".pth"):
        return "ckpt"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip or pickle (torch.save), unless a llama2.c file:
        from .files.llama2c import read_config  # a v0 header starts with dim, and dim 128 is byte 0x80

        try:
            read_config(path)  # header fields and the exact file size
        except CheckpointError:
            return "ckpt"
    return "llama2c"


def tokenizer_beside(folder: Path, vocab_size: int | None = None) -> Path | None:
    """The tokenizer file found beside a source: tokenizer.model, tokenizer.bin, then (given the
    vocabulary's size) tok{vocab_size}.bin, llama2nb's data folder name."""
    names = (*TOKENIZER_NAMES, *((f"tok{vocab_size}.bin",) if vocab_size else ()))
    return next((folder / n for n in names if (folder / n).is_file()), None)


def checkpoint_source(path: str | os.PathLike, seq_len: int | None = None) -> CheckpointSource:
    """A llama2.c .bin or a GGUF file (told apart by its magic) as a TensorSource: validated and
    mapped by files.read_model, no torch; its tokenizer is a GGUF file's own vocabulary, else the
    one beside the file. `quantize` is export over this source."""
    from .files import container_of, read_model

    path = Path(path)
    checkpoint = read_model(path)
    tokenizer = (path if container_of(path) == "gguf"
                 else tokenizer_beside(path.parent, checkpoint.config.vocab_size))
    return CheckpointSource(checkpoint, tokenizer).with_seq_len(seq_len)


def open_source(path: str | os.PathLike, kind: str | None = None, seq_len: int | None = None) -> TensorSource:
    """SOURCE as a TensorSource (see the module docstring); seq_len replaces its context length."""
    path = Path(path)
    kind = detect(path, kind)
    if kind == "meta":
        from .files.meta import open_meta

        return open_meta(path, seq_len)
    if kind == "hf":
        from .files.hf import open_hf

        return open_hf(path, seq_len)
    if kind in ("llama2c", "gguf"):
        return checkpoint_source(path, seq_len)
    from .training.export import ckpt_source  # torch: only our own ckpt.pt needs it

    return ckpt_source(path / "ckpt.pt" if kind == "run" else path).with_seq_len(seq_len)


# ----------------------------------------------------------------------------------------------
# llama2.c output


def pick_group_size(dim: int, hidden_dim: int, requested: int | None, source: str = "export") -> int:
    """Q8_0 group size: `requested` if it divides every row length (dim and hidden_dim), else an
    error; by default the shape's ModelConfig.q8_group_size (the one policy, shared with the bench)."""
    if requested:
        for name, n in (("dim", dim), ("hidden_dim", hidden_dim)):
            if requested <= 0 or n % requested:
                raise CheckpointError(f"{source}: --group-size: expected a divisor of {name}={n} "
                                      f"(every row length), found {requested}")
        return requested
    return ModelConfig(dim, hidden_dim, 1, 1, 1, 1, 1).q8_group_size


def llama2c_header(config: ModelConfig, options: ExportOptions, out: str | os.PathLike) -> ModelConfig:
    """The llama2.c header for `config` in the version asked for (v2: with its group size)."""
    version, group_size = options.version, options.group_size
    if version not in (0, 1, 2):
        raise CheckpointError(f"{out}: --version: expected 0, 1 or 2, found {version}")
    if version != 2 and group_size:
        raise CheckpointError(f"{out}: --group-size: expected only with --version 2, found {group_size}")
    gs = pick_group_size(config.dim, config.hidden_dim, group_size, str(out)) if version == 2 else 0
    return replace(config, version=version, group_size=gs)


def write_llama2c(out: Path, source: TensorSource, options: ExportOptions, progress: WriteProgress | None) -> str:
    config = llama2c_header(source.config, replace(options, version=options.version or 0), out)
    write_checkpoint(out, config, source, progress)
    extra = f", group size {config.group_size}" if config.version == 2 else ""
    return f"wrote {out}: llama2.c v{config.version}{extra}, {describe(config)}"


def describe(c: ModelConfig) -> str:
    return (f"{c.n_params:,} parameters, dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), "
            f"vocab {c.vocab_size}, seq_len {c.seq_len}")


# ----------------------------------------------------------------------------------------------
# The command's work

def write_gguf(out: Path, source: TensorSource, options: ExportOptions, progress: WriteProgress | None) -> str:
    """GGUF with the --type's tensor types and the vocabulary of -z, else the source's own (a
    GGUF source's, or the tokenizer found beside it: tokenizer.model, tokenizer.bin, tokN.bin)."""
    from collections import Counter

    from .files import gguf
    from .files.convert import target_for
    from .tokenizer import Tokenizer

    target = target_for(out, "gguf", options.type)
    config = source.config
    tokenizer = options.tokenizer or source.tokenizer
    if tokenizer is None:
        origin = Path(source.origin)
        tokenizer = tokenizer_beside(origin if origin.is_dir() else origin.parent, config.vocab_size)
    if tokenizer is None:
        raise CheckpointError(f"{out}: vocabulary: expected a tokenizer for the GGUF file's metadata, found none "
                              "beside the source: pass the model's tokenizer with -z")
    vocab = Tokenizer.load(tokenizer, vocab_size=config.vocab_size)
    origin = Path(source.origin)
    name = origin.parent.name if origin.name == "ckpt.pt" else origin.name if origin.is_dir() else origin.stem
    gguf.write_gguf(out, config, source, vocab, target.type, name)
    types = Counter(gguf.type_name(p.info.type) for p in gguf.plan(config, target.type, out))
    kinds = ", ".join(f"{n} {t}" for t, n in types.most_common())
    return f"wrote {out}: GGUF v{gguf.WRITE_VERSION}, --type {target.type} ({kinds} tensors), {describe(config)}"


Writer = Callable[[Path, TensorSource, ExportOptions, "WriteProgress | None"], str]
WRITERS: dict[str, Writer] = {"llama2c": write_llama2c, "gguf": write_gguf}  # container -> writer


def write(out: str | os.PathLike, source: TensorSource, options: ExportOptions = ExportOptions(),
          progress: WriteProgress | None = None) -> str:
    """Write an opened source to OUT with the writer of OUT's container (WRITERS); returns the
    writer's description. The one route into the writers: export and quantize both end here."""
    from .files.convert import target_for

    out = Path(out)
    target = target_for(out, options.container, options.type, options.version, options.group_size)
    if target.container == "llama2c":  # --type q8_0 means version 2 for a llama2.c file
        options = replace(options, version=target.version)
    return WRITERS[target.container](out, source, options, progress)


def export(source: str | os.PathLike, out: str | os.PathLike, kind: str | None = None,
           options: ExportOptions = ExportOptions(), seq_len: int | None = None,
           progress: WriteProgress | None = None) -> str:
    """Export SOURCE to OUT (see the module docstring); returns the writer's description."""
    from .files.convert import target_for

    target_for(out, options.container, options.type, options.version, options.group_size)  # before opening
    return write(out, open_source(source, kind, seq_len), options, progress)

