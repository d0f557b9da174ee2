"""The restricted unpickler: numpy records round-trip, every other global is refused unrun."""
import os
import pickle

import numpy as np
import pytest

from app.database.safe_pickle import UnsafePickleError, loads
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fixture)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_round_trip_of_builtin_and_numpy_values(protocol):
    value = {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3), "f32": np.ones((2, 2), np.float32),
        "big_endian": np.arange(3, dtype=">i4"), "bool": np.array([True, False]),
        "strings": np.array(["a", "bc"]), "structured": np.zeros(2, dtype=[("a", "f4"), ("b", "i2")]),
        "objects": np.array([1, "x", None], dtype=object), "scalar": np.float64(2.5), "int": np.int64(7),
        "flag": np.bool_(True), "dtype": np.dtype("float16"), "set": {1, 2}, "frozen": frozenset("ab"),
        "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"), "complex": 1 + 2j, "tuple": (1, [2.0, None]),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }
    data = pickle.dumps(value, protocol=protocol)
    loaded, reference = loads(data), pickle.loads(data)  # numpy itself may change byte order
    assert loaded.keys() == value.keys()
    for key, expected in reference.items():
        got = loaded[key]
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert (got == expected).all()
        else:
            assert got == expected and type(got) is type(expected)


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
