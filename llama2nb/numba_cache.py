"""Where Numba caches llama2nb's compiled kernels, decided once per process before any `cache=True`.

Contract: `cache_enabled(source_file)` returns whether `numba.njit(cache=True)` works for functions
defined in `source_file` (a path; default: this package's folder), and is the value to pass as
`cache=`. Numba decides at decoration time, so a module decorating at import (sampler.py) or a
compiler of kernel families (jit.py) asks this before `njit`.

Why: Numba caches beside the source (`__pycache__`) or in the user's cache folder (~/.cache); when
neither can be written (a system-wide install read by another user, HOME read-only or absent),
`njit(cache=True)` raises "cannot cache function ...: no locator available" and every command,
even `--help`, dies at import. Here, in that case, the cache moves to a private per-user folder
in the temp directory (NUMBA_CACHE_DIR, also set in the environment so child processes and
Numba's config reloads agree); if that cannot be used either, kernels compile without an on-disk
cache (each run compiles again). Either way one `note:` line on stderr says so, once per process.

The check is Numba's own: decorating a probe function whose code claims to live in
`source_file`, so NUMBA_CACHE_DIR, NUMBA_CACHE_LOCATOR_CLASSES and the locators' order count
exactly as they will for the real kernels. The answer is computed once per file.

Compiled kernels must compute the same whether compiled in this process or loaded from the
cache. Numba links a copy of each callee into every caller's module as `linkonce_odr` (weak in
the object): a call left after inlining binds to whichever definition of that symbol was loaded
first: the callee's own compile in a fresh process, a caller's copy (optimised with the caller)
in a warm one. With fastmath those differ in the last bits, so a first run's logits differed
from a second's (test_numba_cache). `keep_linked_copies_private()`, installed on import, makes
the copies left in an optimised module internal for its machine code, so each caller calls its
own copy, cached with it: the same code in every process (the module later callers link in keeps
them linkonce_odr, so they merge there as before).

`load_without_refresh(dispatcher)` changes two things about a dispatcher's disk cache. Loading a
kernel from it, Numba first refreshes its target context, which imports and installs every
typing and lowering registry it has (linalg, random, typed containers, datetime, ...: ~0.1 s of
a warm start's ~0.5 s, once per process).
Those registries serve compiling, and a compile (a cache miss) refreshes them itself
(numba.core.compiler.CompilerBase); running compiled code needs only the runtime (NRT)
initialised, which the refresh did first. So llama2nb's kernels load with only that; should a
load fail any other way, it is retried Numba's own way (refresh, then load). Saving holds a lock
that every other process respects (`saving_lock`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import sys
import tempfile
from pathlib import Path

import numba

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not locked
    fcntl = None

try:  # Numba's own cache class (numba.core.caching, 0.60 to 0.68 at least)
    from numba.core.caching import FunctionCache
    from numba.core.runtime.nrt import rtsys
except ImportError:  # another layout: kernels load Numba's own way
    FunctionCache = rtsys = None

try:  # the module Numba optimises and links per compiled function (numba.core.codegen)
    from llvmlite.binding import Linkage
    from numba.core.codegen import CPUCodeLibrary
except ImportError:  # another layout: Numba's own linking
    CPUCodeLibrary = Linkage = None

PACKAGE_DIR = Path(__file__).resolve().parent
_PROBE = "def _llama2nb_cache_probe():\n    pass\n"
_noted = False


@functools.lru_cache(maxsize=None)
def cache_enabled(source_file: str | os.PathLike = PACKAGE_DIR / "__init__.py") -> bool:
    """True if `numba.njit(cache=True)` works for functions of `source_file`, after moving the
    cache to a per-user temp folder when needed; False: compile with cache=False."""
    path = os.path.abspath(source_file)
    if _numba_can_cache(path):
        return True
    folder = _private_temp_folder()
    if folder is not None:
        before = os.environ.get("NUMBA_CACHE_DIR"), numba.config.CACHE_DIR
        os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = str(folder)
        if _numba_can_cache(path):
            _note_once(f"Numba cannot cache beside {Path(path).parent} nor in the user cache folder: caching "
                       f"compiled kernels in {folder}")
            return True
        if before[0] is None:
            del os.environ["NUMBA_CACHE_DIR"]
        else:
            os.environ["NUMBA_CACHE_DIR"] = before[0]
        numba.config.CACHE_DIR = before[1]
    _note_once(f"no writable folder for Numba's cache (beside {Path(path).parent}, the user cache folder, "
               f"{tempfile.gettempdir()}): compiling kernels anew every run")
    return False


def _numba_can_cache(path: str) -> bool:
    namespace: dict = {}
    exec(compile(_PROBE, path, "exec"), namespace)  # a function whose source file is `path`
    try:
        numba.njit(cache=True)(namespace["_llama2nb_cache_probe"])
    except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
        return False
    return True


def _private_temp_folder() -> Path | None:
    """<tempdir>/llama2nb-numba-<uid>, created 0700; None unless it is a real folder of this
    user's that nobody else can write (others could plant compiled code in a shared one)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"llama2nb-numba-{uid if uid is not None else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid) or info.st_mode & 0o022:
        return None
    return folder


