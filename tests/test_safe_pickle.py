"""The restricted unpickler: records round-trip; every other global, forged numpy state and
oversized allocation is refused with a message, and nothing crashes.

The hostile pickles are written opcode by opcode (the helpers below); the ones that crash or
exhaust a plain unpickler are loaded in a child process whose address space is limited.
"""
import base64
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from app.database.safe_pickle import MAX_DEPTH, UnsafePickleError, loads
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


# Pickles by hand (protocol 4 opcodes, no frames) ------------------------------------------------

def _text(value: str) -> bytes:
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data  # BINBYTES


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + b"\x93"  # STACK_GLOBAL


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _dtype(description: str, byteorder: str = "<", elsize: int = -1, fields: bytes = b"N") -> bytes:
    """numpy.dtype(description, False, True) with BUILD state (3, byteorder, None, names, fields, ...)."""
    names = b"N" if fields == b"N" else _tuple(_text("a"))
    state = _tuple(_int(3), _text(byteorder), b"N", names, fields, _int(elsize), _int(-1), _int(0))
    return _global("numpy", "dtype") + _text(description) + b"\x89\x88\x87R" + state + b"b"


def _frombuffer(data: bytes, dtype: bytes, shape: tuple, order: str = "C") -> bytes:
    """numpy._core.numeric._frombuffer(bytearray(data), dtype, shape, order), as protocol 5 writes arrays."""
    buffer = b"\x96" + struct.pack("<Q", len(data)) + data  # BYTEARRAY8
    return (_global("numpy._core.numeric", "_frombuffer")
            + _tuple(buffer, dtype, _tuple(*map(_int, shape)), _text(order)) + b"R")


