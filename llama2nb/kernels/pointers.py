"""Calls between separately compiled functions, through addresses known only at run time.

Why: Numba compiles a jitted callee into every caller (it links the callee's LLVM IR into the
caller's module, optimises and generates machine code for the whole again), so a 4-bit matmul
called from five layer functions is compiled five times over, and the layer code once per mix of
weight formats. Called through a pointer, each format's matmul is compiled once and the layer
code once for all formats (jit.py's bound generics). The address is data, passed at run time,
never a constant in the code: compiled code stays valid in Numba's disk cache, which a new
process loads at other addresses.

Three intrinsics:
- `store_native(buffer, value)` writes a value (arrays, tuples of them, numbers) into `buffer`
  as compiled code holds it (Numba's data model), with the arrays' reference-counting fields
  null: the copy owns nothing, and whoever made it keeps the arrays alive while it is used.
- `loaded(position, ty)` makes the intrinsic `load(args)` (one per position and type: an
  intrinsic's code is fixed when it is typed): args[position] is a (code, operand) pair of
  int64, and at address `operand` lies a (code, value of type ty) tuple that store_native wrote;
  load returns that code and args with the value in place of the pair.
- `call_address(code, args)` calls the function at address `code` with the tuple args, in
  Numba's own calling convention, passing on any exception it raises.
Nothing here checks an address: jit.bind makes every one, after checking the signatures agree.
"""

from __future__ import annotations

import functools

from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.core.registry import cpu_target
from numba.extending import intrinsic


def native_size(ty: types.Type) -> int:
    """Bytes a value of Numba type ty takes as compiled code holds it (store_native's buffer)."""
    context = cpu_target.target_context
    return context.get_abi_sizeof(context.get_value_type(ty))


def _owning_nothing(context, builder, ty: types.Type, value):
    """value with every array's meminfo and parent null (no reference counts, no Python object)."""
    if isinstance(ty, types.Array):
        array = cgutils.create_struct_proxy(ty)(context, builder, value=value)
        array.meminfo = cgutils.get_null_value(array.meminfo.type)
        array.parent = cgutils.get_null_value(array.parent.type)
        return array._getvalue()
    if isinstance(ty, types.BaseTuple):
        for i, item in enumerate(ty):
            value = builder.insert_value(value, _owning_nothing(context, builder, item, builder.extract_value(value, i)), i)
        return value
    if isinstance(ty, (types.Number, types.Boolean)):
        return value
    raise TypeError(f"store_native: expected arrays, tuples and numbers, found {ty}")


@intrinsic
def store_native(typingctx, buffer, value):
    """buffer[:native_size(typeof(value))] = value as compiled code holds it.  buffer (n,) uint8"""
    if not (isinstance(buffer, types.Array) and buffer.dtype == types.uint8 and buffer.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        data = cgutils.create_struct_proxy(buffer)(context, builder, value=args[0]).data
        stored = _owning_nothing(context, builder, value, args[1])
        builder.store(stored, builder.bitcast(data, stored.type.as_pointer()))
        return context.get_dummy_value()

    return types.none(buffer, value), codegen


@functools.cache
def loaded(position: int, ty: types.Type):
    """The intrinsic load(args) -> (code, args'): args[position], a (code, operand) pair, has
    at address `operand` the (int64, ty) tuple store_native wrote; load returns its int64 and
    args with item `position` replaced by its ty value."""
    record = types.Tuple((types.int64, ty))

    @intrinsic
    def load(typingctx, args):
        items = list(args)
        spliced = types.Tuple(items[:position] + [ty] + items[position + 1:])

        def codegen(context, builder, sig, llargs):
            values = [builder.extract_value(llargs[0], i) for i in range(len(items))]
            address = builder.extract_value(values[position], 1)
            stored = builder.load(builder.inttoptr(address, context.get_value_type(record).as_pointer()))
            values[position] = builder.extract_value(stored, 1)  # owns nothing: its reference counting is a no-op
            # a new reference to the other items, which Numba will release
            spliced_value = impl_ret_borrowed(context, builder, spliced, context.make_tuple(builder, spliced, values))
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(stored, 0), spliced_value])

        return types.Tuple((types.int64, spliced))(args), codegen

    return load


@intrinsic
def call_address(typingctx, code, args):
    """The function at address `code`, compiled by Numba for exactly args' types and returning
    nothing, called with the items of args; its exception, if it raises one, raised here."""
    argtypes = tuple(args)

    def codegen(context, builder, sig, llargs):
        values = [builder.extract_value(llargs[1], i) for i in range(len(argtypes))]
        function_type = context.call_conv.get_function_type(types.none, argtypes)
        function = builder.inttoptr(llargs[0], function_type.as_pointer())
        status, _ = context.call_conv.call_function(builder, function, types.none, argtypes, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(code, args), codegen
