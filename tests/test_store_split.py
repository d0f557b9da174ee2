"""The database split along its parts (keys, environment, reads, writes, pipeline) and the registry of
per-example analyses: the public names stay where users import them, the format stays the same, an old
database without the new tables opens as before, and an analysis added in one module is computed,
stored, read and merged without any other change to the storage layer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app.database import analyses
from app.database.analyses import ATTENTION, MODEL, Analysis, ExampleArrays, Stored
from app.database.keys import example_key, layer_key
from app.database.records import validate_record
from helpers import fast_tsne, make_db, make_decoder_record, make_record  # noqa: F401 (fast_tsne: autouse)


def test_the_public_names_are_where_users_import_them():
    import app.database.database as database
    import app.database.store as store
    for name in ("VliLmdb", "DatabaseError", "RecordError", "CorruptValueError", "ExampleInfo", "PreprocessReport",
                 "Neighbor", "SearchCost", "SCHEMA_VERSION"):
        assert getattr(database, name) is getattr(store, name), name
    assert store.SCHEMA_VERSION == 2
    public = {"preprocess", "add_record", "import_example", "reserve_example_id", "pending_keys", "discard_pending",
              "compact_copy", "close", "example", "example_ids", "statistic_names", "metric_description",
              "image_png", "image", "attention", "attention_matrix", "rollout", "relevancy", "hidden_states",
              "head_statistics", "tsne", "nearest_other_modality", "nearest_other_modality_cost", "stored_source",
              "version", "patch_lens", "read_analysis"}
    assert public <= set(dir(store.VliLmdb))


def test_the_built_in_analyses_run_in_order_and_say_what_they_need():
    got = {a.name: (a.needs, a.table) for a in analyses.registered()}
    assert list(got) == ["head_statistics", "tsne", "rollout", "relevancy", "logit_lens", "patch_lens"]
    assert got["head_statistics"] == ((analyses.ATTENTION,), "stats")
    assert got["tsne"] == ((analyses.HIDDEN_STATES,), "tsne")
    assert got["relevancy"] == ((analyses.MODEL, analyses.GRADIENTS), "relevancy")
    assert got["logit_lens"] == ((analyses.MODEL,), None)  # in the description
    assert got["patch_lens"] == ((analyses.MODEL,), "patch_lens")


class SelfAttention(Analysis):
    """Each token's attention to itself, mean of heads, per layer: table ``self_att``, float32 (L, n)."""

    name = "self_attention"
    needs = (ATTENTION,)
    field = "attention"
    table = "self_att"
    what = "self-attention"
    stage = "self_attention"

    def compute(self, example: ExampleArrays) -> Stored:
        r = example.record
        diagonal = np.einsum("lhii->li", r.attention) / r.n_heads
        return Stored({example_key(r.ex_id): diagonal.astype("<f4").tobytes()}, {"self_attention_layers": r.n_layers})

    def read(self, db, ex_id, layer):
        with db._read() as txn:
            raw = db._get(txn, self.table, example_key(ex_id), ex_id, self.what)
            return np.frombuffer(raw, "<f4").reshape(db.n_layers, -1)[layer].copy()


@pytest.fixture
def with_self_attention(monkeypatch):
    monkeypatch.setattr(analyses, "_REGISTERED", dict(analyses._REGISTERED))  # restored after the test
    return analyses.register(SelfAttention())


def test_an_analysis_added_in_one_module_is_computed_stored_read_and_merged(tmp_path, with_self_attention):
    records = [make_record(0, image_cls=True, shuffle_image=True), make_decoder_record(1)]
    db, report = make_db(tmp_path / "db", records, special_tokens=("[CLS]", "[SEP]", "<s>", "</s>"))
    assert report.added == [0, 1] and "self_attention" in report.stage_seconds
    for ex_id, record in enumerate(records):
        order = validate_record(record, special_tokens=db.special_tokens).order  # the stored order
        want = np.stack([np.diagonal(record["attention"][layer], axis1=-2, axis2=-1).mean(axis=0)[order]
                         for layer in range(2)])
        for layer in range(2):
            np.testing.assert_allclose(db.read_analysis("self_attention", ex_id, layer), want[layer], rtol=1e-6)
    with db._read() as txn:
        assert json.loads(bytes(txn.get(example_key(0), db=db._dbs["info"]))[:-8])["self_attention_layers"] == 2
    with type(db)(tmp_path / "merged", read_only=False) as merged:
        merged.import_example(db, 1, 9)
        np.testing.assert_array_equal(merged.read_analysis("self_attention", 9, 1),
                                      db.read_analysis("self_attention", 1, 1))
    db.close()


