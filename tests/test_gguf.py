"""GGUF: the reader against llama.cpp's own files and the gguf package (the independent oracle:
used here only), the writer read back by that package, the vocabulary against llama2.c's
tokenizer.bin, every refusal with its own message, and fuzzing whose accepted mutants run a
forward pass in a subprocess (a Numba out-of-bounds read would kill the test runner)."""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2nb import Transformer
from llama2nb.cli import main
from llama2nb.config import ModelConfig
from llama2nb.errors import CheckpointError, TokenizerError
from llama2nb.files import convert, gguf, read_config, read_model
from llama2nb.files.gguf import (ARRAY, BOOL, FLOAT32, INT32, STRING, UINT16, UINT32, UINT64, TensorInfo, Value,
                                 write_gguf)
from llama2nb.files.llama2c import Checkpoint, read_checkpoint, write_checkpoint
from llama2nb.files.source import CheckpointSource
from llama2nb.generate import GenerationError, chat
from llama2nb.sampler import Sampler
from llama2nb.testmodels import byte_vocab, random_weights
from llama2nb.tokenizer import Tokenizer

from .conftest import LLAMA2_BIN, LLAMA2_MODEL, REPO, SHARED, requires
from .reference import Reference

GGUF_PACKAGE = pytest.importorskip("gguf", reason="the gguf package (dev extra) is the test oracle")
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

MODELS = SHARED / "models" / "gguf"
BUNDLED_BIN = REPO / "llama2nb" / "checkpoints" / "model.bin"
BUNDLED_TOKENIZER = REPO / "llama2nb" / "checkpoints" / "tokenizer.bin"
SHARED_FILES = ["bundled-f32", "bundled-Q8_0", "bundled-Q4_0", "gqa256-f32", "gqa256-Q4_K_M", "gqa256-Q6_K"]
TEXTS = ["Once upon a time, there was a little girl named Lily.", "  héllo wörld ✓ 日本語 ", "a" * 40,
         "tabs\tand\nnew lines\r\n", "<s> </s> <unk> [INST] literally", "", " ", "Tom's 3 dogs ran 10 km."]

WORDS = ["once", "upon", "time", "there", "was", "little", "girl", "the", "and", "[INST]"]
PIECES, SCORES = byte_vocab(WORDS)
SMALL = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(PIECES), seq_len=48)
SMALL_MODELS = {"shared-gqa": SMALL, "unshared": replace(SMALL, shared_classifier=False, n_kv_heads=4)}


def small_tokenizer(**options) -> Tokenizer:
    return Tokenizer(PIECES, SCORES, **options)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (GGUF written by write_gguf, the same weights as a llama2.c v0 file)."""
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for seed, (name, config) in enumerate(SMALL_MODELS.items()):
        weights = random_weights(config, seed=seed, scale=0.1)
        files[name] = (folder / f"{name}.gguf", folder / f"{name}.bin")
        write_gguf(files[name][0], config, weights, small_tokenizer())
        write_checkpoint(files[name][1], config, weights)
    return files


def logits_over(model: Transformer, tokens) -> np.ndarray:
    return np.stack([model.forward(int(t), pos).copy() for pos, t in enumerate(tokens)])


def random_tokens(vocab: int, n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


# ----------------------------------------------------------------------------------------------
# The oracle: the gguf package's reader and dequantizer feed tests/reference.py


def reference_from_gguf(path: Path) -> Reference:
    """tests/reference.py's NumPy forward pass over a GGUF file as the gguf package reads and
    dequantizes it (llama2nb's reader is not involved)."""
    r = GGUFReader(path)
    field = lambda key: r.fields[key].contents()  # noqa: E731
    t = {x.name: dequantize(x.data, x.tensor_type).astype(np.float32) for x in r.tensors}
    layers = field("llama.block_count")
    stack = lambda name: np.stack([t[f"blk.{l}.{name}.weight"] for l in range(layers)])  # noqa: E731
    h = dict(dim=field("llama.embedding_length"), hidden=field("llama.feed_forward_length"), layers=layers,
             heads=field("llama.attention.head_count"), kv_heads=field("llama.attention.head_count_kv"),
             vocab=t["token_embd.weight"].shape[0], seq=field("llama.context_length"), version=1, gs=0,
             shared="output.weight" not in t)
    w = {"emb": t["token_embd.weight"], "rms_final": t["output_norm.weight"],
         "cls": t.get("output.weight", t["token_embd.weight"]), "rms_att": stack("attn_norm"),
         "rms_ffn": stack("ffn_norm")}
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
             "w2": "ffn_down", "w3": "ffn_up"}
    w.update({ours: stack(theirs) for ours, theirs in names.items()})
    return Reference.from_arrays(h, w)


def unsupported_types(path: Path) -> list[str]:
    header = gguf.read_header(path)
    return sorted({gguf.type_name(t.type) for t in header.tensors.values() if gguf.format_for(t.type) is None})


def skip_unless_supported(path: Path) -> None:
    missing = unsupported_types(path)
    if missing:
        pytest.skip(f"{path.name} holds {', '.join(missing)} tensors, which formats.by_ggml_type does not "
                    "provide on this branch (the formats branch adds them)")


# ----------------------------------------------------------------------------------------------
# The real files: llama.cpp's converter and quantizer


@requires(MODELS)
@pytest.mark.parametrize("gguf_name, bin_path", [("bundled-f32", BUNDLED_BIN), ("gqa256-f32", MODELS / "gqa256.bin")])
def test_f32_gguf_gives_the_llama2c_files_logits(gguf_name, bin_path):
    """llama.cpp's converter keeps every F32 tensor bit for bit (no Q/K permutation), so the
    logits are equal, not close."""
    ours = Transformer.load(MODELS / f"{gguf_name}.gguf", fastmath="off")
    theirs = Transformer.load(bin_path, fastmath="off")
    tokens = random_tokens(ours.config.vocab_size)
    assert np.array_equal(logits_over(ours, tokens), logits_over(theirs, tokens))
    assert ours.config.seq_len == 128 and ours.config.norm_eps == np.float32(1e-5)


