"""The generation loop: run.c's `generate` and `chat`, as a stream of events that never prints.

    for event in generate(model, tokenizer, sampler, prompt="Once upon a time", steps=256):
        if isinstance(event, TokenEvent):
            print(event.text, end="", flush=True)

run.c's semantics: `steps` counts positions including the prompt; 0 means seq_len and more than
seq_len is clamped (with a NoticeEvent); generation stops when BOS is sampled. Unlike run.c, a
prompt longer than seq_len is an error (run.c silently drops its tail). The prompt runs as one
batched prefill (the same logits as run.c's position-by-position loop), so its cost is in the
time to first token; tok/s counts the positions after the first sampled token over the time
since it, which is run.c's figure ((pos - 1) / time since the first token) when there is no
prompt, and the generation speed alone when there is one.

`generate()` returns a Generation: iterate it for events; its `stats` are current at every
moment, so a caller interrupted mid-stream (Ctrl-C) can still report them. Its clock stops while
chat waits for the user's next line, so the first-token time and tok/s measure the model, not
the typing.

Errors: inputs a user can get wrong (a prompt that does not fit, steps < 0, text that is not
Unicode, a tokenizer of another model) raise GenerationError, a `Llama2nbError`; a chat whose
first turn does not fit is such an error too, as a generate prompt is. A later turn that does
not fit, or a reply that uses up the positions, ends the chat with a NoticeEvent naming the limit
(steps, i.e. -n, or the model's seq_len).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Iterator, Protocol, Union

import numpy as np

from .errors import Llama2nbError
from .sampler import Sampler
from .tokenizer import BOS_ID, EOS_ID, Tokenizer

SYSTEM_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
USER_TEMPLATE = "[INST] {user} [/INST]"


class GenerationError(Llama2nbError, ValueError):
    """Inputs generation cannot run with (e.g. a prompt longer than the context); one line."""


class Model(Protocol):  # what generation needs of a Transformer (tests may pass fakes)
    config: object

    def forward(self, token: int, pos: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenEvent:
    """A token entering the text: forced from the prompt (`prompt=True`) or sampled. `text` is
    what it adds (possibly "" while a multi-byte character is incomplete). id -1 carries the
    end of a stream that stopped inside a character (shown as U+FFFD)."""

    id: int
    text: str
    pos: int
    prompt: bool = False


@dataclass(frozen=True)
class NoticeEvent:
    """Something the user should know that is not an error (e.g. steps clamped to seq_len)."""

    message: str


@dataclass(frozen=True)
class TurnEvent:
    """Chat: a new turn starts. role "user" carries the user's text; role "assistant" comes
    before the assistant's tokens."""

    role: str
    text: str = ""


@dataclass
class Stats:
    positions: int = 0  # forward passes run (prompt + sampled), run.c's pos
    prompt_tokens: int = 0  # forced tokens, BOS included
    sampled_tokens: int = 0  # tokens the sampler chose and that entered the text
    steps: int = 0  # the position budget after clamping
    first_token_seconds: float | None = None  # from the start to the first sampled token
    elapsed_seconds: float = 0.0  # from the start to the last token
    timed_seconds: float = 0.0  # from the first sampled token to the last (run.c's timer)
    timed_positions: int = 0  # positions run after it (run.c's pos - 1 when there is no prompt)
    stop_reason: str = "running"  # steps | bos | eof | context | interrupted | closed

    @property
    def tokens_per_second(self) -> float | None:
        """run.c's figure: positions after the first, per second of the timed span."""
        if self.timed_positions < 1 or self.timed_seconds <= 0:
            return None
        return self.timed_positions / self.timed_seconds


@dataclass(frozen=True)
class DoneEvent:
    stats: Stats


Event = Union[TokenEvent, NoticeEvent, TurnEvent, DoneEvent]


