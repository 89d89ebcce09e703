"""Read and write llama2.c checkpoints: v0 (legacy fp32), v1 (fp32) and v2 (Q8_0).

The file format is the spec: `layout()` lists every tensor in file order with its weight format
(llama2nb.formats), and both the reader (named read-only views into one mapping of the file)
and the writer walk that one list; neither branches on formats. Every header field and the
exact file size are checked before a single view is made, because the Numba kernels do not
bounds-check: a bad file must never reach them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write
from ..config import ModelConfig
from ..errors import CheckpointError
from ..formats import F32, Format
from ..mapping import READ_STEP, Progress, map_read_only
from .source import PER_LAYER, block_source

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: `name`, its layer (None for whole/stacked tensors), format, shape."""

    name: str
    layer: int | None
    format: Format
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.format.nbytes(self.shape)


@dataclass
class TransformerWeights:
    """run.c's TransformerWeights. Per-layer fields index by layer: `w.wq[l]` is layer l's matrix
    view in its format (a slice of one stacked float32 array for fp32 files, a Q8_0Matrix for
    Q8_0 files); norms are float32."""

    token_embedding_table: Any  # (vocab_size, dim)
    rms_att_weight: np.ndarray  # (n_layers, dim)
    wq: Sequence  # (n_layers, dim, dim)
    wk: Sequence  # (n_layers, kv_dim, dim)
    wv: Sequence  # (n_layers, kv_dim, dim)
    wo: Sequence  # (n_layers, dim, dim)
    rms_ffn_weight: np.ndarray  # (n_layers, dim)
    w1: Sequence  # (n_layers, hidden_dim, dim)
    w2: Sequence  # (n_layers, dim, hidden_dim)
    w3: Sequence  # (n_layers, hidden_dim, dim)
    rms_final_weight: np.ndarray  # (dim,)
    wcls: Any  # (vocab_size, dim); the embedding table itself when shared


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: TransformerWeights
    buffer: np.ndarray = field(repr=False)  # the np.memmap of the file, or its in-memory copy


