"""Sampler: run.c's RNG, coin, multinomial and top-p choices, with expected values derived by
hand from run.c's algorithm; then the extras (top-k, min-p, repetition penalty) and validation."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

from llama2nb.sampler import Sampler, XorShift64Star, time_seed

from .sampling_fixtures import RUNC_SAMPLER_C, RunCRng, runc_sample

# xorshift64* from state 42, by hand:
#   s ^= s >> 12   -> 42                      (42 >> 12 == 0)
#   s ^= s << 25   -> 42 ^ 1409286144 = 1409286186
#   s ^= s >> 27   -> 1409286186 ^ 10 = 1409286176   (1409286186 >> 27 == 10; 0b10111010 ^ 0b1010)
#   s * 0x2545F4914F6CDD1D = 0xc3af444_56ce4ab7_719ba3a0 -> low 64 bits 0x56ce4ab7719ba3a0,
#   >> 32 = 0x56ce4ab7 = 1456360119;  random_f32 = (1456360119 >> 8) / 2**24 = 5688906 / 16777216
SEED42_U32 = [1456360119, 3359763283, 3393612768, 4054632243, 3283045847]
SEED42_F32 = [5688906 / 16777216, 13124075 / 16777216, 13256299 / 16777216, 15838407 / 16777216,
              12824397 / 16777216]  # 0.3391, 0.7823, 0.7901, 0.9440, 0.7644


def logits_for(probs) -> np.ndarray:
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def draws(sampler: Sampler, logits: np.ndarray, n: int) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


def test_rng_sequence_for_seed_42():
    rng = XorShift64Star(42)
    assert [rng.random_u32() for _ in range(5)] == SEED42_U32
    rng = XorShift64Star(42)
    coins = [rng.random_f32() for _ in range(5)]
    assert all(isinstance(c, np.float32) for c in coins)
    assert coins == [np.float32(c) for c in SEED42_F32]
    independent = RunCRng(42)
    assert [independent.u32() for _ in range(5)] == SEED42_U32


def test_rng_matches_an_independent_implementation_for_many_seeds():
    for seed in [1, 2, 7, 12345, 2**31 - 1, 2**32 + 5, 2**64 - 1]:
        ours, theirs = XorShift64Star(seed), RunCRng(seed)
        assert [ours.random_u32() for _ in range(50)] == [theirs.u32() for _ in range(50)]


def test_seed_defaults_follow_runc():
    assert Sampler(4, seed=None).seed in range(time_seed() - 5, time_seed() + 1)
    assert Sampler(4, seed=0).seed != 0  # 0 means "the time": state 0 would only ever give 0
    assert Sampler(4, seed=-1).seed == 2**64 - 1  # a negative C int sign-extends into the state
    assert Sampler(4, seed=42).seed == 42


def test_argmax_at_temperature_zero_takes_the_first_maximum():
    s = Sampler(5, temperature=0.0, seed=42)
    logits = np.array([0.1, 3.0, -1.0, 3.0, 2.0], np.float32)
    assert draws(s, logits, 3) == [1, 1, 1]
    assert s.rng.state == 42  # greedy draws no coin


def test_multinomial_by_hand():
    # probs 0.1 0.2 0.3 0.4 -> cdf 0.1 0.3 0.6 1.0; coins 0.339 0.782 0.790 0.944 0.764
    s = Sampler(4, temperature=1.0, topp=1.0, seed=42)
    assert draws(s, logits_for([0.1, 0.2, 0.3, 0.4]), 5) == [2, 3, 3, 3, 3]
    s = Sampler(4, temperature=1.0, topp=0.0, seed=42)  # topp 0 is multinomial too
    assert draws(s, logits_for([0.35, 0.45, 0.1, 0.1]), 5) == [0, 1, 1, 3, 1]  # cdf .35 .8 .9 1


def test_topp_by_hand():
    # probs 0.05 0.5 0.3 0.15, topp 0.7: cutoff (1 - 0.7) / 3 = 0.1 drops token 0; sorted 1, 2, 3;
    # running sum 0.5, 0.8 > 0.7 -> keep tokens 1 and 2; r = coin * 0.8 picks 1 if r < 0.5, else 2:
    # 0.271 -> 1, 0.626 -> 2, 0.632 -> 2, 0.755 -> 2, 0.611 -> 2
    s = Sampler(4, temperature=1.0, topp=0.7, seed=42)
    assert draws(s, logits_for([0.05, 0.5, 0.3, 0.15]), 5) == [1, 2, 2, 2, 2]


def test_topp_ties_keep_ascending_token_order():
    # four equal probabilities, topp 0.6: all pass the cutoff 0.133; glibc's (merge sort) qsort
    # keeps ties in index order 0 1 2 3; running sum passes 0.6 at the third -> keep 0 1 2;
    # r = coin * 0.75: 0.254 -> token 1 (cdf 0.25 < r < 0.5), 0.587 -> token 2, ...
    s = Sampler(4, temperature=1.0, topp=0.6, seed=42)
    assert draws(s, np.zeros(4, np.float32), 5) == [1, 2, 2, 2, 2]


def test_temperature_divides_the_logits():
    # logits 0 and ln 3 at temperature 2 -> probs 1/(1+sqrt 3), sqrt3/(1+sqrt3) = 0.366, 0.634
    s = Sampler(2, temperature=2.0, topp=1.0, seed=42)
    assert draws(s, np.array([0.0, math.log(3)], np.float32), 5) == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("temperature,topp", [(1.0, 0.9), (0.7, 0.9), (1.0, 1.0), (1.3, 0.5), (0.5, 0.95),
                                              (1.0, 0.0)])
def test_same_choices_as_runc_port(temperature, topp):
    """Against a scalar float32 port of run.c's sample(): the same tokens, draw for draw."""
    rng = np.random.default_rng(int(temperature * 10 + topp * 100))
    n = 300
    ours = Sampler(n, temperature=temperature, topp=topp, seed=1234)
    theirs = RunCRng(1234)
    for step in range(120):
        scale = [0.3, 1.0, 3.0][step % 3]
        logits = (rng.standard_normal(n) * scale).astype(np.float32)
        if step % 7 == 0:
            logits[rng.integers(0, n, 20)] = logits.max()  # ties at the top
        assert ours.sample(logits) == runc_sample(logits, temperature, topp, theirs), step


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_same_choices_as_runc_compiled_c(tmp_path):
    """run.c's sampler compiled with the system's cc and libc (glibc's qsort and expf), fed the
    logits of a random 32,000-token model's generation: every choice identical."""
    from llama2nb import Transformer
    from llama2nb.files.llama2c import write_checkpoint
    from llama2nb.testmodels import random_weights
    from llama2nb.config import ModelConfig

    (tmp_path / "sampler.c").write_text(RUNC_SAMPLER_C)
    subprocess.run(["cc", "-O3", "-o", str(tmp_path / "sampler"), str(tmp_path / "sampler.c"), "-lm"], check=True)
    config = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, seq_len=96)
    write_checkpoint(tmp_path / "m.bin", config, random_weights(config, seed=1, scale=0.3))
    model = Transformer.load(tmp_path / "m.bin")
    total = 0
    for temperature, topp, seed in [(1.0, 0.9, 42), (0.8, 0.95, 123), (1.0, 1.0, 7), (2.0, 0.5, 5), (0.0, 0.9, 1)]:
        sampler = Sampler(config.vocab_size, temperature=temperature, topp=topp, seed=seed)
        rows, ours, token = [], [], 1
        for pos in range(config.seq_len):
            logits = model.forward(token, pos)
            rows.append(logits.copy())
            token = sampler.sample(logits)
            ours.append(token)
        np.asarray(rows, np.float32).tofile(tmp_path / "logits.bin")
        out = subprocess.run([str(tmp_path / "sampler"), str(tmp_path / "logits.bin"), str(len(rows)),
                              str(config.vocab_size), repr(temperature), repr(topp), str(seed)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert ours == [int(v) for v in out], (temperature, topp, seed)
        total += len(ours)
    assert total == 5 * 96


def test_sample_leaves_the_logits_alone():
    logits = np.linspace(-1, 1, 100).astype(np.float32)
    before = logits.copy()
    s = Sampler(100, temperature=0.8, topp=0.9, seed=3, top_k=10, min_p=0.05, repetition_penalty=1.3)
    s.observe(5)
    for _ in range(10):
        s.sample(logits)
    assert np.array_equal(logits, before)


def test_large_flat_distribution_runs_compiled_without_allocating():
    """A flat 32,000-token distribution puts every token in top-p's sort (random-weight models):
    the compiled radix sort runs on the preallocated buffers, so a call allocates no array (a
    NumPy argsort or a float copy of the logits would each allocate over 100 KB)."""
    import tracemalloc

    from llama2nb import sampler as sampler_module

    logits = (np.random.default_rng(0).standard_normal(32000) * 0.1).astype(np.float32)
    s = Sampler(32000, seed=5, temperature=0.8)
    s.sample(logits)
    assert sampler_module._sample_topp.signatures  # the top-p choice went through the compiled loop
    tracemalloc.start()
    try:
        for _ in range(20):
            s.sample(logits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000, peak


# ----------------------------------------------------------------------------------------------
# Temperatures at float32's edges


def test_temperature_whose_division_overflows_float32_is_greedy():
    # 5 / 1e-38 = 5e38 > float32's largest (3.4e38): softmax's limit is the argmax; no coin
    logits = np.array([0.1, 3.0, -1.0, 5.0, 5.0], np.float32)
    s = Sampler(5, temperature=1e-38, topp=0.9, seed=42)
    assert draws(s, logits, 3) == [3, 3, 3]  # the first maximum, as temperature 0
    assert s.rng.state == 42
    assert Sampler(5, temperature=1e-50, seed=42).temperature == 0  # rounds to 0 in float32: greedy
    # a penalty far below 1 overflows the same way: greedy on the penalised logits
    s = Sampler(3, temperature=1.0, repetition_penalty=1e-40, seed=42)
    s.observe(1)
    assert s.sample(np.array([1.0, 2.0, 3.0], np.float32)) == 1 and s.rng.state == 42


def test_tiny_temperature_still_blames_broken_logits():
    from llama2nb.errors import Llama2nbError
    from llama2nb.sampler import LogitsError

    s = Sampler(3, temperature=1e-38, seed=1)
    with pytest.raises(LogitsError, match="1 nan or inf of 3") as info:
        s.sample(np.array([5.0, np.nan, 1.0], np.float32))
    assert isinstance(info.value, Llama2nbError)


def test_temperatures_beyond_float32_are_usage_errors():
    from llama2nb.errors import UsageError

    with pytest.raises(UsageError, match="temperature: expected a number from 0 to float32's largest"):
        Sampler(4, temperature=1e39)
    top = float(np.finfo(np.float32).max)
    s = Sampler(4, temperature=top, topp=1.0, seed=42)  # the largest float32 is still a temperature
    assert np.isfinite(s.temperature)
    assert draws(s, np.array([0.0, 1.0, 2.0, 3.0], np.float32), 5) == [1, 3, 3, 3, 3]  # uniform: coin * 4


# ----------------------------------------------------------------------------------------------
# Extras (off by default)


def test_top_k_only_picks_the_k_best():
    logits = np.array([5.0, 4.0, 3.0, 2.9, 2.8, 2.7], np.float32)
    s = Sampler(6, temperature=5.0, topp=1.0, seed=9, top_k=2)
    assert set(draws(s, logits, 200)) == {0, 1}
    s = Sampler(6, temperature=5.0, topp=0.95, seed=9, top_k=3)
    assert set(draws(s, logits, 200)) == {0, 1, 2}


def test_top_k_ties_at_the_boundary_keep_the_lower_ids():
    s = Sampler(5, temperature=10.0, topp=1.0, seed=3, top_k=2)
    assert set(draws(s, np.array([1.0, 2.0, 2.0, 2.0, 0.0], np.float32), 300)) == {1, 2}


def test_min_p_drops_unlikely_tokens():
    # probs 0.5 0.3 0.15 0.05; min_p 0.2 keeps p >= 0.1 -> tokens 0 1 2
    s = Sampler(4, temperature=1.0, topp=1.0, seed=11, min_p=0.2)
    assert set(draws(s, logits_for([0.5, 0.3, 0.15, 0.05]), 300)) == {0, 1, 2}


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([1.0, 2.0, 1.9, -1.0], np.float32)
    s = Sampler(4, temperature=0.0, repetition_penalty=1.5)
    assert s.sample(logits) == 1
    s.observe(1)  # 2.0 / 1.5 = 1.33 < 1.9
    assert s.sample(logits) == 2
    s.observe(2)  # 1.9 / 1.5 = 1.27 < 1.33: back to token 1
    assert s.sample(logits) == 1
    s.reset()
    assert s.sample(logits) == 1
    # negative logits are multiplied (pushed further down), not divided
    s = Sampler(2, temperature=0.0, repetition_penalty=2.0)
    s.observe(0)
    assert s.sample(np.array([-1.0, -1.5], np.float32)) == 1


def test_defaults_leave_runc_choices_unchanged():
    logits = (np.random.default_rng(2).standard_normal(50) * 2).astype(np.float32)
    a = Sampler(50, seed=77)
    b = Sampler(50, seed=77, top_k=0, min_p=0.0, repetition_penalty=1.0)
    for t in range(10):
        b.observe(t)
    assert draws(a, logits, 30) == draws(b, logits, 30)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"topp": 1.5}, "topp"), ({"topp": -0.1}, "topp"),
    ({"topp": float("nan")}, "topp"), ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition"),
    ({"repetition_penalty": 1e39}, "repetition"), ({"repetition_penalty": 1e-50}, "repetition"),
    ({"temperature": 1e39}, "temperature"), ({"vocab_size": 0}, "vocab_size"),
])
def test_out_of_range_settings_are_errors(kwargs, match):
    from llama2nb.errors import UsageError

    with pytest.raises(UsageError, match=match):
        Sampler(**{"vocab_size": 10, **kwargs})


