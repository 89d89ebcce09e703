"""Tokenizers: llama2.c's `tokenizer.bin`, SentencePiece `.model` files and the vocabulary in a
GGUF file's metadata, behind one class.

`.bin` encoding reproduces run.c's `encode()` id for id: a dummy-prefix space, one lookup per
UTF-8 code point with byte fallback (id = byte + 3), then repeated merging of the adjacent pair
whose merged piece scores highest (ties: the leftmost pair). run.c rescans the whole sequence
per merge (quadratic); here a heap of candidate merges over a linked list gives the same merges
in O(n log n), so a 10,000-character prompt encodes in milliseconds.

Decoding works on bytes: `<0xNN>` pieces become raw bytes and an incremental UTF-8 decoder
assembles characters that span tokens, so a stream never shows half a character (run.c prints
printable single bytes and drops the rest).

This module is the project's one writer of tokenizer.bin (`write_bin`) and its one mapping of
SentencePiece pieces to llama2.c's (`Tokenizer._from_sentencepiece`), so `sentencepiece_to_bin`
(used by `export-tokenizer`, `data train-vocab` and the hub's Llama 2 tokenizer) and a `.model`
loaded directly decode alike. It also holds the one policy that finds a checkpoint's tokenizer
when none is given (`find_tokenizer`, shared by `sample` and `eval`).

A GGUF vocabulary (files.gguf.read_vocabulary) becomes llama2.c's pieces and is encoded by the
same algorithm, so it gives tokenizer.bin's ids for the same vocabulary. Its control, unknown
and unused tokens (`special`) are never produced from text: text that spells "<s>" is text.
Its add_space_prefix decides the dummy-prefix space, and its chat template, the chat format
(`chat_format`).
"""

from __future__ import annotations

