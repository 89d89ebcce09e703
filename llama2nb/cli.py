"""The llama2nb command line: Click parsing and Rich display only; the work lives in the modules.

`sample`, `info` and `quantize` never import torch (the training commands import it inside
their bodies).
Output contract of `sample`: on a terminal, Rich streams the story with a live status line;
otherwise stdout carries only the text (flushed per token, as run.c) and everything else goes
to stderr, where the "loading" line is shown only on a terminal and cleared once loaded. The
summary fits the terminal's width (broken between its parts, never inside one). Ctrl-C prints
the summary on a line of its own and exits 130; a reader that goes away (`| head`) ends the run
quietly with 141, as SIGPIPE would.

Errors: a user's error (`Llama2nbError`, or an OSError naming one of the user's files) is one
line `Error: ...` on stderr with exit 1; a flag out of range is a usage error, exit 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

import click

from .errors import Llama2nbError, UsageError
from .kernels.jit import usable_cores
from .sampler import FLOAT32_MAX
from .training.commands import CTX_OPTION, TRAINING_COMMANDS

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "checkpoints"
BUNDLED_MODEL = BUNDLED_DIR / "model.bin"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what run.c would die with under `| head`
STATUS_EVERY = 0.2  # seconds between live redraws (each redraw takes its time from the generation loop)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llama2nb")
def main() -> None:
    """llama2nb: train a baby Llama 2 in PyTorch, sample from it with Numba kernels."""


for _command in TRAINING_COMMANDS:
    main.add_command(_command)


# ----------------------------------------------------------------------------------------------
# Option types: out-of-range values are usage errors, never silent clamps


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan (it passes every range comparison), inf, and values
    beyond float32's largest (the sampler computes in float32, where they would be infinite)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        if abs(number) > FLOAT32_MAX:
            self.fail(f"{value!r} is beyond float32's largest value ({FLOAT32_MAX:.8g}).", param, ctx)
        return number


# ----------------------------------------------------------------------------------------------
# Finding files


def resolve_checkpoint(name: str | None) -> tuple[Path, Path | None]:
    """(checkpoint, tokenizer or None) for a path, a downloaded model name, or the bundled model."""
    if name is None:
        if BUNDLED_MODEL.is_file():
            return BUNDLED_MODEL, None
        raise click.ClickException(
            f"no checkpoint given and the bundled model ({BUNDLED_MODEL}) is not there: download one with "
            "`llama2nb download stories15M` and run `llama2nb sample stories15M`, or train one with `llama2nb train`")
    path = Path(name)
    if path.is_file():
        return path, None
    if path.is_dir():
        raise click.ClickException(f"{path}: expected a checkpoint file, found a directory")
    try:
        from .hub import resolve_model
    except ImportError:  # the hub module is optional at run time; a file path still works
        resolve_model = None
    found = resolve_model(name) if resolve_model is not None and os.sep not in name else None
    if found is not None:
        return Path(found[0]), Path(found[1]) if found[1] else None
    hint = f" (to fetch a llama2.c model: `llama2nb download {name}`)" if os.sep not in name else ""
    raise click.ClickException(f"{path}: no such checkpoint file, nor a downloaded model name{hint}")


def resolve_tokenizer(option: str | None, checkpoint: Path, from_hub: Path | None, vocab_size: int) -> Path:
    """-z if given; else the hub's tokenizer; else tokenizer.find_tokenizer's (eval's policy too:
    a GGUF checkpoint's own vocabulary first)."""
    from .tokenizer import find_tokenizer

    if option is not None:
        path = Path(option)
        if not path.exists():
            raise click.ClickException(f"{path}: no such tokenizer file (-z/--tokenizer)")
        return path
    if from_hub is not None:
        return from_hub
    return find_tokenizer(checkpoint, vocab_size)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A user's error as the command line shows it: a value the code cannot use (UsageError,
    e.g. a sampler setting that rounds to 0 in float32) is a usage error, exit 2; any other
    Llama2nbError, or an OSError naming a file of the user's, one line, exit 1. Anything else
    (BrokenPipeError included) passes through."""
    try:
        yield
    except UsageError as e:
        raise click.UsageError(str(e)) from None
    except Llama2nbError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        if e.filename is None:  # not about a file of the user's
            raise
        raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------
# Streams


def _configure_streams() -> None:
    """A terminal that cannot show UTF-8 gets '?' for what it cannot encode instead of a crash;
    stdin passes undecodable bytes through (the tokenizer encodes their original bytes)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):  # pragma: no cover - detached or exotic streams
                pass
    if hasattr(sys.stdin, "reconfigure"):
        try:
            sys.stdin.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # pragma: no cover
            pass


