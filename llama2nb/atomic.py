"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a torn one.

The work happens in a temp file beside the target, but an OSError about that temp file (a
read-only folder, a full disk, a directory in the way) is re-raised naming the target: the
user asked for that path and has never heard of `.name.tmp-PID`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a path (torch.save, savefig);
    on success fsync it and rename it over `path`, on failure remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):  # never hide the error itself behind the clean-up's
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename is not None \
                and os.fspath(e.filename) == os.fspath(tmp):
            raise type(e)(e.errno, e.strerror, os.fspath(target)).with_traceback(e.__traceback__) from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """atomic_path, opened: write to the yielded file object."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