def _reconstruct(data: bytes, dtype: bytes, shape: tuple) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') with BUILD state (1, shape, dtype, False, data), as protocols 2-4."""
    return (_global("numpy._core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + b"K\x00\x85"
            + _bytes(b"b") + b"\x87R" + _tuple(b"K\x01", _tuple(*map(_int, shape)), dtype, b"\x89", _bytes(data))
            + b"b")


def _call(module: str, name: str, *args: bytes) -> bytes:
    return _global(module, name) + _tuple(*args) + b"R"  # REDUCE


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


_ISOLATED = r"""
import pickle, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
sys.path.insert(0, sys.argv[2])
from app.database.safe_pickle import loads
try:
    value = loads(sys.stdin.buffer.read())
except pickle.UnpicklingError as error:
    print("refused:", error)
else:
    print("loaded:", type(value).__name__, repr(value)[:100])
"""


def _run_isolated(script: str, data: bytes = b"", memory: int = 1 << 30) -> str:
    """Run ``script`` in a child limited to ``memory`` bytes of address space and return its output;
    fails if the child crashes (SIGSEGV) or raises (MemoryError included)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(memory), str(REPO)], input=data,
                          capture_output=True, timeout=300, env=env)
    assert done.returncode == 0, f"child exited {done.returncode}: {done.stderr.decode()[-3000:]}"
    return done.stdout.decode()


def _load_isolated(data: bytes) -> str:
    return _run_isolated(_ISOLATED, data)


# Round trips --------------------------------------------------------------------------------------

def _values() -> dict:
    return {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3), "f32": np.linspace(-1, 1, 4, dtype=np.float32),
        "big_endian": np.arange(3, dtype=">i4"), "bool": np.array([True, False]), "u8": np.arange(4, dtype=np.uint8),
        "i64": np.array([-2**40, 5]), "c64": np.array([1 + 2j], np.complex64), "strings": np.array(["a", "bc"]),
        "byte_strings": np.array([b"x", b"yz"]), "empty": np.zeros((0, 3), np.float32), "zero_d": np.array(2.5),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        "scalar": np.float64(2.5), "int": np.int64(-7), "flag": np.bool_(True), "half": np.float16(0.5),
        "word": np.str_("hé"), "raw": np.bytes_(b"ab"), "dtype": np.dtype(">f2"),
        "set": {1, 2}, "frozen": frozenset("ab"), "bytes": b"\x00\xff", "no_bytes": b"", "bytearray": bytearray(b"ab"),
        "complex": 1 + 2j, "tuple": (1, [2.0, None]), "ordered": OrderedDict(b=1, a=2), "range": range(2, 9, 3),
        "slice": slice(1, None), "img_coords": [None, (0, 1)], "nested": {"a": {"b": [1]}}, "big_int": 2**100,
        ("tuple", "key"): "value",
    }


def _assert_same(got, expected, key):
    if isinstance(expected, np.ndarray):
        assert type(got) is np.ndarray, key
        assert got.dtype == expected.dtype and got.dtype.byteorder == expected.dtype.byteorder, key
        assert got.shape == expected.shape and got.tobytes() == expected.tobytes(), key  # C-order bytes
        assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata, key
    elif isinstance(expected, np.dtype):
        assert got == expected and got.byteorder == expected.byteorder, key
    elif isinstance(expected, np.generic):
        assert type(got) is type(expected) and got.tobytes() == expected.tobytes(), key
    else:
        assert type(got) is type(expected) and got == expected, key
        if isinstance(expected, OrderedDict):
            assert list(got) == list(expected), key


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_round_trip_of_builtin_and_numpy_values(protocol):
    value = _values()
    loaded = loads(pickle.dumps(value, protocol=protocol))
    assert list(loaded) == list(value)
    for key, expected in value.items():
        _assert_same(loaded[key], expected, key)


_NUMPY1_PICKLES = {  # pickles of _numpy1_record() written by numpy 1.26.4, by protocol
    2: (
        "gAJ9cQAoWAUAAABleF9pZHEBSwNYBQAAAGltYWdlcQJjbnVtcHkuY29yZS5tdWx0aWFycmF5Cl9yZWNvbnN0cnVjdApxA2Nu"
        "dW1weQpuZGFycmF5CnEESwCFcQVjX2NvZGVjcwplbmNvZGUKcQZYAQAAAGJxB1gGAAAAbGF0aW4xcQiGcQlScQqHcQtScQwo"
        "SwFLAksCSwOHcQ1jbnVtcHkKZHR5cGUKcQ5YAgAAAHUxcQ+JiIdxEFJxEShLA1gBAAAAfHESTk5OSv////9K/////0sAdHET"
        "YoloBlgMAAAAAAECAwQFBgcICQoLcRRoCIZxFVJxFnRxF2JYCQAAAGF0dGVudGlvbnEYaANoBEsAhXEZaAqHcRpScRsoSwFL"
        "AksDhnEcaA5YAgAAAGY0cR2JiIdxHlJxHyhLA1gBAAAAPHEgTk5OSv////9K/////0sAdHEhYohoBlgiAAAAAAAAAMKawpkZ"
        "P8ONw4xMPsONw4xMP8ONw4zDjD4AAMKAP3EiaAiGcSNScSR0cSViWAMAAABiaWdxJmgDaARLAIVxJ2gKh3EoUnEpKEsBSwKF"
        "cSpoDlgCAAAAZjhxK4mIh3EsUnEtKEsDWAEAAAA+cS5OTk5K/////0r/////SwB0cS9iiWgGWBIAAAA/w7gAAAAAAADDgAAA"
        "AAAAAABxMGgIhnExUnEydHEzYlgEAAAAaGFsZnE0aANoBEsAhXE1aAqHcTZScTcoSwFLAoVxOGgOWAIAAABmMnE5iYiHcTpS"
        "cTsoSwNoIE5OTkr/////Sv////9LAHRxPGKJaAZYBAAAAAA4AEBxPWgIhnE+UnE/dHFAYlgEAAAAbWFza3FBaANoBEsAhXFC"
        "aAqHcUNScUQoSwFLAoVxRWgOWAIAAABiMXFGiYiHcUdScUgoSwNoEk5OTkr/////Sv////9LAHRxSWKJaAZYAgAAAAEAcUpo"
        "CIZxS1JxTHRxTWJYBQAAAHdvcmRzcU5oA2gESwCFcU9oCodxUFJxUShLAUsChXFSaA5YAgAAAFUycVOJiIdxVFJxVShLA2gg"
        "Tk5OSwhLBEsIdHFWYoloBlgQAAAAYQAAAGIAAABjAAAAAAAAAHFXaAiGcVhScVl0cVpiWAUAAABzY29yZXFbY251bXB5LmNv"
        "cmUubXVsdGlhcnJheQpzY2FsYXIKcVxoH2gGWAUAAAAAAMKAPnFdaAiGcV5ScV+GcWBScWFYAQAAAG5xYmhcaA5YAgAAAGk4"
        "cWOJiIdxZFJxZShLA2ggTk5OSv////9K/////0sAdHFmYmgGWBAAAADDucO/w7/Dv8O/w7/Dv8O/cWdoCIZxaFJxaYZxalJx"
        "a1gCAAAAb2txbGhcaEhoBlgBAAAAAXFtaAiGcW5ScW+GcXBScXFYBgAAAHRva2Vuc3FyXXFzKFgFAAAAW0NMU11xdFgBAAAA"
        "YXF1ZVgKAAAAaW1nX2Nvb3Jkc3F2XXF3KE5LAEsBhnF4ZXUu"
    ),
    4: (
        "gASV8QIAAAAAAAB9lCiMBWV4X2lklEsDjAVpbWFnZZSMFW51bXB5LmNvcmUubXVsdGlhcnJheZSMDF9yZWNvbnN0cnVjdJST"
        "lIwFbnVtcHmUjAduZGFycmF5lJOUSwCFlEMBYpSHlFKUKEsBSwJLAksDh5RoBowFZHR5cGWUk5SMAnUxlImIh5RSlChLA4wB"
        "fJROTk5K/////0r/////SwB0lGKJQwwAAQIDBAUGBwgJCguUdJRijAlhdHRlbnRpb26UaAVoCEsAhZRoCoeUUpQoSwFLAksD"
        "hpRoD4wCZjSUiYiHlFKUKEsDjAE8lE5OTkr/////Sv////9LAHSUYohDGAAAAACamRk/zcxMPs3MTD/NzMw+AACAP5R0lGKM"
        "A2JpZ5RoBWgISwCFlGgKh5RSlChLAUsChZRoD4wCZjiUiYiHlFKUKEsDjAE+lE5OTkr/////Sv////9LAHSUYolDED/4AAAA"
        "AAAAwAAAAAAAAACUdJRijARoYWxmlGgFaAhLAIWUaAqHlFKUKEsBSwKFlGgPjAJmMpSJiIeUUpQoSwNoH05OTkr/////Sv//"
        "//9LAHSUYolDBAA4AECUdJRijARtYXNrlGgFaAhLAIWUaAqHlFKUKEsBSwKFlGgPjAJiMZSJiIeUUpQoSwNoE05OTkr/////"
        "Sv////9LAHSUYolDAgEAlHSUYowFd29yZHOUaAVoCEsAhZRoCoeUUpQoSwFLAoWUaA+MAlUylImIh5RSlChLA2gfTk5OSwhL"
        "BEsIdJRiiUMQYQAAAGIAAABjAAAAAAAAAJR0lGKMBXNjb3JllGgDjAZzY2FsYXKUk5RoHkMEAACAPpSGlFKUjAFulGhSaA+M"
        "Amk4lImIh5RSlChLA2gfTk5OSv////9K/////0sAdJRiQwj5/////////5SGlFKUjAJva5RoUmhBQwEBlIaUUpSMBnRva2Vu"
        "c5RdlCiMBVtDTFNdlIwBYZRljAppbWdfY29vcmRzlF2UKE5LAEsBhpRldS4="
    ),
    5: (
        "gAWV2wIAAAAAAAB9lCiMBWV4X2lklEsDjAVpbWFnZZSMEm51bXB5LmNvcmUubnVtZXJpY5SMC19mcm9tYnVmZmVylJOUKJYM"
        "AAAAAAAAAAABAgMEBQYHCAkKC5SMBW51bXB5lIwFZHR5cGWUk5SMAnUxlImIh5RSlChLA4wBfJROTk5K/////0r/////SwB0"
        "lGJLAksCSwOHlIwBQ5R0lFKUjAlhdHRlbnRpb26UaAUolhgAAAAAAAAAAAAAAJqZGT/NzEw+zcxMP83MzD4AAIA/lGgJjAJm"
        "NJSJiIeUUpQoSwOMATyUTk5OSv////9K/////0sAdJRiSwJLA4aUjAFGlHSUUpSMA2JpZ5RoBSiWEAAAAAAAAAA/+AAAAAAA"
        "AMAAAAAAAAAAlGgJjAJmOJSJiIeUUpQoSwOMAT6UTk5OSv////9K/////0sAdJRiSwKFlGgQdJRSlIwEaGFsZpRoBSiWBAAA"
        "AAAAAAAAOABAlGgJjAJmMpSJiIeUUpQoSwNoGE5OTkr/////Sv////9LAHSUYksChZRoEHSUUpSMBG1hc2uUaAUolgIAAAAA"
        "AAAAAQCUaAmMAmIxlImIh5RSlChLA2gNTk5OSv////9K/////0sAdJRiSwKFlGgQdJRSlIwFd29yZHOUaAUolhAAAAAAAAAA"
        "YQAAAGIAAABjAAAAAAAAAJRoCYwCVTKUiYiHlFKUKEsDaBhOTk5LCEsESwh0lGJLAoWUaBB0lFKUjAVzY29yZZSMFW51bXB5"
        "LmNvcmUubXVsdGlhcnJheZSMBnNjYWxhcpSTlGgXQwQAAIA+lIaUUpSMAW6UaEZoCYwCaTiUiYiHlFKUKEsDaBhOTk5K////"
        "/0r/////SwB0lGJDCPn/////////lIaUUpSMAm9rlGhGaDVDAQGUhpRSlIwGdG9rZW5zlF2UKIwFW0NMU12UjAFhlGWMCmlt"
        "Z19jb29yZHOUXZQoTksASwGGlGV1Lg=="
    ),
}



def _numpy1_record() -> dict:
    """What _NUMPY1_PICKLES hold, written here independently of numpy 1.26."""
    return {"ex_id": 3, "image": np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
            "attention": np.array([[0, 0.2, 0.4], [0.6, 0.8, 1]], dtype=np.float32),
            "big": np.array([1.5, -2.0], dtype=">f8"), "half": np.array([0.5, 2.0], dtype=np.float16),
            "mask": np.array([True, False]), "words": np.array(["ab", "c"]),
            "score": np.float32(0.25), "n": np.int64(-7), "ok": np.bool_(True),
            "tokens": ["[CLS]", "a"], "img_coords": [None, (0, 1)]}


@pytest.mark.parametrize("protocol", sorted(_NUMPY1_PICKLES))
def test_numpy_1_pickles_load(protocol):
    data = base64.b64decode("".join(_NUMPY1_PICKLES[protocol]))
    assert b"numpy.core." in data and b"numpy._core" not in data
    loaded = loads(data)
    expected = _numpy1_record()
    assert list(loaded) == list(expected)
    for key in expected:
        if key == "attention":  # float32 of linspace: compare values, not bit patterns
            assert loaded[key].dtype == np.float32 and np.allclose(loaded[key], expected[key], atol=1e-7)
        else:
            _assert_same(loaded[key], expected[key], key)


def test_hand_made_pickles_of_honest_values_load():
    """The helpers below build what numpy writes; the hostile pickles differ from these in one place."""
    data = struct.pack("<4i", 5, -6, 7, 8)
    assert loads(_pickle(_frombuffer(data, _dtype("i4"), (2, 2), "F"))).tolist() == [[5, 7], [-6, 8]]
    assert loads(_pickle(_reconstruct(data, _dtype("i4", ">"), (4,)))).tolist() == [
        int.from_bytes(data[i:i + 4], "big", signed=True) for i in range(0, 16, 4)]
    assert loads(_pickle(_dtype("S3", "|", 3))) == np.dtype("S3")


def test_array_does_not_share_memory_with_the_buffer_it_came_from():
    buffer = b"\x96" + struct.pack("<Q", 4) + b"\x01\x02\x03\x04" + b"\x94"  # memo 0
    array = (_global("numpy._core.numeric", "_frombuffer")
             + _tuple(b"h\x00", _dtype("u1"), _tuple(_int(4)), _text("C")) + b"R")
    loaded = loads(_pickle(b"](" + _tuple(buffer, array) + b"e"))  # [(bytearray, array)]
    (raw, values), = loaded
    values[0] = 9
    assert raw == bytearray(b"\x01\x02\x03\x04") and values.tolist() == [9, 2, 3, 4]


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("array, refused", [
    (np.array([1, "x", None], dtype=object), "'O8'"),
    (np.zeros(2, dtype=[("a", "f4"), ("b", "i2")]), "'V6'"),
    (np.array(["2020-01-01"], dtype="M8[D]"), "'M8'"),
    (np.zeros(2, dtype="V4"), "'V4'"),
], ids=["object", "structured", "datetime", "void"])
def test_object_structured_datetime_and_void_arrays_are_refused(protocol, array, refused):
    """These used to round-trip; an object or structured dtype is what a forged pickle crashes numpy with."""
    with pytest.raises(UnsafePickleError, match=refused):
        loads(pickle.dumps({"field": array}, protocol=protocol))


# Forged numpy state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, refused", [
    (_dtype("V8", "|", 8, fields=b"}" + _text("a") + _tuple(_dtype("O8", "|"), b"K\x00") + b"s"), "'V8'"),
    (_dtype("u8", "|", 8, fields=b"}" + _text("a") + _tuple(_dtype("u8"), b"K\x00") + b"s"), "fields"),
], ids=["void-with-object-field", "uint-with-fields"])
def test_dtype_with_an_object_field_is_refused_not_a_crash(dtype, refused):
    """numpy's __setstate__ took an object field over 16 forged bytes: a fake PyObject*, SIGSEGV."""
    out = _load_isolated(_pickle(_reconstruct(b"\x41" * 16, dtype, (2,))))
    assert out.startswith("refused:") and refused in out


def test_second_dtype_state_cannot_make_an_array_read_the_heap():
    """BUILD on a dtype that an array already used gave that 16-byte array items of 4096 bytes."""
    dtype = _dtype("S1", "|", 1) + b"\x94"  # memo 0
    array = _frombuffer(b"A" * 16, dtype, (16,))
    rebuild = b"h\x00" + _tuple(_int(3), _text("|"), b"NNN", _int(4096), _int(1), _int(0)) + b"b"
    out = _load_isolated(_pickle(b"]" + array + b"a" + rebuild + b"a"))
    assert out.startswith("refused:") and "BUILD may only set the state" in out


@pytest.mark.parametrize("body, refused", [
    (_dtype("S1", "|", 4096), "claims 4096"),
    (_frombuffer(b"\x00" * 16, _dtype("u1"), (20000, 20000)), "needs 400000000 bytes of data, the pickle gives 16"),
    (_reconstruct(b"\x00" * 15, _dtype("f8"), (2,)), "needs 16 bytes"),
    (_reconstruct(b"", _dtype("f8"), (0, 2**31 - 1, 2**31 - 1)), "too large"),
    (_call("numpy._core.multiarray", "scalar", _dtype("f8"), _bytes(b"\x00" * 4)), "needs 8 bytes"),
    (_frombuffer(b"\xff" * 8, _dtype("U1"), (2,)), "0xffffffff, which is no character"),  # numpy: SystemError
    (_reconstruct(b"\x00" * 8, _dtype("f8"), (1,))  # then a second BUILD on the finished array
     + _tuple(b"K\x01", _tuple(_int(1)), _dtype("f8"), b"\x89", _bytes(b"\x01" * 8)) + b"b", "BUILD may only"),
], ids=["dtype-elsize", "frombuffer-16-bytes-for-20000x20000", "reconstruct-short-data", "empty-but-huge-shape",
        "scalar-short-data", "unicode-beyond-U+10FFFF", "array-built-twice"])
def test_numpy_state_that_does_not_match_its_data_is_refused(body, refused):
    with pytest.raises(UnsafePickleError, match=refused):
        loads(_pickle(body))


def test_zero_stride_array_is_refused():
    """numpy.ndarray(shape, dtype, buffer, offset, strides) made a 20 000² image of 3 bytes."""
    shape, strides = _tuple(_int(20000), _int(20000), _int(3)), _tuple(_int(0), _int(0), _int(1))
    data = _pickle(_call("numpy", "ndarray", shape, _text("u1"), _bytes(b"\x00" * 3), _int(0), strides))
    with pytest.raises(UnsafePickleError, match="calls numpy.ndarray"):
        loads(data)


# Allocation ------------------------------------------------------------------------------------------

def test_memo_index_costs_one_entry():
    """A 9-byte pickle (None, LONG_BINPUT 2**32 - 1) made the C unpickler allocate a 32 GB memo."""
    data = b"\x80\x02N" + b"r" + struct.pack("<I", 2**32 - 1) + b"."
    assert len(data) == 9
    assert _load_isolated(data).startswith("loaded: NoneType")


_BIG = _int(2**31 - 1)


@pytest.mark.parametrize("body, refused", [
    (_call("builtins", "bytearray", _BIG), "bytearray() is admitted with bytes, not with int"),
    (b"\x96" + struct.pack("<Q", 2**40), "more than 64 MiB"),  # BYTEARRAY8's header alone
    (_call("builtins", "list", _call("builtins", "range", _int(0), _BIG, _int(1))), "'builtins.list'"),
    (_call("builtins", "set", _call("builtins", "range", _int(0), _BIG, _int(1))), "set() is admitted with a list"),
    (_call("builtins", "frozenset", _call("builtins", "range", _int(0), _BIG, _int(1))), "frozenset() is admitted"),
    (_call("numpy", "ndarray", _tuple(_BIG, _BIG)), "calls numpy.ndarray"),
    (_call("builtins", "bytes", _BIG), "admitted with 0 arguments"),
], ids=["bytearray(N)", "BYTEARRAY8-header", "list(range(N))", "set(range(N))", "frozenset(range(N))",
        "ndarray(shape)", "bytes(N)"])
def test_constructors_cannot_allocate_from_a_count(body, refused):
    out = _load_isolated(_pickle(body))
    assert out.startswith("refused:") and refused in out


def test_numpy_number_may_not_be_a_key_next_to_a_colliding_range():
    """numpy compares np.int64(h) with a key of the same hash, range(N), by building np.asarray(range(N))."""
    stop = next(n for n in range(2**31, 0, -1) if 0 < hash(range(0, n, 1)) < 2**61 - 1)
    number = _call("numpy._core.multiarray", "scalar", _dtype("i8"), _bytes(struct.pack("<q", hash(range(0, stop, 1)))))
    colliding = _call("builtins", "range", _int(0), _int(stop), _int(1))
    out = _load_isolated(_pickle(b"}" + _tuple(number, b"K\x00", colliding, b"K\x01")[:-1] + b"u"))
    assert out.startswith("refused:") and "numpy.int64" in out


def test_opcodes_count_against_the_budget():
    """Each EMPTY_SET is 1 byte of pickle and 216 bytes of set: 400 000 of them took 86 MB."""
    with pytest.raises(UnsafePickleError, match="more than 64 MiB"):
        loads(_pickle(b"](" + b"\x8f" * 400_000 + b"e"))


def test_shared_references_may_not_expand_beyond_the_budget():
    """[[[1] * 1000] * 1000] * 1000 by memo is 7 kB of pickle; np.asarray of it takes 8 GB."""
    inner = b"](" + b"K\x01" * 1000 + b"e\x94"  # memo 0
    middle = b"](" + b"h\x00" * 1000 + b"e\x94"  # memo 1
    outer = b"](" + b"h\x01" * 1000 + b"e"
    with pytest.raises(UnsafePickleError, match="refers to its containers"):
        loads(_pickle(inner + middle + outer))
    assert len(loads(_pickle(inner + b"](" + b"h\x00" * 1000 + b"e"))) == 1000  # a million values: fine


# Shape ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opener, closer", [(b"]", b"a"), (b"}", None)], ids=["lists", "dicts"])
def test_nesting_deeper_than_the_limit_is_refused(opener, closer):
    def nested(depth):  # [[[...]]] by APPEND, or {0: {0: ...}} by SETITEM
        if closer is not None:
            return _pickle(opener * depth + closer * (depth - 1))
        return _pickle((b"}K\x00" * (depth - 1)) + b"}" + b"s" * (depth - 1))
    assert isinstance(loads(nested(MAX_DEPTH)), (list, dict))
    with pytest.raises(UnsafePickleError, match=f"more than {MAX_DEPTH} levels"):
        loads(nested(MAX_DEPTH + 1))
    with pytest.raises(UnsafePickleError, match=f"more than {MAX_DEPTH} levels"):
        loads(nested(100_000))


def test_deep_tuple_key_is_refused_not_a_crash():
    """Hashing a key of 200 000 nested tuples overflowed the C stack (SIGSEGV)."""
    out = _load_isolated(_pickle(b"}" + b")" + b"\x85" * 200_000 + b"K\x01s"))
    assert out.startswith("refused:") and "a dict key or set member holds" in out


def test_container_inside_itself_is_refused():
    with pytest.raises(UnsafePickleError, match="contains itself"):
        loads(_pickle(b"]\x94h\x00a"))


_FUZZ = r"""
import pickle, random, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
sys.path.insert(0, sys.argv[2])
from app.database.safe_pickle import loads
seeds = pickle.loads(sys.stdin.buffer.read())
rng, outcomes = random.Random(0), {"loaded": 0, "refused": 0}
for seed in seeds:
    for _ in range(400):
        data = bytearray(seed)
        how = rng.randrange(3)
        if how == 0:
            data = data[:rng.randrange(len(data))]
        for _ in range(rng.randint(1, 3) if how else 0):
            position = rng.randrange(len(data))
            data[position] = rng.randrange(256) if how == 1 else data[position] ^ (1 << rng.randrange(8))
        try:
            loads(bytes(data))
            outcomes["loaded"] += 1
        except pickle.UnpicklingError:
            outcomes["refused"] += 1
print("fuzzed", outcomes)
"""


def test_damaged_pickles_raise_only_unpickling_errors():
    """Truncations and byte flips of real records: a value or an UnpicklingError, nothing else."""
    record = make_record(0, n_layers=1, n_heads=1, hidden=4, image_hw=(4, 6), custom_metrics={"m": np.ones((1, 1))})
    seeds = [pickle.dumps(record, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    seeds += [base64.b64decode("".join(_NUMPY1_PICKLES[p])) for p in sorted(_NUMPY1_PICKLES)]
    out = _run_isolated(_FUZZ, pickle.dumps(seeds))
    assert out.startswith("fuzzed") and "'refused': 0" not in out, out


# Globals ------------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker, func=os.system):
        self.marker, self.func = marker, func

    def __reduce__(self):
        if self.func is os.system:
            return os.system, (f"touch {self.marker}",)
        return self.func, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("func, name", [(os.system, "system"), (eval, "builtins.eval"), (exec, "builtins.exec")])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, func, name):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"ex_id": 0, "payload": _Evil(marker, func)})
    with pytest.raises(UnsafePickleError, match=name):
        loads(data)
    assert not marker.exists()
    pickle.loads(data)  # the same bytes really are malicious with the plain unpickler
    assert marker.exists()


def test_other_globals_are_refused():
    import collections
    import subprocess
    for obj in (subprocess.Popen, collections.Counter, np.load, pickle.loads):
        with pytest.raises(UnsafePickleError):
            loads(pickle.dumps(obj))
    # _codecs.encode is admitted for protocol-2 bytes only with the latin-1 codec
    forged = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match="rot13"):
        loads(forged)


def test_preprocess_keeps_a_malicious_record_pending(tmp_path):
    marker = tmp_path / "pwned"
    good = make_record(0)
    db, _ = make_db(tmp_path / "db", [good])
    db["1"] = pickle.dumps({**make_record(1), "text": _Evil(marker)})
    report = db.preprocess(progress=False)
    assert report.added == [] and list(report.failed) == [1]
    assert "refused to unpickle global 'posix.system'" in report.failed[1] or "system" in report.failed[1]
    assert not marker.exists()
    assert db.pending_keys() == ["1"] and db.example_ids() == [0]
    db.close()
