"""Unpickling of user records that runs no code of the pickle's choosing.

A pickle can name any importable callable (``os.system``, ``builtins.eval``, ...) and have the
unpickler call it.  Records arrive as pickles written by users or downloaded with a database, so
:func:`loads` uses :class:`SafeUnpickler`, whose ``find_class`` admits only

* builtin containers and scalars (``set``, ``frozenset``, ``bytearray``, ``complex``, ``slice``,
  ``range``, ``collections.OrderedDict``), and
* exactly the globals numpy 1.x and 2.x pickles reference to rebuild arrays, dtypes and scalars:
  ``numpy._core.multiarray._reconstruct`` (also under its numpy 1.x name ``numpy.core``),
  ``numpy._core.multiarray.scalar``, ``numpy._core.numeric._frombuffer`` (protocol 5 arrays),
  ``numpy.ndarray``, ``numpy.dtype`` and the dtype classes of ``numpy.dtypes``, and
  ``_codecs.encode`` restricted to the latin-1 codec (protocol 2 pickles of bytes).

Any other global raises :class:`UnsafePickleError` naming it, before anything is called.
Nothing is imported on the pickle's behalf: admitted names map to objects resolved here.
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle

import numpy as np

__all__ = ["UnsafePickleError", "SafeUnpickler", "loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global that is not on the allow-list."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(
            f"refused to unpickle global '{self.global_name}': records may only contain builtin "
            f"values and numpy arrays/scalars (convert tensors with .numpy(), objects to dicts)")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and nothing else."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(obj, str):
        raise UnsafePickleError("_codecs", f"encode(encoding={encoding!r})")
    return codecs.encode(obj, encoding, errors)


def _allowed() -> dict[tuple[str, str], object]:
    core = np._core  # numpy >= 2 (numpy.core is a deprecated alias of it)
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for package in ("numpy._core", "numpy.core"):
        table[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    for name in ("set", "frozenset", "bytearray", "complex", "slice", "range",
                 "int", "float", "str", "bytes", "list", "tuple", "dict", "bool"):
        table[("builtins", name)] = getattr(__import__("builtins"), name)
        table[("__builtin__", name)] = table[("builtins", name)]  # protocol 0-2 pickles from py2
    for name in dir(np.dtypes):  # e.g. numpy.dtypes.Float16DType
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            table[("numpy.dtypes", name)] = obj
    return table


_ALLOWED = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` admits only the allow-list above."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(module, name) from None


def loads(data: bytes) -> object:
    """Unpickle ``data`` like ``pickle.loads``, refusing every global that is not allow-listed.

    Raises :class:`UnsafePickleError` (a ``pickle.UnpicklingError``) for a refused global and
    ``pickle.UnpicklingError``/``EOFError``/``ValueError`` and the like for corrupt data.
    """
    return SafeUnpickler(io.BytesIO(data)).load()
