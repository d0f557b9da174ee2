"""Unpickling of user records that runs no code of the pickle's choosing and stays within bounds.

Records arrive as pickles written by users or downloaded with a database.  A plain unpickler calls
whatever the pickle names (``os.system``); even with only numpy's own globals admitted it hands
pickle data to numpy's C ``__setstate__`` (a dtype with an object field over forged bytes crashes
the process; a second state on a dtype an array already uses makes it read the heap), and a few
bytes can ask for gigabytes (a memo index of 2**32, ``bytearray(N)``, ``set(range(N))``, an array
with zero strides).  :func:`loads` therefore reads pickles with :class:`SafeUnpickler`, built on the
pure-Python ``pickle._Unpickler`` because its opcodes can be overridden one by one:

* Values: None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
  ``collections.OrderedDict``, set, frozenset, range, slice, and numpy arrays, scalars and dtypes of
  kinds bool, int, uint, float, complex and fixed-width bytes/unicode (``b i u f c S U``).  Object,
  structured, subarray, datetime and void dtypes are refused.
* Globals: only the ones pickles of those values name (protocols 0-5, numpy 1.x ``numpy.core`` and
  2.x ``numpy._core``).  ``find_class`` returns a token; REDUCE calls this module's checked
  constructor for it, never the global itself, so numpy never sees pickle data: a dtype is made from
  its description alone (kind and size, then the byte order of its state), an array by copying a
  buffer whose length must be shape x itemsize into a fresh C-contiguous array.  BUILD only finishes,
  once, the dtype or array a REDUCE started; the memo then holds the finished object.
* Memory: one :func:`loads` may allocate ``max(64 MiB, 8 x len(data))`` (:data:`MIN_BUDGET`,
  :data:`BUDGET_PER_BYTE`), counted cumulatively: arrays and bytearrays by their size, all else at
  about CPython's size of what each opcode makes (a float, a memo entry, a dict key; the memo is a
  dict, so an index of 2**32 costs one entry), and the final check of the value by container.
  Strings and bytes read from the pickle are not counted: they are no larger than the pickle.
  Records whose bulk is arrays fit with room to spare; one of more than 64 MiB made mostly of tiny
  Python objects (ten million None in a list) does not.
* Shape: a value may nest containers at most :data:`MAX_DEPTH` deep, may not contain itself, and may
  not expand, counting shared containers and arrays each time they are referenced, beyond the budget
  (what ``np.asarray`` or a copy of it would allocate).  Dict keys and set members are builtin
  hashables (numpy numbers compare with a tuple by building an array from it), tuples of at most
  :data:`MAX_KEY_VALUES` values in all (so hashing one stays cheap).

Every refusal raises :class:`UnsafePickleError` and every corrupt pickle ``pickle.UnpicklingError``,
with a message saying what was refused or where the pickle broke.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import itertools
import math
import pickle
import pickletools
import re
import struct
import sys

import numpy as np

__all__ = ["UnsafePickleError", "SafeUnpickler", "loads", "MAX_DEPTH", "MIN_BUDGET", "BUDGET_PER_BYTE"]

MAX_DEPTH = 100  # containers nested deeper are refused: callers walk records recursively
MIN_BUDGET = 64 << 20  # bytes one loads() may allocate, at least ...
BUDGET_PER_BYTE = 8  # ... or this many per byte of pickle
MAX_KEY_VALUES = 64  # values in all of a tuple or frozenset used as a dict key or set member
MAX_NDIM = 32  # numpy 1.x's limit
_KEY_COST = 48  # bytes of a dict or set entry, with the slack of its table
_CHECK_COST = 96  # bytes the final check keeps per container (see SafeUnpickler._check_value)
_NUMPY_KINDS = frozenset("biufcSU")
_DESCRIPTION = re.compile(r"(b1|[iu][1248]|f(2|4|8|16)|c(8|16|32)|[SU][1-9][0-9]{0,8})\Z")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for what a record may not hold or do: a global off the allow-list, a forged
    numpy state, more memory than its budget, containers nested too deep."""