# Control characters a model's byte tokens can produce (ESC, BEL, backspace, C1 controls ...)
# would drive the terminal, not show: dropped on terminals (as run.c drops non-printable bytes);
# pipes get the text as it is.
_TERMINAL_UNSAFE = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def _for_terminal(text: str) -> str:
    return text.translate(_TERMINAL_UNSAFE)


def _utf8(stream: TextIO) -> bool:
    return (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# sample


@main.command()
@click.argument("checkpoint", required=False)
@click.option("-z", "--tokenizer", "tokenizer_path", metavar="PATH",
              help="tokenizer.bin, .model or .gguf [default: a GGUF checkpoint's own vocabulary; else beside the "
                   "checkpoint, data/tokN.bin, the bundled one]")
@click.option("-t", "--temperature", type=FiniteFloat(min=0.0), default=1.0, show_default=True,
              help="0 = greedy (argmax); so small that logits / t overflow float32 (e.g. 1e-38): greedy too")
@click.option("-p", "--topp", type=FiniteFloat(0.0, 1.0), default=0.9, show_default=True,
              help="top-p (nucleus) sampling; 0 or 1 = off")
@click.option("-s", "--seed", type=click.IntRange(0, (1 << 64) - 1), default=0,
              help="random seed [default: 0 = the time, as run.c]")
@click.option("-n", "--steps", type=click.IntRange(min=0), default=256, show_default=True,
              help="positions to run, prompt included; 0 = the model's seq_len")
@click.option("-i", "--prompt", default=None, help="the story's start (generate) or the first user turn (chat)")
@click.option("-m", "--mode", type=click.Choice(["generate", "chat"]), default="generate", show_default=True)
@click.option("-y", "--system", default=None, help="system prompt (chat mode)")
@click.option("--fastmath/--no-fastmath", default=True, show_default=True,
              help="fast-math kernels (as gcc -Ofast: faster, last-bit differences); "
                   "--no-fastmath: IEEE arithmetic")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="threads for the matmuls (llama2nb's point is one core; more can help big models)")
@click.option("--in-memory", is_flag=True,
              help="read the weights into RAM instead of mapping the file, for the memory of a copy: "
                   "faster where the OS cannot map files in 2 MB pages (Linux without transparent "
                   "huge pages, macOS)")
@click.option("--no-repack", "repack", flag_value=False, default=True,
              help="multiply by Q4_0/Q8_0 GGUF weights as the file holds them (mapped), not repacked at load "
                   "into a faster in-RAM layout of the same bits (AVX-512 VNNI CPUs only; costs their size in RAM)")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="keep only the k most likely tokens; 0 = off")
@click.option("--min-p", type=FiniteFloat(0.0, 1.0), default=0.0, show_default=True,
              help="drop tokens below min-p times the top probability; 0 = off")
@click.option("--repetition-penalty", type=FiniteFloat(min=0.0, min_open=True), default=1.0, show_default=True,
              help="divide the logits of tokens already in the text (CTRL-style); 1 = off")