def resolve_steps(steps: int, seq_len: int) -> tuple[int, str | None]:
    """run.c's rule: 0 -> seq_len, > seq_len -> seq_len (here with a notice); < 0 is an error."""
    if steps < 0:
        raise GenerationError(f"steps: expected >= 0 (0 = the model's seq_len {seq_len}), found {steps}")
    if steps == 0:
        return seq_len, None
    if steps > seq_len:
        return seq_len, f"steps {steps} is more than the model's seq_len {seq_len}: running {seq_len}"
    return steps, None


class Generation:
    """One run of generate or chat; iterate for events, read `stats` at any time."""

    def __init__(self, body: Callable[["Generation"], Iterator[Event]], steps: int) -> None:
        self.stats = Stats(steps=steps)
        self._body = body
        self._start: float | None = None
        self._timer: float | None = None  # set when the first token enters the text
        self._timer_pos = 0
        self._paused = 0.0  # seconds spent waiting for the user, left out of every figure

    def __iter__(self) -> Iterator[Event]:
        self._start = self._clock()
        try:
            yield from self._body(self)
        except KeyboardInterrupt:
            self.stats.stop_reason = "interrupted"
            raise
        finally:
            if self.stats.stop_reason == "running":  # the consumer stopped iterating early
                self.stats.stop_reason = "closed"
        yield DoneEvent(self.stats)

    # bookkeeping shared by both loops -------------------------------------------------------

    def _clock(self) -> float:
        return time.perf_counter() - self._paused

    def _untimed(self, wait: Callable[[], str | None]) -> str | None:
        """Call `wait` (the user typing) with the clock stopped."""
        started = time.perf_counter()
        try:
            return wait()
        finally:
            self._paused += time.perf_counter() - started

    def _emitted(self, sampled: bool, pos: int) -> None:
        """A token entered the text with `pos` positions run: the timer starts at the first
        sampled token (run.c's first printed token when there is no prompt) and counts the
        positions run since."""
        now = self._clock()
        s = self.stats
        s.elapsed_seconds = now - self._start
        if not sampled:
            return
        s.sampled_tokens += 1
        if s.first_token_seconds is None:
            s.first_token_seconds = now - self._start
        if self._timer is None:
            self._timer, self._timer_pos = now, pos
        else:
            s.timed_positions = pos - self._timer_pos
            s.timed_seconds = now - self._timer

    def _finish(self, positions: int) -> None:
        """The final figures, over the time since the first sampled token, up to the end of the
        last forward pass (e.g. the one that sampled BOS, as run.c counts it)."""
        now = self._clock()
        self.stats.elapsed_seconds = now - self._start
        if self._timer is not None:
            self.stats.timed_positions = positions - self._timer_pos
            self.stats.timed_seconds = now - self._timer


def generate(model: Model, tokenizer: Tokenizer, sampler: Sampler, prompt: str = "", steps: int = 256,
             ) -> Generation:
    """run.c's generate(): feed BOS and the prompt, then sample until `steps` positions have
    run or BOS is sampled. Yields a TokenEvent per token entering the text (the prompt's
    included, as run.c prints them), NoticeEvents, and a DoneEvent with the Stats last."""
    seq_len = model.config.seq_len
    steps, notice = resolve_steps(steps, seq_len)
    prompt_tokens = tokenizer.encode(_check_text(prompt, "prompt"), bos=True, eos=False)
    if len(prompt_tokens) > seq_len:
        raise GenerationError(f"prompt: expected at most {seq_len} tokens (the model's seq_len), found "
                              f"{len(prompt_tokens)} tokens")
    _check_vocab(model, tokenizer)

    def body(run: Generation) -> Iterator[Event]:
        if notice:
            yield NoticeEvent(notice)
        if len(prompt_tokens) > steps:
            yield NoticeEvent(f"the prompt's {len(prompt_tokens)} tokens fill all {steps} steps: nothing "
                              f"will be sampled (raise -n)")
        stats = run.stats
        n = len(prompt_tokens)
        stats.prompt_tokens = n
        decoder = tokenizer.stream(prev_token=None)
        decoder.push(BOS_ID)  # no text, but the next piece's leading space is stripped
        # run.c prints prompt[1..] as it forces them; they are known now, so show them first
        for i, token in enumerate(prompt_tokens[1:steps + 1], start=1):
            sampler.observe(token)
            yield TokenEvent(token, decoder.push(token), i, prompt=True)
        # the prompt in blocks (run.c: one forward per position, the same logits)
        fed = min(n, steps)
        logits = _prefill(model, prompt_tokens[:fed], 0)
        pos = stats.positions = fed
        if fed < n:
            stats.stop_reason = "steps"
        # sample after the last position run, until steps positions have run or BOS comes
        while fed == n:
            nxt = sampler.sample(logits)
            if nxt == BOS_ID:  # run.c: BOS delimits sequences, so it ends this one
                stats.stop_reason = "bos"
                break
            if nxt != EOS_ID:  # the penalty is for repeated text; BOS/EOS delimit it
                sampler.observe(nxt)
            text = decoder.push(nxt)
            run._emitted(sampled=True, pos=pos)
            yield TokenEvent(nxt, text, pos, prompt=False)
            if pos >= steps:
                stats.stop_reason = "steps"
                break
            logits = model.forward(nxt, pos)
            pos = stats.positions = pos + 1
        run._finish(pos)
        tail = decoder.flush()
        if tail:
            yield TokenEvent(-1, tail, pos, prompt=False)

    return Generation(body, steps)