def _refused_global(module: str, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"refused to unpickle global '{module}.{name}': records may only contain builtin values and "
        f"numpy arrays/scalars (convert tensors with .numpy(), objects to dicts)")


class _Global:
    """What ``find_class`` returns for an admitted global: ``construct(unpickler, *args)`` is what
    REDUCE calls for it with ``len(args)`` in ``arity``; None for ``numpy.ndarray``, which is only an
    argument of ``_reconstruct``."""
    __slots__ = ("name", "construct", "arity")

    def __init__(self, name, construct, arity):
        self.name, self.construct, self.arity = name, construct, arity


class _Unbuilt:
    """A numpy dtype or array that REDUCE started and the next BUILD finishes from its state; the memo
    keys that hold it, to be given the finished object."""
    __slots__ = ("kind", "dtype", "memo_keys", "finished")

    def __init__(self, kind: str, dtype: np.dtype | None = None):
        self.kind, self.dtype, self.memo_keys, self.finished = kind, dtype, [], False


def _describe(obj) -> str:
    """What ``obj`` is, for a message: its type, never its repr (which a pickle could make huge)."""
    if type(obj) is _Global:
        return obj.name
    if type(obj) is _Unbuilt:
        return f"a numpy {obj.kind} whose state is not set yet"
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _checked_dtype(dtype) -> np.dtype:
    if type(dtype) is _Unbuilt:
        raise UnsafePickleError("a numpy dtype is used before its state is set")
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"expected a numpy dtype, the pickle gives {_describe(dtype)}")
    if dtype.kind not in _NUMPY_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise UnsafePickleError(f"numpy dtype {dtype} is not allowed")
    return dtype


def _check_code_points(data, dtype: np.dtype):
    """Unicode data must hold code points up to U+10FFFF: numpy fails on reading others (SystemError)."""
    if dtype.kind == "U" and len(data):
        codes = np.frombuffer(data, dtype=np.dtype("u4").newbyteorder(dtype.byteorder))
        if codes.max() > sys.maxunicode:
            raise UnsafePickleError(f"numpy {dtype} data holds {hex(codes.max())}, which is no character")


def _dtype(unpickler, description, align, copy) -> _Unbuilt:
    """``numpy.dtype(description, align, copy)``: only plain kinds and sizes; the byte order comes
    with the state."""
    if type(description) is not str or not _DESCRIPTION.match(description):
        named = repr(description[:40]) if type(description) is str else _describe(description)
        raise UnsafePickleError(
            f"numpy dtype {named} is not allowed: records hold bool, int, uint, float, complex and "
            f"fixed-width bytes/unicode values (no object, structured, datetime or void dtypes)")
    if not isinstance(align, int) or not isinstance(copy, int):
        raise UnsafePickleError("numpy.dtype takes (description, align, copy) with bool flags")
    try:
        return _Unbuilt("dtype", np.dtype(description))
    except (TypeError, ValueError, OverflowError) as error:  # f16 where there is no long double, U10**9
        raise UnsafePickleError(f"numpy dtype {description!r} is not available here: {error}") from None


def _finished_dtype(unbuilt: _Unbuilt, state) -> np.dtype:
    """The dtype's state: (3, byteorder, None, None, None, elsize, alignment, flags) [+ (None,) for
    version 4].  Only the byte order is taken; alignment and flags are numpy's own."""
    if type(state) is not tuple or (len(state), state[0]) not in ((8, 3), (9, 4)):
        raise UnsafePickleError("a numpy dtype's state must be (3, byteorder, None, None, None, elsize, "
                                "alignment, flags)")
    byteorder, subarray, names, fields, elsize, alignment, flags = state[1:8]
    if any(value is not None for value in (subarray, names, fields) + state[8:]):
        raise UnsafePickleError("numpy dtypes with fields, subarrays or metadata are not allowed")
    if byteorder not in ("<", ">", "|", "=") or not all(type(n) is int for n in (elsize, alignment, flags)):
        raise UnsafePickleError("a numpy dtype's state must name a byte order ('<', '>', '|', '=') and "
                                "give integer sizes and flags")
    dtype = unbuilt.dtype
    if elsize not in (-1, dtype.itemsize):
        raise UnsafePickleError(f"numpy dtype {dtype} has items of {dtype.itemsize} bytes, its state "
                                f"claims {elsize}")
    if byteorder in "<>":
        dtype = dtype.newbyteorder(byteorder)
    return dtype.newbyteorder("=") if dtype.isnative else dtype  # '<' here is native, as numpy writes it


