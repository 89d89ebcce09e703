"""The fastmath choice, made in one place, and the compiler that builds every variant.

Kernels are plain Python functions that register themselves with `@kernel`. `compile_family`
compiles every registered kernel with one fastmath setting and one set of compile-time
constants (module globals such as a format's group size, replaced in each copy: Numba freezes
globals at compile time, so each value gets code specialised for it). The functions of a family
call each other, so each copy is given globals in which its callees are the same family's
compiled versions; registering is what puts a kernel there, so no hand-kept list can forget one.

A `@generic` function picks its implementation by the type of one argument: `linear(out, x, w,
stamp)` runs the matmul of w's weight format. Compiled, that choice is made while Numba types
the caller (an `overload`), so the layer code is written once and specialised per format with no
branch at run time; from Python, and under NUMBA_DISABLE_JIT, it is made per call.

Every variant is cached on disk (`cache=True`, where numba_cache finds a writable folder) under
its own name. The name carries the fastmath setting and the constants the kernel's code reads,
its callees' included, and no others: families that agree on those share the compiled code
(the attention compiled for one model's family serves the next model's, of other formats).
It also carries a hash of the sources of every kernel file, because Numba's
cache checks only the file of the function itself: an edit to a callee would otherwise leave a
stale compiled caller in place. The hash also covers the target CPU (NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES: a portable build for AVX2, say): Numba keys its index on the target too, but
in one index file shared with the native build, and the compile-time constants taken from the
target (VNNI, F16C) are not part of the name of every kernel.

`compile_ahead(jobs)` compiles the entry points a model will call, those not in the disk cache,
in forked processes, one per CPU the process may use, each saving what it compiles to the cache
(under a lock: Numba's index of a function is read, changed and written back); the caller then
loads them. Numba compiles on one thread, so a first run that compiles several kernels waits
for the longest share instead of the sum.
"""

from __future__ import annotations

import hashlib
import inspect
import multiprocessing
import os
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numba
from numba.extending import overload

from ..errors import UsageError
from ..numba_cache import cache_enabled, load_without_refresh

# off: IEEE semantics, as gcc -O3. reassoc: reassociate and contract into FMAs, which is what lets
# LLVM vectorise a dot product's reduction (gcc's -funsafe-math-optimizations, near enough).
# full: every LLVM fast-math flag (no NaN/Inf, approximate reciprocals), as gcc -Ofast.
FASTMATH: dict[str, bool | frozenset[str]] = {
    "off": False,
    "reassoc": frozenset({"reassoc", "contract"}),
    "full": True,
}

# The default of every entry point (CLI, Transformer.load, bench): the fastest setting, as
# llama2.c's Makefile builds run.c with -Ofast. IEEE arithmetic is one argument away.
DEFAULT_FASTMATH = "full"


def fastmath_name(choice: bool | str | None) -> str:
    """Normalise a user's choice (True/False or a FASTMATH name) to a FASTMATH name."""
    if choice is True:
        return "full"
    if choice is False or choice is None:
        return "off"
    if choice in FASTMATH:
        return choice
    raise ValueError(f"fastmath: expected one of {', '.join(FASTMATH)} (or True/False), found {choice!r}")


KERNELS: dict[str, Callable] = {}  # name -> plain Python function, every family compiles them all


def kernel(fn: Callable) -> Callable:
    """Register `fn` to be compiled into every family under its own name."""
    other = KERNELS.setdefault(fn.__name__, fn)
    if other is not fn:
        raise ValueError(f"kernel {fn.__name__}: defined twice ({other.__module__} and {fn.__module__})")
    return fn


@dataclass(frozen=True)
class Generic:
    """A function whose implementation is chosen by the type of its argument number `arg`:
    choose(value) and choose_type(numba_type) name the registered kernel to run (choose_type
    returns None for a type no implementation takes)."""

    name: str
    arg: int
    choose: Callable[[Any], str]
    choose_type: Callable[[Any], str | None]

    def bind(self, kernels: dict[str, Callable]) -> Callable:
        """The function for Python callers: one dispatch per call, to `kernels`."""

        def dispatch(*args):
            return kernels[self.choose(args[self.arg])](*args)

        dispatch.__name__ = dispatch.__qualname__ = self.name
        return dispatch


GENERICS: dict[str, Generic] = {}


