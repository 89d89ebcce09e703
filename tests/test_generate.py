"""generate() and chat(): run.c's loop semantics, checked with a scripted fake model (exact
control over every logit) and then with a real tiny Transformer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from llama2nb import Transformer
from llama2nb.generate import (SYSTEM_TEMPLATE, USER_TEMPLATE, DoneEvent, GenerationError, NoticeEvent, TokenEvent,
                               TurnEvent, chat, generate, resolve_steps)
from llama2nb.sampler import Sampler, XorShift64Star
from llama2nb.tokenizer import BOS_ID, EOS_ID, Tokenizer

from .sampling_fixtures import tiny_vocab, write_tiny_model


@dataclass
class Config:
    vocab_size: int
    seq_len: int


class ScriptedModel:
    """forward() records what it was fed and returns logits whose argmax is script(pos)."""

    def __init__(self, vocab_size: int, seq_len: int, script=lambda pos: 100) -> None:
        self.config = Config(vocab_size, seq_len)
        self.script = script
        self.fed: list[tuple[int, int]] = []
        self._logits = np.zeros(vocab_size, np.float32)

    def forward(self, token: int, pos: int) -> np.ndarray:
        assert 0 <= pos < self.config.seq_len and 0 <= token < self.config.vocab_size
        self.fed.append((token, pos))
        self._logits[:] = 0
        self._logits[self.script(pos)] = 10
        return self._logits


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    pieces, scores = tiny_vocab()
    return Tokenizer(pieces, scores)


def greedy(tok: Tokenizer) -> Sampler:
    return Sampler(tok.vocab_size, temperature=0.0)


def piece(tok: Tokenizer, text: str) -> int:
    return tok.pieces.index(text.encode())


def run(events) -> tuple[list, DoneEvent]:
    events = list(events)
    assert isinstance(events[-1], DoneEvent)
    return events[:-1], events[-1]


def test_steps_count_positions_including_the_prompt(tok):
    cat = piece(tok, " cat")
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: cat)
    prompt = tok.encode("Once upon a time")  # BOS + 4
    events, done = run(generate(model, tok, greedy(tok), "Once upon a time", steps=10))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.id for t in tokens] == prompt[1:] + [cat] * 6
    assert [t.prompt for t in tokens] == [True] * 4 + [False] * 6
    assert "".join(t.text for t in tokens) == "Once upon a time" + " cat" * 6  # no leading space
    assert [p for _, p in model.fed] == list(range(10))
    assert [t for t, _ in model.fed] == prompt + [cat] * 5
    s = done.stats
    assert (s.positions, s.prompt_tokens, s.sampled_tokens, s.steps, s.stop_reason) == (10, 5, 6, 10, "steps")
    assert s.timed_positions == 5  # positions after the first sampled token (run.c: pos - 1 without a prompt)
    assert s.tokens_per_second and s.tokens_per_second > 0 and s.first_token_seconds is not None


def test_steps_zero_means_seq_len_and_more_is_clamped_with_a_notice(tok):
    model = ScriptedModel(tok.vocab_size, 12)
    events, done = run(generate(model, tok, greedy(tok), steps=0))
    assert done.stats.positions == 12 and not any(isinstance(e, NoticeEvent) for e in events)
    events, done = run(generate(ScriptedModel(tok.vocab_size, 12), tok, greedy(tok), steps=500))
    assert done.stats.positions == 12
    notices = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert len(notices) == 1 and "500" in notices[0] and "12" in notices[0]
    assert resolve_steps(5, 12) == (5, None)
    with pytest.raises(GenerationError, match="steps"):
        resolve_steps(-1, 12)


def test_sampling_bos_stops(tok):
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: BOS_ID if pos == 3 else piece(tok, " dog"))
    events, done = run(generate(model, tok, greedy(tok), steps=50))
    assert [e.id for e in events if isinstance(e, TokenEvent)] == [piece(tok, " dog")] * 3
    assert done.stats.stop_reason == "bos" and done.stats.positions == 4
    assert done.stats.timed_positions == 3  # run.c counts the position that sampled BOS


def test_eos_does_not_stop_generate_mode(tok):
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: EOS_ID if pos == 1 else piece(tok, " sun"))
    events, done = run(generate(model, tok, greedy(tok), steps=4))
    assert [e.id for e in events if isinstance(e, TokenEvent)][:2] == [piece(tok, " sun"), EOS_ID]
    assert done.stats.stop_reason == "steps"


def test_prompt_longer_than_seq_len_is_an_error_with_both_lengths(tok):
    model = ScriptedModel(tok.vocab_size, 8)
    prompt = " ".join(["cat"] * 20)
    n = len(tok.encode(prompt))
    with pytest.raises(GenerationError) as info:
        generate(model, tok, greedy(tok), prompt, steps=0)
    assert str(n) in str(info.value) and "8" in str(info.value)


def test_prompt_filling_all_steps_samples_nothing_with_a_notice(tok):
    model = ScriptedModel(tok.vocab_size, 64)
    events, done = run(generate(model, tok, greedy(tok), "Once upon a time there was", steps=3))
    assert any(isinstance(e, NoticeEvent) and "nothing" in e.message for e in events)
    assert done.stats.sampled_tokens == 0 and done.stats.positions == 3


def test_vocabulary_mismatch_is_an_error(tok):
    with pytest.raises(GenerationError, match=f"expected 500.*found {tok.vocab_size}"):
        generate(ScriptedModel(500, 16), tok, Sampler(500), steps=4)


def test_multibyte_characters_are_never_split(tok):
    # the model "says" 🦙 as four byte tokens: the text arrives whole, on the fourth
    llama = list("🦙".encode())
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: llama[(pos) % 4] + 3)
    events, _ = run(generate(model, tok, greedy(tok), steps=8))
    texts = [e.text for e in events if isinstance(e, TokenEvent)]
    assert texts == ["", "", "", "🦙"] * 2


def test_repetition_penalty_sees_the_prompt(tok):
    cat, dog = piece(tok, " cat"), piece(tok, " dog")

    class TwoChoices(ScriptedModel):
        def forward(self, token, pos):
            super().forward(token, pos)
            self._logits[:] = 0
            self._logits[cat], self._logits[dog] = 3.0, 2.5
            return self._logits

    model = TwoChoices(tok.vocab_size, 64)
    sampler = Sampler(tok.vocab_size, temperature=0.0, repetition_penalty=1.5)
    events, _ = run(generate(model, tok, sampler, "the cat", steps=4))
    sampled = [e.id for e in events if isinstance(e, TokenEvent) and not e.prompt]
    # " cat" is in the prompt: 3.0 / 1.5 = 2.0 < 2.5 -> dog; then dog is seen too: 2.5 / 1.5 < 2.0 -> cat
    assert sampled == [dog, cat]


def test_stats_are_readable_when_the_consumer_stops_early(tok):
    gen = generate(ScriptedModel(tok.vocab_size, 64), tok, greedy(tok), steps=30)
    for i, event in enumerate(gen):
        if i == 4:
            break
    assert gen.stats.positions == 5 and gen.stats.sampled_tokens == 5


# ----------------------------------------------------------------------------------------------
# chat


def test_chat_template_turns_and_eos(tok):
    dog = piece(tok, " dog")
    answers = iter([[dog, dog, EOS_ID], [piece(tok, " sun"), EOS_ID]])
    state = {"turn": None, "i": 0}

    class Chatty(ScriptedModel):
        """Answers scripted per turn: after the turn's last prompt token, emit the answer."""

        def forward(self, token, pos):
            super().forward(token, pos)
            self._logits[:] = 0
            self._logits[piece(tok, ".")] = 5  # what it "says" while the prompt is forced
            if self.answer_from is not None and pos >= self.answer_from:
                k = pos - self.answer_from
                if k < len(state["turn"]):
                    self._logits[state["turn"][k]] = 10
            return self._logits

    model = Chatty(tok.vocab_size, 200)
    model.answer_from = None
    fed_turns = []

    def read_user():
        text = ["the cat", "the dog", None][len(fed_turns)]
        fed_turns.append(text)
        if text is not None:
            state["turn"] = next(answers)
            system = "be happy" if len(fed_turns) == 1 else ""
            rendered = (f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{text} [/INST]" if system
                        else f"[INST] {text} [/INST]")
            model.answer_from = len(model.fed) + len(tok.encode(rendered)) - 1
        return text

    events, done = run(chat(model, tok, greedy(tok), read_user, system="be happy", steps=0))
    kinds = [(type(e).__name__, getattr(e, "role", None)) for e in events if not isinstance(e, TokenEvent)]
    assert kinds == [("TurnEvent", "user"), ("TurnEvent", "assistant"), ("TurnEvent", "user"),
                     ("TurnEvent", "assistant")]
    answers_text, current = [], None
    for e in events:
        if isinstance(e, TurnEvent):
            current = [] if e.role == "assistant" else None
            if current is not None:
                answers_text.append(current)
        elif isinstance(e, TokenEvent) and current is not None:
            current.append(e.text)
    assert ["".join(t) for t in answers_text] == ["dog dog", "sun"]  # leading space stripped
    # what the model was fed: turn 1 with the system template, answer, EOS, then turn 2 plain
    fed = [t for t, _ in model.fed]
    first = tok.encode("[INST] <<SYS>>\nbe happy\n<</SYS>>\n\nthe cat [/INST]")
    second = tok.encode("[INST] the dog [/INST]")
    assert fed[: len(first)] == first
    rest = fed[len(first):]
    assert rest[:3] == [dog, dog, EOS_ID]  # the answer, then EOS fed back as run.c does
    assert rest[3: 3 + len(second)] == second
    assert rest[3 + len(second):] == [piece(tok, " sun"), EOS_ID]
    assert done.stats.stop_reason == "eof"
    assert [p for _, p in model.fed] == list(range(len(model.fed)))
    assert done.stats.sampled_tokens == 3