def _reconstruct(unpickler, cls, shape, typecode) -> _Unbuilt:
    """``numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``: the array comes with BUILD."""
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"_reconstruct may only rebuild numpy.ndarray, not {_describe(cls)}")
    return _Unbuilt("array")


def _finished_array(unpickler, state) -> np.ndarray:
    """An array's state: (1, shape, dtype, is_fortran, raw bytes)."""
    if type(state) is not tuple or len(state) != 5 or state[0] != 1:
        raise UnsafePickleError("a numpy array's state must be (1, shape, dtype, is_fortran, data)")
    _, shape, dtype, fortran, data = state
    if type(data) is list:
        raise UnsafePickleError("numpy object arrays are not allowed: records hold numbers and strings")
    if type(fortran) not in (bool, int) or fortran not in (0, 1):
        raise UnsafePickleError("a numpy array's fortran flag must be a bool")
    return unpickler.array(data, dtype, shape, fortran=bool(fortran))


def _frombuffer(unpickler, buffer, dtype, shape, order) -> np.ndarray:
    """``numpy._core.numeric._frombuffer(buffer, dtype, shape, order)``: protocol 5 arrays."""
    if order not in ("C", "F"):
        raise UnsafePickleError("_frombuffer takes order 'C' or 'F'")
    return unpickler.array(buffer, dtype, shape, fortran=order == "F")