def generic(arg: int, choose: Callable[[Any], str], choose_type: Callable[[Any], str | None]):
    """Register the decorated function's name as a Generic dispatching on argument `arg`. The
    decorated function documents the signature; what it becomes calls the plain kernels."""

    def register(template: Callable) -> Callable:
        g = GENERICS[template.__name__] = Generic(template.__name__, arg, choose, choose_type)
        function = g.bind(KERNELS)
        function.__doc__ = template.__doc__
        return function

    return register


def _sources_hash() -> str:
    # intrinsics (simd.py, vnni_gguf.py, ...) are compiled into their callers: every module of
    # this folder is part of every family
    files = {inspect.getsourcefile(f) for f in KERNELS.values()} | set(map(str, Path(__file__).parent.glob("*.py")))
    digest = hashlib.sha256(str(numba.config.OPT).encode())
    digest.update(f"{numba.config.CPU_NAME}|{numba.config.CPU_FEATURES}".encode())  # the target CPU
    for path in sorted(files):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:10]


def compile_family(fastmath: str, constants: dict[str, Any], parallel: bool = False) -> types.SimpleNamespace:
    """Every registered kernel and generic, compiled (lazily, at first call) as @njit with the
    named fastmath setting and `constants` in place of module globals of the same names."""
    flags = FASTMATH[fastmath_name(fastmath)]
    sources = _sources_hash()

    def tag(name: str) -> str:  # the family as far as kernel `name` can tell: what its code depends on
        used = sorted((key, value) for key, value in constants.items() if key in _names_used(name))
        return f"{fastmath}{'_par' if parallel else ''}{''.join(f'_{key}{int(value)}' for key, value in used)}_{sources}"

    compiled: dict[str, Callable] = {}
    namespaces: list[dict] = []
    options = {"fastmath": set(flags) if isinstance(flags, frozenset) else flags, "error_model": "numpy"}

    for name, fn in KERNELS.items():
        namespace = {**fn.__globals__, **constants}
        namespaces.append(namespace)
        clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        clone.__qualname__ = f"{fn.__name__}__{tag(name)}"
        clone.__module__ = fn.__module__
        # only the functions with a prange loop are compiled parallel (the others would only warn)
        threaded = parallel and "prange" in fn.__code__.co_names
        compiled[name] = numba.njit(cache=cache_enabled(inspect.getsourcefile(fn)), parallel=threaded, **options)(clone)
        load_without_refresh(compiled[name])  # a warm start loads without Numba's registry refresh
    for name, g in GENERICS.items():
        compiled[name] = _family_generic(g, compiled, tag, options, parallel)
    for namespace in namespaces:  # callees resolve to this family's compiled copies
        namespace.update(compiled)
    return types.SimpleNamespace(**compiled)


def _names_used(name: str) -> set[str]:
    """Every global name kernel (or generic) `name` reads, its callees' included: the constants
    among them are all that its compiled code depends on, so families that agree on those share
    its compiled code (on disk: a model of another format reuses the attention a first one
    compiled). A generic may call any format's kernel: it reads every name."""
    if name in GENERICS:
        return {"*"} | set().union(*(_code_names(fn.__code__) for fn in KERNELS.values()))
    seen, todo, names = {name}, [name], set()
    while todo:
        own = _code_names(KERNELS[todo.pop()].__code__)
        names |= own
        if own & GENERICS.keys():
            return _names_used(next(iter(own & GENERICS.keys())))
        for callee in own & KERNELS.keys() - seen:
            seen.add(callee)
            todo.append(callee)
    return names