def test_chat_from_an_iterable_with_first_prompt_and_no_system(tok):
    model = ScriptedModel(tok.vocab_size, 400, lambda pos: EOS_ID)
    events, done = run(chat(model, tok, greedy(tok), ["second"], prompt="first"))
    users = [e.text for e in events if isinstance(e, TurnEvent) and e.role == "user"]
    assert users == ["first", "second"]
    fed = [t for t, _ in model.fed]
    assert fed[: len(tok.encode("[INST] first [/INST]"))] == tok.encode("[INST] first [/INST]")
    assert done.stats.stop_reason == "eof"


def test_chat_stops_when_the_context_is_full(tok):
    model = ScriptedModel(tok.vocab_size, 40, lambda pos: EOS_ID)
    events, done = run(chat(model, tok, greedy(tok), iter(["hello there"] * 10)))
    assert done.stats.stop_reason == "context"
    assert any(isinstance(e, NoticeEvent) and "full" in e.message for e in events)
    assert done.stats.positions <= 40


def test_chat_full_names_the_limit(tok):
    model = ScriptedModel(tok.vocab_size, 40, lambda pos: EOS_ID)
    events, done = run(chat(model, tok, greedy(tok), iter(["hello there"] * 10), steps=30))
    notices = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert done.stats.stop_reason == "steps"
    assert len(notices) == 1 and "the -n limit of 30 positions" in notices[0] and "raise -n" in notices[0]
    events, _ = run(chat(model, tok, greedy(tok), iter(["hello there"] * 10), steps=0))
    notices = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert len(notices) == 1 and "the model's context of 40 positions" in notices[0] and "-n" not in notices[0]


