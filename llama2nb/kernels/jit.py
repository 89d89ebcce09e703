"""The fastmath choice, made in one place, and the compiler that builds every variant.

Kernels are plain Python functions that register themselves with `@kernel`. `compile_family`
compiles every registered kernel with one fastmath setting and one set of compile-time
constants (module globals such as a format's group size, replaced in each copy: Numba freezes
globals at compile time, so each value gets code specialised for it). The functions of a family
call each other, so each copy is given globals in which its callees are the same family's
compiled versions; registering is what puts a kernel there, so no hand-kept list can forget one.

A `@generic` function picks its implementation by the type of one argument: `linear(out, x, w,
stamp)` runs the matmul of w's weight format. From Python it is chosen per call. Compiled code
passes a `Bound` instead of the operand, made once per matrix by the family's `bind`: the
address of the implementation for the operand's type, compiled on its own, and the address of
the operand as compiled code holds it (kernels/pointers.py). So the layer code is written once
and compiled once for every mix of formats, and each format's matmul is compiled once, not
again into every caller (Numba compiles a jitted callee into each caller's code).

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
(under numba_cache.saving_lock); the caller then loads them. Numba compiles on one thread, so a
first run that compiles several kernels waits for the longest share instead of the sum.
"""

from __future__ import annotations

import functools
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
from typing import Any, Callable, NamedTuple

import numba
import numpy as np
from numba.core import types as nb
from numba.core.errors import TypingError
from numba.extending import overload

from ..errors import UsageError
from ..numba_cache import cache_enabled, load_without_refresh
from .pointers import call_address, loaded, native_size, store_native

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
INLINED: set[str] = set()  # the kernels registered with inline=True


def kernel(fn: Callable | None = None, *, inline: bool = False) -> Callable:
    """Register `fn` to be compiled into every family under its own name. `@kernel(inline=True)`:
    Numba inlines it into each caller before typing, rather than compiling it apart; for a body
    that several formats' thin kernels share, which apart is compiled once on its own and then
    again into each caller's code (the callers then compile it once each, and nothing else)."""
    if fn is None:
        return functools.partial(kernel, inline=inline)
    other = KERNELS.setdefault(fn.__name__, fn)
    if other is not fn:
        raise ValueError(f"kernel {fn.__name__}: defined twice ({other.__module__} and {fn.__module__})")
    if inline:
        INLINED.add(fn.__name__)
    return fn


class Bound(NamedTuple):
    """An operand bound to a generic's implementation for compiled callers (a family's `bind`):
    `operand` is the address of a record (the address of the implementation compiled for the
    operand's type, the operand as compiled code holds it: Binding.native), and `code` that of
    a small function, one per type, which reads the record and calls the one with the other.
    Under NUMBA_DISABLE_JIT nothing has an address: code is 1 and operand the operand itself.
    code 0 binds nothing: a placeholder the caller tests for."""

    code: int
    operand: Any


NOTHING = Bound(0, 0)
BOUND_TYPE = nb.NamedUniTuple(nb.int64, 2, Bound)  # Bound's type in compiled code


@dataclass(frozen=True)
class Binding:
    """What a family's bind returns: the Bound to pass, and what it points into, to keep alive
    while it is used (the native copy owns no reference to the operand's arrays)."""

    bound: Bound
    native: np.ndarray | None  # the record Bound.operand points to (uint8)
    operand: Any


@dataclass(frozen=True)
class Generic:
    """A function whose implementation is chosen by the type of its argument number `arg`:
    choose(value) and choose_type(numba_type) name the registered kernel to run (choose_type
    returns None for a type no implementation takes). Compiled callers pass a Bound in that
    argument's place and exactly the types `bound` lists in the others'."""

    name: str
    arg: int
    choose: Callable[[Any], str]
    choose_type: Callable[[Any], str | None]
    bound: tuple[Any, ...] | None

    def bind(self, kernels: dict[str, Callable]) -> Callable:
        """The function for Python callers: one dispatch per call, to `kernels`."""

        def dispatch(*args):
            if isinstance(args[self.arg], Bound):  # (uncompiled layer code: operand is the operand)
                args = (*args[:self.arg], args[self.arg].operand, *args[self.arg + 1:])
            return kernels[self.choose(args[self.arg])](*args)

        dispatch.__name__ = dispatch.__qualname__ = self.name
        return dispatch

    def bound_types(self) -> tuple[Any, ...]:
        """The argument types of a compiled call: `bound`, with the Bound's type in place."""
        return tuple(BOUND_TYPE if i == self.arg else ty for i, ty in enumerate(self.bound))


GENERICS: dict[str, Generic] = {}


