"""VliLmdb: round trip, failures kept pending, re-runs, opening errors, atomicity, ids."""
import json
import multiprocessing
import os
import pickle
import threading

import lmdb
import numpy as np
import pytest

from app.database.analysis import attention_rollout
from app.database.database import DatabaseError, RecordError, VliLmdb
from app.database.records import validate_record
from app.database.stats import STATISTICS, head_statistics
from helpers import fake_tsne_maps, fast_tsne, make_db, make_record  # noqa: F401 (fixture)

F16 = dict(rtol=2e-3, atol=2e-3)


def _records():
    return [make_record(0, text_tokens=["[CLS]", "a", "b", "[SEP]"], grid=(2, 3), shuffle_image=True,
                        image_cls=True, custom_metrics={"mine": np.arange(4.0).reshape(2, 2)},
                        metric_descriptions={"mine": "layer x 2 + head"},
                        prediction={"answer": "red", "score": 0.9, "label": "red"}),
            make_record(1, n_text=5, grid=(3, 2), shuffle_image=True),
            make_record(2, n_text=3, grid=None, img_coords=None)]


def test_round_trip(tmp_path):
    records = _records()
    writer, report = make_db(tmp_path / "db", records)
    assert report.added == [0, 1, 2] and report.failed == {}
    assert set(report.stage_seconds) >= {"unpickle", "validate", "statistics", "tsne", "index", "write"}
    writer.close()
    db = VliLmdb(tmp_path / "db")
    assert db.example_ids() == [0, 1, 2] and len(db) == 3
    assert (db.n_layers, db.n_heads, db.hidden_size) == (2, 2, 8)
    assert db.statistic_names() == list(STATISTICS) + ["mine"]
    assert db.metric_description("mine") == "layer x 2 + head" and db.metric_description("other") is None
    for raw in records:
        rec = validate_record(raw)
        info = db.example(raw["ex_id"])
        assert info is db.example(raw["ex_id"])  # cached
        assert list(info.tokens) == rec.tokens and info.txt_len == rec.txt_len
        assert info.special.tolist() == rec.special.tolist() and list(info.coords) == rec.coords
        assert info.grid == rec.grid and info.image_size == raw["image"].shape[:2]
        assert info.accuracy == rec.accuracy and info.text == raw["text"]
        assert info.prediction == raw.get("prediction")
        np.testing.assert_array_equal(db.image(raw["ex_id"]), raw["image"])
        assert db.image_png(raw["ex_id"]).startswith(b"\x89PNG")
        for layer in range(2):
            for head in range(2):
                np.testing.assert_allclose(db.attention_matrix(raw["ex_id"], layer, head),
                                           rec.attention[layer, head], **F16)
                np.testing.assert_allclose(db.attention(raw["ex_id"], layer, head, [1, 2]),
                                           rec.attention[layer, head, [1, 2]].mean(0), **F16)
            np.testing.assert_allclose(db.attention(raw["ex_id"], layer, None, 2),
                                       rec.attention[layer, :, 2].mean(0), **F16)
            np.testing.assert_allclose(db.attention_matrix(raw["ex_id"], layer, None),
                                       rec.attention[layer].mean(0), **F16)
        for layer in range(3):
            np.testing.assert_allclose(db.hidden_states(raw["ex_id"], layer), rec.hidden_states[layer], **F16)
            stored = rec.hidden_states.astype(np.float16).astype(np.float32)  # maps come from what is stored
            np.testing.assert_array_equal(db.tsne(raw["ex_id"], layer), fake_tsne_maps(stored)[layer])
        rollout = attention_rollout(rec.attention)  # checked against loops in test_analysis.py
        for layer in range(2):
            np.testing.assert_allclose(db.rollout(raw["ex_id"], layer, [1, 2]), rollout[layer, [1, 2]].mean(0), **F16)
        stats = db.head_statistics(raw["ex_id"])
        want = head_statistics(rec.attention, rec.is_text, rec.special, rec.coords, rec.image.shape[:2], rec.grids,
                               rec.patch_grid)
        assert list(stats) == db.statistic_names()
        for key in STATISTICS:
            np.testing.assert_allclose(stats[key], want[key], rtol=1e-6, equal_nan=True)
        if "custom_metrics" in raw:
            np.testing.assert_array_equal(stats["mine"], raw["custom_metrics"]["mine"])
        else:
            assert np.isnan(stats["mine"]).all()
    with pytest.raises(KeyError, match="example 9"):
        db.example(9)
    with pytest.raises(IndexError):
        db.attention(0, 2, 0, [0])
    with pytest.raises(IndexError):
        db.tsne(0, 3)
    db.close()


