"""The fastmath choice, made in one place, and the compiler that builds every variant.

Kernels are written once as plain Python functions. `jit_family` compiles a set of them with one
fastmath setting; the functions of a family call each other, so each copy is given globals in
which its callees are the same family's compiled versions. Every variant is cached on disk
(`cache=True`) under its own name, and that name carries a hash of the sources of the whole
family, because Numba's cache checks only the file of the function itself: an edit to a kernel
would otherwise leave a stale compiled caller in place.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from typing import Callable, Iterable

import numba

# off: IEEE semantics, as gcc -O3. reassoc: reassociate and contract into FMAs, which is what lets
# LLVM vectorise a dot product's reduction (gcc's -funsafe-math-optimizations, near enough).
# full: every LLVM fast-math flag (no NaN/Inf, approximate reciprocals), as gcc -Ofast.
FASTMATH: dict[str, bool | frozenset[str]] = {
    "off": False,
    "reassoc": frozenset({"reassoc", "contract"}),
    "full": True,
}


def fastmath_name(choice: bool | str) -> str:
    """Normalise a user's choice (True/False or a FASTMATH name) to a FASTMATH name."""
    if choice is True:
        return "full"
    if choice is False or choice is None:
        return "off"
    if choice in FASTMATH:
        return choice
    raise ValueError(f"fastmath: expected one of {', '.join(FASTMATH)} (or True/False), found {choice!r}")


def _family_hash(functions: Iterable[Callable], sources: Iterable[str] = ()) -> str:
    digest = hashlib.sha256(str(numba.config.OPT).encode())
    for path in sorted({inspect.getsourcefile(f) for f in functions} | {__file__} | set(sources)):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:10]


def jit_family(functions: Iterable[Callable], fastmath: str, parallel: bool = False,
               constants: dict[str, int] | None = None, sources: Iterable[str] = ()) -> types.SimpleNamespace:
    """Compile `functions` (lazily, at first call) as @njit with the named fastmath setting.
    `constants` replace module globals of the same name: Numba freezes globals at compile time,
    so each value gets code specialised for it (and its own cache entry). `sources` are other
    files the compiled code depends on (intrinsics), hashed into the cache names too."""
    functions = list(functions)
    constants = constants or {}
    flags = FASTMATH[fastmath_name(fastmath)]
    suffix = "".join(f"_{name}{value}" for name, value in sorted(constants.items()))
    tag = f"{fastmath}{'_par' if parallel else ''}{suffix}_{_family_hash(functions, sources)}"
    compiled: dict[str, Callable] = {}
    namespaces: list[dict] = []
    for fn in functions:
        namespace = {**fn.__globals__, **constants}
        namespaces.append(namespace)
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = f"{fn.__name__}__{tag}"
        copy.__module__ = fn.__module__
        # only the functions with a prange loop are compiled parallel (the others would only warn)
        threaded = parallel and "prange" in fn.__code__.co_names
        compiled[fn.__name__] = numba.njit(cache=True, fastmath=set(flags) if isinstance(flags, frozenset) else flags,
                                           error_model="numpy", parallel=threaded)(copy)
    for namespace in namespaces:  # callees resolve to this family's compiled copies
        namespace.update(compiled)
    return types.SimpleNamespace(**compiled)