import codecs
import heapq
import math
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import atomic_write
from .config import MAX_VOCAB
from .errors import TokenizerError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # run.c's byte fallback: byte b is token b + 3 (after <unk>, <s>, </s>)
MAX_TOKEN_LENGTH = 1 << 16  # a sanity bound on the .bin header; real vocabularies stay below 100
# run.c starts its best-merge search at -1e10 and merges only strictly better pairs, so a pair
# whose merged piece scores -1e10 or less is never merged; keep that quirk for exact ids.
_MERGE_FLOOR = float(np.float32(-1e10))
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A vocabulary of byte-string pieces with scores; encode text to ids and ids to text."""

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], *, path: str | os.PathLike = "<memory>",
                 max_token_length: int | None = None, sentencepiece=None, special: Iterable[int] = (),
                 add_space_prefix: bool = True, token_types: np.ndarray | None = None,
                 chat_template: str | None = None) -> None:
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
        self.path = Path(path)
        self.pieces: list[bytes] = [bytes(p) for p in pieces]
        self.scores = np.asarray(scores, dtype=np.float32)
        self.max_token_length = max_token_length if max_token_length is not None else max(
            (len(p) for p in self.pieces), default=0)
        self._sp = sentencepiece  # a SentencePieceProcessor for .model files: it does the encoding
        self.add_space_prefix = add_space_prefix
        self.token_types = token_types  # GGUF's token types, when the vocabulary came with them
        self.chat_template = chat_template
        special = set(special)
        # bytes -> id. run.c binary-searches a sorted copy; with duplicate pieces that finds an
        # arbitrary one, here the lowest id wins (real vocabularies have no duplicates).
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            if i not in special:
                self._lookup.setdefault(p, i)
        self._scores = self.scores.tolist()  # Python floats: the merge loop compares them per pair
        self._pair_cache: dict[tuple[int, int], int] = {}
        # What each token contributes to the output, and a second version with its leading
        # space stripped (used right after BOS, as run.c and SentencePiece do).
        self._bytes: list[bytes] = []
        for p in self.pieces:
            m = _BYTE_PIECE.fullmatch(p)
            self._bytes.append(bytes([int(m.group(1), 16)]) if m else p)
        self._bytes_after_bos = [b[1:] if b[:1] == b" " and not _BYTE_PIECE.fullmatch(p) else b
                                 for p, b in zip(self.pieces, self._bytes)]
        if self.vocab_size > BOS_ID:  # BOS delimits sequences: run.c never prints it
            self._bytes[BOS_ID] = self._bytes_after_bos[BOS_ID] = b""

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def load(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "Tokenizer":
        """Read a llama2.c `tokenizer.bin` or a SentencePiece `.model`; with `vocab_size`, the
        count must match the model's (a tokenizer of another model would index out of range)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise TokenizerError(f"{path}: expected a tokenizer file, found a directory") from None
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer: {e.strerror or e}") from None
        if data[:4] == b"GGUF":
            tok = cls._from_gguf(path)
        elif path.suffix == ".model" or _looks_like_sentencepiece(data):
            tok = cls._from_sentencepiece(path, data)
        else:
            tok = cls._from_bin(path, data)
        if vocab_size is not None and tok.vocab_size != vocab_size:
            raise TokenizerError(f"{path}: tokenizer vocabulary: expected {vocab_size} tokens (the model's "
                                  f"vocab_size), found {tok.vocab_size}; pass the model's own tokenizer with -z")
        return tok

    @classmethod
    def _from_bin(cls, path: Path, data: bytes) -> "Tokenizer":
        """llama2.c layout: int32 max_token_length, then per token float32 score, int32 length,
        bytes. The count is not stored: read to the end, checking every length against it."""
        size = len(data)
        if size < 4:
            raise TokenizerError(f"{path}: tokenizer header: expected at least 4 bytes, found a {size}-byte file")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= MAX_TOKEN_LENGTH:
            raise TokenizerError(f"{path}: tokenizer field max_token_length: expected 1..{MAX_TOKEN_LENGTH}, "
                                  f"found {max_len} (not a llama2.c tokenizer.bin?)")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < size:
            i = len(pieces)
            if len(pieces) >= MAX_VOCAB:
                raise TokenizerError(f"{path}: tokenizer: expected at most {MAX_VOCAB} tokens, found more")
            if size - off < 8:
                raise TokenizerError(f"{path}: tokenizer token {i}: expected an 8-byte score and length at "
                                      f"offset {off}, found {size - off} bytes (truncated?)")
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if not math.isfinite(score):
                raise TokenizerError(f"{path}: tokenizer token {i} score: expected a finite float, found {score}")
            if not 0 <= length <= size - off:
                raise TokenizerError(f"{path}: tokenizer token {i} length: expected 0..{size - off} (the bytes "
                                      f"left at offset {off}), found {length} (truncated or not a tokenizer?)")
            pieces.append(data[off:off + length])
            scores.append(score)
            off += length
        if not pieces:
            raise TokenizerError(f"{path}: tokenizer: expected at least one token, found none")
        return cls(pieces, scores, path=path, max_token_length=max_len)

    @classmethod
    def _from_sentencepiece(cls, path: Path, data: bytes) -> "Tokenizer":
        """Pieces and scores as llama2.c's tokenizer.py exports them (so `.bin` and `.model`
        decode alike): every id in order, U+2581 replaced by a space, BOS written as "\\n<s>\\n"
        and EOS as "\\n</s>\\n", byte-fallback pieces kept as their `<0xNN>` text, scores as
        SentencePiece gives them. SentencePiece itself does the encoding."""
        try:
            import sentencepiece as spm
        except ImportError:  # pragma: no cover - a dependency, but keep the message clean
            raise TokenizerError(f"{path}: reading .model tokenizers needs the sentencepiece package") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError on bad protos
            raise TokenizerError(f"{path}: tokenizer: expected a SentencePiece model, found unparsable data "
                                  f"({type(e).__name__})") from None
        n = sp.get_piece_size()
        if n == 0:
            raise TokenizerError(f"{path}: tokenizer: expected at least one token, found none")
        pieces, scores = [], []
        for i in range(n):
            piece = sp.id_to_piece(i)
            if i == sp.bos_id():
                piece = "\n<s>\n"
            elif i == sp.eos_id():
                piece = "\n</s>\n"
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
            scores.append(sp.get_score(i))
        return cls(pieces, scores, path=path, sentencepiece=sp)

    @classmethod
    def _from_gguf(cls, path: Path) -> "Tokenizer":
        """The SentencePiece vocabulary in a GGUF file's metadata (checked by read_vocabulary)."""
        from .files.gguf import read_vocabulary

        v = read_vocabulary(path)
        return cls(v.pieces, v.scores, path=path, special=v.special_ids, add_space_prefix=v.add_space_prefix,
                   token_types=v.token_types, chat_template=v.chat_template)

    def save_bin(self, path: str | os.PathLike) -> None:
        """Write llama2.c's tokenizer.bin layout (atomically)."""
        write_bin(path, self.pieces, self.scores, self.max_token_length)

    # ------------------------------------------------------------------------------------------
    # Encoding

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def kind(self) -> str:
        return "sentencepiece" if self._sp is not None else "llama2.c"

    @property
    def chat_format(self) -> str | None:
        """"llama2" (the [INST] format generate.chat speaks) when the vocabulary names no chat
        template or names Llama 2's, else None: a format the engine does not have."""
        if self.chat_template is None or "[INST]" in self.chat_template:
            return "llama2"
        return None

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for `text`: run.c's algorithm for `.bin` files, SentencePiece for `.model`.
        A `str` that came from undecodable bytes (surrogateescape, e.g. from argv) is encoded
        from its original bytes; lone surrogates are a ValueError."""
        if self._sp is not None:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            ids = self._sp.encode(text) if text else []
        else:
            ids = self._encode_bpe(_to_bytes(text))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def _encode_bpe(self, data: bytes) -> list[int]:
        if not data:
            return []
        prefix = b" " if self.add_space_prefix else b""
        ids = self._initial_ids(prefix + data)  # run.c's add_dummy_prefix (" " for non-empty text)
        return self._merge(ids)

    def _initial_ids(self, data: bytes) -> list[int]:
        """One id per UTF-8 code point (run.c's grouping: a lead byte plus at most 3
        continuation bytes), or its bytes as byte-fallback ids when the code point is unknown."""
        lookup, n_vocab = self._lookup, self.vocab_size
        ids: list[int] = []
        n, i = len(data), 0
        while i < n:
            j = i + 1
            # run.c appends continuation bytes (10xxxxxx) while the buffer holds < 4 bytes
            while j < n and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            tid = lookup.get(data[i:j])
            if tid is not None:
                ids.append(tid)
            else:
                for b in data[i:j]:
                    # run.c emits b + 3 unconditionally; a vocabulary too small for byte tokens
                    # would index out of the model's table, so those become <unk> instead.
                    ids.append(b + BYTE_OFFSET if b + BYTE_OFFSET < n_vocab else UNK_ID)
            i = j
        return ids

    def _pair(self, a: int, b: int) -> int:
        """Id of the piece pieces[a] + pieces[b], or -1 (cached: prompts repeat pairs a lot)."""
        key = (a, b)
        tid = self._pair_cache.get(key)
        if tid is None:
            tid = self._lookup.get(self.pieces[a] + self.pieces[b], -1)
            if tid >= 0 and not self._scores[tid] > _MERGE_FLOOR:
                tid = -1
            if len(self._pair_cache) < 1 << 20:
                self._pair_cache[key] = tid
        return tid

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop: repeatedly merge the adjacent pair whose merged piece has the
        highest score, the leftmost on ties. Nodes keep their original index, which orders them
        left to right forever, so (-score, left index) is exactly run.c's choice; heap entries
        made stale by an earlier merge are recognised and skipped when popped."""
        n = len(ids)
        if n < 2:
            return ids
        tok = list(ids)
        nxt = list(range(1, n + 1))  # n marks the end
        prv = list(range(-1, n - 1))
        alive = [True] * n
        scores, pair = self._scores, self._pair
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            t = pair(tok[i], tok[i + 1])
            if t >= 0:
                heap.append((-scores[t], i, t, tok[i + 1]))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, i, t, right_tok = pop(heap)
            j = nxt[i]
            # stale if the left node died, or either side changed since this entry was made
            if not alive[i] or j >= n or tok[j] != right_tok or pair(tok[i], tok[j]) != t:
                continue
            tok[i] = t
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                u = pair(t, tok[k])
                if u >= 0:
                    push(heap, (-scores[u], i, u, tok[k]))
            p = prv[i]
            if p >= 0:
                u = pair(tok[p], t)
                if u >= 0:
                    push(heap, (-scores[u], p, u, t))
        out = []
        i = 0
        while i < n:
            out.append(tok[i])
            i = nxt[i]
        return out

    # ------------------------------------------------------------------------------------------
    # Decoding

    def piece_bytes(self, token: int, prev_token: int | None = None) -> bytes:
        """The bytes `token` adds to the text: `<0xNN>` is the raw byte, BOS adds nothing, and a
        leading space is dropped right after BOS (run.c's decode, SentencePiece's behaviour)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id: expected 0..{self.vocab_size - 1}, found {token}")
        return (self._bytes_after_bos if prev_token == BOS_ID else self._bytes)[token]

    def decode(self, ids: Iterable[int], prev_token: int | None = None) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD). Stripping follows run.c: the space
        is dropped from a piece that follows BOS, so pass the BOS too (encode's output does)."""
        out = bytearray()
        prev = prev_token
        for t in ids:
            out += self.piece_bytes(t, prev)
            prev = t
        return out.decode("utf-8", "replace")

    def stream(self, prev_token: int | None = None) -> "StreamDecoder":
        return StreamDecoder(self, prev_token)


