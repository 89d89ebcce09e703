"""SentencePiece vocabularies: train one as llama2.c does, and export a `.model` to llama2.c's
`tokenizer.bin` layout. Torch-free (sentencepiece and NumPy only).

tokenizer.bin layout (llama2.c's tokenizer.py export): uint32 max_token_length, then for every
token id in order: float32 score, uint32 byte length, the UTF-8 bytes of the piece, with '▁'
replaced by ' ', BOS written as '\\n<s>\\n' and EOS as '\\n</s>\\n'; byte-fallback pieces stay as
their `<0xNN>` text.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_write


def _load_sp(model_path: str | os.PathLike):
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer model: expected a SentencePiece .model file, found nothing there")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: tokenizer model: expected a SentencePiece model, found unreadable data ({first})") from None
    return sp


def tokenizer_bin_bytes(model_path: str | os.PathLike) -> bytes:
    """The llama2.c tokenizer.bin bytes for a SentencePiece model."""
    sp = _load_sp(model_path)
    bos, eos = sp.bos_id(), sp.eos_id()
    tokens, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i == bos:
            piece = "\n<s>\n"
        elif i == eos:
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    out = [struct.pack("<I", max(len(t) for t in tokens))]
    for data, score in zip(tokens, scores):
        out.append(struct.pack("<fI", score, len(data)))
        out.append(data)
    return b"".join(out)


def export_tokenizer(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write llama2.c's tokenizer.bin for `model_path` to `out_path` (atomically)."""
    data = tokenizer_bin_bytes(model_path)
    with atomic_write(out_path) as f:
        f.write(data)
    return Path(out_path)


def train_vocab(stories: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
                num_threads: int | None = None) -> tuple[Path, Path]:
    """Train a SentencePiece BPE vocabulary the way llama2.c's tinystories.py does and write
    `model_path` (e.g. data/tok512.model) and its llama2.c export beside it (data/tok512.bin)."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"{model_path}: expected a path ending in .model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".train-vocab-") as tmp:
        text_file = Path(tmp) / "corpus.txt"
        n = 0
        with open(text_file, "w", encoding="utf-8") as f:
            for story in stories:
                story = story.strip()
                if story:
                    f.write(story + "\n")
                    n += 1
        if n == 0:
            raise ValueError("train-vocab: expected some text to train on, found none")
        prefix = Path(tmp) / "tok"
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
                input_format="text", character_coverage=1.0,
                num_threads=num_threads or os.cpu_count() or 1, split_digits=True,
                allow_whitespace_only_pieces=True, byte_fallback=True, unk_surface=r" \342\201\207 ",
                normalization_rule_name="identity", minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (5000). Please set it to a value <= 301."
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = reason.split("] ", 1)[-1]
            raise ValueError(f"train-vocab --vocab-size {vocab_size}: SentencePiece refused: {reason}") from None
        data = (prefix.with_suffix(".model")).read_bytes()
    with atomic_write(model_path) as f:
        f.write(data)
    bin_path = export_tokenizer(model_path, model_path.with_suffix(".bin"))
    return model_path, bin_path