def test_chat_says_when_a_reply_uses_up_the_steps(tok):
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: piece(tok, " cat"))  # never says EOS
    asked = []

    def read_user():
        asked.append(1)
        return ["Hi", "Tell me a story", "Bye"][len(asked) - 1]

    events, done = run(chat(model, tok, greedy(tok), read_user, steps=20))
    notices = [e.message for e in events if isinstance(e, NoticeEvent)]
    assert len(asked) == 1 and done.stats.positions == 20 and done.stats.stop_reason == "steps"
    assert notices == ["the -n limit of 20 positions is used up: the chat ends here and later turns are not read "
                       "(raise -n)"]


def test_chat_first_turn_that_does_not_fit_is_an_error(tok):
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: EOS_ID)
    words = " ".join(["cat"] * 30)
    with pytest.raises(GenerationError, match=r"first turn: expected at most 19 tokens .*-n limit of 20 positions.*"
                                              r"found \d+ tokens"):
        chat(model, tok, greedy(tok), [], prompt=words, steps=20)  # before any model work
    with pytest.raises(GenerationError, match="first turn: expected at most 63 tokens .*model's context of 64"):
        list(chat(model, tok, greedy(tok), [words * 3]))
    assert model.fed == []


def test_chat_clock_stops_while_the_user_types(tok, monkeypatch):
    import importlib
    import types

    now = [1000.0]  # a fake clock: each forward takes 0.5 s, each line typed 100 s
    monkeypatch.setattr(importlib.import_module("llama2nb.generate"), "time",
                        types.SimpleNamespace(perf_counter=lambda: now[0]))
    slow_user = iter(["hi", "more"])

    def read_user():
        now[0] += 100.0
        return next(slow_user, None)

    class Ticking(ScriptedModel):
        def forward(self, token, pos):
            now[0] += 0.5
            return super().forward(token, pos)

    model = Ticking(tok.vocab_size, 200, lambda pos: EOS_ID if pos % 12 == 0 else piece(tok, " cat"))
    _, done = run(chat(model, tok, greedy(tok), read_user))
    s = done.stats
    assert s.sampled_tokens >= 2 and done.stats.stop_reason == "eof"
    assert s.first_token_seconds == 0.5 * len(tok.encode(USER_TEMPLATE.format(user="hi")))  # the prefill only
    assert s.elapsed_seconds == 0.5 * len(model.fed)  # forwards only, no typing
    assert 0 < s.timed_seconds < s.elapsed_seconds