@CTX_OPTION
def sample(checkpoint: str | None, tokenizer_path: str | None, temperature: float, topp: float, seed: int,
           steps: int, prompt: str | None, mode: str, system: str | None, fastmath: bool | None, threads: int,
           in_memory: bool, repack: bool, top_k: int, min_p: float, repetition_penalty: float,
           ctx: int | None) -> None:
    """Sample a story (or chat) from a CHECKPOINT (a llama2.c .bin or a llama GGUF file): a
    path, a downloaded model name such as stories15M, or nothing for the bundled model."""
    from .files import read_config
    from .generate import chat, check_chat_format, generate
    from .sampler import Sampler
    from .tokenizer import Tokenizer

    _configure_streams()
    view = _View(interactive=_is_terminal(sys.stdout))
    run = None
    try:
        with _user_errors():
            ckpt, hub_tokenizer = resolve_checkpoint(checkpoint)
            config = read_config(ckpt)  # header and size only: fails fast, before compiling
            tok = Tokenizer.load(resolve_tokenizer(tokenizer_path, ckpt, hub_tokenizer, config.vocab_size),
                                 config.vocab_size)
            sampler = Sampler(config.vocab_size, temperature, topp, seed or None, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty)
            if mode == "generate":
                if system:
                    view.notice("-y/--system applies to chat mode only; ignored")
                starter = lambda model: generate(model, tok, sampler, prompt or "", steps)  # noqa: E731
            else:
                check_chat_format(tok)  # before compiling
                starter = lambda model: chat(model, tok, sampler, view.read_user, system or "", prompt,  # noqa: E731
                                             steps)
            view.seed = sampler.seed
            if threads > (cores := usable_cores()):
                view.notice(f"--threads {threads} is more than the {_count(cores, 'core')} this process may use: "
                            f"far slower than --threads {cores}")
            model, view.compile_seconds = view.load(ckpt, fastmath, threads, in_memory, ctx, repack)
            for note in model.notes:
                view.notice(note)
            run = starter(model)
            view.stream(run, chat_mode=mode == "chat")
            view.summary(run)
    except KeyboardInterrupt:
        view.interrupted(run)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)