@requires(MODELS)
@pytest.mark.parametrize("fastmath", ["off", "full"])  # full: the default, VNNI tiles where the CPU has them
@pytest.mark.parametrize("name", SHARED_FILES)
def test_shared_file_matches_the_reference_fed_by_the_gguf_package(name, fastmath):
    """Every file against the NumPy oracle on the gguf package's dequantized weights: F32 at the
    oracle's float tolerance. Quantized types' kernels quantize their activations (Q8 per 32
    or per 256, as llama.cpp's do), which the float oracle does not: their bounds, relative to
    the logits' range, sit a few times above what quantizing the oracle's own activations
    that way moves its logits; greedy agreement is asked of the trained model only (on the
    random-weight gqa256 model, whose top logits nearly tie, that alone flips some argmaxes)."""
    path = MODELS / f"{name}.gguf"
    skip_unless_supported(path)
    model = Transformer.load(path, fastmath=fastmath)
    oracle = reference_from_gguf(path)
    tokens = random_tokens(model.config.vocab_size, 64, seed=1)
    ours = logits_over(model, tokens)
    theirs = np.stack([oracle.forward(int(t), pos).copy() for pos, t in enumerate(tokens)])
    diff = np.abs(ours - theirs)
    agree = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    print(f"{name} ({fastmath}): max abs {diff.max():.3g}, mean abs {diff.mean():.3g}, greedy agreement {agree:.1%}")
    if name.endswith("f32"):
        assert diff.max() <= 5e-4
        assert agree == 1.0
    else:
        spread = float(np.ptp(theirs))
        assert diff.max() <= 0.08 * spread and diff.mean() <= 0.015 * spread
        assert agree >= 0.9 or name.startswith("gqa256")


@requires(MODELS)
@pytest.mark.parametrize("name, tokenizer_bin", [("bundled-f32", BUNDLED_TOKENIZER), ("bundled-Q4_0", BUNDLED_TOKENIZER),
                                                 ("gqa256-Q4_K_M", MODELS / "gqa256-tok512.bin")])
def test_gguf_vocabulary_gives_tokenizer_bin_ids(name, tokenizer_bin):
    ours = Tokenizer.load(MODELS / f"{name}.gguf")
    theirs = Tokenizer.load(tokenizer_bin)
    assert ours.pieces == theirs.pieces and np.array_equal(ours.scores, theirs.scores)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)