def generic(arg: int, choose: Callable[[Any], str], choose_type: Callable[[Any], str | None],
            bound: tuple | None = None):
    """Register the decorated function's name as a Generic dispatching on argument `arg`. With
    `bound`, compiled callers may call it, passing a Bound as that argument and the others of the
    Numba types `bound` lists (None in arg's place); without, only Python calls it. The decorated
    function documents the signature; what it becomes calls the plain kernels."""

    def register(template: Callable) -> Callable:
        if bound is not None and (template.__code__.co_argcount not in _TEMPLATES
                                  or len(bound) != template.__code__.co_argcount):
            raise ValueError(f"generic {template.__name__}: expected {sorted(_TEMPLATES)} arguments, "
                             f"each with a type in `bound`, found {template.__code__.co_argcount}")
        g = GENERICS[template.__name__] = Generic(template.__name__, arg, choose, choose_type, bound)
        function = g.bind(KERNELS)
        function.__doc__ = template.__doc__
        return function

    return register


def _sources_hash() -> str:
    # intrinsics (simd.py, vnni_gguf.py, ...) are compiled into their callers: every module of
    # this folder is part of every family
    files = {inspect.getsourcefile(f) for f in KERNELS.values()} | set(map(str, Path(__file__).parent.glob("*.py")))
    return _hash_of(tuple(sorted(files)), str(numba.config.OPT), f"{numba.config.CPU_NAME}|{numba.config.CPU_FEATURES}")


@functools.cache
def _hash_of(files: tuple[str, ...], opt: str, cpu: str) -> str:
    """The hash of these source files' contents, the optimisation level and the target CPU, read
    once per process for each set of files (the set grows as modules registering kernels import;
    the modules a process runs are the ones it read first)."""
    digest = hashlib.sha256(opt.encode())
    digest.update(cpu.encode())
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:10]


def compile_family(fastmath: str, constants: dict[str, Any], parallel: bool = False) -> types.SimpleNamespace:
    """Every registered kernel and generic, compiled (lazily, at first call) as @njit with the
    named fastmath setting and `constants` in place of module globals of the same names; and
    `bind(generic, operand)` -> Binding, `binding_jobs(generic, operand)` -> compile_ahead's jobs."""
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
        # only the functions with a prange loop are compiled parallel (the others would only warn)
        threaded = parallel and _runs_prange(name)
        inline = "always" if name in INLINED else "never"
        compiled[name] = _njit(fn, namespace, f"{fn.__name__}__{tag(name)}", dict(options, parallel=threaded, inline=inline))
    for name, g in GENERICS.items():
        compiled[name] = g.bind(compiled) if g.bound is None else _family_generic(g, compiled, f"{fastmath}_{sources}",
                                                                                 options)
    for namespace in namespaces:  # callees resolve to this family's compiled copies
        namespace.update(compiled)
    family = types.SimpleNamespace(**compiled)
    family.bind, family.binding_jobs = _binder(compiled)
    return family


def _njit(fn: Callable, namespace: dict, qualname: str, options: dict[str, Any]) -> Callable:
    """fn's code with `namespace` for globals, compiled under the name `qualname` (cached where
    the disk cache works, under that name: it must name what the code depends on)."""
    clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = qualname
    clone.__module__ = fn.__module__
    dispatcher = numba.njit(cache=cache_enabled(inspect.getsourcefile(fn)), **options)(clone)
    load_without_refresh(dispatcher)  # a warm start loads without Numba's registry refresh
    return dispatcher


def _names_used(name: str) -> set[str]:
    """Every global name kernel `name` reads, its callees' included: the constants among them
    are all that its compiled code depends on, so families that agree on those share its
    compiled code (on disk: a model of another format reuses the layer code a first one
    compiled). A generic's implementations are compiled apart and called through a pointer:
    what they read is not the caller's."""
    seen, todo, names = {name}, [name], set()
    while todo:
        own = _code_names(KERNELS[todo.pop()].__code__)
        names |= own
        for callee in own & KERNELS.keys() - seen:
            seen.add(callee)
            todo.append(callee)
    return names


def _runs_prange(name: str) -> bool:
    """Whether kernel `name` has a prange loop, in its own code or in the kernels inlined into it."""
    own = _code_names(KERNELS[name].__code__)
    return "prange" in own or any(_runs_prange(callee) for callee in own & INLINED if callee != name)


