"""Text → stories → pretokenized shards. Torch-free.

Data directory layout (default `data/`):

    data/TinyStories_all_data/data00.json … data49.json   `llama2nb data download`
    data/tok512.model, data/tok512.bin                     `llama2nb data train-vocab --vocab-size 512`
    data/tok512/meta.json                                   `llama2nb data pretokenize --vocab-size 512`
    data/tok512/train-000.bin, train-001.bin, …             (uint16 tokens; uint32 past 65,535 tokens)
    data/tok512/val-000.bin, …

A shard directory is named after its tokenizer's file stem (`--tokenizer path/llama2.model`
gives `data/llama2/`). Every story is encoded with BOS in front and no EOS, as llama2.c does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..atomic import atomic_write
from ..errors import DataError

TINYSTORIES_DIR = "TinyStories_all_data"
EOT_LINE = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# Reading stories


def split_stories(text: str) -> list[str]:
    """Stories of a plain text file: separated by `<|endoftext|>` lines when the file has any
    (TinyStories-train.txt's layout), otherwise by blank lines."""
    lines = text.splitlines()
    if any(line.strip() == EOT_LINE for line in lines):
        parts, current = [], []
        for line in lines:
            if line.strip() == EOT_LINE:
                parts.append("\n".join(current))
                current = []
            else:
                current.append(line)
        parts.append("\n".join(current))
    else:
        parts = re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def read_stories(path: str | os.PathLike) -> list[str]:
    """Stories of a TinyStories JSON shard (a list of objects with a "story" field) or of a
    plain text file (see split_stories)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text, found an invalid byte at offset {e.start}") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: expected a TinyStories JSON shard, found invalid JSON at line {e.lineno}") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of stories, found {type(items).__name__}")
        stories = []
        for item in items:
            story = item.get("story") if isinstance(item, dict) else item if isinstance(item, str) else None
            if isinstance(story, str) and story.strip():
                stories.append(story.strip())
        return stories
    return split_stories(text)


def tinystories_shards(data_dir: str | os.PathLike) -> list[Path]:
    shards = sorted((Path(data_dir) / TINYSTORIES_DIR).glob("*.json"))
    if not shards:
        raise DataError(f"{Path(data_dir) / TINYSTORIES_DIR}: expected TinyStories JSON shards "
                         "(run `llama2nb data download`, or pass --text FILE), found none")
    return shards


# ----------------------------------------------------------------------------------------------
# Pretokenizing

_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor()
    _SP.Load(model_path)


def _encode_chunk(stories: Sequence[str]) -> tuple[np.ndarray, int]:
    bos = _SP.bos_id()
    ids: list[int] = []
    for story in stories:
        ids.append(bos)
        ids.extend(_SP.encode(story))
    return np.asarray(ids, dtype=np.int64), len(stories)


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def encode_stories(stories: Sequence[str], model_path: str | os.PathLike, dtype: np.dtype,
                   workers: int = 1, chunk: int = 256,
                   advance: Callable[[int], None] | None = None) -> np.ndarray:
    """All stories encoded (BOS + ids each) and concatenated, in order, with `workers` processes."""
    chunks = [stories[i:i + chunk] for i in range(0, len(stories), chunk)]
    parts: list[np.ndarray] = []
    if workers <= 1 or len(chunks) <= 1:
        _init_worker(str(model_path))
        results: Iterable = map(_encode_chunk, chunks)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(model_path),))
        results = pool.imap(_encode_chunk, chunks)
    try:
        for ids, n in results:
            parts.append(ids.astype(dtype))
            if advance:
                advance(n)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    with atomic_write(path) as f:
        f.write(np.ascontiguousarray(tokens).tobytes())


def write_meta(shard_dir: Path, model_path: Path, vocab_size: int, bos_id: int, dtype: np.dtype) -> None:
    meta = {"tokenizer": str(model_path), "vocab_size": vocab_size, "bos_id": bos_id, "dtype": dtype.name}
    with atomic_write(shard_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_meta(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        vocab, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
    except FileNotFoundError:
        raise DataError(f"{path}: expected the meta.json that `llama2nb data pretokenize` writes, found nothing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected JSON with vocab_size and dtype, found unreadable data ({e})") from None
    if dtype not in (np.uint16, np.uint32) or vocab <= 0:
        raise DataError(f"{path}: expected dtype uint16/uint32 and a positive vocab_size, found {dtype}, {vocab}")
    meta["vocab_size"], meta["dtype"] = vocab, dtype
    return meta


def shard_files(shard_dir: str | os.PathLike, split: str) -> list[Path]:
    return sorted(Path(shard_dir).glob(f"{split}-*.bin"))


def tokenizer_model_path(data_dir: str | os.PathLike, vocab_size: int | None, tokenizer: str | None) -> Path:
    if tokenizer:
        return Path(tokenizer)
    if vocab_size:
        return Path(data_dir) / f"tok{vocab_size}.model"
    raise DataError("pretokenize: expected --vocab-size N (data/tokN.model) or --tokenizer MODEL, found neither")