class StreamDecoder:
    """Token-by-token text that never emits half a UTF-8 character: bytes wait until their
    character is complete; invalid sequences become U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, prev_token: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.prev = prev_token
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        data = self.tokenizer.piece_bytes(token, self.prev)
        self.prev = token
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        """Whatever is pending at the end of the stream (an incomplete character shows as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------
# Helpers


def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # argv/stdin bytes that were not UTF-8 arrive as surrogate escapes: use the bytes
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise ValueError(f"text: expected encodable Unicode, found a lone surrogate at index {e.start}") from None


def _looks_like_sentencepiece(data: bytes) -> bool:
    """A SentencePiece model is a protobuf whose first field (pieces, #1, length-delimited)
    starts with tag byte 0x0A; a tokenizer.bin starts with a small int32 max_token_length."""
    if len(data) < 4 or data[0] != 0x0A:
        return False
    (max_len,) = struct.unpack_from("<i", data, 0)
    return not 0 < max_len <= MAX_TOKEN_LENGTH


def write_bin(path: str | os.PathLike, pieces: Sequence[bytes | str], scores: Sequence[float],
              max_token_length: int | None = None) -> None:
    """Write a llama2.c tokenizer.bin atomically: int32 max_token_length (default: the longest
    piece), then per token float32 score, int32 byte length and the bytes, little-endian, which
    is what run.c's build_tokenizer reads (llama2.c's tokenizer.py packs the lengths as uint32:
    the same bytes for every real length)."""
    raw = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces]
    if len(raw) != len(scores):
        raise ValueError(f"{len(raw)} pieces but {len(scores)} scores")
    max_len = max_token_length if max_token_length is not None else max((len(p) for p in raw), default=1)
    with atomic_write(path) as f:
        f.write(struct.pack("<i", max(max_len, 1)))
        for p, s in zip(raw, scores):
            f.write(struct.pack("<fi", float(s), len(p)))
            f.write(p)


