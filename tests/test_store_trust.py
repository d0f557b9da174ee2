"""The database never loses or misreports data: concurrent processes, damaged and truncated files,
records that fail in unexpected ways, interrupted runs."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import app.database.analyses.statistics as statistics_analysis
import app.database.store as store
from app.database.database import CorruptValueError, DatabaseError, VliLmdb
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IDLE_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from app.database.database import VliLmdb
    db = VliLmdb({path!r}, read_only={read_only})
    ids = db.example_ids()          # opened and used once, then idle: no LMDB reader slot held
    print("ready", ids, flush=True)
    sys.stdin.readline()            # idle until told to look again
    print("sees", db.example_ids(), db.example(max(db.example_ids())).text, flush=True)
    db.close()
""")


def _start_holder(path, read_only):
    code = IDLE_HOLDER.format(root=ROOT, path=str(path), read_only=read_only)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().startswith("ready")
    return holder


@pytest.mark.parametrize("read_only", [True, False], ids=["idle app", "idle live-model app"])
def test_an_idle_process_keeps_seeing_every_example_while_another_preprocesses_and_adds(tmp_path, read_only):
    path = tmp_path / "db"
    writer, _ = make_db(path, [make_record(0)])
    writer.close()
    holder = _start_holder(path, read_only)
    try:
        script = VliLmdb(path, read_only=False)  # a user's script, in a third process's place
        for i in (1, 2):
            script[str(i)] = pickle.dumps(make_record(i, n_text=6, grid=(5, 5), text=f"pending {i}"))
        inode = os.stat(path / "data.mdb").st_ino
        assert script.preprocess(progress=False).added == [1, 2]
        new = script.reserve_example_id()
        script.add_record(make_record(new, text="added live"))
        script.close()
        assert os.stat(path / "data.mdb").st_ino == inode  # never replaced under the idle process
        out, _ = holder.communicate("\n", timeout=60)
        assert out.strip() == f"sees [0, 1, 2, {new}] added live"
    finally:
        holder.kill()
    with VliLmdb(path) as reopened:  # after a "restart"
        assert reopened.example_ids() == [0, 1, 2, new]
        assert reopened.example(new).text == "added live"


def test_a_record_written_while_preprocess_runs_is_not_lost(tmp_path, monkeypatch):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    db["1"] = pickle.dumps(make_record(1, text="first version"))
    # the user rewrites the pending record after its example is committed, before its raw record is cleared
    real_clear = store.VliLmdb._clear_pending

    def rewrite_then_clear(self, key, source):
        if key == b"1" and not getattr(self, "_rewritten", False):
            self._rewritten = True
            self[key.decode()] = pickle.dumps(make_record(1, text="second version"))
        real_clear(self, key, source)

    monkeypatch.setattr(store.VliLmdb, "_clear_pending", rewrite_then_clear)
    assert db.preprocess(progress=False).added == [1]
    assert db.pending_keys() == ["1"]  # the rewritten record stays pending: the user decides
    report = db.preprocess(progress=False)
    assert "already in the database" in report.failed[1]
    db.close()


def test_an_interrupted_run_is_noticed_and_its_raw_record_cleared(tmp_path, monkeypatch):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    db["1"] = pickle.dumps(make_record(1))
    monkeypatch.setattr(store.VliLmdb, "_clear_pending", lambda self, key, source: None)  # "killed" here
    assert db.preprocess(progress=False).added == [1]
    assert db.pending_keys() == ["1"]
    monkeypatch.undo()
    report = db.preprocess(progress=False)
    assert report.added == [] and report.failed == {} and report.already == [1]
    assert db.pending_keys() == [] and not (tmp_path / "db" / "pending").exists()
    db.close()


def _flip(path, needle: bytes, offset: int = 0):
    """Flip one byte of every occurrence of ``needle`` in the data file (free pages may hold stale
    copies of a value: the live one is among them)."""
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(needle)
    assert at >= 0
    while at >= 0:
        data[at + offset] ^= 0x20
        at = data.find(needle, at + 1)
    (path / "data.mdb").write_bytes(bytes(data))