class _View:
    """Everything `sample` shows. Terminal: Rich on stdout. Otherwise: text on stdout, the rest
    on stderr, plain."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.text_parts: list[str] = []
        self.sep = " · " if _utf8(sys.stdout) else " | "
        self._console = None
        self._live = None
        self._stdin_tty = _is_terminal(sys.stdin)
        self._mid_line = False  # the story's or the assistant's line is still open
        self._at_prompt = False  # chat: waiting at the `User: ` prompt
        self.seed: int | None = None
        self.compile_seconds: float | None = None
        self.load_seconds: float | None = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # interactive means stdout is a terminal: say so, for Rich's live redraws
            self._console = Console(highlight=False, soft_wrap=False, force_terminal=self.interactive or None)
        return self._console

    @staticmethod
    def _note(message: str):
        from rich.text import Text

        return Text.assemble(("note: ", "yellow"), message)  # plain text: never parsed as markup

    def notice(self, message: str) -> None:
        if self.interactive:
            self.console.print(self._note(message))
        else:
            click.echo(f"note: {message}", err=True)

    def load(self, path: Path, fastmath: bool | None, threads: int = 1, in_memory: bool = False,
             ctx: int | None = None, repack: bool = True):
        """The model, and the seconds spent compiling (or loading cached) kernels: the model's
        and the sampler's. Reading the file is timed apart (load_seconds) and, on a terminal,
        shown as it goes (a cold multi-GB file takes a while)."""
        from .forward import Transformer
        from .sampler import Sampler

        ellipsis = "…" if _utf8(sys.stderr) else "..."

        def work(show):
            import warnings

            from numba.core.errors import NumbaPerformanceWarning

            options = {} if fastmath is None else {"fastmath": fastmath}
            if threads != 1:
                options["threads"] = threads
            if in_memory:
                options["in_memory"] = True
            if not repack:
                options["repack"] = False

            def reading(done: int, size: int) -> None:  # shown only while a read takes its time
                if done < size:
                    shown.append(done)
                    show(f"reading {path.name}: {_size(done)} of {_size(size)}")
                elif shown:
                    show(f"compiling kernels for {path.name}{ellipsis}")

            shown: list[int] = []

            with warnings.catch_warnings():  # compiler advice is for developers, not for sampling
                warnings.simplefilter("ignore", NumbaPerformanceWarning)
                model = Transformer.load(path, ctx=ctx, progress=reading, **options)
            self.load_seconds = model.load_seconds
            return model, model.compile_seconds + Sampler.warm_up()

        message = f"loading {path.name}, compiling kernels{ellipsis}"
        if self.interactive:
            with self.console.status(message) as status:
                return work(status.update)
        if not _is_terminal(sys.stderr):  # a log file gets no progress line
            return work(lambda text: None)

        def show(text: str) -> None:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()

        show(message)
        try:
            return work(show)
        finally:  # transient: the line is cleared once loaded
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    # streaming -------------------------------------------------------------------------------

    def stream(self, run, chat_mode: bool) -> None:
        from .generate import NoticeEvent, TokenEvent, TurnEvent

        if self.interactive and not chat_mode:
            self._stream_live(run)
            return
        out = sys.stdout
        clean = _for_terminal if _is_terminal(out) else (lambda text: text)
        for event in run:
            if isinstance(event, TokenEvent):
                if event.text:
                    out.write(clean(event.text))
                    out.flush()
                    self.text_parts.append(event.text)
                    self._mid_line = True
            elif isinstance(event, TurnEvent):
                if event.role == "assistant":
                    out.write("Assistant: ")
                    out.flush()
                    self._mid_line = True
                elif not self._stdin_tty:  # piped input is not echoed: show it in the transcript
                    out.write(f"User: {event.text}\n")
            elif isinstance(event, NoticeEvent):
                if chat_mode:
                    self._end_line()
                self.notice(event.message)
        if chat_mode:
            self._end_line()
        else:
            out.write("\n")  # run.c ends the story with a newline
        out.flush()

    def _end_line(self) -> None:
        if self._mid_line:
            sys.stdout.write("\n")
            sys.stdout.flush()  # before a note on stderr, which shares the terminal
            self._mid_line = False

    def read_user(self) -> str | None:
        """The next user turn from stdin; None at end of input. Blank lines are skipped."""
        while True:
            if self._mid_line:
                sys.stdout.write("\n")
                self._mid_line = False
            sys.stdout.flush()
            if self._stdin_tty:
                try:
                    import readline  # noqa: F401 - line editing and history for input()
                except ImportError:  # pragma: no cover - not on every platform
                    pass
                self._at_prompt = True  # until a line or Ctrl-D comes; Ctrl-C leaves it set for interrupted()
                try:
                    line = input("User: ")
                except EOFError:  # Ctrl-D
                    self._at_prompt = False
                    sys.stdout.write("\n")
                    return None
                self._at_prompt = False
            else:
                line = sys.stdin.readline()
                if not line:
                    return None
            line = line.rstrip("\r\n")
            if line.strip():
                return line

    def _stream_live(self, run) -> None:
        from rich.live import Live

        from .generate import NoticeEvent, TokenEvent

        tail = _Tail(self)
        last = 0.0
        with Live(tail, console=self.console, auto_refresh=False, transient=True) as live:
            self._live = live
            for event in run:
                if isinstance(event, TokenEvent):
                    self.text_parts.append(_for_terminal(event.text))
                    tail.dirty = True
                elif isinstance(event, NoticeEvent):
                    live.console.print(self._note(event.message))
                now = time.perf_counter()
                if now - last >= STATUS_EVERY:
                    tail.status = self._status(run)
                    live.refresh()
                    last = now
            self._live = None
        self.console.print("".join(self.text_parts), markup=False, highlight=False)

    def _status(self, run) -> str:
        s = run.stats
        rate = s.tokens_per_second
        return self.sep.join([f"{rate:.1f} tok/s" if rate else "- tok/s", f"pos {s.positions}/{s.steps}",
                              f"{s.elapsed_seconds:.1f} s"])

    # the end ---------------------------------------------------------------------------------

    def summary_parts(self, run) -> list[str]:
        s = run.stats
        rate = s.tokens_per_second
        counts = f"{_count(s.sampled_tokens, 'token')} sampled in {_count(s.positions, 'position')}"
        parts = [counts + (f" ({s.prompt_tokens} prompt incl. BOS)" if s.prompt_tokens else "")]
        if rate:
            parts.append(f"{rate:.1f} tok/s")
        elif s.sampled_tokens:
            parts.append("tok/s n/a")  # one token: no span to time
        if s.first_token_seconds is not None:
            parts.append(f"first token {s.first_token_seconds * 1000:.0f} ms")
        if self.load_seconds is not None:
            parts.append(f"load {self.load_seconds:.2f} s")
        if self.compile_seconds is not None:
            parts.append(f"JIT compile {self.compile_seconds:.2f} s")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        if s.stop_reason == "interrupted":
            parts.append("interrupted")
        return parts

    def summary(self, run) -> None:
        """The summary, broken between parts to fit a terminal's width (one line in a log)."""
        parts = self.summary_parts(run)
        if self.interactive:
            from rich.text import Text

            self.console.print(Text(_fit(parts, self.sep, self.console.width), style="dim"), soft_wrap=True)
        else:
            width = _terminal_width(sys.stderr)
            click.echo(_fit(parts, self.sep, width) if width else self.sep.join(parts), err=True)

    def interrupted(self, run) -> None:
        """Ctrl-C: end the open line, then the summary, nothing more. The summary still shows
        when stdout's reader died of the same Ctrl-C (`| cat`): it goes to stderr then."""
        try:
            if self._live is not None:
                self._live.stop()
                self.console.print("".join(self.text_parts), markup=False, highlight=False)
            elif run is not None:
                self._end_line()  # the story's or the reply's line (a pipe gets its last newline)
                if self._at_prompt:  # the summary goes below `User: ...^C`, not on it
                    sys.stdout.write("\n")
                sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        try:
            if not self.interactive and _is_terminal(sys.stderr):
                sys.stderr.write("\n")  # the terminal's ^C echo left the cursor mid-line
            if run is None:
                click.echo("interrupted", err=True)
                return
            run.stats.stop_reason = "interrupted"
            self.summary(run)
        except BrokenPipeError:
            _silence_stdout()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _terminal_width(stream: TextIO) -> int | None:
    if not _is_terminal(stream):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return None