@pytest.mark.parametrize("where", ["prompt", "chat prompt", "chat line", "system"])
def test_text_that_is_not_unicode_is_a_user_error(tok, where):
    model = ScriptedModel(tok.vocab_size, 64)
    bad = "lone \ud800"
    field = {"prompt": "prompt", "system": "system prompt"}.get(where, "first turn")
    with pytest.raises(GenerationError, match=rf"^{field}: expected text, found a lone surrogate '\\ud800' at "
                                              r"character 5$"):
        if where == "prompt":
            generate(model, tok, greedy(tok), bad)
        elif where == "chat prompt":
            chat(model, tok, greedy(tok), [], prompt=bad)
        elif where == "system":
            chat(model, tok, greedy(tok), [], system=bad)
        else:
            list(chat(model, tok, greedy(tok), [bad]))
    # undecodable input bytes (surrogate escapes) are not refused: they encode as their bytes
    events, _ = run(generate(model, tok, greedy(tok), "caf\udcc3\udca9", steps=8))
    assert "".join(e.text for e in events if e.prompt) == "café"


def test_chat_samples_at_every_position_like_runc(tok):
    """run.c's chat calls sample() after every forward, prompt positions included: the RNG
    advances once per position, which is what makes seeds reproduce run.c's chats."""
    model = ScriptedModel(tok.vocab_size, 64, lambda pos: EOS_ID if pos > 20 else piece(tok, " cat"))
    sampler = Sampler(tok.vocab_size, temperature=1.0, topp=0.9, seed=42)
    run(chat(model, tok, sampler, ["hi"]))
    coins = XorShift64Star(42)
    for _ in range(len(model.fed)):
        coins.random_u32()
    assert sampler.rng.state == coins.state


