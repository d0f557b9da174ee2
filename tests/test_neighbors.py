"""Nearest token of the other modality: the index agrees with brute-force exact cosine."""
import numpy as np
import pytest

import app.database.neighbors as neighbors
from app.database.records import validate_record
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fixture)


def _structured_records(n_examples, hidden=96, rank=6, n_layers=2):
    """Records whose hidden states lie near a low-rank subspace, like real models' (anisotropic)."""
    rng = np.random.default_rng(42)
    basis = rng.normal(size=(n_layers + 1, rank, hidden))
    records = []
    for ex_id in range(n_examples):
        raw = make_record(ex_id, n_text=5, grid=(2, 3), image_cls=ex_id % 2 == 0, n_layers=n_layers,
                          hidden=hidden, shuffle_image=ex_id % 3 == 0)
        n = len(raw["tokens"])
        codes = rng.normal(size=(n_layers + 1, n, rank))
        raw["hidden_states"] = (np.einsum("lnr,lrd->lnd", codes, basis)
                                + 0.05 * rng.normal(size=(n_layers + 1, n, hidden))).astype(np.float32)
        records.append(raw)
    return records


def _brute_force(normalized, ex_id, layer, token):
    query = normalized[ex_id].hidden_states[layer, token]
    query_is_text = token < normalized[ex_id].txt_len
    best = None
    for other in normalized.values():
        for position in range(other.n_tokens):
            if other.special[position] or (position < other.txt_len) == query_is_text:
                continue
            vector = other.hidden_states[layer, position]
            cosine = float(vector @ query / np.linalg.norm(vector) / np.linalg.norm(query))
            if best is None or cosine > best[2]:
                best = (other.ex_id, position, cosine)
    return best


@pytest.mark.parametrize("shard_examples, rerank", [(64, 64), (3, 8)])
def test_index_agrees_with_brute_force(tmp_path, monkeypatch, shard_examples, rerank):
    monkeypatch.setattr(neighbors, "SHARD_EXAMPLES", shard_examples)  # (3, 8): sealed shards + tail
    monkeypatch.setattr(neighbors, "RERANK", rerank)
    records = _structured_records(8)
    db, report = make_db(tmp_path / "db", records)
    assert report.failed == {}
    normalized = {r["ex_id"]: validate_record(r) for r in records}
    if shard_examples == 3:
        assert db._meta("nn_shards") == 2 and db._meta("nn_tail") == [6, 7]
    checked = 0
    for ex_id in (0, 3, 7):
        info = db.example(ex_id)
        for layer in range(3):
            for token in range(info.n_tokens):
                found, cost = db.nearest_other_modality_cost(ex_id, layer, token)
                if info.special[token]:
                    assert found is None
                    continue
                want = _brute_force(normalized, ex_id, layer, token)
                assert (found.ex_id, found.token) == want[:2], (ex_id, layer, token)
                assert found.similarity == pytest.approx(want[2], abs=2e-3)
                other_text = token >= info.txt_len
                n_other = sum(int(((np.arange(r.n_tokens) < r.txt_len) == other_text)[~r.special].sum())
                              for r in normalized.values())
                assert cost.points_scanned == n_other and cost.reranked == min(rerank, n_other)
                checked += 1
    assert checked > 50
    db.close()


def test_no_other_modality_gives_none(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_record(0, grid=None, img_coords=None),
                                      make_record(1, grid=None, img_coords=None)])
    assert db.nearest_other_modality(0, 1, 1) is None
    db.close()


def test_projection_is_orthonormal_and_reproducible():
    p = neighbors.make_projection(128)
    assert p.shape == (128, neighbors.DIM) and p.dtype == np.float32
    np.testing.assert_allclose(p.T @ p, np.eye(neighbors.DIM), atol=1e-5)
    np.testing.assert_array_equal(p, neighbors.make_projection(128))
    assert neighbors.make_projection(16).shape == (16, 16)