def _fit(parts: list[str], sep: str, width: int) -> str:
    """`parts` joined by `sep`, broken into lines of at most `width` columns between parts (a
    part longer than the width gets a line of its own)."""
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return "\n".join(lines)


class _Tail:
    """The last screenful of the story with the status line under it (the whole story is
    printed once at the end, so the terminal's scrollback keeps all of it)."""

    def __init__(self, view: _View) -> None:
        self.view = view
        self.status = ""
        self.dirty = False

    def __rich_console__(self, console, options):
        from rich.segment import Segment
        from rich.text import Text

        height = max((options.height or console.height) - 1, 1)
        story = "".join(self.view.text_parts)
        # Render only the end (each redraw costs time the generation loop could use): a
        # screenful or two of characters, cut at a newline so the wrapping below the cut is what
        # the full story gets; in one long paragraph the cut moves in screenful steps.
        budget = height * max(options.max_width, 1)
        if len(story) > 2 * budget:
            cut = story.rfind("\n", 0, len(story) - budget)
            if cut < len(story) - 2 * budget:
                cut = (len(story) - budget) // budget * budget - budget
            story = story[cut + 1:] if story[cut:cut + 1] == "\n" else story[max(cut, 0):]
        text = Text(story)
        lines = console.render_lines(text, options.update(height=None), pad=False) if text else []
        for line in lines[-height:]:
            yield from line
            yield Segment.line()
        yield Text(self.status, style="dim")


# ----------------------------------------------------------------------------------------------
# info


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