def _note_once(message: str) -> None:
    global _noted
    if not _noted:
        _noted = True
        print(f"note: {message}", file=sys.stderr)


if FunctionCache is not None and all(hasattr(FunctionCache, name) for name in
                                     ("load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
    class _LoadWithoutRefresh(FunctionCache):
        """A dispatcher's disk cache that loads without refreshing the target context (see the
        module doc); saving, indexing and compiling on a miss are Numba's own."""

        def load_overload(self, sig, target_context):
            try:
                rtsys.initialize(target_context)  # what running loaded code needs of the refresh
                with self._guard_against_spurious_io_errors():
                    return self._load_overload(sig, target_context)
            except Exception:  # anything the registries might have been needed for: Numba's own way
                return super().load_overload(sig, target_context)

        def save_overload(self, sig, data):
            with saving_lock(getattr(self, "_cache_path", None)):
                super().save_overload(sig, data)
else:
    _LoadWithoutRefresh = None


@contextlib.contextmanager
def saving_lock(folder: str | os.PathLike | None):
    """Held while a compiled kernel is saved into the cache `folder`, by any process (an flock
    on a file there): Numba reads a function's index, adds an entry naming a new data file and
    writes both back, so two processes saving at once (two first runs, compile_ahead's
    processes, test workers) could lose an entry or give two entries one data file. Nothing is
    locked where flock is missing or the folder cannot be written (Numba then fails the save)."""
    if fcntl is None or folder is None:
        yield
        return
    try:
        handle = open(os.path.join(folder, ".llama2nb-saving.lock"), "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_without_refresh(dispatcher) -> bool:
    """Have `dispatcher` (numba.njit(cache=True)'s) load from the disk cache without refreshing
    Numba's registries (see the module doc); False where it has no such cache (cache=False,
    NUMBA_DISABLE_JIT) or this Numba's cache class is not the one expected."""
    cache = getattr(dispatcher, "_cache", None)
    if _LoadWithoutRefresh is None or type(cache) is not FunctionCache:
        return False
    cache.__class__ = _LoadWithoutRefresh
    return True


def keep_linked_copies_private() -> bool:
    """After Numba optimises a compiled function's module, make the callees' copies linked into
    it internal for its own machine code (see the module doc), and linkonce_odr again in the
    module later callers link in (Numba's `_get_module_for_linking`), so that they merge there
    as before instead of each caller carrying every callee's private copies; once per process.
    False where Numba's codegen is not the one expected (then calls bind as Numba binds them)."""
    optimize = getattr(CPUCodeLibrary, "_optimize_final_module", None)
    for_linking = getattr(CPUCodeLibrary, "_get_module_for_linking", None)
    if optimize is None or for_linking is None:
        return False
    if getattr(optimize, "keeps_linked_copies_private", False):
        return True

    def optimize_then_keep_copies_private(library):
        optimize(library)
        library.private_copies = []
        for function in library._final_module.functions:
            if not function.is_declaration and function.linkage == Linkage.linkonce_odr:
                function.linkage = "internal"
                library.private_copies.append(function.name)

    def module_for_linking(library):
        module = for_linking(library)
        copies = getattr(library, "private_copies", None)
        if copies:  # (once: the module is kept as the library's shared module)
            if module is library._final_module:
                module = library._shared_module = module.clone()
            for name in copies:
                module.get_function(name).linkage = "linkonce_odr"
            library.private_copies = None
        return module

    optimize_then_keep_copies_private.keeps_linked_copies_private = True
    CPUCodeLibrary._optimize_final_module = optimize_then_keep_copies_private
    CPUCodeLibrary._get_module_for_linking = module_for_linking
    return True


keep_linked_copies_private()
