"""Tokenizer: run.c's exact ids for .bin files, SentencePiece for .model, byte-exact decoding,
and clean errors for every kind of bad tokenizer file."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from llama2nb.errors import TokenizerError
from llama2nb.tokenizer import BOS_ID, EOS_ID, Tokenizer, sentencepiece_to_bin, write_bin
from llama2nb.testmodels import byte_vocab

from .conftest import LLAMA2_BIN, LLAMA2_MODEL, requires
from .sampling_fixtures import WORDS, runc_encode, tiny_vocab, write_tiny_tokenizer

TRICKY = [
    "Hello 🦙 world! 日本語のテキスト",
    "emoji 👨‍👩‍👧‍👦 family and flags 🇫🇷🇯🇵",
    "tabs\tand\t\ttabs\t",
    "runs   of     spaces  ",
    "  two leading spaces",
    " one leading space",
    "trailing space ",
    "naïve café ñ Ωmega ∑ ≠ → ✓",
    "\n\nnew\nlines\r\n",
    "control \x01\x07\x7f chars",
    "a" * 50,
    "中文字符和English混合",
    "<0x41> looks like a byte token",
    "</s> <s> <unk> literally",
]


@pytest.fixture(scope="module")
def llama_bin() -> Tokenizer:
    return Tokenizer.load(LLAMA2_BIN, vocab_size=32000)


@pytest.fixture(scope="module")
def llama_model() -> Tokenizer:
    return Tokenizer.load(LLAMA2_MODEL, vocab_size=32000)


def long_prompt(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ("Once upon a time there was a little girl named Lily . She loved to play outside , "
             "café 日本 🦙 naïve\ttabs").split(" ")
    text = ""
    while len(text) < n_chars:
        text += rng.choice(words) + rng.choice([" ", " ", " ", "  ", "\n"])
    return text[:n_chars]


# ----------------------------------------------------------------------------------------------
# run.c's known cases on the Llama 2 vocabulary


@requires(LLAMA2_BIN)
def test_runc_known_cases(llama_bin):
    assert llama_bin.encode("") == [1]
    assert llama_bin.encode("", bos=False) == []
    assert llama_bin.encode("I believe the meaning of life is") == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert llama_bin.encode("I believe the meaning of life is", bos=False, eos=True) == [
        306, 4658, 278, 6593, 310, 2834, 338, 2]
    # run.c's test_all.py / test.c cases
    assert llama_bin.encode("Simply put, the theory of relativity states that ") == [
        1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871]
    assert llama_bin.encode("A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n        I just ") == [
        1, 319, 11473, 2643, 378, 629, 271, 18099, 278, 3815, 373, 278, 6826, 29901, 13, 13, 4706, 6324, 14332,
        29892, 13, 13, 4706, 306, 925, 29871]
    assert llama_bin.encode("Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => "
                            "menthe poivrée\n        plush girafe => girafe peluche\n        cheese =>") == [
        1, 4103, 9632, 4223, 304, 5176, 29901, 13, 13, 4706, 7205, 4932, 357, 1149, 301, 449, 276, 316, 2778, 13,
        4706, 1236, 407, 837, 524, 1149, 6042, 354, 772, 440, 29878, 1318, 13, 4706, 715, 1878, 330, 3055, 1725,
        1149, 330, 3055, 1725, 4639, 28754, 13, 4706, 923, 968, 1149]


@requires(LLAMA2_BIN)
def test_fast_merge_equals_runc_loop(llama_bin):
    """The heap-and-linked-list merge gives run.c's quadratic loop's ids on many strings."""
    rng = random.Random(1)
    alphabet = "aeiou tnsrl.,!?\t\n日本語🦙é"
    samples = TRICKY + [long_prompt(300, seed) for seed in range(5)]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    for text in samples:
        expected = runc_encode(llama_bin.pieces, llama_bin.scores, text.encode("utf-8"))
        assert llama_bin.encode(text) == expected, text


@requires(LLAMA2_BIN)
@requires(LLAMA2_MODEL)
@pytest.mark.parametrize("text", TRICKY + ["", long_prompt(2000)], ids=range(len(TRICKY) + 2))
def test_round_trips_bin_and_model(llama_bin, llama_model, text):
    ids_bin, ids_model = llama_bin.encode(text), llama_model.encode(text)
    assert llama_bin.decode(ids_bin) == text
    assert llama_model.decode(ids_model) == text
    assert llama_bin.decode(ids_model) == text  # the vocabularies are the same pieces
    assert ids_bin == ids_model  # run.c's BPE agrees with SentencePiece on all of these
    assert all(0 <= t < 32000 for t in ids_bin)


@requires(LLAMA2_BIN)
@requires(LLAMA2_MODEL)
def test_model_file_exports_the_bin_vocabulary(llama_bin, llama_model):
    assert llama_model.kind == "sentencepiece" and llama_bin.kind == "llama2.c"
    assert llama_model.pieces == llama_bin.pieces
    assert np.array_equal(llama_model.scores, llama_bin.scores)


@requires(LLAMA2_BIN)
@requires(LLAMA2_MODEL)
def test_sentencepiece_to_bin_is_llama2c_tokenizer_bin(tmp_path):
    """The one .model -> .bin conversion gives llama2.c's tokenizer.bin byte for byte: int32
    max_token_length, then per token float32 score, int32 length and the bytes; BOS and EOS are
    written as llama2.c's tokenizer.py writes them, "\\n<s>\\n" and "\\n</s>\\n"."""
    out = sentencepiece_to_bin(LLAMA2_MODEL, tmp_path / "llama2.bin")
    data = out.read_bytes()
    assert data == LLAMA2_BIN.read_bytes()
    (max_len,) = struct.unpack_from("<i", data, 0)
    offset, pieces = 4, []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    assert len(pieces) == 32000 and max_len == max(len(p) for p in pieces)
    assert pieces[:4] == [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x00>"] and pieces[29871] == b" "
    assert not list(tmp_path.glob(".*tmp*"))


def test_sentencepiece_to_bin_refuses_a_bin(tmp_path):
    write_tiny_tokenizer(tmp_path / "tok.bin")
    with pytest.raises(TokenizerError, match="expected a SentencePiece .model to convert, found a llama2.c"):
        sentencepiece_to_bin(tmp_path / "tok.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


@requires(LLAMA2_BIN)
def test_10000_character_prompt_merges_in_n_log_n(llama_bin):
    """The merge loop does O(n) pair lookups (each initial pair, each heap pop, two new
    neighbours per merge: at most 6 per initial token), where run.c's rescan does O(n^2)."""
    text = long_prompt(10_000, seed=7)
    fresh = Tokenizer.load(LLAMA2_BIN)
    n = len(fresh._initial_ids(b" " + text.encode("utf-8")))
    lookups = 0
    pair = fresh._pair

    def counted(a, b):
        nonlocal lookups
        lookups += 1
        return pair(a, b)

    fresh._pair = counted
    ids = fresh.encode(text)
    print(f"\n10,000-character prompt: {n} initial ids -> {len(ids)} tokens with {lookups} pair lookups")
    assert n > 9_000 and lookups <= 6 * (n - 1)
    assert fresh.decode(ids) == text and ids == llama_bin.encode(text)


# ----------------------------------------------------------------------------------------------
# Decoding


@requires(LLAMA2_BIN)
def test_decode_strips_the_space_after_bos_only(llama_bin):
    hello = llama_bin.encode("hello", bos=False)  # [" hello"]
    assert llama_bin.decode([BOS_ID] + hello) == "hello"
    assert llama_bin.decode(hello) == " hello"
    assert llama_bin.decode(hello + hello) == " hello hello"


@requires(LLAMA2_BIN)
def test_stream_never_emits_half_a_character(llama_bin):
    text = "🦙 日本 👨‍👩‍👧 é"
    ids = llama_bin.encode(text)
    assert any(llama_bin.pieces[t].startswith(b"<0x") for t in ids)  # byte-fallback tokens involved
    decoder = llama_bin.stream()
    parts = [decoder.push(t) for t in ids]
    assert "".join(parts) + decoder.flush() == text
    assert all("\ufffd" not in p for p in parts)
    # the 4 byte tokens of the llama: nothing until the character is complete
    llama = llama_bin.encode("🦙", bos=False)[1:]
    assert len(llama) == 4
    decoder = llama_bin.stream()
    assert [decoder.push(t) for t in llama] == ["", "", "", "🦙"]


@requires(LLAMA2_BIN)
def test_incomplete_or_invalid_bytes_decode_as_replacement(llama_bin):
    assert llama_bin.decode([0xF0 + 3, 0x9F + 3]) == "\ufffd"  # cut-off 4-byte sequence
    decoder = llama_bin.stream()
    assert decoder.push(0xF0 + 3) == ""
    assert decoder.flush() == "\ufffd"
    with pytest.raises(ValueError, match="token id"):
        llama_bin.piece_bytes(32000)


@requires(LLAMA2_BIN)
def test_undecodable_argv_bytes_encode_as_their_bytes(llama_bin):
    # Python passes non-UTF-8 argv bytes as surrogate escapes; run.c sees the raw bytes
    raw = b"caf\xe9 ok"
    text = raw.decode("utf-8", "surrogateescape")
    assert llama_bin.encode(text) == runc_encode(llama_bin.pieces, llama_bin.scores, raw)
    assert llama_bin.encode(raw) == llama_bin.encode(text)
    with pytest.raises(ValueError, match="surrogate"):
        llama_bin.encode("lone \ud800 surrogate")


# ----------------------------------------------------------------------------------------------
# Tiny vocabularies written by the tests (no ../shared)


def test_tiny_vocab_round_trip(tmp_path):
    n = write_tiny_tokenizer(tmp_path / "tok.bin")
    tok = Tokenizer.load(tmp_path / "tok.bin", vocab_size=n)
    pieces, scores = tiny_vocab()
    assert tok.pieces == pieces and tok.vocab_size == n
    ids = tok.encode("Once upon a time there was a little girl.")
    assert [tok.pieces[t] for t in ids[1:]] == [w.encode() for w in
                                                [" Once", " upon", " a", " time", " there", " was", " a",
                                                 " little", " girl", "."]]
    assert tok.encode("café 日本") == [BOS_ID, tok.pieces.index(" café".encode()), tok.pieces.index(" 日本".encode())]
    for text in ["Once upon a time", "zebra 🦓 café", "", "  spaces\tand\ttabs ", "x" * 500]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == runc_encode(pieces, scores, text.encode())
    tok.save_bin(tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()


def test_equal_scores_merge_the_leftmost_pair(tmp_path):
    """run.c takes the first pair with the best score ('>' not '>='): 'ab' and 'bc' tie."""
    pieces, scores = byte_vocab()
    pieces += [b" ", b"a", b"b", b"c", b"ab", b"bc", b" a"]
    scores += [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, -5.0]
    write_bin(tmp_path / "tie.bin", pieces, scores)
    tok = Tokenizer.load(tmp_path / "tie.bin")
    ids = tok.encode("abc", bos=False)
    # pairs " a" (-5), "ab" (-1), "bc" (-1): the tie goes to the leftmost, "ab"; then nothing merges
    # (taking "bc" first, as a rightmost rule would, leads to " a" + "bc" instead)
    assert [tok.pieces[t] for t in ids] == [b" ", b"ab", b"c"]
    assert ids == runc_encode(pieces, scores, b"abc", bos=False)
    ids = tok.encode("bcab", bos=False)
    assert ids == runc_encode(pieces, scores, b"bcab", bos=False)


def test_small_vocabulary_byte_fallback_stays_in_range(tmp_path):
    # 5 tokens: no room for byte tokens (byte + 3); out-of-vocabulary text becomes <unk>
    write_bin(tmp_path / "small.bin", [b"<unk>", b"<s>", b"</s>", b" ", b"a"], [0, 0, 0, 0, 0])
    tok = Tokenizer.load(tmp_path / "small.bin")
    ids = tok.encode("a zé")
    assert ids == [1, 3, 4, 3, 0, 0, 0]
    assert all(t < tok.vocab_size for t in ids)


# ----------------------------------------------------------------------------------------------
# Bad files: one-line TokenizerErrors naming the file


def good_bytes(tmp_path) -> bytes:
    write_tiny_tokenizer(tmp_path / "good.bin")
    return (tmp_path / "good.bin").read_bytes()


def assert_clean_error(path, match: str, vocab_size=None):
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.load(path, vocab_size=vocab_size)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_tokenizer_files(tmp_path):
    good = good_bytes(tmp_path)
    cases = {
        "missing.bin": (None, "cannot read"),
        "empty.bin": (b"", "at least 4 bytes"),
        "header-only.bin": (struct.pack("<i", 10), "at least one token"),
        "zero-max.bin": (struct.pack("<i", 0) + good[4:], "max_token_length"),
        "huge-max.bin": (struct.pack("<i", 1 << 30) + good[4:], "max_token_length"),
        "cut-score.bin": (good[:4 + 5], "truncated"),
        "cut-piece.bin": (good[:4 + 8 + 2], "length"),
        "cut-middle.bin": (good[: len(good) // 2 + 3], "truncated|length"),
        "length-past-end.bin": (good[:4] + struct.pack("<fi", 0.0, 1000) + b"abc", "length.*found 1000"),
        "negative-length.bin": (good[:4] + struct.pack("<fi", 0.0, -1) + b"abc", "length.*found -1"),
        "nan-score.bin": (good[:4] + struct.pack("<fi", float("nan"), 1) + b"a", "score.*finite.*nan"),
        "inf-score.bin": (good + struct.pack("<fi", float("-inf"), 1) + b"a", "score.*finite"),
        "garbage.bin": (bytes(random.Random(3).randrange(256) for _ in range(5000)), "tokenizer"),
        "garbage.model": (b"\x0a\x05hello, not a protobuf" * 3, "SentencePiece"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        assert_clean_error(path, match)
    assert_clean_error(tmp_path, "directory")


def test_vocabulary_size_mismatch_names_both(tmp_path):
    n = write_tiny_tokenizer(tmp_path / "tok.bin")
    message = assert_clean_error(tmp_path / "tok.bin", "vocabulary", vocab_size=32000)
    assert "32000" in message and str(n) in message


def test_fuzzed_tokenizer_files_never_crash(tmp_path):
    """Truncations and bit flips of a real file: each loads or raises the loader's own error."""
    good = good_bytes(tmp_path)
    rng = random.Random(11)
    path = tmp_path / "fuzz.bin"
    outcomes = {"loaded": 0, "error": 0}
    for case in range(300):
        data = bytearray(good)
        if case % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            tok = Tokenizer.load(path)
        except TokenizerError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        ids = tok.encode("Once upon a time, café 🦙")
        assert all(0 <= t < tok.vocab_size for t in ids)
        tok.decode(ids)
    assert outcomes["error"] > 50 and outcomes["loaded"] > 10, outcomes


@requires(LLAMA2_BIN)
def test_words_of_the_tiny_vocab_exist_in_llama(llama_bin):
    # sanity for the tiny vocabulary's design: its words are real Llama 2 pieces or merges of them
    for word in WORDS:
        assert llama_bin.decode(llama_bin.encode(word.strip())) == word.strip()
    assert EOS_ID == 2 and llama_bin.pieces[EOS_ID] == b"\n</s>\n"


# ----------------------------------------------------------------------------------------------
# Property-based: any text encodes as run.c does and decodes back to itself

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.text(
    alphabet=" \t\nabcOnceuponatimé日本🦙.", max_size=60)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.bin"
    write_tiny_tokenizer(path)
    return Tokenizer.load(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_any_text_tiny_vocab(tiny_tok, text):
    ids = tiny_tok.encode(text)
    assert ids == runc_encode(tiny_tok.pieces, tiny_tok.scores, text.encode())
    assert tiny_tok.decode(ids) == text
    decoder = tiny_tok.stream()
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == text


@requires(LLAMA2_BIN)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_any_text_llama2(llama_bin, text):
    ids = llama_bin.encode(text)
    assert ids == runc_encode(llama_bin.pieces, llama_bin.scores, text.encode())
    assert llama_bin.decode(ids) == text