def test_bad_logits_are_errors():
    s = Sampler(3, seed=1)
    with pytest.raises(ValueError, match="shape"):
        s.sample(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="finite"):
        s.sample(np.array([0.0, np.nan, 1.0], np.float32))


# ----------------------------------------------------------------------------------------------
# Property-based: any logits, settings and seed choose what run.c's sampler chooses

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(logits=st.integers(2, 40).flatmap(lambda n: arrays(np.float32, n, elements=st.sampled_from(
           [0.0, 1.0, 1.0, -2.5, 3.0, 0.5]) | st.floats(-20, 20, width=32))),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]) | st.floats(0.05, 3.0),
       topp=st.sampled_from([0.0, 0.5, 0.9, 0.95, 1.0]) | st.floats(0.0, 1.0),
       seed=st.integers(1, 2**64 - 1))
def test_any_logits_same_choices_as_runc(logits, temperature, topp, seed):
    n = len(logits)
    if temperature and 0 < np.float32(topp) < 1:  # run.c reads past its array when no token
        x = logits.astype(np.float32) / np.float32(temperature)  # passes the cutoff: keep
        p = np.exp(x - x.max())  # those cases out of the comparison
        assume((p / p.sum()).max() >= (np.float32(1) - np.float32(topp)) / np.float32(n - 1) * 1.01)
    ours = Sampler(n, temperature=temperature, topp=topp, seed=seed)
    theirs = RunCRng(seed)
    for _ in range(3):
        assert ours.sample(logits) == runc_sample(logits, temperature, topp, theirs)