def test_a_damaged_value_is_refused_and_names_the_example(tmp_path):
    path = tmp_path / "db"
    records = [make_record(i, text=f"caption number {i}") for i in range(3)]
    writer, _ = make_db(path, records)
    writer.close()
    _flip(path, b"caption number 1", offset=3)  # inside example 1's description (info)
    with VliLmdb(path) as db:
        assert db.example_ids() == [0, 1, 2]
        with pytest.raises(CorruptValueError, match="example 1, description: .*damaged"):
            db.example(1)
        for intact in (0, 2):  # the rest of the database stays usable
            assert db.example(intact).text == f"caption number {intact}"
            assert db.attention(intact, 0, 0, [0]).shape == (10,)


def test_a_damaged_array_is_refused(tmp_path):
    path = tmp_path / "db"
    record = make_record(0)
    record["hidden_states"][:] = 0.5
    record["hidden_states"][1, 3, 2] = 0.25  # float16 0.25 = 0x3400, found once in layer 1's values
    writer, _ = make_db(path, [record])
    writer.close()
    _flip(path, np.float16([0.25, 0.5]).tobytes())
    with VliLmdb(path) as db:
        assert db.hidden_states(0, 0).shape == (10, 8)
        with pytest.raises(CorruptValueError, match="example 0, hidden states of layer 1"):
            db.hidden_states(0, 1)