@main.command()
@click.argument("checkpoint")
@CTX_OPTION
def info(checkpoint: str, ctx: int | None) -> None:
    """Describe a CHECKPOINT (llama2.c .bin or GGUF) from its header (no weights are mapped), and
    the memory a run of it needs."""
    from .files import container_of
    from .files.llama2c import read_config

    try:
        path, _ = resolve_checkpoint(checkpoint)
        rows = _gguf_rows(path, ctx) if container_of(path) == "gguf" else _llama2c_rows(path, read_config(path), ctx)
    except Llama2nbError as e:
        raise click.ClickException(str(e)) from None
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _file_row(path: Path) -> tuple[str, str]:
    size = path.stat().st_size
    return "file", f"{path} ({size:,} bytes, {_size(size)})"


def _shape_rows(c) -> list[tuple[str, str]]:
    params = c.n_params
    return [
        ("shape", f"dim {c.dim}, hidden_dim {c.hidden_dim}, {c.n_layers} layers, {c.n_heads} heads "
                  f"({c.n_kv_heads} kv heads, head size {c.head_size}), vocab {c.vocab_size}, seq_len {c.seq_len}"),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("classifier", "shared with the token embedding" if c.shared_classifier else "separate (unshared)"),
        ("KV cache", f"{_size(c.kv_cache_bytes)} ({c.kv_cache_bytes:,} bytes, fp32, at seq_len {c.seq_len}; "
                     "--ctx caps it)"),
    ]


def _llama2c_rows(path: Path, c, ctx: int | None) -> list[tuple[str, str]]:
    layouts = {0: "legacy fp32", 1: "fp32", 2: "Q8_0 int8"}
    return [_file_row(path), ("format", f"llama2.c version {c.version} ({layouts.get(c.version, '?')})"),
            *_shape_rows(c),
            ("group size", str(c.group_size) if c.version == 2 else "none (not quantized)"),
            ("matmul", f"{c.weight_format!r}: {c.weight_format.kernel_description()}"),
            *_memory_rows(path.stat().st_size, c, ctx)]


def _gguf_rows(path: Path, ctx: int | None) -> list[tuple[str, str]]:
    """A GGUF file's container, model, tensors per type, vocabulary and every metadata key;
    whether this build runs it, and if not, why (the loader's own message)."""
    from .files import gguf

    header = gguf.read_header(path)
    rows = [_file_row(path), ("format", f"GGUF version {header.version}, alignment {header.alignment}, "
                                        f"tensor data from offset {header.data_offset:,}")]
    config = None
    try:
        config = gguf.model_config(header)
        gguf.tensor_formats(header)
        status = "runs in this build"
    except Llama2nbError as e:
        status = f"cannot run: {str(e).removeprefix(f'{path}: ')}"
    if config is not None:
        rows += _shape_rows(config)
        rows.append(("rms eps, rope theta", f"{config.norm_eps:g}, {config.rope_theta:g}"))
        rows += _memory_rows(path.stat().st_size, config, ctx)
    per_type: dict[int, list] = {}
    for t in header.tensors.values():
        per_type.setdefault(t.type, []).append(t)
    for type_id, tensors in sorted(per_type.items(), key=lambda kv: -sum(t.nbytes for t in kv[1])):
        rows.append((f"tensors {gguf.type_name(type_id)}", f"{len(tensors)}, {_size(sum(t.nbytes for t in tensors))}"
                                                           f"; {_kernel_row(gguf.format_for(type_id), tensors)}"))
    rows.append(("status", status))
    rows += [(key, _metadata_text(key, value)) for key, value in header.metadata.items()]
    return rows


def _metadata_text(key: str, value) -> str:
    from .files import gguf

    if value.type == gguf.ARRAY:
        items = value.value
        first = ", ".join(repr(bytes(x).decode("utf-8", "replace")) if isinstance(x, bytes) else str(x)
                          for x in list(items[:4]))
        more = ", ..." if len(items) > 4 else ""
        return f"[{first}{more}] ({len(items):,} {gguf.VALUE_TYPE_NAMES[value.element_type]})"
    text = repr(value.value) if value.type == gguf.STRING else str(value.value)
    if key == "general.file_type" and value.value in gguf.FILE_TYPE_NAMES:
        text += f" ({gguf.FILE_TYPE_NAMES[value.value]})"
    return text if len(text) <= 100 else text[:97] + "..."