def _code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a code object and the code nested in it read."""
    return set(code.co_names).union(*(_code_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _family_generic(g: Generic, compiled: dict[str, Callable], tag: Callable[[str], str],
                    options: dict[str, Any], parallel: bool) -> Callable:
    """g for one family: from Python it dispatches per call to the family's kernels; in
    compiled callers an overload resolves it by type, at compile time, to the same kernels.
    The overload's implementation is the chosen kernel's own code, not a function calling it:
    each level of calls compiles the callee's code again, into the caller's module (a threaded
    family's kernels with a prange loop excepted: only their own dispatchers compile parallel).
    It is cached, under a name of its own, after the kernel and the constants its code reads:
    Numba names compiled code by qualified name and a per-process counter, so with one name for
    code that differs, code loaded from the disk cache (named in another process) and code
    compiled now could share a symbol, and a caller be linked to the wrong kernel."""
    function = g.bind(compiled)

    @overload(function, jit_options={**options, "cache": cache_enabled()}, strict=False)
    def typed(*args):
        name = g.choose_type(args[g.arg])
        if name is None:
            return None
        implementation = compiled[name]
        if parallel and "prange" in implementation.py_func.__code__.co_names:

            def body(*args):  # compiled parallel, as only the kernel's own dispatcher is
                return implementation(*args)
        else:
            kernel = implementation.py_func
            body = types.FunctionType(kernel.__code__, kernel.__globals__, kernel.__name__, kernel.__defaults__,
                                      kernel.__closure__)
            body.__module__ = kernel.__module__
        body.__qualname__ = body.__name__ = f"{g.name}__{name}__{tag(name)}"
        return body

    return function


COMPILE_JOBS_VARIABLE = "LLAMA2NB_COMPILE_JOBS"  # processes compile_ahead may use (1: compile in-process)
_JOBS: list[tuple[Any, tuple]] = []  # compile_ahead's jobs, as its forked processes inherit them


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def compile_workers() -> int:
    """How many processes compile_ahead uses: LLAMA2NB_COMPILE_JOBS, else the CPUs this process
    may run on."""
    value = os.environ.get(COMPILE_JOBS_VARIABLE, "")
    if value.strip():
        try:
            return max(int(value), 1)
        except ValueError:
            raise UsageError(f"{COMPILE_JOBS_VARIABLE}: expected a number of processes, found {value!r}") from None
    return usable_cores()


def compile_ahead(jobs: list[tuple[Any, tuple]], workers: int | None = None) -> int:
    """Compile each (dispatcher, argument types) of `jobs` that is neither compiled in this process
    nor in the disk cache, in up to `workers` (compile_workers()) forked processes that save it
    to the cache, so that dispatcher.compile(types) here then loads it. Returns how many were
    compiled so. Nothing is done (0) with one worker or one job, without a disk cache, without
    fork, or once Numba's threads have started (forking them is unsafe): the caller's first calls
    compile as usual, and so does any job a process failed."""
    workers = compile_workers() if workers is None else workers
    todo = [(d, sig) for d, sig in dict.fromkeys(jobs) if not _compiled_or_cached(d, sig)]
    if workers < 2 or len(todo) < 2 or "fork" not in multiprocessing.get_all_start_methods() or _threads_started():
        return 0
    _JOBS[:] = todo
    context = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_compiling_process,
                                 initargs=(context.Lock(),)) as pool:
            done = list(pool.map(_compile_job, range(len(todo))))
    except BrokenProcessPool:  # a process died: what it did not save, the caller compiles
        return 0
    finally:
        _JOBS.clear()
    return done.count(True)


def _compiled_or_cached(dispatcher: Any, sig: tuple) -> bool:
    """True where dispatcher.compile(sig) would not compile: done in this process, or in the
    disk cache's index (or where this Numba's cache cannot be asked: the caller compiles)."""
    if not isinstance(dispatcher, numba.core.dispatcher.Dispatcher) or sig in dispatcher.overloads:
        return True
    cache = dispatcher._cache
    try:
        if not cache._enabled:
            return True
        return cache._index_key(sig, dispatcher.targetctx.codegen()) in cache._cache_file._load_index()
    except (AttributeError, OSError):
        return True


def _threads_started() -> bool:
    try:
        from numba.np.ufunc import parallel
        return bool(parallel._is_initialized)
    except (ImportError, AttributeError):
        return True


def _compiling_process(lock) -> None:
    """A compiling process's set-up. Every save to Numba's disk cache goes under `lock`, shared
    by all of them, so that two saves to one function's index do not lose one (or name two
    entries' data files alike). Its output goes nowhere: forked while another thread of the
    parent (a progress display) may have held the lock of sys.stderr, it must not write there."""
    from numba.core.caching import IndexDataCacheFile

    sys.stdout = sys.stderr = open(os.devnull, "w")

    save = IndexDataCacheFile.save

    def locked(self, key, data):
        with lock:
            save(self, key, data)

    IndexDataCacheFile.save = locked


def _compile_job(index: int) -> bool:
    dispatcher, sig = _JOBS[index]
    try:
        dispatcher.compile(sig)
    except Exception:  # the caller compiles it again, and reports what goes wrong
        return False
    return True