@requires(MODELS)
def test_info_shows_metadata_and_tensors_per_type():
    result = CliRunner().invoke(main, ["info", str(MODELS / "bundled-Q4_0.gguf")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "GGUF version 3, alignment 32" in out
    assert "tensors Q4_0" in out and "tensors Q8_0" in out and "tensors F32" in out
    assert "36, 839.2 KiB" in out  # 35 matrices + token_embd in Q4_0
    assert "general.file_type" in out and "(MOSTLY_Q4_0)" in out
    assert "tokenizer.ggml.tokens" in out and "(4,096 string)" in out
    assert "dim 128, hidden_dim 352, 5 layers" in out
    status = next(line for line in out.splitlines() if line.startswith("status"))
    assert ("runs in this build" in status) == (not unsupported_types(MODELS / "bundled-Q4_0.gguf"))


def test_type_tables_agree_with_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    for t in gguf.GGML_TYPES.values():
        theirs = GGMLQuantizationType(t.id)
        assert (t.name, (t.block_size, t.type_size)) == (theirs.name, GGML_QUANT_SIZES[theirs])
    for value, name in gguf.FILE_TYPE_NAMES.items():
        assert LlamaFileType(value).name == name


# ----------------------------------------------------------------------------------------------
# Writing: read back by the gguf package and by llama2nb


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_written_file_reads_back_in_the_gguf_package(small, name):
    path, bin_path = small[name]
    config = SMALL_MODELS[name]
    r = GGUFReader(path)
    field = lambda key: r.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == path.stem
    assert (field("general.file_type"), field("general.quantization_version")) == (0, 2)
    assert (field("llama.embedding_length"), field("llama.feed_forward_length"), field("llama.block_count"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.context_length"), field("llama.rope.dimension_count"), field("llama.vocab_size")) == \
        (config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads, config.seq_len,
         config.head_size, config.vocab_size)
    assert np.float32(field("llama.attention.layer_norm_rms_epsilon")) == np.float32(1e-5)
    assert field("llama.rope.freq_base") == 10000.0
    assert field("tokenizer.ggml.model") == "llama"
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and len(tokens) == config.vocab_size
    assert field("tokenizer.ggml.token_type")[:4] == [2, 3, 3, 6]
    assert np.allclose(field("tokenizer.ggml.scores"), SCORES)
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    names = [t.name for t in r.tensors]
    assert ("output.weight" in names) == (not config.shared_classifier)
    source = read_checkpoint(bin_path).weights
    for t in r.tensors:
        slot = next(s for s in gguf.layout(config) if s.name == t.name)
        expected = getattr(source, slot.field)
        expected = expected if slot.layer is None else expected[slot.layer]
        assert np.array_equal(t.data, expected), t.name
        assert list(t.shape) == list(reversed(slot.shape))


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_written_file_gives_the_sources_logits(small, name):
    path, bin_path = small[name]
    ours = Transformer.load(path, fastmath="off")
    assert np.float32(ours.config.norm_eps) == np.float32(1e-5)  # stored as float32 (9.99999975e-06)
    assert ours.config == replace(SMALL_MODELS[name], version=1, norm_eps=ours.config.norm_eps)
    tokens = random_tokens(SMALL.vocab_size, 40)
    expected = logits_over(Transformer.load(bin_path, fastmath="off"), tokens)
    assert np.array_equal(logits_over(ours, tokens), expected)
    oracle = reference_from_gguf(path)
    theirs = np.stack([oracle.forward(int(t), pos).copy() for pos, t in enumerate(tokens)])
    assert np.abs(theirs - expected).max() <= 1.5e-5  # tests/test_forward.py's fp32 tolerance
    in_memory = Transformer.load(path, fastmath="off", in_memory=True)
    assert not isinstance(in_memory.checkpoint.buffer, np.memmap)
    assert np.array_equal(logits_over(in_memory, tokens), expected)


def test_version_2_files_read_as_version_3(small, tmp_path):
    """Versions 2 and 3 lay files out alike (3 added big-endian files, which are refused)."""
    path, _ = small["unshared"]
    v2 = rebuild(path, tmp_path / "v2.gguf", version=2)
    assert gguf.read_header(v2).version == 2
    tokens = random_tokens(SMALL.vocab_size, 8)
    assert np.array_equal(logits_over(Transformer.load(v2), tokens), logits_over(Transformer.load(path), tokens))


def q_type_available(name: str) -> bool:
    return gguf.format_for(gguf.GGML[name]) is not None


@pytest.mark.parametrize("file_type, ggml_name", [("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("f16", "F16")])
def test_quantized_tensors_equal_the_gguf_packages_quantizer(small, tmp_path, file_type, ggml_name):
    if not q_type_available(ggml_name):
        pytest.skip(f"formats.by_ggml_type does not provide {ggml_name} on this branch (the formats branch adds it)")
    _, bin_path = small["unshared"]
    out = tmp_path / f"{file_type}.gguf"
    write_gguf(out, SMALL_MODELS["unshared"], CheckpointSource(read_checkpoint(bin_path)),
               small_tokenizer(), file_type)
    source = read_checkpoint(bin_path).weights
    from gguf.constants import GGMLQuantizationType

    for t in GGUFReader(out).tensors:
        slot = next(s for s in gguf.layout(SMALL_MODELS["unshared"]) if s.name == t.name)
        array = getattr(source, slot.field)
        array = np.asarray(array if slot.layer is None else array[slot.layer], np.float32)
        expected_type = gguf.tensor_type(slot, file_type, False)
        assert int(t.tensor_type) == expected_type
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                              quantize(array, GGMLQuantizationType(expected_type)).view(np.uint8).reshape(-1))


def test_tensor_type_policy():
    config = replace(SMALL, dim=48, n_heads=4, hidden_dim=64)  # rows of 48: not whole Q8_0 blocks
    slots = {s.name: s for s in gguf.layout(replace(config, shared_classifier=False))}
    assert gguf.tensor_type(slots["blk.0.attn_norm.weight"], "q4_0", False) == gguf.GGML["F32"]
    assert gguf.tensor_type(slots["blk.0.ffn_down.weight"], "q4_0", False) == gguf.GGML["Q4_0"]  # rows of 64
    assert gguf.tensor_type(slots["blk.0.ffn_gate.weight"], "q8_0", False) == gguf.GGML["F16"]  # rows of 48
    shared = {s.name: s for s in gguf.layout(replace(SMALL, shared_classifier=True))}
    assert gguf.tensor_type(shared["token_embd.weight"], "q4_0", True) == gguf.GGML["Q8_0"]  # the classifier
    assert gguf.tensor_type(shared["token_embd.weight"], "q8_0", True) == gguf.GGML["Q8_0"]
    assert gguf.tensor_type(shared["blk.1.attn_q.weight"], "f16", True) == gguf.GGML["F16"]


def test_write_refuses_before_creating_anything(tmp_path):
    out = tmp_path / "m.gguf"
    weights = random_weights(SMALL)
    del weights["w3"]
    with pytest.raises(CheckpointError, match="cannot write blk.0.ffn_up.weight: weight 'w3' missing"):
        write_gguf(out, SMALL, weights, small_tokenizer())
    with pytest.raises(CheckpointError, match="tokenizer: expected 67 tokens"):
        write_gguf(out, replace(SMALL, vocab_size=67), random_weights(replace(SMALL, vocab_size=67)),
                   small_tokenizer())
    assert list(tmp_path.iterdir()) == []  # no target, no temp file


def test_rope_theta_and_eps_come_from_the_metadata(small, tmp_path):
    """A file's rope.freq_base and RMS epsilon reach the forward pass (no hard-coded constants),
    and a llama2.c file, which cannot hold them, is refused rather than written wrong."""
    path, bin_path = small["shared-gqa"]
    config = replace(SMALL, rope_theta=500000.0, norm_eps=1e-6)
    out = tmp_path / "theta.gguf"
    write_gguf(out, config, CheckpointSource(read_checkpoint(bin_path)), small_tokenizer())
    model = Transformer.load(out, fastmath="off")
    assert (model.config.rope_theta, np.float32(model.config.norm_eps)) == (500000.0, np.float32(1e-6))
    source = read_checkpoint(bin_path)
    same = Transformer(Checkpoint(source.path, replace(source.config, rope_theta=500000.0, norm_eps=1e-6),
                                  source.weights, source.buffer), fastmath="off")
    tokens = random_tokens(SMALL.vocab_size, 20)
    assert np.array_equal(logits_over(model, tokens), logits_over(same, tokens))
    assert not np.array_equal(logits_over(model, tokens), logits_over(Transformer.load(path, fastmath="off"), tokens))
    with pytest.raises(CheckpointError, match=r"norm_eps: expected 1e-05 .*found 1e-06: write GGUF instead"):
        convert.convert(out, tmp_path / "x.bin", convert.target_for(tmp_path / "x.bin"))


# ----------------------------------------------------------------------------------------------
# The vocabulary


def test_llama2_vocabulary_round_trips_through_gguf(tmp_path):
    """The Llama 2 vocabulary (32,000 pieces) written into a GGUF file by llama2nb and read back
    gives llama2.c's tokenizer.bin ids."""
    if not LLAMA2_BIN.exists():
        pytest.skip(f"{LLAMA2_BIN} not present (../shared is the developers' folder)")
    theirs = Tokenizer.load(LLAMA2_BIN)
    config = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, seq_len=8)
    path = tmp_path / "llama2-vocab.gguf"
    write_gguf(path, config, random_weights(config), theirs)
    ours = Tokenizer.load(path)
    assert ours.pieces == theirs.pieces and np.array_equal(ours.scores, theirs.scores)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    if LLAMA2_MODEL.exists():
        sp = Tokenizer.load(LLAMA2_MODEL)
        tokens = GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
        assert tokens == [sp._sp.id_to_piece(i) for i in range(32000)]


def vocabulary_file(tmp_path: Path, small, **changes) -> Path:
    """The small model's GGUF with tokenizer metadata changed (Value, or None to delete)."""
    path, _ = small["shared-gqa"]
    return rebuild(path, tmp_path / "vocab.gguf", metadata=lambda md: _apply(md, changes))


def _apply(md: dict, changes: dict) -> None:
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value


def _types(**at) -> Value:
    types = gguf.infer_token_types(gguf.tokens_from_pieces(PIECES))
    for index, value in at.items():
        types[int(index[1:])] = value
    return Value(ARRAY, types, INT32)


def test_special_tokens_are_never_encoded_from_text(small, tmp_path):
    """A control token beyond BOS/EOS ("[INST]", mergeable from its characters) is never
    produced from text; marked normal, the same vocabulary does merge it."""
    inst = PIECES.index(b"[INST]")
    normal = Tokenizer.load(vocabulary_file(tmp_path, small))
    assert inst in normal.encode("[INST] hi")
    control = Tokenizer.load(vocabulary_file(tmp_path, small, tokenizer__ggml__token_type=_types(**{f"i{inst}": 3})))
    ids = control.encode("[INST] hi <s></s>")
    assert inst not in ids and 1 not in ids[1:] and 2 not in ids
    assert control.decode(ids).strip() == "[INST] hi <s></s>"  # the dummy space is a byte token here


def test_add_space_prefix_false_drops_the_dummy_space(small, tmp_path):
    on = Tokenizer.load(vocabulary_file(tmp_path, small))
    off = Tokenizer.load(vocabulary_file(tmp_path, small, tokenizer__ggml__add_space_prefix=Value(BOOL, False)))
    assert on.encode("once") == [1, 3 + ord(" "), PIECES.index(b"once")]  # the space is a byte token here
    assert off.encode("once") == [1, PIECES.index(b"once")]


LLAMA2_TEMPLATE = "{% for message in messages %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
CHATML_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% endfor %}"


def test_chat_template_picks_the_chat_format(small, tmp_path):
    path, _ = small["shared-gqa"]
    llama2 = Tokenizer.load(vocabulary_file(tmp_path, small, tokenizer__chat_template=Value(STRING, LLAMA2_TEMPLATE)))
    assert llama2.chat_format == "llama2" and Tokenizer.load(path).chat_format == "llama2"
    chatml_path = rebuild(path, tmp_path / "chatml.gguf",
                          metadata=lambda md: _apply(md, {"tokenizer.chat_template": Value(STRING, CHATML_TEMPLATE)}))
    chatml = Tokenizer.load(chatml_path)
    assert chatml.chat_format is None
    model = Transformer.load(path, warm_up=False)
    with pytest.raises(GenerationError, match=r"tokenizer.chat_template: expected Llama 2's \[INST\] format"):
        chat(model, chatml, Sampler(SMALL.vocab_size, 0.0, 0.9, 1), ["hi"])
    result = CliRunner().invoke(main, ["sample", str(chatml_path), "-m", "chat", "-i", "hi", "-n", "20"])
    assert result.exit_code == 1 and "tokenizer.chat_template: expected Llama 2's [INST] format" in result.output
    assert "JIT compile" not in result.output  # refused before compiling


VOCABULARY_REFUSALS = {
    "user-defined": (dict(tokenizer__ggml__token_type=_types(i300=4)),
                     r"expected no user-defined tokens \(type 4.*found 1, e.g. id 300"),
    "bad-type": (dict(tokenizer__ggml__token_type=_types(i5=9)), r"token_type of token 5: expected 1..6, found 9"),
    "bos-id": (dict(tokenizer__ggml__bos_token_id=Value(UINT32, 7)), r"bos_token_id: expected 1 .*found uint32 7"),
    "unk-id": (dict(tokenizer__ggml__unknown_token_id=Value(UINT32, 2)), r"unknown_token_id: expected 0"),
    "add-bos-false": (dict(tokenizer__ggml__add_bos_token=Value(BOOL, False)),
                      r"add_bos_token: expected true .*found bool False"),
    "no-vocabulary": (dict(tokenizer__ggml__model=None), r"tokenizer.ggml.model: expected llama .*pass a tokenizer with -z"),
    "scores-length": (dict(tokenizer__ggml__scores=Value(ARRAY, np.zeros(3, np.float32), FLOAT32)),
                      r"tokenizer.ggml.scores: expected an array of \d+ float32, found an array of 3 float32"),
    "nan-score": (dict(tokenizer__ggml__scores=Value(ARRAY, np.full(len(PIECES), np.nan, np.float32), FLOAT32)),
                  r"scores of token 0: expected a finite float, found nan"),
}


@pytest.mark.parametrize("name", list(VOCABULARY_REFUSALS))
def test_vocabulary_refusals(small, tmp_path, name):
    changes, message = VOCABULARY_REFUSALS[name]
    path = vocabulary_file(tmp_path, small, **changes)
    with pytest.raises(TokenizerError, match=message) as error:
        Tokenizer.load(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_byte_pieces_are_required(small, tmp_path):
    tokens = gguf.tokens_from_pieces(PIECES)
    tokens[3 + 0x41] = b"A"
    path = vocabulary_file(tmp_path, small, tokenizer__ggml__tokens=Value(ARRAY, tokens, STRING))
    with pytest.raises(TokenizerError, match=r"tokens\[68\]: expected the byte piece <0x41> .*found b'A'"):
        Tokenizer.load(path)


# ----------------------------------------------------------------------------------------------
# Structured mutations: each refusal with its own message


def rebuild(path: Path, out: Path, *, version: int = 3, metadata=None, tensors=None, extra: bytes = b"",
            alignment: int | None = None) -> Path:
    """`path` re-packed with its metadata (a dict of Values) and tensor table (a list of
    TensorInfos) edited in place by the callables given, the same tensor data after it."""
    header = gguf.read_header(path)
    md, table = dict(header.metadata), list(header.tensors.values())
    if metadata:
        metadata(md)
    if tensors:
        tensors(table)
    head = gguf.pack_header(version, md, table)
    align = alignment or gguf.DEFAULT_ALIGNMENT
    out.write_bytes(head + b"\0" * (-len(head) % align) + path.read_bytes()[header.data_offset:] + extra)
    return out


def test_rebuild_without_changes_is_the_same_file(small, tmp_path):
    for path, _ in small.values():
        assert rebuild(path, tmp_path / "same.gguf").read_bytes() == path.read_bytes()


def patch(data: bytes, marker: bytes, skip: int, fmt: str, value) -> bytes:
    """data with struct `fmt` `value` written `skip` bytes after the first `marker`."""
    at = data.index(marker) + len(marker) + skip
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def duplicate_key(data: bytes, key: str) -> bytes:
    """data with the uint32 metadata entry `key` twice (and the count one higher)."""
    at = data.index(struct.pack("<Q", len(key)) + key.encode())
    entry = data[at:at + 8 + len(key) + 4 + 4]  # length, key, type, a uint32 value
    data = data[:at] + entry + data[at:]
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    return data[:16] + struct.pack("<Q", n_kv + 1) + data[24:]


def set_key(key: str, value: Value | None):
    return dict(metadata=lambda md: _apply(md, {key: value}))


def edit_tensor(name: str, **changes):
    def edit(table: list[TensorInfo]) -> None:
        i = next(i for i, t in enumerate(table) if t.name == name)
        table[i] = replace(table[i], **changes)
    return dict(tensors=edit)


def add_tensor(name: str, shape=(32,)):
    """A tensor appended after the data (its bytes included)."""
    def add(table: list[TensorInfo]) -> None:
        end = max(t.offset + t.nbytes for t in table)
        table.append(TensorInfo(name, shape, 0, -(-end // 32) * 32, 4 * int(np.prod(shape))))
    return dict(tensors=add, extra=b"\0" * (4 * int(np.prod(shape)) + 64))


def tensor_edit(fn):
    return dict(tensors=fn)


Q = "blk.0.attn_q.weight"
STRUCTURED = {  # name -> (rebuild options | bytes -> bytes, message)
    "alignment-0": (set_key("general.alignment", Value(UINT32, 0)),
                    r"general.alignment: expected a uint32 power of two, found uint32 0"),
    "alignment-48": (set_key("general.alignment", Value(UINT32, 48)),
                     r"general.alignment: expected a uint32 power of two, found uint32 48"),
    "alignment-type": (set_key("general.alignment", Value(UINT64, 32)), r"general.alignment: .*found uint64 32"),
    "shape-overflow": (edit_tensor(Q, shape=(1 << 40, 1 << 40)),
                       r"tensor 'blk.0.attn_q.weight' shape \[1099511627776, 1099511627776\]: expected an element "
                       r"count within int64, found .* \(the product overflows\)"),
    "offset-wrap": (edit_tensor(Q, offset=(1 << 64) - 32),
                    r"tensor 'blk.0.attn_q.weight' offset \+ size: expected below 2\*\*64, found .* \(it wraps around\)"),
    "duplicate-tensor": (tensor_edit(lambda t: t.append(t[-1])), r"expected each tensor name once, found it twice"),
    "duplicate-key": (lambda data: duplicate_key(data, "llama.block_count"),
                      r"metadata key 'llama.block_count': expected each key once, found it twice \(a duplicate key\)"),
    "huge-array-count": (lambda data: patch(data, b"tokenizer.ggml.tokens", 8, "<Q", 1 << 60),
                         r"metadata 'tokenizer.ggml.tokens' count: expected at most [\d,]+ string elements "
                         r"\(the [\d,]+ bytes left in the file\), found 1,152,921,504,606,846,976"),
    "string-longer-than-file": (lambda data: patch(data, b"general.name", 4, "<Q", 1 << 40),
                                r"metadata 'general.name' length: expected at most the [\d,]+ bytes left in the file, "
                                r"found 1,099,511,627,776 \(a string longer than the file\)"),
    "key-longer-than-file": (lambda data: patch(data, b"GGUF", 20, "<Q", 1 << 50),
                             r"metadata key 0 length: .*\(a string longer than the file\)"),
    "bad-magic": (lambda data: b"GGUX" + data[4:], r"magic: expected GGUF, found b'GGUX'"),
    "big-endian": (lambda data: data[:4] + struct.pack(">I", 3) + data[8:],
                   r"byte order: expected a little-endian file, found a big-endian one \(version 3 byte-swapped\)"),
    "version-1": (dict(version=1), r"version: expected 2 or 3, found 1"),
    "truncated-data": (lambda data: data[:-100], r"tensor '.*' data: expected bytes .* within the [\d,]+-byte file, "
                                                 r"found them past its end \(truncated\?\)"),
    "truncated-header": (lambda data: data[:data.index(b"blk.1.ffn_norm.weight") + 30],
                         r"tensor 'blk.1.ffn_norm.weight' ne\[0\] at offset [\d,]+: expected 8 bytes, found 5 left in "
                         r"the [\d,]+-byte file \(truncated\?\)"),
    "tiny-file": (lambda data: data[:10], r"GGUF header: expected at least 24 bytes, found a 10-byte file"),
    "misaligned-offset": (edit_tensor(Q, offset=64 + 4),
                          r"tensor 'blk.0.attn_q.weight' offset: expected a multiple of the alignment 32, found 68"),
    "overlap": (tensor_edit(lambda t: t.__setitem__(3, replace(t[3], offset=t[2].offset))), r"the two overlap"),
    "dims-5": (edit_tensor(Q, shape=(1, 1, 1, 32, 32)), r"dimension count: expected 1..4, found 5"),
    "ne-zero": (edit_tensor(Q, shape=(0, 32)), r"shape: expected every ne at least 1, found \[32, 0\]"),
    "unknown-type": (edit_tensor(Q, type=99), r"tensor 'blk.0.attn_q.weight' type: expected a ggml type id, found 99 "
                                              r"\(unknown\)"),
    "unsupported-type": (edit_tensor(Q, type=25, nbytes=2 * 32 * 32),
                         r"tensor 'blk.0.attn_q.weight' type: expected one of .*F32.*, found I16 \(not supported\)"),
    "partial-block": (edit_tensor(Q, type=12), r"ne\[0\]: expected a multiple of Q4_K's block of 256, found 32"),
    "value-type-13": (lambda data: patch(data, b"general.name", 0, "<I", 13),
                      r"metadata 'general.name' type: expected a GGUF value type 0..12, found 13"),
    "nested-array": (lambda data: patch(data, b"tokenizer.ggml.scores", 4, "<I", 9),
                     r"element type: expected a scalar or string type \(nested arrays"),
    "bool-2": (lambda data: patch(data, b"tokenizer.ggml.add_bos_token", 4, "<B", 2),
               r"add_bos_token': expected a bool \(0 or 1\), found 2"),
    "huge-tensor-count": (lambda data: data[:8] + struct.pack("<Q", 1 << 40) + data[16:],
                          r"tensor count: expected at most [\d,]+ \(for the [\d,]+ bytes left\), found 1,099,511,627,776"),
    "huge-metadata-count": (lambda data: data[:16] + struct.pack("<Q", 1 << 40) + data[24:],
                            r"metadata count: expected at most [\d,]+ .*found 1,099,511,627,776"),
    "key-not-utf8": (lambda data: data.replace(b"general.name", b"general.n\xffme", 1),
                     r"metadata key \d+: expected UTF-8 text, found b'general.n\\xffme'"),
    "file-offset-not-word": (dict(metadata=lambda md: _apply(md, {"general.alignment": Value(UINT32, 1),
                                                                  "general.name": Value(STRING, "x")}), alignment=1),
                             r"offset: expected a file offset that is a multiple of 4, found"),
    # the model's meaning
    "architecture": (set_key("general.architecture", Value(STRING, "qwen2")),
                     r"general.architecture: expected llama, found qwen2"),
    "no-architecture": (set_key("general.architecture", None), r"general.architecture: expected llama, found no such key"),
    "tokenizer-gpt2": (set_key("tokenizer.ggml.model", Value(STRING, "gpt2")),
                       r"tokenizer.ggml.model: expected llama \(a SentencePiece vocabulary\), found gpt2 \(a BPE "
                       r"vocabulary such as Llama 3's\)"),
    "split": (set_key("split.count", Value(UINT16, 3)),
              r"split.count: expected one file \(merge the parts with llama-gguf-split --merge\), found uint16 3"),
    "experts": (set_key("llama.expert_count", Value(UINT32, 8)),
                r"llama.expert_count: expected 0 \(a dense model; mixtures of experts are not supported\), found uint32 8"),
    "rope-scaling": (set_key("llama.rope.scaling.type", Value(STRING, "linear")),
                     r"llama.rope.scaling.type: expected none \(plain RoPE\), found linear"),
    "rope-scaling-factor": (set_key("llama.rope.scaling.factor", Value(FLOAT32, 4.0)),
                            r"llama.rope.scaling.factor: expected none or 1 \(plain RoPE\), found float32 4.0"),
    "bias": (add_tensor("blk.0.attn_q.bias"), r"tensor 'blk.0.attn_q.bias': expected only llama's tensors .*found a "
                                              r"bias \(llama has none\)"),
    "rope-freqs": (add_tensor("rope_freqs.weight", (4,)), r"found RoPE frequency factors \(scaled RoPE is not supported\)"),
    "expert-tensor": (add_tensor("blk.0.ffn_gate_exps.weight"), r"found an expert tensor"),
    "missing-tensor": (tensor_edit(lambda t: t.pop()), r"tensor 'blk.1.ffn_norm.weight': expected in the file "
                                                       r"\(block_count 2\), found none"),
    "wrong-shape": (edit_tensor("blk.0.attn_k.weight", shape=(32, 16)),
                    r"tensor 'blk.0.attn_k.weight' shape: expected ne \[32, 16\], found ne \[16, 32\]"),
    "norm-not-f32": (edit_tensor("blk.0.attn_norm.weight", type=1, nbytes=64),
                     r"tensor 'blk.0.attn_norm.weight' type: expected F32 for a norm vector, found F16"),
    "head-count": (set_key("llama.attention.head_count", Value(UINT32, 3)),
                   r"llama.attention.head_count: expected a divisor of embedding_length 32 leaving an even head size, "
                   r"found 3"),
    "head-count-kv": (set_key("llama.attention.head_count_kv", Value(UINT32, 3)),
                      r"llama.attention.head_count_kv: expected a divisor of head_count 4, found 3"),
    "rope-dimensions": (set_key("llama.rope.dimension_count", Value(UINT32, 4)),
                        r"llama.rope.dimension_count: expected 8 \(the head size: embedding_length / head_count\), "
                        r"found uint32 4"),
    "no-embedding-length": (set_key("llama.embedding_length", None),
                            r"llama.embedding_length: expected an integer in 1..65,536, found no such key"),
    "context-0": (set_key("llama.context_length", Value(UINT32, 0)), r"llama.context_length: expected an integer in 1"),
    "eps-negative": (set_key("llama.attention.layer_norm_rms_epsilon", Value(FLOAT32, -1.0)),
                     r"layer_norm_rms_epsilon: expected a number in \(0.0, 1.0\), found float32 -1.0"),
    "eps-integer": (set_key("llama.attention.layer_norm_rms_epsilon", Value(UINT32, 0)),
                    r"layer_norm_rms_epsilon: expected a number in \(0.0, 1.0\), found uint32 0"),
    "theta-array": (set_key("llama.rope.freq_base", Value(ARRAY, np.ones(3, np.float32), FLOAT32)),
                    r"llama.rope.freq_base: expected a number in \(0.0, inf\), found an array of 3 float32"),
    "vocab-size": (set_key("llama.vocab_size", Value(UINT32, 100)),
                   r"tokenizer.ggml.tokens: expected 100 tokens \(the model's vocabulary\), found an array of \d+ string"),
}


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_mutation_is_refused_with_its_message(small, tmp_path, name):
    mutation, message = STRUCTURED[name]
    base, _ = small["shared-gqa"]
    path = tmp_path / f"{name}.gguf"
    if callable(mutation):
        path.write_bytes(mutation(base.read_bytes()))
    else:
        rebuild(base, path, **mutation)
    with pytest.raises(CheckpointError, match=message) as error:
        gguf.read_checkpoint(path)
    line = str(error.value)
    assert line.startswith(f"{path}: ") and "\n" not in line
    with pytest.raises(CheckpointError, match=message if gguf.is_gguf(path) else None):
        read_config(path)  # what `sample` checks before compiling (a file without the magic: as llama2.c)
    with pytest.raises(CheckpointError):
        read_model(path)


# ----------------------------------------------------------------------------------------------
# Fuzzing: the loader's own error or a valid load; a forward pass on every accepted mutant

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
INTERESTING = st.sampled_from([0, 1, 2, 3, 4, 31, 32, 33, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                               2**63 - 1, 2**63, 2**64 - 1])
U64 = st.one_of(INTERESTING, st.integers(0, 2**64 - 1), st.integers(0, 4096))


REFUSALS: dict[str, int] = {}  # what refused the mutants, for the summary line


def load_or_refuse(path: Path) -> bool:
    """Load the model and, apart, the vocabulary (encoding and decoding with it): each either
    loads or raises the loader's own one-line error; anything else propagates and fails the
    test. True when the model loads."""
    accepted = []
    for load in (read_model, Tokenizer.load):
        try:
            loaded = load(path)
        except (CheckpointError, TokenizerError) as error:
            line = str(error)
            assert "\n" not in line and line.startswith(f"{path}: ")
            reason = re.sub(r"'[^']*'|\d[\d,]*", "*", line.removeprefix(f"{path}: ").split(": expected")[0])
            REFUSALS[reason] = REFUSALS.get(reason, 0) + 1
            accepted.append(False)
            continue
        if isinstance(loaded, Tokenizer):
            loaded.decode(loaded.encode("Once upon a time ☃ [INST] <s>"))
        accepted.append(True)
    return accepted[0]


FORWARD_SCRIPT = """
import sys
from llama2nb.files import read_model
from llama2nb.forward import Transformer
for name in sys.argv[1:]:
    print(name, flush=True)
    model = Transformer(read_model(name), warm_up=False, ctx=4)
    last = model.config.vocab_size - 1
    model.forward(last, 0)
    if model.config.seq_len >= 3:
        model.prefill([0, last], 1)
print("all ran", flush=True)
"""


def run_forward_in_subprocess(paths: list[Path]) -> None:
    if not paths:
        return
    result = subprocess.run([sys.executable, "-c", FORWARD_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(nothing)"
    assert result.returncode == 0 and last == "all ran", (f"exit {result.returncode} after {last}", result.stderr[-2000:])


class Mutants:
    """Accepted mutants, kept (once each) for the forward pass in a subprocess."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.accepted, self.tried = folder, {}, 0

    def check(self, data: bytes) -> None:
        self.tried += 1
        digest = hashlib.sha256(data).hexdigest()[:16]
        path = self.folder / f"mutant-{digest}.gguf"
        path.write_bytes(data)
        if load_or_refuse(path):
            self.accepted[digest] = path
        else:
            path.unlink()

    def run(self, minimum_tried: int) -> None:
        assert self.tried >= minimum_tried
        top = sorted(REFUSALS.items(), key=lambda kv: -kv[1])[:25]
        print(f"{self.tried} mutants tried, {len(self.accepted)} accepted and run; refusals so far: {top}")
        run_forward_in_subprocess(list(self.accepted.values()))


def test_fuzz_header_bytes(small, tmp_path):
    """Random overwrites of header bytes (8-byte values at random offsets: lengths, counts,
    types, shapes, offsets) and truncations."""
    base, _ = small["shared-gqa"]
    data = base.read_bytes()
    header_end = gguf.read_header(base).data_offset
    mutants = Mutants(tmp_path)

    @FUZZ
    @given(writes=st.lists(st.tuples(st.integers(0, header_end - 1), U64, st.sampled_from([1, 2, 4, 8])),
                           min_size=1, max_size=4),
           cut=st.one_of(st.none(), st.integers(0, len(data))))
    def case(writes, cut):
        mutated = bytearray(data)
        for at, value, width in writes:
            mutated[at:at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        mutants.check(bytes(mutated[:cut] if cut is not None else mutated))

    case()
    mutants.run(500)


METADATA_VALUES = st.one_of(
    st.builds(lambda t, v: Value(t, v), st.sampled_from([UINT32, UINT64]), U64.map(lambda v: v % 2**32)),
    st.builds(lambda v: Value(FLOAT32, v), st.floats(width=32)),
    st.builds(lambda v: Value(BOOL, v), st.booleans()),
    st.builds(lambda v: Value(STRING, v), st.sampled_from(["llama", "gpt2", "none", "linear", "", "x" * 300])),
    st.builds(lambda n: Value(ARRAY, np.arange(n, dtype=np.int32), INT32), st.integers(0, 600)),
    st.builds(lambda n: Value(ARRAY, [b"<0x00>"] * n, STRING), st.integers(0, 600)),
)


def test_fuzz_structured(small, tmp_path):
    """Metadata keys set to values of random types; tensor infos with random shapes, types,
    offsets and names; tensors dropped or repeated."""
    base, _ = small["shared-gqa"]
    header = gguf.read_header(base)
    keys = [*header.metadata, "general.alignment", "split.count", "llama.expert_count", "llama.rope.scaling.type",
            "llama.vocab_size", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"]
    names = list(header.tensors)
    mutants = Mutants(tmp_path)
    tensor_change = st.one_of(
        st.builds(lambda s: {"shape": tuple(s)}, st.lists(U64.map(lambda v: v % 2**64), min_size=1, max_size=5)),
        st.builds(lambda s: {"shape": tuple(s)}, st.lists(st.sampled_from([1, 8, 16, 32, 64, 256, 267]), min_size=1,
                                                          max_size=3)),
        st.builds(lambda t: {"type": t}, st.integers(0, 45)),
        st.builds(lambda o: {"offset": o}, U64),
        st.builds(lambda o: {"offset": o * 32}, st.integers(0, 2000)),
        st.builds(lambda n: {"name": n}, st.sampled_from(names + ["output.weight", "blk.2.attn_q.weight", "x"])),
    )

    @FUZZ
    @given(meta=st.lists(st.tuples(st.sampled_from(keys), st.one_of(st.none(), METADATA_VALUES)), max_size=3),
           edits=st.lists(st.tuples(st.integers(0, len(names) - 1), tensor_change), max_size=3),
           drop=st.one_of(st.none(), st.integers(0, len(names) - 1)), repeat=st.booleans())
    def case(meta, edits, drop, repeat):
        def tensors(table):
            for i, change in edits:
                table[i] = replace(table[i], **change)
            if repeat:
                table.append(table[0])
            if drop is not None:
                table.pop(drop)

        out = tmp_path / "structured.gguf"
        rebuild(base, out, metadata=lambda md: _apply(md, dict(meta)), tensors=tensors)
        mutants.check(out.read_bytes())

    case()
    mutants.run(500)


def test_fuzz_bit_flips_and_truncations_anywhere(small, tmp_path):
    """Bit flips anywhere in the file (weights included: a load that runs on NaNs is a valid
    load) and truncations, on both small models."""
    files = [path.read_bytes() for path, _ in small.values()]
    mutants = Mutants(tmp_path)

    @FUZZ
    @given(which=st.integers(0, len(files) - 1), flips=st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
           cut=st.one_of(st.none(), st.integers(0, 2**40)))
    def case(which, flips, cut):
        data = bytearray(files[which])
        for bit in flips:
            position = bit % (8 * len(data))
            data[position // 8] ^= 1 << (position % 8)
        mutants.check(bytes(data[:cut % len(data)] if cut is not None else data))

    case()
    mutants.run(500)


# ----------------------------------------------------------------------------------------------
# The command line


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def test_sample_takes_the_vocabulary_from_the_gguf_file_and_ctx_caps_the_context(small, tmp_path):
    path, _ = small["unshared"]
    lonely = tmp_path / "alone" / "m.gguf"  # no tokenizer.bin beside it
    lonely.parent.mkdir()
    lonely.write_bytes(path.read_bytes())
    result = cli("sample", str(lonely), "-n", "0", "-t", "0", "--ctx", "12", "-i", "once upon")
    assert "in 12 positions" in result.stderr
    assert result.stdout.lstrip().startswith("once upon")  # the dummy space is a byte token here
    assert "in 48 positions" in cli("sample", str(lonely), "-n", "0", "-t", "0").stderr


def test_quantize_and_export_convert_without_torch(small, tmp_path):
    path, bin_path = small["shared-gqa"]
    tok = tmp_path / "tokenizer.bin"
    small_tokenizer().save_bin(tok)
    out = tmp_path / "from-bin.gguf"
    assert "GGUF v3, --type f32 (" in cli("quantize", str(bin_path), str(out), "--type", "f32", "-z", str(tok)).output
    assert gguf.read_header(out).tensors == gguf.read_header(path).tensors
    back = tmp_path / "back.bin"
    result = cli("quantize", str(out), str(back), "--type", "f32", "--save-tokenizer", str(tmp_path / "t.bin"))
    assert "llama2.c v0" in result.output
    assert back.read_bytes() == bin_path.read_bytes()  # GGUF -> v0: byte for byte the file it came from
    assert (tmp_path / "t.bin").read_bytes() == tok.read_bytes()
    v2 = tmp_path / "v2.bin"
    assert "llama2.c v2, group size 32" in cli("export", str(out), str(v2), "--version", "2").output
    assert read_checkpoint(v2).config.version == 2
    cli("quantize", str(out), str(tmp_path / "x.bin"), "--type", "q4_0", code=2)
    cli("quantize", str(out), str(tmp_path / "x.bin"), "--type", "q8_0", "--version", "1", code=2)
    cli("quantize", str(out), str(tmp_path / "x.gguf"), "--type", "f32", "--version", "1", code=2)
    refused = cli("quantize", str(bin_path), str(tmp_path / "y.gguf"), "--type", "f32", code=1)
    assert "vocabulary: expected a tokenizer for the GGUF file's metadata, found none" in refused.output


@pytest.mark.parametrize("source_kind", ["bin", "gguf"])
def test_quantize_is_export_over_a_checkpoint_source(small, tmp_path, monkeypatch, source_kind):
    """One route into the writers: quantize opens IN as a CheckpointSource and hands it to
    export.write, so quantize and export write the same bytes for the same input and type."""
    from llama2nb import export as export_module
    from llama2nb.files.source import TensorSource

    gguf_path, bin_path = small["unshared"]
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / f"m.{source_kind}"
    source.write_bytes((bin_path if source_kind == "bin" else gguf_path).read_bytes())
    small_tokenizer().save_bin(folder / "tokenizer.bin")  # the vocabulary beside a .bin IN
    sources = []
    write = export_module.write
    monkeypatch.setattr(export_module, "write",
                        lambda out, src, *args: sources.append(type(src)) or write(out, src, *args))
    cases = [("x.gguf", ["--type", t]) for t in ("f32", "f16", "q8_0", "q4_0")]
    cases += [("x.bin", ["--type", "f32"]), ("x.bin", ["--type", "f32", "--version", "1"]),
              ("x.bin", ["--type", "q8_0"]), ("x.bin", ["--type", "q8_0", "--group-size", "16"])]
    for i, (name, options) in enumerate(cases):
        quantized, exported = tmp_path / f"q{i}-{name}", tmp_path / f"e{i}-{name}"
        cli("quantize", str(source), str(quantized), *options)
        cli("export", str(source), str(exported), *options)
        assert quantized.read_bytes() == exported.read_bytes(), options
    assert sources == [CheckpointSource, CheckpointSource] * len(cases)
    assert issubclass(CheckpointSource, TensorSource)


def test_export_reads_a_v0_file_whose_first_byte_looks_like_a_pickle(tmp_path):
    """A v0 header starts with dim: dim 128 is the byte 0x80, a pickle's first byte too."""
    from llama2nb.testmodels import write_random_model

    config = ModelConfig(dim=128, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=len(PIECES),
                         seq_len=8)
    path = tmp_path / "m.bin"
    write_random_model(path, config)
    assert path.read_bytes()[:1] == b"\x80"
    small_tokenizer().save_bin(tmp_path / "tokenizer.bin")
    cli("export", str(path), str(tmp_path / "e.gguf"), "--type", "q8_0")
    cli("quantize", str(path), str(tmp_path / "q.gguf"), "--type", "q8_0")
    assert (tmp_path / "e.gguf").read_bytes() == (tmp_path / "q.gguf").read_bytes()
    cli("export", str(path), str(tmp_path / "v0.bin"))
    assert (tmp_path / "v0.bin").read_bytes() == path.read_bytes()


def test_export_from_ckpt_pt_to_gguf(tmp_path):
    torch = pytest.importorskip("torch")
    from llama2nb.training.model import ModelArgs, Transformer as TorchModel

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(PIECES), multiple_of=16,
                     max_seq_len=32)
    model = TorchModel(args).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "model_args": args.to_dict()}, run / "ckpt.pt")
    small_tokenizer().save_bin(run / "tokenizer.bin")
    cli("export", str(run), str(tmp_path / "m.bin"))
    assert "GGUF v3" in cli("export", str(run), str(tmp_path / "m.gguf")).output
    assert GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "run"
    tokens = random_tokens(len(PIECES), 20)
    a = logits_over(Transformer.load(tmp_path / "m.gguf", fastmath="off"), tokens)
    b = logits_over(Transformer.load(tmp_path / "m.bin", fastmath="off"), tokens)
    assert np.array_equal(a, b)


def test_eval_reads_gguf_with_its_vocabulary_and_ctx(small, tmp_path):
    path, _ = small["shared-gqa"]
    text = tmp_path / "stories.txt"
    text.write_text("once upon a time there was a little girl and the girl was little\n\n" * 6)
    result = cli("eval", str(path), "--text", str(text), "--ctx", "16")
    assert "windows of <= 16" in result.output


TORCH_FREE_SCRIPT = """
import sys
from llama2nb.cli import main
from llama2nb.tokenizer import Tokenizer
bin_path, gguf_path, tokenizer, out = sys.argv[1:]
for args in (["quantize", bin_path, out, "--type", "f32", "-z", tokenizer], ["info", out],
             ["export", out, out + ".bin", "--version", "1"]):
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
Tokenizer.load(gguf_path).encode("once upon a time")
print("torch" in sys.modules)
"""


def test_gguf_paths_never_import_torch(small, tmp_path):
    path, bin_path = small["shared-gqa"]
    tok = tmp_path / "tokenizer.bin"
    small_tokenizer().save_bin(tok)
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(bin_path), str(path), str(tok),
                             str(tmp_path / "out.gguf")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