# ----------------------------------------------------------------------------------------------
# A real tiny Transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("gen"), seq_len=256)
    model = Transformer.load(path)
    return model, Tokenizer.load(path.parent / "tokenizer.bin", model.config.vocab_size)


def test_real_model_same_seed_same_story(tiny):
    model, tok = tiny

    def story(seed):
        events, done = run(generate(model, tok, Sampler(tok.vocab_size, seed=seed), "Once upon", steps=40))
        return "".join(e.text for e in events if isinstance(e, TokenEvent)), done.stats

    a, stats = story(7)
    b, _ = story(7)
    c, _ = story(8)
    assert a == b and a != c
    assert a.startswith("Once upon")
    assert stats.positions <= 40 and stats.prompt_tokens == 3


def test_real_model_chat(tiny):
    model, tok = tiny
    events, done = run(chat(model, tok, Sampler(tok.vocab_size, seed=1), ["hello", "more"], system="be brief"))
    assert done.stats.positions <= model.config.seq_len
    assert done.stats.stop_reason in ("eof", "context", "steps")


def test_prefill_gives_runc_loop_tokens(tiny):
    """The batched prompt (prefill) chooses what run.c's position-by-position loop chooses."""
    model, tok = tiny
    prompt = "Once upon a time there was a little girl"
    ids = tok.encode(prompt)
    for seed in (5, 6, 7):
        sampler, token, pos, expected = Sampler(tok.vocab_size, seed=seed), ids[0], 0, []
        while pos < 60:  # run.c's generate(), with forward() only
            logits = model.forward(token, pos)
            nxt = ids[pos + 1] if pos < len(ids) - 1 else sampler.sample(logits)
            pos += 1
            if nxt == BOS_ID:
                break
            expected.append(nxt)
            token = nxt
        events, _ = run(generate(model, tok, Sampler(tok.vocab_size, seed=seed), prompt, steps=60))
        assert [e.id for e in events if isinstance(e, TokenEvent) and e.id >= 0] == expected


def test_chat_gives_runc_chat_tokens(tiny):
    """Against run.c's chat() loop written out with forward() only: the same answers."""
    model, tok = tiny
    turns, system, steps = ["hello there", "the cat", "a dog"], "be happy", 200

    def runc_chat(sampler):
        out, pos, user_turn, user_idx, prompt_tokens, nxt, k = [], 0, True, 0, [], 0, 0
        while pos < steps:
            if user_turn:
                if k == len(turns):
                    break
                user = turns[k]
                k += 1
                rendered = (SYSTEM_TEMPLATE.format(system=system, user=user) if pos == 0 and system
                            else USER_TEMPLATE.format(user=user))
                prompt_tokens, user_idx, user_turn = tok.encode(rendered), 0, False
            if user_idx < len(prompt_tokens):
                token = prompt_tokens[user_idx]
                user_idx += 1
            else:
                token = nxt
            if token == EOS_ID:
                user_turn = True
            nxt = sampler.sample(model.forward(token, pos))
            pos += 1
            if user_idx >= len(prompt_tokens) and nxt != EOS_ID:
                out.append(nxt)
        return out

    for seed in (1, 2, 3):
        expected = runc_chat(Sampler(tok.vocab_size, temperature=0.9, seed=seed))
        events, done = run(chat(model, tok, Sampler(tok.vocab_size, temperature=0.9, seed=seed), turns,
                                system=system, steps=steps))
        got = [e.id for e in events if isinstance(e, TokenEvent) and e.id >= 0]
        assert got == expected and len(got) > 0, (seed, done.stats)