def test_bad_records_stay_pending_good_ones_land(tmp_path, capsys):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    bad_shape = make_record(1)
    bad_shape["attention"] = bad_shape["attention"][:, :, :, :-1]
    db["1"] = pickle.dumps(bad_shape)
    db["2"] = pickle.dumps(make_record(2))
    db["3"] = pickle.dumps(make_record(3, n_layers=3))          # differs from the database
    db["4"] = b"not a pickle"
    db["5"] = pickle.dumps(make_record(6))                       # key and ex_id disagree
    db["0"] = pickle.dumps(make_record(0))                       # already an example
    report = db.preprocess(progress=False)
    assert report.added == [2]
    assert sorted(report.failed) == [0, 1, 3, 4, 5]
    assert report.failed[1].startswith("example 1, field 'attention': expected shape")
    assert "field 'attention': 3 layers, but the database has 2 layers" in report.failed[3]
    assert "could not unpickle" in report.failed[4]
    assert "field 'ex_id'" in report.failed[5] and "already in the database" in report.failed[0]
    assert "example 1, field 'attention'" in capsys.readouterr().err  # printed too
    assert db.example_ids() == [0, 2]
    assert sorted(db.pending_keys()) == ["0", "1", "3", "4", "5"]
    # fixing a record and re-running only handles the pending ones
    db["1"] = pickle.dumps(make_record(1))
    for key in ("0", "3", "4", "5"):
        assert db.discard_pending(key)
    report = db.preprocess(progress=False)
    assert report.added == [1] and report.failed == {}
    assert db.example_ids() == [0, 1, 2] and db.pending_keys() == []
    assert db.preprocess(progress=False).added == []
    db.close()


def test_commit_is_atomic(tmp_path, monkeypatch):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    db["1"] = pickle.dumps(make_record(1))

    def interrupted(*args):
        raise KeyboardInterrupt

    original = VliLmdb._bump_next_id
    monkeypatch.setattr(VliLmdb, "_bump_next_id", interrupted)  # late in the write transaction
    with pytest.raises(KeyboardInterrupt):
        db.preprocess(progress=False)
    monkeypatch.setattr(VliLmdb, "_bump_next_id", original)
    assert db.example_ids() == [0] and db.pending_keys() == ["1"]
    with db._read() as txn:
        for name in ("attention", "hidden", "image", "tsne", "stats"):
            keys = [bytes(k) for k in txn.cursor(db=db._dbs[name]).iternext(values=False)]
            assert all(k.startswith(b"0000000000") for k in keys), name
    assert db.preprocess(progress=False).added == [1]  # and the next run picks it up
    db.close()


def test_add_record_and_reserve_ids(tmp_path):
    db = VliLmdb(tmp_path / "db", read_only=False)
    first = db.reserve_example_id()
    assert db.add_record(make_record(first)) == first
    with pytest.raises(RecordError, match="already in the database"):
        db.add_record(make_record(first))
    bad = make_record(5)
    bad["tokens"] = bad["tokens"][:-1]
    with pytest.raises(RecordError, match="example 5, field 'img_coords'"):
        db.add_record(bad)
    assert db.example_ids() == [first]
    ids, lock = [], threading.Lock()

    def reserve():
        for _ in range(10):
            value = db.reserve_example_id()
            with lock:
                ids.append(value)

    threads = [threading.Thread(target=reserve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 40 and first not in ids
    db["100"] = pickle.dumps(make_record(100))
    assert db.reserve_example_id() == 101
    db.close()


def _reserve_in_child(path, queue):
    db = VliLmdb(path, read_only=False)
    queue.put([db.reserve_example_id() for _ in range(5)])
    db.close()


def test_reserve_ids_across_processes(tmp_path):
    VliLmdb(tmp_path / "db", read_only=False).close()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_reserve_in_child, args=(str(tmp_path / "db"), queue)) for _ in range(3)]
    for child in children:
        child.start()
    ids = sum((queue.get(timeout=60) for _ in children), [])
    for child in children:
        child.join(timeout=60)
    assert sorted(ids) == list(range(15))


def _read_in_forked_child(db, queue):
    queue.put((db.example_ids(), db.attention(0, 0, 0, [0]).tolist()))


def test_fork_reopens_the_environment(tmp_path):
    writer, _ = make_db(tmp_path / "db", [make_record(0)])
    db = VliLmdb(tmp_path / "db")
    expected = db.attention(0, 0, 0, [0]).tolist()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_forked_child, args=(db, queue))
    child.start()
    assert queue.get(timeout=60) == ([0], expected)
    child.join(timeout=60)
    assert db.example_ids() == [0]  # the parent's environment still works
    db.close()
    writer.close()