def _scalar(unpickler, dtype, data) -> np.generic:
    """``numpy._core.multiarray.scalar(dtype, raw bytes)``."""
    dtype = _checked_dtype(dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"a numpy {dtype} scalar needs {dtype.itemsize} bytes of data, the pickle "
                                f"gives {len(data) if type(data) is bytes else _describe(data)}")
    unpickler.charge(64 + len(data), "numpy scalars")
    _check_code_points(data, dtype)
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_encode(unpickler, text, encoding) -> bytes:
    """``_codecs.encode(str, 'latin1')``, how protocol-2 pickles write bytes, and nothing else."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or type(text) is not str:
        named = repr(encoding[:40]) if type(encoding) is str else _describe(encoding)
        raise UnsafePickleError(f"_codecs.encode is admitted for latin-1 text only, not "
                                f"encode({_describe(text)}, encoding={named})")
    unpickler.charge(len(text), "bytes")
    return text.encode("latin-1")


def _set(unpickler, items=()) -> set:
    if type(items) not in (list, tuple):
        raise UnsafePickleError(f"set() is admitted with a list, not with {_describe(items)}")
    for item in items:
        unpickler.check_key(item)
    unpickler.charge(_KEY_COST * len(items), "sets")
    return set(items)


def _frozenset(unpickler, items=()) -> frozenset:
    if type(items) not in (list, tuple):
        raise UnsafePickleError(f"frozenset() is admitted with a list, not with {_describe(items)}")
    return unpickler.hashable(frozenset, items)


def _bytearray(unpickler, data=b"") -> bytearray:
    if type(data) is not bytes:
        raise UnsafePickleError(f"bytearray() is admitted with bytes, not with {_describe(data)}")
    unpickler.charge(len(data), "bytearrays")
    return bytearray(data)


def _bytes(unpickler) -> bytes:
    return b""  # protocol 2 writes an empty bytes as bytes()


def _complex(unpickler, real, imag) -> complex:
    if not all(type(part) in (int, float) for part in (real, imag)):
        raise UnsafePickleError("complex() is admitted with two numbers")
    return complex(real, imag)


def _range(unpickler, start, stop, step) -> range:
    if not all(type(n) is int for n in (start, stop, step)) or step == 0:
        raise UnsafePickleError("range() is admitted with three ints, a non-zero step")
    return range(start, stop, step)


def _slice(unpickler, start, stop, step) -> slice:
    if not all(n is None or type(n) is int for n in (start, stop, step)):
        raise UnsafePickleError("slice() is admitted with ints or None")
    return slice(start, stop, step)


def _ordered_dict(unpickler) -> collections.OrderedDict:
    return collections.OrderedDict()  # its items follow as SETITEMS


def _refusing(opcode: str):
    """The handler of an opcode that pickles of records never use: instances of classes, extension
    codes, persistent ids, out-of-band buffers."""
    def refuse(unpickler):
        raise UnsafePickleError(f"the pickle uses opcode {opcode}, which records never need")
    return refuse


_NDARRAY = _Global("numpy.ndarray", None, ())


def _admitted() -> dict[tuple[str, str], _Global]:
    table = {("numpy", "ndarray"): _NDARRAY}
    for (module, name), construct, arity in [
            (("numpy", "dtype"), _dtype, (3,)),
            (("numpy._core.multiarray", "_reconstruct"), _reconstruct, (3,)),
            (("numpy._core.multiarray", "scalar"), _scalar, (2,)),
            (("numpy._core.numeric", "_frombuffer"), _frombuffer, (4,)),
            (("_codecs", "encode"), _latin1_encode, (2,)),
            (("builtins", "set"), _set, (0, 1)),
            (("builtins", "frozenset"), _frozenset, (0, 1)),
            (("builtins", "bytearray"), _bytearray, (0, 1)),
            (("builtins", "bytes"), _bytes, (0,)),
            (("builtins", "complex"), _complex, (2,)),
            (("builtins", "range"), _range, (3,)),
            (("builtins", "slice"), _slice, (3,)),
            (("collections", "OrderedDict"), _ordered_dict, (0,))]:
        table[(module, name)] = _Global(f"{module}.{name}", construct, arity)
        if module.startswith("numpy._core."):  # numpy 1.x names the same functions numpy.core.*
            table[(module.replace("numpy._core.", "numpy.core."), name)] = table[(module, name)]
    return table


_ADMITTED = _admitted()
_PLAIN_KEYS = frozenset({str, bytes, int, float, complex, bool, type(None), range, np.str_, np.bytes_})
_LEAVES = frozenset({type(None), bool, int, float, complex, range, slice})
_SIZED_LEAVES = frozenset({str, bytes, bytearray, np.str_, np.bytes_})
_CONTAINERS = frozenset({list, tuple, dict, collections.OrderedDict, set, frozenset})
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def _opcode_costs() -> list[int]:
    """Bytes each opcode allocates in CPython (a stack slot at least), roughly, besides what it reads
    from the pickle; keys added to a dict or set are charged :data:`_KEY_COST` each where they are added."""
    costs = [8] * 256
    for names, cost in [
            (("EMPTY_LIST", "MARK", "LIST", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
              "BINUNICODE8", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"), 64),
            (("EMPTY_DICT", "DICT"), 184),  # with the table of its first keys
            (("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"), 48),
            (("INT", "BININT", "BININT2", "LONG", "LONG1", "LONG4"), 40),
            (("FLOAT", "BINFLOAT"), 32),
            (("EMPTY_SET", "FROZENSET"), 224),
            (("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), 96)]:
        for name in names:
            costs[getattr(pickle, name)[0]] = cost
    return costs


_OPCODE_COSTS = _opcode_costs()


class SafeUnpickler(pickle._Unpickler):
    """A pure-Python unpickler that admits only the globals above, builds numpy values itself and
    refuses a pickle that would allocate more than ``max_bytes`` (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, max_bytes: int = MIN_BUDGET):
        super().__init__(file)
        self._file_readinto = file.readinto
        self.max_bytes = max_bytes
        self.charged = 0
        # id of each nested or mixed tuple and frozenset made -> (how many values it holds in all,
        # whether they are all plain keys); ids of dead ones are reused only by tuples made later
        self._hashables: dict[int, tuple[int, bool]] = {}

    def find_class(self, module: str, name: str) -> _Global:
        key = _compat_pickle.NAME_MAPPING.get((module, name)) or (
            _compat_pickle.IMPORT_MAPPING.get(module, module), name)  # protocol 2: __builtin__.xrange
        try:
            return _ADMITTED[key]
        except KeyError:
            raise _refused_global(module, name) from None

    def load(self):
        """Unpickle one value; refusals raise :class:`UnsafePickleError`, corrupt data
        ``pickle.UnpicklingError``."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readline = self._unframer.read, self._unframer.readline
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto, self.charged = 0, 0
        read, dispatch, costs, opcode = self.read, self.dispatch, _OPCODE_COSTS, None
        try:
            while True:
                key = read(1)
                if not key:
                    raise pickle.UnpicklingError("truncated pickle: it ends before its STOP opcode")
                opcode = key[0]
                handler = dispatch.get(opcode)
                if handler is None:
                    raise pickle.UnpicklingError(f"corrupt pickle: invalid opcode {key!r}")
                self.charged += costs[opcode]
                if self.charged > self.max_bytes:
                    self.charge(0, "objects")
                handler(self)
        except pickle._Stop as stop:
            value = stop.value
        except (pickle.UnpicklingError, MemoryError, RecursionError):
            raise  # the bounds exist so that the last two never happen
        except Exception as error:  # a malformed opcode argument, an empty stack, an unhashable key ...
            raise pickle.UnpicklingError(f"corrupt pickle at opcode {_OPCODE_NAMES.get(opcode, opcode)}: "
                                         f"{type(error).__name__}: {str(error)[:200]}") from error
        self._check_value(value)
        return value

    def charge(self, size: int, what: str):
        """Count ``size`` more bytes against the budget, refusing the pickle once it is spent."""
        self.charged += size
        if self.charged > self.max_bytes:
            raise UnsafePickleError(
                f"unpickling would allocate more than {self.max_bytes / 2**20:.0f} MiB, the budget of a "
                f"record of this size (max({MIN_BUDGET >> 20} MiB, {BUDGET_PER_BYTE} x its size)); "
                f"refused while building {what}")

    def array(self, data, dtype, shape, *, fortran: bool) -> np.ndarray:
        """A fresh, writeable, C-contiguous copy of ``data`` as an array, which it must exactly fill."""
        dtype = _checked_dtype(dtype)
        if type(shape) is not tuple or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
            raise UnsafePickleError(f"a numpy array's shape must be a tuple of at most {MAX_NDIM} "
                                    f"non-negative ints")
        if type(data) not in (bytes, bytearray):
            raise UnsafePickleError(f"a numpy array's data must be bytes, not {_describe(data)}")
        count = math.prod(shape)
        if len(data) != count * dtype.itemsize:
            raise UnsafePickleError(f"a numpy array of shape {shape} and dtype {dtype} needs "
                                    f"{count * dtype.itemsize} bytes of data, the pickle gives {len(data)}")
        if math.prod(n or 1 for n in shape) * dtype.itemsize > self.max_bytes:  # (0, 2**62): strides overflow
            raise UnsafePickleError(f"a numpy array of shape {shape} is too large")
        self.charge(len(data), "numpy arrays")
        _check_code_points(data, dtype)
        flat = np.frombuffer(data, dtype=dtype, count=count)
        return flat.reshape(shape, order="F" if fortran else "C").copy()

    def hashable(self, kind: type, items) -> tuple | frozenset:
        """``kind(items)`` for a tuple or frozenset, remembering how many values it holds in all and
        whether they are all plain keys, so that :meth:`check_key` knows without walking it."""
        size, plain = len(items), True
        for item in items:
            item_kind = type(item)
            if item_kind in _PLAIN_KEYS:
                continue
            if item_kind is tuple or item_kind is frozenset:
                known = self._hashables.get(id(item))
                if known is None:
                    size += len(item)
                else:
                    size += known[0]
                    plain = plain and known[1]
            else:
                plain = False
        if kind is frozenset:
            for item in items:
                self.check_key(item)
            self.charge(_KEY_COST * len(items), "sets")
        value = kind(items)
        if size > len(items) or not plain:
            self._hashables[id(value)] = (size, plain)
        else:
            self._hashables.pop(id(value), None)  # a dead tuple's id, now this flat one's
        return value

    def check_key(self, key):
        """Refuse a dict key or set member that numpy would compare by building arrays (its numbers
        and dtypes) or that is costly to hash (a tuple of many values in all)."""
        kind = type(key)
        if kind in _PLAIN_KEYS:
            return
        if kind is tuple or kind is frozenset:
            size, plain = self._hashables.get(id(key), (len(key), True))
            if plain and size <= MAX_KEY_VALUES:
                return
            if plain:
                raise UnsafePickleError(f"a dict key or set member holds {size} values in all (at most "
                                        f"{MAX_KEY_VALUES})")
        raise UnsafePickleError(f"a dict key or set member may not be or hold {_describe(key)}: keys are str, "
                                f"bytes, int, float, bool, None or tuples of these (convert numpy numbers "
                                f"with int() or float())")

    def _check_value(self, value):
        """Walk the finished value without recursion: refuse types a record may not hold, nesting deeper
        than MAX_DEPTH, a container inside itself, and shared references that expand beyond the budget."""
        if self._leaf_size(value) is not None:
            return
        done: dict[int, int] = {}  # id of each checked container -> expanded bytes * 128 + height
        on_path = {id(value)}
        path = [[value, self._children(value), 1, 0]]  # container, its iterator, height, expanded bytes
        while path:
            frame = path[-1]
            for child in frame[1]:
                kind = type(child)
                if kind in _LEAVES:
                    frame[3] += 8
                elif kind in _SIZED_LEAVES:
                    frame[3] += 8 + len(child)
                elif kind in _CONTAINERS:
                    known = done.get(id(child))
                    if known is not None:
                        frame[2] = max(frame[2], (known & 127) + 1)
                        frame[3] += 8 + (known >> 7)
                        continue
                    if id(child) in on_path:
                        raise UnsafePickleError("the record contains itself (a container inside itself)")
                    if len(path) >= MAX_DEPTH:
                        raise UnsafePickleError(f"the record nests containers more than {MAX_DEPTH} levels deep")
                    on_path.add(id(child))
                    path.append([child, self._children(child), 1, 0])
                    break
                else:
                    frame[3] += 8 + self._leaf_size(child)
            else:
                container, _, height, expanded = path.pop()
                on_path.discard(id(container))
                if height > MAX_DEPTH:  # through containers already checked, so not caught above
                    raise UnsafePickleError(f"the record nests containers more than {MAX_DEPTH} levels deep")
                if expanded > self.max_bytes:
                    raise UnsafePickleError(
                        f"the record refers to its containers or arrays so many times that copying it "
                        f"would take more than {self.max_bytes / 2**20:.0f} MiB")
                self.charge(_CHECK_COST, "the check of its containers")
                done[id(container)] = expanded << 7 | height  # height <= MAX_DEPTH < 128
                if path:
                    path[-1][2] = max(path[-1][2], height + 1)
                    path[-1][3] += 8 + expanded

    @staticmethod
    def _children(container):
        return itertools.chain.from_iterable(container.items()) if isinstance(container, dict) else iter(container)

    @staticmethod
    def _leaf_size(value) -> int | None:
        """The bytes ``value`` takes if it is an admitted value other than a container (None for a
        container); raises for anything else (a bare global, an unfinished numpy value)."""
        kind = type(value)
        if kind in _CONTAINERS:
            return None
        if kind is np.ndarray:
            return value.nbytes
        if kind in _SIZED_LEAVES:
            return len(value)
        if kind in _LEAVES or isinstance(value, (np.generic, np.dtype)):
            return 8
        raise UnsafePickleError(f"a record may not hold {_describe(value)}")

    # Opcodes -----------------------------------------------------------------------------------

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if type(func) is not _Global or func.construct is None:
            raise UnsafePickleError(f"the pickle calls {_describe(func)}, which records never need")
        if type(args) is not tuple or len(args) not in func.arity:
            given = len(args) if type(args) is tuple else _describe(args)
            raise UnsafePickleError(f"{func.name} is admitted with {' or '.join(map(str, func.arity))} "
                                    f"arguments, the pickle gives {given}")
        self.stack[-1] = func.construct(self, *args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not _Unbuilt or target.finished:
            raise UnsafePickleError(f"BUILD may only set the state of the numpy dtype or array just made, "
                                    f"once; here it targets {_describe(target)}")
        value = _finished_dtype(target, state) if target.kind == "dtype" else _finished_array(self, state)
        target.finished = True
        self.stack[-1] = value
        for index in target.memo_keys:
            if self.memo.get(index) is target:
                self.memo[index] = value
    dispatch[pickle.BUILD[0]] = load_build

    def _memo_put(self, index: int):
        if index < 0:
            raise pickle.UnpicklingError("corrupt pickle: negative memo index")
        value = self.stack[-1]
        self.memo[index] = value
        if type(value) is _Unbuilt:
            value.memo_keys.append(index)

    def load_put(self):
        self._memo_put(int(self.readline()[:-1]))
    dispatch[pickle.PUT[0]] = load_put

    def load_binput(self):
        self._memo_put(self.read(1)[0])
    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self):
        self._memo_put(struct.unpack("<I", self.read(4))[0])
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_memoize(self):
        self._memo_put(len(self.memo))
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def load_bytearray8(self):
        size, = struct.unpack("<Q", self.read(8))
        self.charge(size, "bytearrays")  # before allocating: the budget bounds it, not the header
        buffer = bytearray(size)  # protocol 5 arrays: read once, straight into place
        with memoryview(buffer) as view:
            frame = self._unframer.current_frame  # the header's frame; big payloads follow outside it
            got = frame.readinto(view) if frame is not None else 0
            while got < size:
                with view[got:] as rest:
                    more = self._file_readinto(rest)
                if not more:
                    break
                got += more
        if got != size:
            raise pickle.UnpicklingError(f"truncated pickle: BYTEARRAY8 announces {size} bytes, {got} follow")
        self.append(buffer)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_tuple(self):
        items = self.pop_mark()  # first: it rebinds self.append
        self.append(self.hashable(tuple, items))
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self):
        self.stack[-1] = self.hashable(tuple, (self.stack[-1],))
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self):
        second = self.stack.pop()
        self.stack[-1] = self.hashable(tuple, (self.stack[-1], second))
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self):
        third, second = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self.hashable(tuple, (self.stack[-1], second, third))
    dispatch[pickle.TUPLE3[0]] = load_tuple3

    def load_frozenset(self):
        items = self.pop_mark()  # first: it rebinds self.append
        self.append(self.hashable(frozenset, items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def _target(self, kinds: tuple[type, ...], opcode: str):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise UnsafePickleError(f"{opcode} may only fill a {' or '.join(k.__name__ for k in kinds)}, "
                                    f"not {_describe(target)}")
        return target

    def _set_items(self, target: dict, items: list):
        if len(items) % 2:
            raise pickle.UnpicklingError("corrupt pickle: a dict needs key/value pairs")
        self.charge(_KEY_COST * len(items) // 2, "dicts")
        for index in range(0, len(items), 2):
            self.check_key(items[index])
            target[items[index]] = items[index + 1]

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items(self._target((dict, collections.OrderedDict), "SETITEM"), [key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self._target((dict, collections.OrderedDict), "SETITEMS"), items)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        target = {}
        self._set_items(target, items)
        self.append(target)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        for item in items:
            self.check_key(item)
        self.charge(_KEY_COST * len(items), "sets")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    for _name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
                  "NEXT_BUFFER", "READONLY_BUFFER"):
        dispatch[getattr(pickle, _name)[0]] = _refusing(_name)
    del _name


def loads(data: bytes) -> object:
    """Unpickle ``data`` like ``pickle.loads``, within the rules and the budget of the module docstring.

    Raises :class:`UnsafePickleError` (a ``pickle.UnpicklingError``) for what is refused and
    ``pickle.UnpicklingError`` for corrupt data; nothing else.
    """
    budget = max(MIN_BUDGET, BUDGET_PER_BYTE * len(data))
    return SafeUnpickler(io.BytesIO(data), max_bytes=budget).load()