# ----------------------------------------------------------------------------------------------
# quantize


@main.command()
@click.argument("source", metavar="IN")
@click.argument("out", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--type", "type_", type=click.Choice(["f32", "f16", "q8_0", "q4_0"]), required=True,
              help="tensor type: GGUF takes all four; a llama2.c file f32 (v0/v1) or q8_0 (v2)")
@click.option("--format", "container", type=click.Choice(["llama2c", "gguf"]), default=None,
              help="OUT's container [default: GGUF for a .gguf suffix, else llama2.c]")
@click.option("--version", type=click.IntRange(0, 2), default=None,
              help="llama2.c version: 0 (what run.c reads) or 1 for f32, 2 for q8_0 [default: 0 or 2]")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="llama2.c Q8_0 group size; must divide dim and hidden_dim [default: 64, 32 or 16, the "
                   "largest that does]")
@click.option("-z", "--tokenizer", "tokenizer_path", metavar="PATH",
              help="the vocabulary a GGUF OUT carries [default: a GGUF IN's own; else tokenizer.bin, "
                   "tokenizer.model or tokN.bin beside IN]")
@click.option("--save-tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write IN's vocabulary (a GGUF's, or -z) as a llama2.c tokenizer.bin here, for run.c")
def quantize(source: str, out: Path, type_: str, container: str | None, version: int | None,
             group_size: int | None, tokenizer_path: str | None, save_tokenizer: Path | None) -> None:
    """Convert IN (a llama2.c .bin, a GGUF file, or a downloaded model name) to OUT with
    tensors of --type, one tensor at a time and without torch: e.g. a .bin to a Q4_0 GGUF, or
    a Q8_0 GGUF to a llama2.c v2 file for runq.c. (`export` from a .bin or GGUF IN: the same
    writers, the same bytes.)"""
    from .export import ExportOptions, checkpoint_source, write
    from .files.convert import target_for
    from .tokenizer import Tokenizer

    with _user_errors():
        path, hub_tokenizer = resolve_checkpoint(source)
        target_for(out, container, type_, version, group_size)  # the options, checked before reading IN
        tokenizer = tokenizer_path or hub_tokenizer
        options = ExportOptions(version, group_size, type_, container, Path(tokenizer) if tokenizer else None)
        model = checkpoint_source(path)
        click.echo(write(out, model, options))
        if save_tokenizer is not None:
            vocabulary = tokenizer or model.tokenizer  # -z, else a GGUF IN's own or the tokenizer beside IN
            if vocabulary is None:
                raise UsageError(f"{path}: --save-tokenizer: expected a vocabulary (a GGUF IN, or -z), found none")
            Tokenizer.load(vocabulary, vocab_size=model.config.vocab_size).save_bin(save_tokenizer)
            click.echo(f"wrote {save_tokenizer}")


def _kernel_row(fmt, tensors) -> str:
    """Which matmul runs a GGUF type's tensors, and the RAM a repack at load takes (the
    matrices the layers multiply by: not the token embedding, read a row at a time)."""
    from .formats.base import REPACKED

    if fmt is None:
        return "not supported in this build"
    layout = REPACKED.get(type(fmt))
    if layout is None or not layout().usable("full"):
        return fmt.kernel_description()
    extra = sum(layout().nbytes(t.shape) for t in tensors if len(t.shape) == 2 and t.name != "token_embd.weight")
    return f"{layout().kernel_description()}: {_size(extra)} of RAM (--no-repack: {fmt.kernel_description()})"


