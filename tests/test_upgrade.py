"""Upgrading a schema-1 database in place: every value kept, statistics recomputed, nothing lost on
an interruption. tests/data/schema1_db was written by VL-InterpreT's schema-1 store: three examples
(5 text tokens, an image [CLS], a 3x3 grid, 2 layers x 2 heads, hidden 16, custom metric "mine") and
one record (7) left pending."""
import json
import shutil

import lmdb
import numpy as np
import pytest

import app.database.upgrade as upgrade_module
from app.database.analysis import attention_rollout
from app.database.database import DatabaseError, VliLmdb
from app.database.stats import STATISTICS, head_statistics
from app.database.upgrade import main, upgrade

SCHEMA1 = "tests/data/schema1_db"


@pytest.fixture
def old_db(tmp_path):
    path = tmp_path / "db"
    shutil.copytree(SCHEMA1, path)
    return path


def _schema1_values(path):
    """What schema 1 stored, read with plain LMDB calls (its values carry no checksum)."""
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    out = {}
    with env.begin() as txn:
        for name in ("info", "attention", "hidden", "image", "tsne", "stats", "pending"):
            db = env.open_db(name.encode(), txn=txn, create=False)
            out[name] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    env.close()
    return out


def test_upgrade_keeps_every_value_and_recomputes_the_statistics(old_db):
    before = _schema1_values(old_db)
    with pytest.raises(DatabaseError, match="upgrade it in place"):
        VliLmdb(old_db)
    assert main([str(old_db)]) == 0
    with VliLmdb(old_db, read_only=False) as db:
        assert db.example_ids() == [0, 1, 2] and db.pending_keys() == ["7"]
        for ex_id in (0, 1, 2):
            key = b"%010d" % ex_id
            info = json.loads(before["info"][key])
            got = db.example(ex_id)
            assert list(got.tokens) == info["tokens"] and got.text == info["text"] and got.notes == ()
            assert db.image_png(ex_id) == before["image"][key]
            n, exp = len(info["tokens"]), info["attention_exp"]
            attention = np.stack([np.frombuffer(before["attention"][key + b"/%03d" % layer], "<f2")
                                  for layer in range(2)]).reshape(2, 2, n, n).astype(np.float32) * 2.0 ** -exp
            np.testing.assert_array_equal(db.attention_matrix(ex_id, 1, 0), attention[1, 0])
            np.testing.assert_allclose(db.rollout(ex_id, 1, [0]), attention_rollout(attention)[1, 0], rtol=2e-3,
                                       atol=1e-6)
            hidden1 = np.frombuffer(before["hidden"][key + b"/001"], "<f2").reshape(n, -1)
            np.testing.assert_array_equal(db.hidden_states(ex_id, 1), hidden1.astype(np.float32))
            np.testing.assert_array_equal(db.tsne(ex_id, 2),
                                          np.frombuffer(before["tsne"][key], "<f4").reshape(3, n, 2)[2])
            stats = db.head_statistics(ex_id)
            info_now = db.example(ex_id)
            want = head_statistics(attention, np.arange(n) < info["txt_len"], np.array(info["special"]),
                                   [None if c is None else tuple(c) for c in info["coords"]],
                                   tuple(info["image_size"]), info_now.grids, info_now.patch_grid)
            for name in STATISTICS:  # the new definitions (cross-modal as the mean of both directions)
                np.testing.assert_allclose(stats[name], want[name], rtol=1e-6, equal_nan=True)
            old_custom = np.frombuffer(before["stats"][key], "<f4").reshape(-1, 2, 2)[7]
            np.testing.assert_array_equal(stats["mine"], old_custom)
            assert db.nearest_other_modality(ex_id, 1, 1) is not None
        assert db.preprocess(progress=False).added == [7]  # the moved pending record still lands
    assert main([str(old_db)]) == 0  # a second run has nothing to do


def test_an_interrupted_upgrade_resumes(old_db, monkeypatch):
    real = upgrade_module._upgrade_example
    calls = []

    def crash_on_second(txn, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(txn, *args)

    monkeypatch.setattr(upgrade_module, "_upgrade_example", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        upgrade(str(old_db), progress=False)
    with pytest.raises(DatabaseError, match="schema version 1"):
        VliLmdb(old_db)  # half-upgraded: still refused
    monkeypatch.undo()
    assert upgrade(str(old_db), progress=False) == 2  # the two examples left
    with VliLmdb(old_db) as db:
        assert db.example_ids() == [0, 1, 2]
        for ex_id in (0, 1, 2):
            assert db.head_statistics(ex_id)["cross_modal"].shape == (2, 2)


def test_upgrade_refuses_what_is_not_a_database(tmp_path, capsys):
    env = lmdb.open(str(tmp_path / "foreign"))
    env.close()
    assert main([str(tmp_path / "foreign")]) == 2
    assert "not a VL-InterpreT database" in capsys.readouterr().err