def sentencepiece_to_bin(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the SentencePiece model `model_path` in llama2.c's tokenizer.bin layout at
    `out_path` (atomically): the pieces and scores `Tokenizer` reads from it, written by
    write_bin. For the Llama 2 tokenizer.model that is llama2.c's tokenizer.bin byte for byte."""
    tok = Tokenizer.load(model_path)
    if tok.kind != "sentencepiece":
        raise TokenizerError(f"{model_path}: expected a SentencePiece .model to convert, found a llama2.c "
                             "tokenizer.bin")
    tok.save_bin(out_path)
    return Path(out_path)


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint's tokenizer

BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "checkpoints" / "tokenizer.bin"
TOKENIZER_SEARCH = ("a GGUF checkpoint's own vocabulary, tokenizer.bin/.model or tokN.bin/.model beside the "
                    "checkpoint, data/tokN.bin/.model, or the bundled tokenizer if it has N tokens")


def tokenizer_candidates(checkpoint: str | os.PathLike, vocab_size: int) -> list[Path]:
    """Where a checkpoint's tokenizer may be, in the order `find_tokenizer` tries them: a GGUF
    checkpoint itself (it carries its vocabulary), beside the checkpoint (its own name, then the
    name `data train-vocab` gives an N-token vocabulary), then `data train-vocab`'s default
    output under the current directory."""
    if _is_gguf(Path(checkpoint)):
        return [Path(checkpoint)]
    folder = Path(checkpoint).parent
    names = ("tokenizer.bin", "tokenizer.model", f"tok{vocab_size}.bin", f"tok{vocab_size}.model")
    data = Path("data")
    return [folder / n for n in names] + [data / f"tok{vocab_size}.bin", data / f"tok{vocab_size}.model"]


def find_tokenizer(checkpoint: str | os.PathLike, vocab_size: int) -> Path:
    """The tokenizer `sample` and `eval` use for a checkpoint of `vocab_size` tokens when none is
    given: the first existing file of tokenizer_candidates, else the bundled model's tokenizer if
    it has exactly vocab_size tokens (it serves models trained on its vocabulary). One policy
    for both commands, so a checkpoint samples and evaluates with the same tokenizer.
    TokenizerError (saying where it looked) when there is none."""
    for path in tokenizer_candidates(checkpoint, vocab_size):
        if path.is_file():
            return path
    if BUNDLED_TOKENIZER.is_file() and _count_tokens(BUNDLED_TOKENIZER) == vocab_size:
        return BUNDLED_TOKENIZER
    raise TokenizerError(f"{checkpoint}: no tokenizer found (looked for {TOKENIZER_SEARCH}, N = {vocab_size}): "
                         "pass one with -z/--tokenizer")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _count_tokens(path: Path) -> int | None:
    try:
        return Tokenizer.load(path).vocab_size
    except TokenizerError:
        return None