def layout(config: ModelConfig) -> list[Entry]:
    """Every tensor of a checkpoint in file order, as llama2.c's export.py writes them."""
    c = config
    L, D, V = c.n_layers, c.dim, c.vocab_size
    shapes = c.matrix_shapes()
    f32, matrix = F32(), c.weight_format
    norms = [Entry("rms_att_weight", None, f32, (L, D)), Entry("rms_ffn_weight", None, f32, (L, D)),
             Entry("rms_final_weight", None, f32, (D,))]
    if c.version == 0:
        entries = [Entry("token_embedding_table", None, f32, (V, D)), norms[0]]
        entries += [Entry(n, None, f32, (L, *shapes[n])) for n in ("wq", "wk", "wv", "wo")]
        entries.append(norms[1])
        entries += [Entry(n, None, f32, (L, *shapes[n])) for n in ("w1", "w2", "w3")]
        entries.append(norms[2])
        # RoPE tables: run.c skips them; we write them as llama2.c does, and never read them.
        entries += [Entry(n, None, f32, (c.seq_len, c.head_size // 2)) for n in ("freq_cis_real", "freq_cis_imag")]
    elif c.version == 1:
        entries = norms + [Entry("token_embedding_table", None, f32, (V, D))]
        entries += [Entry(n, None, f32, (L, *shapes[n])) for n in LAYER_MATRICES]
    else:
        # Q8_0: each layer's matrix is its int8 values followed by its scales, so layers interleave.
        entries = norms + [Entry("token_embedding_table", None, matrix, (V, D))]
        entries += [Entry(n, layer, matrix, shapes[n]) for n in LAYER_MATRICES for layer in range(L)]
    if not c.shared_classifier:
        entries.append(Entry("wcls", None, matrix, (V, D)))
    return entries


def header_bytes(config: ModelConfig) -> int:
    return V0_HEADER_BYTES if config.version == 0 else V1_HEADER_BYTES


def expected_file_size(config: ModelConfig) -> int:
    return header_bytes(config) + sum(e.nbytes for e in layout(config))


# ----------------------------------------------------------------------------------------------
# Reading


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Parse and validate the header, and check the file's size against it exactly."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(V1_HEADER_BYTES)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    if path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint file, found a directory")

    def need(n: int, what: str) -> None:
        if len(head) < n:
            raise CheckpointError(f"{path}: {what}: expected at least {n} bytes, found a {size}-byte file")

    need(4, "header")
    if struct.unpack_from("<I", head)[0] == MAGIC:
        need(V1_HEADER_BYTES, "v1/v2 header")
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise CheckpointError(f"{path}: header field version: expected 1 or 2 after the ak42 magic, found {version}")
        dims = struct.unpack_from("<7i", head, 8)
        flag = head[36]
        if flag not in (0, 1):
            raise CheckpointError(f"{path}: header field shared_classifier: expected 0 or 1, found {flag}")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        config = ModelConfig(*dims, shared_classifier=bool(flag), version=version, group_size=group_size)
    else:
        need(V0_HEADER_BYTES, "v0 header")
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", head)
        # legacy layout: a negative vocab_size marks an unshared classifier
        config = ModelConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq, shared_classifier=vocab > 0)
    config.validate(str(path))

    expected = expected_file_size(config)
    if size != expected:
        hint = ""
        if config.version == 0 and size == expected_file_size(replace(config, shared_classifier=not config.shared_classifier)):
            hint = (" (the size fits an unshared classifier: v0 files mark one with a negative vocab_size)"
                    if config.shared_classifier else " (the size fits a shared classifier: vocab_size should be positive)")
        elif size < expected:
            hint = " (truncated?)"
        shape = (f"dim={config.dim} hidden_dim={config.hidden_dim} n_layers={config.n_layers} "
                 f"n_heads={config.n_heads} n_kv_heads={config.n_kv_heads} vocab_size={config.vocab_size} "
                 f"seq_len={config.seq_len} shared_classifier={int(config.shared_classifier)}")
        raise CheckpointError(f"{path}: file size: expected {expected:,} bytes for a v{config.version} "
                              f"checkpoint with {shape}, found {size:,}{hint}")
    return config


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def require_memory(source: str | os.PathLike, what: str, needed: int, detail: str = "", hint: str = "") -> None:
    """Refuse, before allocating, what would not fit in 90% of the memory available now."""
    available = available_memory()
    if available is not None and needed > 0.9 * available:
        raise CheckpointError(f"{source}: {what}: needs {needed / 2**30:.1f} GiB{detail}, only "
                              f"{available / 2**30:.1f} GiB of memory is available{hint}")


def file_buffer(path: Path, size: int, in_memory: bool,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the object to keep alive, a plain uint8 ndarray of the file's `size` bytes): one
    read-only mapping in 2 MB pages where the OS allows (mapping.py), or with in_memory one
    copy in anonymous memory, which NumPy asks to back with 2 MB pages; either way the file is
    read here, reporting `progress(bytes read, size)`. Every container's reader takes its views
    from this one buffer."""
    if not in_memory:
        mm = map_read_only(path, progress)
        return mm, mm.view(np.ndarray)  # plain ndarray views: Numba types them without the subclass
    require_memory(path, "in-memory load", size, hint=" (map it instead)")
    mm = np.empty(size, np.uint8)  # NumPy advises huge pages for large arrays
    with open(path, "rb") as f:
        for start in range(0, size, READ_STEP):
            stop = min(start + READ_STEP, size)
            if f.readinto(memoryview(mm)[start:stop]) != stop - start:
                raise CheckpointError(f"{path}: file size: changed while it was being read")
            if progress is not None:
                progress(stop, size)
        if f.read(1):
            raise CheckpointError(f"{path}: file size: changed while it was being read")
    mm.flags.writeable = False
    return mm, mm


def read_checkpoint(path: str | os.PathLike, in_memory: bool = False, progress: Progress | None = None,
                    config: ModelConfig | None = None) -> Checkpoint:
    """Map a checkpoint read-only and return named views of its weights (nothing is copied).
    The mapping uses 2 MB pages where the OS allows (mapping.py), which streams the weights at
    the speed of memory; the file is read (into the page cache) here, reporting
    `progress(bytes read, size)`.

    in_memory=True reads the file into anonymous memory instead, which NumPy asks to back with
    2 MB pages: for platforms where a file cannot be mapped in them, for the memory of a copy.
    `config`: read_config(path)'s, when the caller has read it already (the file's size is
    checked against it again when mapped)."""
    path = Path(path)
    config = config if config is not None else read_config(path)
    mm, buf = file_buffer(path, expected_file_size(config), in_memory, progress)
    offset = header_bytes(config)
    found: dict[str, Any] = {}
    for entry in layout(config):
        view = entry.format.view(buf, offset, entry.shape)
        offset += entry.nbytes
        if entry.layer is None:
            found[entry.name] = view
        else:
            found.setdefault(entry.name, []).append(view)
    if offset != len(buf):
        raise CheckpointError(f"{path}: file size: expected {offset:,} bytes, found {len(buf):,}: it changed "
                              "since its header was read")
    found.pop("freq_cis_real", None)
    found.pop("freq_cis_imag", None)
    if config.shared_classifier:
        found["wcls"] = found["token_embedding_table"]
    return Checkpoint(path, config, TransformerWeights(**found), mm)


# ----------------------------------------------------------------------------------------------
# Writing


def freq_cis_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin tables a v0 file carries (llama2.c's precompute_freqs_cis, theta 10000)."""
    hs = config.head_size
    freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2, dtype=np.float32)[: hs // 2] / hs))
    angles = np.outer(np.arange(config.seq_len, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


WriteProgress = Callable[[str, int, int, int, int], None]
"""progress(tensor, tensors_done, tensors_total, bytes_done, bytes_total), after every block."""


def write_checkpoint(path: str | os.PathLike, config: ModelConfig, weights: Mapping[str, Any],
                     progress: WriteProgress | None = None) -> None:
    """Write `weights` in the layout `config.version` names, atomically (temp file + rename).

    `weights` maps TransformerWeights' names ("wcls" only for an unshared classifier) to
    float32 arrays, stacked over the layers or sequences indexed by layer, or is a TensorSource
    (files.source), read tensor by tensor in row blocks: then memory holds about one block, and
    v2 quantizes each block as it goes. `progress` is called after every block."""
    config.validate(str(path))
    _check_implied_constants(config, path)
    entries = layout(config)
    missing = [e.name for e in entries if e.name not in weights and not e.name.startswith("freq_cis")]
    if missing:
        raise CheckpointError(f"{path}: cannot write: weight {missing[0]!r} missing")
    extra = dict(zip(("freq_cis_real", "freq_cis_imag"), freq_cis_tables(config))) if config.version == 0 else {}
    tensors = [(entry, layer) for entry in entries for layer in _layers_of(entry, config)]
    header = _header(config)
    done_bytes, total_bytes = len(header), expected_file_size(config)
    with atomic_write(path) as f:
        f.write(header)
        for done, (entry, layer) in enumerate(tensors):
            label = entry.name if layer is None else f"{entry.name}[{layer}]"
            shape = entry.shape[1:] if layer is not None and entry.layer is None else entry.shape
            blocks = iter([extra[entry.name]]) if entry.name in extra else block_source(weights, entry.name, layer)
            for written in _write_tensor(f, path, label, entry.format, shape, blocks):
                done_bytes += written
                if progress is not None:
                    progress(label, done, len(tensors), done_bytes, total_bytes)
            if progress is not None:
                progress(label, done + 1, len(tensors), done_bytes, total_bytes)


def _check_implied_constants(config: ModelConfig, path: str | os.PathLike) -> None:
    """A llama2.c file cannot record norm_eps or rope_theta: readers imply run.c's values, so
    a model with others would be silently changed."""
    if np.float32(config.norm_eps) != np.float32(ModelConfig.norm_eps):
        raise CheckpointError(f"{path}: norm_eps: expected {ModelConfig.norm_eps:g} (the only value a llama2.c file "
                              f"can mean), found {config.norm_eps:g}: write GGUF instead")
    if config.rope_theta != ModelConfig.rope_theta:
        raise CheckpointError(f"{path}: rope_theta: expected {ModelConfig.rope_theta:g} (the only value a llama2.c "
                              f"file can mean), found {config.rope_theta:g}: write GGUF instead")


def _header(config: ModelConfig) -> bytes:
    if config.version == 0:
        vocab = config.vocab_size if config.shared_classifier else -config.vocab_size
        return struct.pack("<7i", config.dim, config.hidden_dim, config.n_layers, config.n_heads,
                           config.n_kv_heads, vocab, config.seq_len)
    head = struct.pack("<Ii7iB", MAGIC, config.version, config.dim, config.hidden_dim, config.n_layers,
                       config.n_heads, config.n_kv_heads, config.vocab_size, config.seq_len,
                       int(config.shared_classifier))
    if config.version == 2:
        head += struct.pack("<i", config.group_size)
    return head.ljust(V1_HEADER_BYTES, b"\0")


def _layers_of(entry: Entry, config: ModelConfig) -> Sequence[int | None]:
    """The tensors one entry is written from: its own layer, or for a stack over the layers
    (v0/v1's per-layer tensors) each layer in turn."""
    if entry.layer is None and entry.name in PER_LAYER:
        return range(config.n_layers)
    return [entry.layer]


def _write_tensor(f, path: str | os.PathLike, label: str, fmt: Format, shape: tuple[int, ...],
                  blocks: Iterator[np.ndarray]) -> Iterator[int]:
    """Encode one tensor's row blocks in `fmt` into f at its offset; yield the bytes of each block.

    A format's encode may give several parts (Q8_0: the int8 values, then the scales): each
    part is a section of the tensor's bytes in which every row has the same size, so part i of
    each block goes to section i, after the rows written before it. A vector is one row."""
    matrix = shape if len(shape) > 1 else (1, *shape)
    start, rows, cursors = f.tell(), 0, None
    for block in blocks:
        block = np.asarray(block, np.float32)
        if (block.shape[1:] if len(shape) > 1 else block.shape) != matrix[1:]:
            raise CheckpointError(f"{path}: cannot write {label}: expected shape {shape}, found "
                                  f"{'rows of shape ' if len(shape) > 1 else ''}{block.shape}")
        block = block.reshape(-1, matrix[1])
        parts = [memoryview(np.ascontiguousarray(part)).cast("B") for part in fmt.encode(block)]
        if cursors is None:  # the sections' offsets, from the first block's bytes per row
            per_row = [len(part) // len(block) for part in parts]
            if any(len(part) != size * len(block) for part, size in zip(parts, per_row)) or \
                    sum(per_row) * matrix[0] != fmt.nbytes(shape):
                raise ValueError(f"{fmt!r}: encode must give parts of a whole number of bytes per row")
            cursors = [start + sum(per_row[:i]) * matrix[0] for i in range(len(parts))]
        for i, part in enumerate(parts):
            f.seek(cursors[i])
            f.write(part)
            cursors[i] += len(part)
        rows += len(block)
        yield sum(len(part) for part in parts)
    if rows != matrix[0]:
        raise CheckpointError(f"{path}: cannot write {label}: expected shape {shape}, found {rows} rows")
    f.seek(start + fmt.nbytes(shape))