def _memory_rows(file_size: int, c, ctx: int | None) -> list[tuple[str, str]]:
    """What a run takes: the weights mapped (page cache: shared, evictable; --in-memory: private)
    and the run state (KV cache and buffers, private), at the file's context and at --ctx."""
    from dataclasses import replace

    from .files.llama2c import available_memory
    from .forward import RunState

    def run(positions: int) -> str:
        state = RunState.nbytes(replace(c, seq_len=positions))
        return (f"{_size(file_size + state)} at {positions} positions: {_size(file_size)} of weights mapped + "
                f"{_size(state)} of KV cache and buffers")

    rows = [("memory", run(c.seq_len))]
    if ctx is not None and ctx < c.seq_len:
        rows.append(("with --ctx", run(ctx)))
    available = available_memory()
    if available is not None:
        rows.append(("available", f"{_size(available)} now (the weights may exceed it, at the disk's speed; "
                                  "the KV cache may not)"))
    return rows


# ----------------------------------------------------------------------------------------------
# bench


@main.command()
@click.option("--models", "shapes", default="15M,42M,110M", show_default=True,
              help="Comma-separated model shapes to measure (random weights): stories 15M, 42M, 110M, and "
                   "7B (Llama 2 7B's shape: Q8_0, Q4_0, and Q4_K_M when --gguf has it and llama.cpp's "
                   "quantizer is installed; tg31/pp64; writes 18-22 GB of files once).")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 50), help="Runs per measurement.")
@click.option("--runc", type=click.Path(exists=True, dir_okay=False), help="A built llama2.c run binary to compare.")
@click.option("--gguf", "gguf_types", default="Q4_0,Q4_K_M", show_default=True,
              help="GGUF types to measure too (of F32, Q8_0, Q4_0, Q4_K_M; '' for none): copies of the same "
                   "weights, quantized by llama.cpp's quantizer where llama-cpp-python is installed.")
@click.option("--llamacpp", is_flag=True,
              help="Also time llama.cpp on every GGUF file (needs llama-cpp-python: "
                   "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python).")
@click.option("--runq", type=click.Path(exists=True, dir_okay=False), help="A built llama2.c runq binary to compare.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Also measure fp32 (int8 at 7B) and every GGUF file (llama.cpp's too) with this many "
                   "threads on as many cores.")
@click.option("--portable/--no-portable", default=True, show_default=True,
              help="Also run the first stories shape's Q8_0 and Q4_0 GGUF files compiled for AVX2 without AVX-512 "
                   "or VNNI (NUMBA_CPU_NAME=haswell), as on many users' CPUs.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where the random-weight checkpoints live "
              "[default: ~/.cache/llama2nb/bench].")
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Folder for latest.md, latest.json, latest.png and dated copies.")
def bench(shapes: str, runs: int, runc: str | None, gguf_types: str, llamacpp: bool, runq: str | None, threads: int,
          portable: bool, cache_dir: str | None, out_dir: str) -> None:
    """Measure generation (tg), prompt processing (pp), start-up and memory, llama-bench style.

    Each row runs in a fresh process pinned to one core (N cores for N threads); compile time is
    excluded from tok/s and reported apart, and each kernel family's compile from an empty cache
    in a table of its own. The first rows retell llama2.c's gcc-flag story with Numba's settings.
    """
    from .bench import SHAPES, run_benchmark

    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        raise click.BadParameter(f"expected some of {', '.join(SHAPES)}, found {shapes!r}", param_hint="--models")
    from .bench.llamacpp import available
    from .bench.models import GGUF_TYPES

    types = [t.strip() for t in gguf_types.split(",") if t.strip()]
    if any(t not in GGUF_TYPES for t in types):
        raise click.BadParameter(f"expected some of {', '.join(GGUF_TYPES)}, found {gguf_types!r}", param_hint="--gguf")
    if llamacpp and not available():
        raise click.BadParameter("needs llama-cpp-python, which is not installed", param_hint="--llamacpp")
    try:
        report = run_benchmark(names, runs=runs, cache_dir=Path(cache_dir) if cache_dir else None, runc=runc,
                               runq=runq, threads=threads, out_dir=Path(out_dir),
                               log=lambda m: click.echo(m, err=True), gguf_types=types, llamacpp=llamacpp,
                               portable=portable)
    except (RuntimeError, OSError, Llama2nbError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(report["markdown"])
    click.echo(f"saved {Path(out_dir) / 'latest.md'}, latest.json, latest.png", err=True)