def test_a_failing_analysis_refuses_that_record_alone_under_its_field(tmp_path, with_self_attention, monkeypatch):
    real = SelfAttention.compute

    def broken(self, example):
        if example.record.ex_id == 1:
            raise ZeroDivisionError("simulated")
        return real(self, example)

    monkeypatch.setattr(SelfAttention, "compute", broken)
    db, report = make_db(tmp_path / "db", [make_record(i) for i in range(3)])
    assert report.added == [0, 2]
    assert report.failed[1] == "example 1, field 'attention': could not be processed: ZeroDivisionError: simulated"
    db.close()


@pytest.mark.parametrize("change, message", [
    (dict(name="head_statistics"), "needs a name of its own"),
    (dict(needs=("the weather",)), "needs must be some of"),
    (dict(needs=(MODEL,)), "preprocessing does not have: it stores an optional record field, not 'attention'"),
    (dict(table="stats"), "table 'stats' is taken"),
    (dict(table="attention"), "table 'attention' is taken"),
    (dict(field="colour"), "field 'colour' is no record field"),
])
def test_a_declaration_that_cannot_work_is_refused(change, message, monkeypatch):
    monkeypatch.setattr(analyses, "_REGISTERED", dict(analyses._REGISTERED))
    bad = type("Bad", (SelfAttention,), change)()
    with pytest.raises(ValueError, match=message):
        analyses.register(bad)


def test_an_example_is_stored_under_the_same_keys_as_before(tmp_path):
    """The keys and description fields of schema 2, as the store wrote them before the split."""
    record = make_record(0, custom_metrics={"m": np.ones((2, 2))}, logit_lens=[[["a", 0.5]]] * 3)
    db, _ = make_db(tmp_path / "db", [record])
    with db._read() as txn:
        keys = {name: sorted(bytes(k) for k in txn.cursor(db=db._dbs[name]).iternext(values=False))
                for name in ("info", "ids", "image", "attention", "rollout", "hidden", "tsne", "stats", "relevancy",
                             "patch_lens")}
        info = json.loads(bytes(txn.get(example_key(0), db=db._dbs["info"]))[:-8])
    one = [example_key(0)]
    assert keys == {"info": one, "ids": one, "image": one, "tsne": one, "stats": one, "relevancy": [],
                    "patch_lens": [], "attention": [layer_key(0, l) for l in range(2)],
                    "rollout": [layer_key(0, l) for l in range(2)], "hidden": [layer_key(0, l) for l in range(3)]}
    assert set(info) == {"ex_id", "tokens", "txt_len", "special", "coords", "grid", "modality", "grids", "generated",
                         "image_size", "accuracy", "prediction", "text", "notes", "logit_lens", "custom_metrics",
                         "source", "attention_exp", "rollout_exp"}
    assert info["custom_metrics"] == ["m"] and info["logit_lens"] == [[["a", 0.5]]] * 3
    db.close()


def test_a_database_written_before_the_patch_lens_table_opens_as_before(tmp_path):
    """Without the patch_lens table (a database of the previous release): read-only it reads as empty, and
    it merges; opened for writing, the table is created."""
    from app.database.database import VliLmdb
    db, _ = make_db(tmp_path / "db", [make_record(0), make_record(1)])
    with db._write() as txn:
        txn.drop(db._dbs["patch_lens"], delete=True)
    db.close()
    with VliLmdb(tmp_path / "db") as old:
        assert old._dbs["patch_lens"] is None and old.patch_lens(0, 1) is None
        assert old.example_ids() == [0, 1]
        with VliLmdb(tmp_path / "merged", read_only=False) as merged:
            merged.import_example(old, 1)
            np.testing.assert_array_equal(merged.attention_matrix(1, 1, 0), old.attention_matrix(1, 1, 0))
    with VliLmdb(tmp_path / "db", read_only=False) as again:
        again.add_record(make_record(2, patch_lens=[[["w", 0.5]] * 6] * 3))
        assert again.patch_lens(2, 0).words == ["w"] * 6 and again.patch_lens(0, 0) is None
