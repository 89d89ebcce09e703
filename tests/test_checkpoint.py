"""Checkpoint layouts: write -> read round trips, and the loader's errors (no bad file reaches a kernel)."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2nb import CheckpointError, Transformer
from llama2nb.files.llama2c import MAGIC, expected_file_size, read_checkpoint, read_config, write_checkpoint
from llama2nb.formats import Q8_0
from llama2nb.testmodels import random_weights

from .conftest import STORIES260K, TINY, TINY_MODELS, requires

NAMES = ("token_embedding_table", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3",
         "rms_final_weight")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_round_trip(tmp_path, name):
    config = TINY_MODELS[name]
    weights = random_weights(config, seed=3)
    path = tmp_path / "m.bin"
    write_checkpoint(path, config, weights)
    assert path.stat().st_size == expected_file_size(config)
    ck = read_checkpoint(path)
    assert ck.config == config
    w = ck.weights
    for key in NAMES + (() if config.shared_classifier else ("wcls",)):
        stored = getattr(w, key)
        if config.version == 2 and key not in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight"):
            matrices = [stored] if key in ("token_embedding_table", "wcls") else stored
            originals = [weights[key]] if key in ("token_embedding_table", "wcls") else weights[key]
            for m, original in zip(matrices, originals):
                expected = Q8_0(config.group_size).quantize(original)
                np.testing.assert_array_equal(m.q, expected.q)
                np.testing.assert_array_equal(m.s, expected.s)
                assert np.max(np.abs(m.dequantize() - original)) <= np.max(m.s) / 2 + 1e-7
        else:
            np.testing.assert_array_equal(np.asarray(stored), weights[key])
    if config.shared_classifier:
        assert w.wcls is w.token_embedding_table
    assert not np.asarray(w.rms_att_weight).flags.writeable  # views into a read-only map


@requires(STORIES260K)
def test_stories260k_round_trips_through_every_layout(tmp_path):
    source = read_checkpoint(STORIES260K)
    weights = {k: getattr(source.weights, k) for k in NAMES}
    v0 = tmp_path / "v0.bin"
    write_checkpoint(v0, source.config, weights)
    ours, theirs = v0.read_bytes(), STORIES260K.read_bytes()
    tables = 2 * source.config.seq_len * source.config.head_size // 2 * 4  # the unused RoPE tables
    assert len(ours) == len(theirs) and ours[:-tables] == theirs[:-tables]  # every weight byte identical
    # the tables themselves: torch's float32 cos/sin and NumPy's differ in the last bit at most
    np.testing.assert_allclose(np.frombuffer(ours[-tables:], np.float32),
                               np.frombuffer(theirs[-tables:], np.float32), atol=1.2e-7)
    for version, gs in ((1, 0), (2, 4)):
        path = tmp_path / f"v{version}.bin"
        write_checkpoint(path, replace(source.config, version=version, group_size=gs), weights)
        assert read_config(path) == replace(source.config, version=version, group_size=gs)


def v0_header(dim=32, hidden=64, layers=2, heads=4, kv=4, vocab=67, seq=80) -> bytes:
    return struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


def v1_header(version=1, dims=(32, 64, 2, 4, 4, 67, 80), shared=1, gs=16) -> bytes:
    head = struct.pack("<Ii7iB", MAGIC, version, *dims, shared)
    if version == 2:
        head += struct.pack("<i", gs)
    return head.ljust(256, b"\0")


def write_bytes(tmp_path, data: bytes):
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    return path


BAD_HEADERS = [
    (v0_header(dim=0), "dim: expected an integer in 1..65536, found 0"),
    (v0_header(dim=-32), "dim: expected"),
    (v0_header(heads=5), "n_heads: expected a divisor of dim=32, found 5"),
    (v0_header(kv=3), "n_kv_heads: expected a divisor of n_heads=4, found 3"),
    (v0_header(dim=36, heads=12), "even head size"),
    (v0_header(layers=5000), "n_layers: expected an integer in 1..1024"),
    (v0_header(vocab=0), "vocab_size"),
    (v0_header(seq=2**30), "seq_len"),
    (v1_header(version=3), "version: expected 1 or 2"),
    (v1_header(shared=7), "shared_classifier: expected 0 or 1, found 7"),
    (v1_header(version=2, gs=0), "group_size: expected a positive integer, found 0"),
    (v1_header(version=2, gs=48), "group_size: expected a divisor of dim=32"),
    (v1_header(version=2, dims=(32, 48, 2, 4, 4, 67, 80), gs=32), "group_size: expected a divisor of hidden_dim=48"),
    (b"", "header: expected at least 4 bytes, found a 0-byte file"),
    (v0_header()[:20], "v0 header: expected at least 28 bytes"),
    (v1_header()[:100], "v1/v2 header: expected at least 256 bytes"),
]


@pytest.mark.parametrize("data,message", BAD_HEADERS)
def test_bad_header_names_the_field(tmp_path, data, message):
    path = write_bytes(tmp_path, data + b"\0" * 64 if len(data) >= 28 else data)
    with pytest.raises(CheckpointError) as error:
        read_config(path)
    text = str(error.value)
    assert str(path) in text and message in text and "\n" not in text


@pytest.mark.parametrize("name", ["v0-shared", "v1-shared", "v2-unshared-gqa"])
@pytest.mark.parametrize("delta", [-1, 1, -4096])
def test_wrong_size_is_refused_before_mapping(tiny_models, tmp_path, name, delta):
    data = tiny_models[name].read_bytes()
    path = write_bytes(tmp_path, data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(CheckpointError, match=rf"file size: expected {len(data):,} bytes .* found {len(data) + delta:,}"):
        Transformer.load(path)


def test_v0_classifier_flag_inconsistent_with_size_gets_a_hint(tiny_models, tmp_path):
    data = bytearray(tiny_models["v0-unshared"].read_bytes())
    data[20:24] = struct.pack("<i", TINY.vocab_size)  # claim shared, keep the classifier's bytes
    with pytest.raises(CheckpointError, match="fits an unshared classifier"):
        read_config(write_bytes(tmp_path, bytes(data)))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_config(tmp_path / "nope.bin")
    with pytest.raises(CheckpointError, match="directory|cannot read"):
        read_config(tmp_path)


def test_kv_cache_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    from llama2nb.files import llama2c as checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    path = tmp_path / "m.bin"
    write_checkpoint(path, TINY, random_weights(TINY))
    with pytest.raises(CheckpointError, match=r"KV cache: needs .* GiB"):
        Transformer.load(path)
    with pytest.raises(CheckpointError, match=r"in-memory load: needs .* GiB.*\(map it instead\)"):
        Transformer.load(path, in_memory=True)


# ----------------------------------------------------------------------------------------------
# Fuzzing: random headers, truncations and bit flips end in the loader's own error or a valid load.

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
small_int = st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-4, 300))


def load_or_refuse(path) -> None:
    try:
        model = Transformer.load(path)
    except CheckpointError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    model.forward(0, 0)  # a file that loads must run: its layout was proven exact


@FUZZ
@given(dims=st.tuples(*[small_int] * 7), tail=st.binary(max_size=2048))
def test_fuzz_v0_headers(tmp_path, dims, tail):
    load_or_refuse(write_bytes(tmp_path, struct.pack("<7i", *dims) + tail))


@FUZZ
@given(version=st.integers(-1, 4), dims=st.tuples(*[small_int] * 7), flag=st.integers(0, 255),
       gs=small_int, tail=st.binary(max_size=2048))
def test_fuzz_v1_v2_headers(tmp_path, version, dims, flag, gs, tail):
    head = struct.pack("<Ii7iBi", MAGIC, version, *dims, flag, gs).ljust(256, b"\0")
    load_or_refuse(write_bytes(tmp_path, head + tail))


@FUZZ
@given(name=st.sampled_from(list(TINY_MODELS)), cut=st.integers(0, 2**20), flips=st.lists(st.integers(0, 2**20), max_size=4))
def test_fuzz_truncations_and_bit_flips(tiny_models, tmp_path, name, cut, flips):
    data = bytearray(tiny_models[name].read_bytes())
    for bit in flips:
        position = bit % (8 * min(len(data), 300))  # mostly the header, where a flip matters
        data[position // 8] ^= 1 << (position % 8)
    if cut % 3:
        data = data[: cut % len(data)]
    load_or_refuse(write_bytes(tmp_path, bytes(data)))