def check_chat_format(tokenizer: Tokenizer) -> None:
    """Refuse a vocabulary whose GGUF chat template is not Llama 2's: chat speaks only that."""
    if getattr(tokenizer, "chat_format", "llama2") != "llama2":
        raise GenerationError(f"{tokenizer.path}: tokenizer.chat_template: expected Llama 2's [INST] format "
                              f"(the one chat speaks), found another: {tokenizer.chat_template[:60]!r}")


def chat(model: Model, tokenizer: Tokenizer, sampler: Sampler, read_user: Callable[[], str | None] | Iterable[str],
         system: str = "", prompt: str | None = None, steps: int = 0) -> Generation:
    """run.c's chat(): Llama 2's chat template, one user turn at a time from `read_user` (a
    callable returning the next line or None at end of input, or an iterable of lines), the
    assistant's turn ending at EOS. `prompt` is the first user turn if given. Every turn is
    encoded with BOS and EOS is fed back into the model, as run.c does. run.c samples at every
    position, prompt positions too, discarding those; here a turn runs as one prefill and the
    discarded samples' coins are drawn unused, so seeds still choose what run.c chooses.

    Unlike run.c, the system prompt comes only from `system` (run.c asks for it on stdin first).
    A first turn that does not fit in `steps` is a GenerationError (raised here when `prompt`
    gives it, else while iterating); a later one, or a reply that uses up the positions, ends
    the chat with a notice naming the limit. A tokenizer whose GGUF chat template is not Llama
    2's is refused (GenerationError)."""
    seq_len = model.config.seq_len
    steps, notice = resolve_steps(steps, seq_len)
    _check_vocab(model, tokenizer)
    check_chat_format(tokenizer)
    if not callable(read_user):
        lines = iter(read_user)
        read_user = lambda: next(lines, None)  # noqa: E731 - an iterator as the callable form
    # which limit ends the chat: steps (-n) below the model's context, else the context itself
    reason, hint = ("steps", " (raise -n)") if steps < seq_len else ("context", "")
    limit = f"the -n limit of {steps} positions" if reason == "steps" else f"the model's context of {seq_len} positions"

    _check_text(system, "system prompt")

    def encode_turn(user: str, first: bool) -> list[int]:
        template = SYSTEM_TEMPLATE if first and system else USER_TEMPLATE
        user = _check_text(user, "first turn" if first else "turn")
        turn = tokenizer.encode(template.format(system=system, user=user), bos=True, eos=False)
        if first and len(turn) >= steps:
            raise GenerationError(f"first turn: expected at most {steps - 1} tokens with the chat template ({limit}, "
                                  f"one position left for the reply), found {len(turn)} tokens")
        return turn

    first_turn = encode_turn(prompt, True) if prompt is not None else None

    def body(run: Generation) -> Iterator[Event]:
        if notice:
            yield NoticeEvent(notice)
        stats, pos, pending = run.stats, 0, prompt
        while True:
            if pos >= steps:  # a reply took the last positions: no room for another turn
                stats.stop_reason = reason
                yield NoticeEvent(f"{limit} is used up: the chat ends here and later turns are not read{hint}")
                break
            # the user's turn
            user = pending if pending is not None else run._untimed(read_user)
            pending = None
            if user is None:
                stats.stop_reason = "eof"
                break
            yield TurnEvent("user", user)
            turn = first_turn if first_turn is not None and pos == 0 else encode_turn(user, pos == 0)
            if pos + len(turn) >= steps:
                stats.stop_reason = reason
                yield NoticeEvent(f"the conversation is full: this turn needs {len(turn)} positions and "
                                  f"{steps - pos} of {limit} remain{hint}")
                break
            stats.prompt_tokens += len(turn)
            yield TurnEvent("assistant")
            pos = yield from _reply(run, model, tokenizer, sampler, turn, pos, steps)
        run._finish(pos)

    return Generation(body, steps)


