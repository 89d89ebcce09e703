"""SentencePiece vocabularies: train one as llama2.c's tinystories.py does. Torch-free
(sentencepiece only).

The llama2.c export of a trained `.model` (its `tokenizer.bin`) is written by
`llama2nb.tokenizer.sentencepiece_to_bin`, the project's one SentencePiece-to-llama2.c mapping and
one tokenizer.bin writer, which the engine's tokenizer, `export-tokenizer` and the hub share.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_write
from ..errors import DataError
from ..tokenizer import sentencepiece_to_bin


def train_vocab(stories: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
                num_threads: int | None = None) -> tuple[Path, Path]:
    """Train a SentencePiece BPE vocabulary the way llama2.c's tinystories.py does and write
    `model_path` (e.g. data/tok512.model) and its llama2.c export beside it (data/tok512.bin)."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"{model_path}: expected a path ending in .model")  # the caller names it
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
            raise DataError("train-vocab: expected some text to train on, found none")
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
            raise DataError(f"train-vocab --vocab-size {vocab_size}: SentencePiece refused: {reason}") from None
        data = (prefix.with_suffix(".model")).read_bytes()
    with atomic_write(model_path) as f:
        f.write(data)
    bin_path = sentencepiece_to_bin(model_path, model_path.with_suffix(".bin"))
    return model_path, bin_path