def test_a_truncated_file_is_one_line_not_a_bus_error(tmp_path):
    path = tmp_path / "db"
    writer, _ = make_db(path, [make_record(i, n_text=6, grid=(6, 6), hidden=64) for i in range(3)])
    writer.close()
    size = os.path.getsize(path / "data.mdb")
    with open(path / "data.mdb", "r+b") as f:
        f.truncate(size // 2)
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from app.database.database import VliLmdb; VliLmdb({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "data.mdb is truncated" in result.stderr  # not -7 (SIGBUS)
    with pytest.raises(DatabaseError, match="truncated"):
        VliLmdb(path)


def _failing(mutate):
    def make(i):
        record = make_record(i)
        mutate(record)
        return record
    return make


PLACEHOLDER = 987654321


def _nested_pickle(field, depth):
    """A record pickle whose ``field`` is an int nested ``depth`` lists deep (pickle.dumps itself
    cannot write that: it recurses), built by splicing opcodes into a protocol-2 pickle."""
    record = make_record(1)
    record[field] = PLACEHOLDER
    data = pickle.dumps(record, protocol=2)
    placeholder = b"J" + PLACEHOLDER.to_bytes(4, "little")  # BININT
    assert data.count(placeholder) == 1
    return data.replace(placeholder, b"]" * depth + b"K\x01" + b"a" * depth)  # EMPTY_LIST.., BININT1, APPEND..


@pytest.mark.parametrize("raw, field", [
    (lambda: _nested_pickle("ex_id", 10**5), ("record", "ex_id")),  # the unpickler may refuse it first
    (lambda: _nested_pickle("txt_len", 10**5), ("record", "txt_len")),
    (lambda: _nested_pickle("ex_id", 50), "ex_id"),        # unpickled, refused by validation
    (lambda: _nested_pickle("txt_len", 50), "txt_len"),
    (lambda: pickle.dumps(_failing(lambda r: r.update(
        hidden_states=r["hidden_states"].astype(np.float64) * 1e300))(1)), "hidden_states"),
    (lambda: pickle.dumps(_failing(lambda r: r.update(ex_id=2**63))(1)), "ex_id"),
    (lambda: pickle.dumps(_failing(lambda r: r.update(ex_id=2**31))(1)), "ex_id"),
], ids=["ex_id nested 1e5", "txt_len nested 1e5", "ex_id nested 50", "txt_len nested 50", "beyond float32",
        "ex_id 2**63", "ex_id 2**31"])
def test_one_bad_record_never_blocks_the_others(tmp_path, raw, field):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    db["1"] = raw()
    db["2"] = pickle.dumps(make_record(2))
    for _ in range(2):  # and on every re-run
        report = db.preprocess(progress=False)
        fields = field if isinstance(field, tuple) else (field,)
        assert any(f"example 1, field '{name}'" in report.failed.get(1, "") for name in fields), report.failed
        assert len(report.failed[1]) < 400
    assert db.example_ids() == [0, 2] and db.pending_keys() == ["1"]
    db.close()


def test_an_unexpected_failure_refuses_that_record_alone(tmp_path, monkeypatch):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    db["1"] = pickle.dumps(make_record(1))
    db["2"] = pickle.dumps(make_record(2))
    real = statistics_analysis.head_statistics

    def broken_for_one(attention, *args):
        if attention.shape[-1] == 10 and float(attention[0, 0, 0, 0]) == float(_first_weight(1)):
            raise MemoryError("simulated")
        return real(attention, *args)

    monkeypatch.setattr(statistics_analysis, "head_statistics", broken_for_one)
    report = db.preprocess(progress=False)
    assert report.added == [2] and "example 1, field 'attention': could not be processed: MemoryError" in report.failed[1]
    db.close()


def _first_weight(ex_id):
    from app.database.records import validate_record
    return validate_record(make_record(ex_id)).attention[0, 0, 0, 0]


def test_old_schema_says_how_to_upgrade(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    with db._write() as txn:
        txn.put(b"schema_version", b"1", db=db._dbs["meta"])  # as schema 1 wrote it: plain JSON
    db.close()
    with pytest.raises(DatabaseError, match=r"schema version 1.*python -m app.database.upgrade"):
        VliLmdb(tmp_path / "db")


def test_a_database_on_a_read_only_filesystem_opens_for_browsing(tmp_path):
    """LMDB's lock file cannot be written there: the database opens lock-free, read-only, and says so."""
    path = tmp_path / "db"
    writer, _ = make_db(path, [make_record(0, text="on read-only media")])
    writer.close()
    os.remove(path / "lock.mdb")  # as on a medium written elsewhere: no lock file to open either
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from app.database.database import VliLmdb; "
            f"db = VliLmdb({str(path)!r}); print(db.example(0).text, db.attention(0, 0, 0, [0]).shape)")
    script = (f"mount --bind {path} {path} && mount -o remount,ro,bind {path} {path} && "
              f"{sys.executable} -c {code!r}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    if "mount" in result.stderr and result.returncode != 0 and "VliLmdb" not in result.stderr:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "on read-only media (10,)"
    assert "read-only filesystem" in result.stderr and "opened without LMDB's lock" in result.stderr


def _tables(db, skip=("info",)):
    with db._read() as txn:
        return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table)]
                for name, table in db._dbs.items() if table is not None and name not in skip}


def test_notes_are_added_in_one_transaction_that_changes_nothing_else(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_record(0, notes=["from the record"]), make_record(1)])
    before, other = _tables(db), db.example(1)
    info = db.add_notes(0, ["  ablation: 'red' (0.612) to 'blue' (0.455) ", "patching"])
    assert info.notes == ("from the record", "ablation: 'red' (0.612) to 'blue' (0.455)", "patching")
    assert db.example(0).notes == info.notes  # the cached description was replaced
    assert _tables(db) == before
    assert db.example(1).notes == other.notes and db.example(0).tokens == other.tokens
    db.close()
    with VliLmdb(tmp_path / "db") as reopened:
        assert reopened.example(0).notes == info.notes
        with pytest.raises(DatabaseError, match="read-only"):
            reopened.add_notes(0, ["x"])
        with VliLmdb(tmp_path / "merged", read_only=False) as merged:  # notes travel with a merged example
            merged.import_example(reopened, 0)
            assert merged.example(0).notes == info.notes


@pytest.mark.parametrize("notes, message", [
    ("a str", "expected a list of non-empty str"), ([""], "non-empty"), (["ok", 3], "non-empty"),
    (["x" * 1001], "1,001 characters long; at most 1,000"), (["n"] * 200, "has 1 notes; at most 200"),
])
def test_bad_notes_are_refused_and_nothing_is_written(tmp_path, notes, message):
    db, _ = make_db(tmp_path / "db", [make_record(0, notes=["kept"])])
    before = _tables(db, skip=())
    with pytest.raises(store.RecordError, match=message) as error:
        db.add_notes(0, notes)
    assert "example 0, field 'notes'" in str(error.value)
    assert _tables(db, skip=()) == before and db.example(0).notes == ("kept",)
    with pytest.raises(KeyError, match="example 5"):
        db.add_notes(5, ["x"])
    db.close()