def _code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a code object and the code nested in it read."""
    return set(code.co_names).union(*(_code_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _call_4(a0, a1, a2, a3):  # a compiled caller's call of a generic: to the code its Bound names
    args = (a0, a1, a2, a3)
    call_address(args[POSITION].code, args)  # noqa: F821 (POSITION: a global of each copy)


def _through_4(a0, a1, a2, a3):  # that code, for one operand type: the operand read, its implementation called
    code, args = LOAD((a0, a1, a2, a3))  # noqa: F821 (a global of each copy)
    call_address(code, args)


_TEMPLATES = {4: (_call_4, _through_4)}  # by the generic's number of arguments


def _family_generic(g: Generic, compiled: dict[str, Callable], tag: str, options: dict[str, Any]) -> Callable:
    """g for one family: from Python it dispatches per call to the family's kernels; in
    compiled callers, which pass a Bound, an overload calls the code the Bound points to. That
    code and the implementation it calls are compiled on their own (_binder), so a caller
    compiles none of them and one caller serves every weight format."""
    function = g.bind(compiled)
    expected = g.bound_types()

    @overload(function, jit_options={**options, "cache": cache_enabled()}, strict=False)
    def typed(*args):
        if args[g.arg] != BOUND_TYPE:
            return None
        if tuple(args) != expected:
            raise TypingError(f"{g.name}: compiled callers pass {', '.join(map(str, expected))}; "
                              f"found {', '.join(map(str, args))}")
        template, _ = _TEMPLATES[len(args)]
        body = types.FunctionType(template.__code__, {"POSITION": g.arg, "call_address": call_address}, g.name)
        body.__module__ = template.__module__
        body.__qualname__ = f"{g.name}__through__{tag}"  # the same code in every family
        return body

    return function


def _binder(compiled: dict[str, Callable]):
    """A family's bind(generic, operand) -> Binding, and binding_jobs(generic, operand): the
    (dispatcher, argument types) bind compiles, for compile_ahead. Bound.operand is the address
    of a record (the address of the generic's implementation for the operand's Numba type, the
    operand) and Bound.code that of a small function, one per type, that reads the record
    (pointers.loaded) and calls the one with the other. Each is compiled once: a jitted callee
    would be compiled into its caller's code again."""

    def binding_jobs(name: str, operand: Any) -> list[tuple[Callable, tuple]]:
        g, ty = GENERICS[name], numba.typeof(operand)
        implementation = g.choose_type(ty)
        if g.bound is None or implementation is None:
            raise TypeError(f"{name}: expected an operand of a registered format, for compiled callers, found {ty}")
        operand_types = tuple(ty if i == g.arg else t for i, t in enumerate(g.bound))
        return [(compiled[implementation], operand_types), (_through(name, ty), g.bound_types()),
                (_store(), (nb.uint8[::1], nb.Tuple((nb.int64, ty))))]  # (the longest to compile first)

    def bind(name: str, operand: Any) -> Binding:
        if numba.config.DISABLE_JIT:
            return Binding(Bound(1, operand), None, operand)
        (implementation, operand_types), (code, argtypes), (store, (_, record)) = binding_jobs(name, operand)
        native = np.zeros(native_size(record), np.uint8)
        store(native, (_address(implementation, operand_types), operand))
        return Binding(Bound(_address(code, argtypes), native.ctypes.data), native, operand)

    return bind, binding_jobs


@functools.cache
def _through(name: str, ty: Any) -> Callable:
    """Generic `name`'s small function for operands of Numba type ty: the same code in every
    family (no fastmath, no constants), so one dispatcher per process serves them all."""
    g = GENERICS[name]
    namespace = {"LOAD": loaded(g.arg, ty), "call_address": call_address}
    digest = hashlib.sha256(str(ty).encode()).hexdigest()[:10]
    _, template = _TEMPLATES[len(g.bound)]
    return _njit(template, namespace, f"{name}__{digest}__{_sources_hash()}", {})


@functools.cache
def _store() -> Callable:
    """store_native compiled (under a name carrying the sources' hash), one dispatcher per process."""
    return _njit(_store_native, {"store_native": store_native}, f"_store__{_sources_hash()}", {})


def _store_native(native, record):
    store_native(native, record)  # noqa: F821 (a global of the compiled copy)


def _address(dispatcher: Any, argtypes: tuple) -> int:
    """The address of dispatcher's code for exactly these argument types (compiled or loaded
    now if need be), which must return nothing: what pointers.call_address calls."""
    dispatcher.compile(argtypes)
    result = dispatcher.overloads[argtypes]
    if tuple(result.signature.args) != argtypes or result.signature.return_type != nb.none:
        raise TypeError(f"{dispatcher.py_func.__name__}: expected code taking {argtypes} and returning nothing, "
                        f"found {result.signature}")
    return result.library.get_pointer_to_function(result.fndesc.llvm_func_name)


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
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_compiling_process) as pool:
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


def _compiling_process() -> None:
    """A compiling process's set-up: its output goes nowhere. Forked while another thread of the
    parent (a progress display) may have held the lock of sys.stderr, it must not write there.
    (Its saves to the disk cache take numba_cache.saving_lock, as every process's do.)"""
    sys.stdout = sys.stderr = open(os.devnull, "w")


def _compile_job(index: int) -> bool:
    dispatcher, sig = _JOBS[index]
    try:
        dispatcher.compile(sig)
    except Exception:  # the caller compiles it again, and reports what goes wrong
        return False
    return True