def _reply(run: Generation, model: Model, tokenizer: Tokenizer, sampler: Sampler, turn: list[int], pos: int,
           steps: int) -> Generator[Event, None, int]:
    """The assistant's turn after the user's `turn` (its tokens, BOS first) from position pos:
    the turn in blocks, then tokens sampled until EOS or `steps` positions (like run.c, a token
    sampled at the last position is still shown), EOS fed back; returns the next position."""
    stats = run.stats
    decoder = tokenizer.stream(prev_token=None)
    decoder.push(BOS_ID)  # strip the leading space of the answer's first piece
    # feed the turn in blocks; run.c samples after every position and ignores all but the last
    # sample, so draw those coins unused to keep the RNG in step
    for token in turn[1:]:
        sampler.observe(token)  # (BOS is a delimiter, not text to penalise)
    logits = _prefill(model, turn, pos)
    pos = stats.positions = pos + len(turn)
    sampler.skip(len(turn) - 1)
    nxt = sampler.sample(logits)  # the answer's first token
    while nxt != EOS_ID:
        token = nxt
        sampler.observe(token)
        text = decoder.push(token)
        run._emitted(sampled=True, pos=pos)
        yield TokenEvent(token, text, pos, prompt=False)
        if pos >= steps:
            break
        nxt = sampler.sample(model.forward(token, pos))
        pos += 1
        stats.positions = pos
    tail = decoder.flush()
    if tail:
        yield TokenEvent(-1, tail, pos, prompt=False)
    if nxt == EOS_ID and pos < steps:
        model.forward(EOS_ID, pos)  # run.c feeds EOS back and samples (unused)
        sampler.skip(1)
        pos += 1
        stats.positions = pos
    return pos


def _prefill(model: Model, tokens: list[int], pos: int) -> np.ndarray:
    """Logits after running `tokens` at positions pos, pos+1, ...: the model's batched prefill
    when it has one, else one forward per token."""
    prefill = getattr(model, "prefill", None)
    if prefill is not None:
        return prefill(tokens, pos)
    for i, token in enumerate(tokens):
        logits = model.forward(token, pos + i)
    return logits


def _check_text(text: str, field: str) -> str:
    """A user's text, if it is Unicode: a lone surrogate that no undecodable input byte explains
    is the user's error, named by `field` (surrogate escapes encode as their bytes)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{field}: expected text, found a lone surrogate {text[e.start]!r} at character "
                              f"{e.start}") from None
    return text


def _check_vocab(model: Model, tokenizer: Tokenizer) -> None:
    vocab = model.config.vocab_size
    if tokenizer.vocab_size != vocab:
        raise GenerationError(f"{tokenizer.path}: tokenizer vocabulary: expected {vocab} tokens (the model's "
                              f"vocab_size), found {tokenizer.vocab_size}")