def test_opening_errors(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(DatabaseError, match="not a VL-InterpreT database") as info:
        VliLmdb(missing)
    assert "\n" not in str(info.value) and not missing.exists()  # read-only creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatabaseError, match="is a file"):
        VliLmdb(tmp_path / "file", read_only=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(DatabaseError, match="other files and no database"):
        VliLmdb(tmp_path / "docs", read_only=False)
    assert sorted(os.listdir(tmp_path / "docs")) == ["notes.txt"]
    empty = tmp_path / "empty"
    VliLmdb(empty, read_only=False).close()
    with pytest.raises(DatabaseError, match="empty database"):
        VliLmdb(empty)
    pending = tmp_path / "pending"
    db = VliLmdb(pending, read_only=False)
    db["0"] = pickle.dumps(make_record(0))
    db.close()
    with pytest.raises(DatabaseError) as info:
        VliLmdb(pending)
    message = str(info.value)
    assert "no preprocessed examples" in message and "read_only=False).preprocess()" in message
    assert "\n" not in message
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    for read_only in (True, False):
        with pytest.raises(DatabaseError, match="not a VL-InterpreT one"):
            VliLmdb(foreign, read_only=read_only)


def test_schema_version_is_checked(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_record(0)])
    with db._write() as txn:
        db._put_meta(txn, "schema_version", 99)
    db.close()
    for read_only in (True, False):
        with pytest.raises(DatabaseError, match="newer/unknown schema version 99"):
            VliLmdb(tmp_path / "db", read_only=read_only)


def test_read_only_refuses_writes_and_shares_the_environment(tmp_path):
    writer, _ = make_db(tmp_path / "db", [make_record(0)])
    reader = VliLmdb(tmp_path / "db")  # same process: shares the writer's environment
    with pytest.raises(DatabaseError, match="read-only"):
        reader["1"] = pickle.dumps(make_record(1))
    with pytest.raises(DatabaseError, match="read-only"):
        reader.preprocess(progress=False)
    reader.close()
    writer["1"] = pickle.dumps(make_record(1))
    assert writer.preprocess(progress=False).added == [1]
    writer.close()
    with VliLmdb(tmp_path / "db") as db:
        assert db.example_ids() == [0, 1]
    with pytest.raises(DatabaseError, match="closed"):
        db.example_ids()


def test_special_tokens_are_stored(tmp_path):
    record = make_record(0, text_tokens=["<s>", "a", "</s>"])
    db, _ = make_db(tmp_path / "db", [record], special_tokens=["<s>", "</s>"])
    db.close()
    db = VliLmdb(tmp_path / "db")
    assert db.special_tokens == ("<s>", "</s>")
    assert db.example(0).special.tolist()[:3] == [True, False, True]
    db.close()
    with pytest.raises(DatabaseError, match="already uses special tokens"):
        VliLmdb(tmp_path / "db", special_tokens=["[CLS]"])


def test_documented_import_from_inside_app_database(tmp_path):
    import subprocess
    import sys
    code = "from database import VliLmdb; print(VliLmdb.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join("app", "database"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "app.database.store"


def test_tiny_weights_are_stored_precisely_and_compact_copy(tmp_path):
    peaked = make_record(1)
    n = peaked["attention"].shape[-1]
    peaked["attention"] = np.full_like(peaked["attention"], 1e-7)  # deep in float16's subnormal range
    peaked["attention"][..., 0] = 1 - 1e-7 * (n - 1)
    db, report = make_db(tmp_path / "db", [make_record(0), peaked])
    assert report.failed == {}
    np.testing.assert_allclose(db.attention_matrix(1, 1, 0), peaked["attention"][1, 0], rtol=2e-3, atol=1e-12)
    db.compact_copy(tmp_path / "copy")
    db.close()
    with VliLmdb(tmp_path / "copy") as copy:
        assert copy.example_ids() == [0, 1]
        np.testing.assert_allclose(copy.attention(1, 0, 1, [0, 4]), peaked["attention"][0, 1, [0, 4]].mean(0),
                                   rtol=2e-3)


def test_raw_records_never_enter_the_main_file(tmp_path):
    """Pending pickles wait in pending/, which goes once empty: the main file never fills with the free
    pages they would leave, so nothing ever needs rewriting or replacing it."""
    path = tmp_path / "db"
    db = VliLmdb(path, read_only=False)
    records = [make_record(i, n_text=6, grid=(6, 6), n_layers=4, n_heads=4, hidden=256) for i in range(6)]
    for record in records:
        db[str(record["ex_id"])] = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    assert os.path.getsize(path / "pending" / "data.mdb") > sum(r["attention"].nbytes for r in records)
    inode = os.stat(path / "data.mdb").st_ino
    report = db.preprocess(progress=False)
    assert report.added == list(range(6))
    assert not (path / "pending").exists() and db.pending_keys() == []
    assert os.stat(path / "data.mdb").st_ino == inode  # the same file, written in place
    db.compact_copy(tmp_path / "copy")
    assert os.path.getsize(path / "data.mdb") <= 1.25 * os.path.getsize(tmp_path / "copy" / "data.mdb")
    db[str(6)] = pickle.dumps(make_record(6, n_text=6, grid=(6, 6), n_layers=4, n_heads=4, hidden=256))
    assert db.preprocess(progress=False).added == [6]
    db.close()
    with VliLmdb(path) as ro:
        assert ro.example_ids() == list(range(7))
        assert ro.attention(5, 1, 0, [0]).shape == (42,)


def test_nearest_token_is_exact_against_brute_force(tmp_path):
    """Over the stored (float16) hidden states of every example, isotropic ones included."""
    records = [make_record(i, n_text=5, grid=(3, 4), hidden=96, seed=3) for i in range(6)]
    db, _ = make_db(tmp_path / "db", records)
    stored = {r["ex_id"]: validate_record(r) for r in records}
    for ex_id, layer, token in [(0, 0, 1), (2, 1, 3), (4, 2, 9), (5, 2, 2)]:
        got = db.nearest_other_modality(ex_id, layer, token)
        query = db.hidden_states(ex_id, layer)[token]
        query_is_text = token < stored[ex_id].txt_len
        best = None
        for other, rec in stored.items():
            states = db.hidden_states(other, layer)
            for k in range(rec.n_tokens):
                if rec.special[k] or (k < rec.txt_len) == query_is_text:
                    continue
                cosine = float(states[k] @ query / np.linalg.norm(states[k]) / np.linalg.norm(query))
                if best is None or (-cosine, other, k) < (-best[0], best[1], best[2]):
                    best = (cosine, other, k)
        assert (got.ex_id, got.token) == best[1:] and got.similarity == pytest.approx(best[0], abs=1e-5)
    db.close()


def test_import_example_copies_every_value_and_indexes_it(tmp_path):
    """What merging shards relies on: an imported example reads back exactly as in its source."""
    records = _records()
    source, _ = make_db(tmp_path / "source", records)
    target, _ = make_db(tmp_path / "target", [make_record(5, text_tokens=["[CLS]", "a", "b", "[SEP]"],
                                                          grid=(2, 3), image_cls=True)])
    assert target.import_example(source, 0) == 0 and target.import_example(source, 1, new_id=7) == 7
    with pytest.raises(RecordError, match="already in the database"):
        target.import_example(source, 0)
    for old, new in ((0, 0), (1, 7)):
        a, b = source.example(old), target.example(new)
        assert (a.tokens, a.coords, a.grid, a.text, a.prediction, a.accuracy, a.notes) == \
            (b.tokens, b.coords, b.grid, b.text, b.prediction, b.accuracy, b.notes)
        assert source.image_png(old) == target.image_png(new)
        for layer in range(2):
            np.testing.assert_array_equal(source.attention_matrix(old, layer, None), target.attention_matrix(new, layer, None))
            np.testing.assert_array_equal(source.rollout(old, layer, [1]), target.rollout(new, layer, [1]))
        np.testing.assert_array_equal(source.hidden_states(old, 2), target.hidden_states(new, 2))
        np.testing.assert_array_equal(source.tsne(old, 1), target.tsne(new, 1))
        for name, values in source.head_statistics(old).items():
            np.testing.assert_array_equal(values, target.head_statistics(new)[name])
    assert target.metric_description("mine") == "layer x 2 + head"
    assert target.example_ids() == [0, 5, 7]
    neighbor = target.nearest_other_modality(7, 1, 1)  # the copy is searchable
    assert neighbor is not None and neighbor.ex_id in (0, 5, 7)
    other = VliLmdb(tmp_path / "other", read_only=False)
    other.add_record(make_record(0, n_layers=3))
    with pytest.raises(RecordError, match="layers"):
        other.import_example(source, 1, new_id=9)
    source.close(), target.close(), other.close()
