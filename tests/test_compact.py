"""Compact storage of large examples (app.database.compact): every read checked against the full record,
through computations that do not share its code (numpy sorting, scikit-learn's PCA, the rollout of the
analysis module on the full attention)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from app.database import compact
from app.database.analysis import attention_rollout
from app.database.records import validate_record
from app.database.stats import STATISTICS, head_statistics
from app.database.store import VliLmdb
from helpers import make_db, make_decoder_record

TOP_KEYS, COMPONENTS = compact.MIN_TOP_KEYS, 3
SPECIALS = ("<s>", "</s>")


@pytest.fixture()
def compact_db(tmp_path, monkeypatch):
    """Three decoder examples stored compact (thresholds lowered for small test examples)."""
    monkeypatch.setattr(compact, "COMPACT_ABOVE", 0)
    monkeypatch.setattr(compact, "HEAD_BUDGET", 0)
    monkeypatch.setattr(compact, "HIDDEN_COMPONENTS", COMPONENTS)
    records = [make_decoder_record(i, n_layers=3, n_heads=2, hidden=12) for i in range(3)]
    db, report = make_db(tmp_path / "db", records, special_tokens=SPECIALS)
    assert not report.failed, report.failed
    yield db, records
    db.close()


def test_plan_keeps_a_7b_shaped_example_under_100_mb():
    layers, heads, tokens, hidden = 32, 32, 636, 4096
    assert compact.full_bytes(layers, heads, tokens, hidden) > 900e6
    top_keys, components = compact.plan(layers, heads, tokens, hidden)
    attention = layers * (2 * tokens ** 2 + heads * tokens * top_keys * 4)
    states = (layers + 1) * (4 * hidden + 2 * components * hidden + 4 * tokens * components)
    assert attention + states < 90e6 and top_keys >= 16
    assert compact.plan(12, 12, 250, 768) is None  # ViLT-sized examples stay whole


def test_the_example_says_what_was_reduced(compact_db):
    db, records = compact_db
    info = db.example(1)
    assert info.reduction.top_keys == TOP_KEYS and info.reduction.components == COMPONENTS
    attention = records[1]["attention"]
    top = np.sort(attention, axis=-1)[..., -TOP_KEYS:].sum(-1) / attention.sum(-1)
    assert info.reduction.kept_mass == pytest.approx(top.mean(), abs=2e-3)
    assert info.notes[-1].startswith("stored reduced") and f"{TOP_KEYS} largest weights" in info.notes[-1]


def test_head_means_and_rollout_are_exact_heads_keep_their_largest_weights(compact_db):
    db, records = compact_db
    attention = records[2]["attention"].astype(np.float64)
    n = attention.shape[-1]
    for layer in range(3):
        np.testing.assert_allclose(db.attention_matrix(2, layer, None), attention[layer].mean(0), atol=1e-3)
        for head in range(2):
            full = attention[layer, head]
            kept = np.zeros_like(full)
            order = np.argsort(-full, axis=-1, kind="stable")[:, :TOP_KEYS]
            np.put_along_axis(kept, order, np.take_along_axis(full, order, axis=-1), axis=-1)
            np.testing.assert_allclose(db.attention_matrix(2, layer, head), kept, atol=1e-3)
            np.testing.assert_allclose(db.attention(2, layer, head, [n - 2, n - 1]), kept[[n - 2, n - 1]].mean(0),
                                       atol=1e-3)
        rollout = attention_rollout(attention)[layer]
        np.testing.assert_allclose(db.rollout(2, layer, [n - 2]), rollout[n - 2], atol=2e-3)
    assert np.triu(db.attention_matrix(2, 1, 0), k=1).max() == 0


def test_statistics_are_those_of_the_full_attention(compact_db):
    db, records = compact_db
    rec = validate_record(records[0], special_tokens=SPECIALS)
    want = head_statistics(rec.attention, rec.is_text, rec.special, rec.coords, rec.image.shape[:2], rec.grids,
                           rec.patch_grid)
    got = db.head_statistics(0)
    for key in STATISTICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, equal_nan=True, err_msg=key)


def test_hidden_states_keep_their_principal_directions(compact_db):
    db, records = compact_db
    for layer in range(4):
        states = records[1]["hidden_states"][layer].astype(np.float16).astype(np.float64)
        pca = PCA(n_components=COMPONENTS, svd_solver="full").fit(states)
        np.testing.assert_allclose(db.hidden_states(1, layer), pca.inverse_transform(pca.transform(states)),
                                   atol=2e-2)
    variance = [PCA(n_components=COMPONENTS).fit(h.astype(np.float64)).explained_variance_ratio_.sum()
                for h in records[1]["hidden_states"]]
    assert db.example(1).reduction.kept_variance == pytest.approx(np.mean(variance), abs=1e-3)


def test_nearest_token_searches_the_reconstructions(compact_db):
    db, _ = compact_db
    info = db.example(0)
    query = info.n_tokens - 2
    found = db.nearest_other_modality(0, 2, query)
    states = {e: db.hidden_states(e, 2).astype(np.float64) for e in range(3)}
    q = states[0][query]
    candidates = [(e, t) for e in range(3) for t in range(info.n_tokens)
                  if not db.example(e).is_text[t] and not db.example(e).special[t]]
    cosine = {c: states[c[0]][c[1]] @ q / np.linalg.norm(states[c[0]][c[1]]) / np.linalg.norm(q) for c in candidates}
    assert (found.ex_id, found.token) == max(cosine, key=cosine.get)
    assert found.similarity == pytest.approx(cosine[(found.ex_id, found.token)], abs=1e-3)


def test_a_compact_example_copies_verbatim(compact_db, tmp_path):
    db, _ = compact_db
    with VliLmdb(tmp_path / "other", read_only=False, special_tokens=SPECIALS) as other:
        other.import_example(db, 1, new_id=7)
        assert other.example(7).reduction == db.example(1).reduction
        np.testing.assert_array_equal(other.attention_matrix(7, 2, 1), db.attention_matrix(1, 2, 1))
        np.testing.assert_array_equal(other.rollout(7, 2, [3]), db.rollout(1, 2, [3]))
        np.testing.assert_array_equal(other.hidden_states(7, 3), db.hidden_states(1, 3))
