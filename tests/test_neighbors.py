"""Nearest token of the other modality: exact against brute-force cosine computed here in numpy.

The index is exercised directly (neighbors.py on an LMDB environment made in tmp_path, with the
stored float16 hidden states read through a plain callback), so these tests do not depend on store.py.
"""
import lmdb
import numpy as np
import pytest

import app.database.neighbors as neighbors
from app.database.checksum import CorruptValueError, open_value, seal_value


class _Index:
    """The store's use of neighbors.py in miniature: hidden states stored as sealed float16 values."""

    def __init__(self, path):
        self.env = lmdb.open(str(path), map_size=1 << 30, max_dbs=2)
        self.nn, self.hidden_db = self.env.open_db(b"nn"), self.env.open_db(b"hidden")
        self.projection, self.tail, self.shards = None, [], 0
        self.examples = {}  # ex_id -> (stored float16 (L + 1, n, d), txt_len, special)

    def add(self, ex_id, hidden, txt_len, special):
        special = np.asarray(special, bool)
        if self.projection is None:
            self.projection = neighbors.make_projection(hidden, special)
        stored = np.clip(hidden, -65504, 65504).astype("<f2")
        self.examples[ex_id] = (stored, txt_len, special)
        with self.env.begin(write=True) as txn:
            for key, value in neighbors.example_entries(ex_id, hidden, np.arange(len(special)) < txt_len, special, self.projection).items():
                txn.put(key, value, db=self.nn)
            for layer, states in enumerate(stored):
                txn.put(b"%d/%d" % (ex_id, layer), seal_value(states.tobytes()), db=self.hidden_db)
            self.tail.append(ex_id)
            if len(self.tail) >= neighbors.SHARD_EXAMPLES:
                neighbors.seal(txn, self.nn, self.tail, self.shards, len(stored))
                self.shards, self.tail = self.shards + 1, []

    def search(self, ex_id, layer, token):
        width = self.projection.shape[1]
        with self.env.begin(buffers=True) as txn:
            def hidden_rows(other):
                raw = txn.get(b"%d/%d" % (other, layer), db=self.hidden_db)
                return np.frombuffer(open_value(raw, f"example {other}"), dtype="<f2").reshape(-1, width)

            query = hidden_rows(ex_id)[token].astype(np.float32)
            return neighbors.search(txn, self.nn, query, token < self.examples[ex_id][1], layer,
                                    self.shards, list(self.tail), self.projection, hidden_rows)


def _brute_force(examples, ex_id, layer, token):
    """(best cosine, {(ex_id, token): cosine}) over the other modality, float64 on the stored values."""
    stored, txt_len, _ = examples[ex_id]
    query = stored[layer, token].astype(np.float64)
    cosines = {}
    for other, (states, other_txt_len, special) in examples.items():
        rows = states[layer].astype(np.float64)
        cos = rows @ query / np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(query), 1e-300)
        for position in range(len(rows)):
            if not special[position] and (position < other_txt_len) != (token < txt_len):
                cosines[(other, position)] = float(cos[position])
    return max(cosines.values()), cosines


def _check_exact(index, ex_ids, layers):
    """recall@1 against brute force (ties: lowest (ex_id, token)); returns the SearchCosts."""
    costs, hits, queries = [], 0, 0
    for ex_id in ex_ids:
        _, txt_len, special = index.examples[ex_id]
        for layer in layers:
            for token in np.flatnonzero(~special):
                found, cost = index.search(ex_id, layer, int(token))
                best, cosines = _brute_force(index.examples, ex_id, layer, token)
                winners = sorted(key for key, cos in cosines.items() if cos >= best - 1e-6)
                # within 1e-6 the float32 cosine cannot order two tokens: any of them is the answer,
                # the lowest id when the stored vectors tie exactly
                exact_ties = [key for key in winners if cosines[key] == best]
                want = exact_ties[0] if len(winners) == len(exact_ties) else None
                got = (found.ex_id, found.token)
                hits += got == want if want is not None else got in winners
                assert found.similarity == pytest.approx(cosines[got], abs=1e-5)
                assert cost.points_scanned == len(cosines)
                costs.append(cost)
                queries += 1
    assert queries > 50
    assert hits / queries == 1.0
    return costs


def _layout(n_text=9, n_image=16):
    """(txt_len, special) for [CLS] text.. [SEP] then an image [CLS] and patches."""
    special = np.zeros(n_text + n_image, bool)
    special[[0, n_text - 1, n_text]] = True
    return n_text, special


def test_exact_on_isotropic_states(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbors, "SHARD_EXAMPLES", 4)  # several shards and a tail
    rng = np.random.default_rng(0)
    index = _Index(tmp_path / "db")
    for ex_id in range(30):
        txt_len, special = _layout(n_text=9 + ex_id % 3, n_image=40)
        index.add(ex_id, rng.standard_normal((2, len(special), 768)).astype(np.float32), txt_len, special)
    assert index.shards == 7 and index.tail == [28, 29]
    costs = _check_exact(index, (0, 13, 29), (0, 1))
    # nothing to prune here: the search reads nearly every candidate (a scan), and says so
    assert np.mean([c.exact_cosines / c.points_scanned for c in costs]) > 0.5


def _anisotropic(rng, n, width=768, rank=8, layers=2):
    """Low-rank states with an offset and outlier dimensions, plus small isotropic noise."""
    basis = np.random.default_rng(7).normal(size=(layers, rank, width))
    states = np.einsum("lnr,lrd->lnd", rng.normal(size=(layers, n, rank)), basis)
    states[:, :, :2] += 8 + rng.normal(size=(layers, n, 2))
    return (states + 0.05 * rng.normal(size=(layers, n, width))).astype(np.float32)


def test_exact_and_pruned_on_anisotropic_states(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbors, "SHARD_EXAMPLES", 5)
    rng = np.random.default_rng(1)
    index = _Index(tmp_path / "db")
    for ex_id in range(32):
        txt_len, special = _layout(n_text=12, n_image=48)
        index.add(ex_id, _anisotropic(rng, len(special)), txt_len, special)
    assert index.shards == 6 and index.tail == [30, 31]
    costs = _check_exact(index, (0, 17, 31), (0, 1))
    text_queries = [c for c in costs if c.points_scanned == 32 * 47]  # they scan the image tokens
    # the bound leaves only a small fraction of the candidates to read exactly (2 % here), from a
    # quarter of the examples; the isotropic test above reads nearly all of them
    assert np.mean([c.exact_cosines / c.points_scanned for c in costs]) < 0.05
    assert np.mean([c.examples_read for c in text_queries]) < 12


def test_bound_holds_for_every_pair():
    """a·b + r·s (+ BOUND_SLACK) >= the float64 cosine of the stored vectors, for all pairs."""
    rng = np.random.default_rng(8)
    special = np.zeros(60, bool)
    isotropic = rng.standard_normal((2, 60, 768)).astype(np.float32) * 300
    isotropic[:, :10, 3] = 1e5  # beyond float16: stored clipped to 65504
    for hidden in (_anisotropic(rng, 60), isotropic):
        projection = neighbors.make_projection(hidden[:, :20], special[:20])  # fitted on other tokens
        entries = neighbors.example_entries(0, hidden, np.zeros(len(special), bool), special, projection)  # all image tokens
        stored = np.clip(hidden, -65504, 65504).astype(np.float16).astype(np.float64)
        units = stored / np.linalg.norm(stored, axis=-1, keepdims=True)
        for layer in range(2):
            raw = entries[neighbors.tail_key(layer, "i", 0)[0]]
            rows = np.frombuffer(open_value(raw, "rows"), dtype="<f4").reshape(60, -1).astype(np.float64)
            bound = rows[:, :-1] @ rows[:, :-1].T + np.outer(rows[:, -1], rows[:, -1])
            cosines = units[layer] @ units[layer].T
            assert (bound + neighbors.BOUND_SLACK >= cosines).all()
            assert (bound - cosines).max() > 1e-3  # not trivially tight: the residuals are there


def test_ties_go_to_the_lowest_example_and_token(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbors, "SHARD_EXAMPLES", 2)
    rng = np.random.default_rng(2)
    index = _Index(tmp_path / "db")
    txt_len, special = _layout(n_text=6, n_image=10)
    base = _anisotropic(rng, len(special), width=64)
    index.add(0, rng.standard_normal(base.shape).astype(np.float32), txt_len, special)
    index.add(3, base * 2, txt_len, special)  # scaled by powers of 2: the same cosines, exactly
    index.add(5, base * 4, txt_len, special)
    index.add(9, base, txt_len, special)
    for token in np.flatnonzero(~special[:txt_len]):
        for layer in (0, 1):
            found, _ = index.search(9, layer, int(token))
            best, cosines = _brute_force(index.examples, 9, layer, token)
            ties = sorted(key for key, cos in cosines.items() if cos == best)
            assert len(ties) == 3  # the same direction in examples 3, 5 and 9
            assert (found.ex_id, found.token) == ties[0] and ties[0][0] == 3
    copies = _Index(tmp_path / "copies")  # every image token of one example the same vector
    hidden = rng.standard_normal((1, len(special), 64)).astype(np.float32)
    hidden[0, txt_len:] = hidden[0, -1]
    copies.add(0, hidden, txt_len, special)
    found, _ = copies.search(0, 0, 1)
    assert (found.ex_id, found.token) == (0, txt_len + 1)  # txt_len is the image [CLS]


def test_no_other_modality_gives_none(tmp_path):
    rng = np.random.default_rng(3)
    index = _Index(tmp_path / "db")
    special = np.array([True, False, False, True])
    index.add(0, rng.standard_normal((1, 4, 16)).astype(np.float32), 4, special)  # text only
    found, cost = index.search(0, 0, 1)
    assert found is None and cost.points_scanned == 0


def test_residual_is_exact_near_the_projected_subspace(tmp_path):
    """Tokens of the fitted example lie in the projection's span: r is ~0, not sqrt(rounding)."""
    rng = np.random.default_rng(4)
    index = _Index(tmp_path / "db")
    txt_len, special = _layout(n_text=8, n_image=20)
    hidden = rng.standard_normal((1, len(special), 128)).astype(np.float32)
    index.add(0, hidden, txt_len, special)  # 25 non-special tokens < DIM: all inside the fit
    with index.env.begin(buffers=True) as txn:
        raw = txn.get(neighbors.tail_key(0, "i", 0)[0], db=index.nn)
        rows = np.frombuffer(open_value(raw, "tail"), dtype="<f4").reshape(-1, neighbors.DIM + 1)
    units = hidden[0, txt_len:][~special[txt_len:]]
    units = units.astype(np.float16).astype(np.float64)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    np.testing.assert_allclose(rows[:, :-1], units @ index.projection[0].astype(np.float64), atol=1e-6)
    assert rows[:, -1].max() < 1e-5


def test_projection_fits_the_energy_of_anisotropic_states():
    rng = np.random.default_rng(5)
    special = np.zeros(80, bool)
    special[0] = True
    fitted = neighbors.make_projection(_anisotropic(rng, 80), special)
    assert fitted.shape == (2, 768, neighbors.DIM) and fitted.dtype == np.float32
    for p in fitted:
        np.testing.assert_allclose(p.T @ p, np.eye(neighbors.DIM), atol=1e-5)
    np.testing.assert_array_equal(fitted, neighbors.make_projection(_anisotropic(np.random.default_rng(5), 80),
                                                                    special))
    # another example of the same model: the fit keeps most of its energy, a random basis does not
    other = _anisotropic(rng, 200)[0].astype(np.float64)
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    assert np.mean(np.linalg.norm(other @ fitted[0], axis=1) ** 2) > 0.95
    assert neighbors.make_projection(rng.standard_normal((1, 3, 16)), np.zeros(3, bool)).shape == (1, 16, 16)


def test_damaged_index_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbors, "SHARD_EXAMPLES", 2)
    rng = np.random.default_rng(6)
    index = _Index(tmp_path / "db")
    txt_len, special = _layout()
    for ex_id in range(2):
        index.add(ex_id, rng.standard_normal((1, len(special), 32)).astype(np.float32), txt_len, special)
    key = neighbors.shard_keys(0, "i", 0)[0]
    with index.env.begin(write=True) as txn:
        value = bytearray(txn.get(key, db=index.nn))
        value[5] ^= 0x10
        txn.put(key, bytes(value), db=index.nn)
    with pytest.raises(CorruptValueError, match="s/000/i/000000/v"):
        index.search(0, 0, 1)


def test_bad_input_names_the_example(tmp_path):
    rng = np.random.default_rng(9)
    txt_len, special = _layout()
    hidden = rng.standard_normal((2, len(special), 32)).astype(np.float32)
    projection = neighbors.make_projection(hidden, special)
    with pytest.raises(ValueError, match="example 2147483648: ex_id"):
        neighbors.example_entries(2 ** 31, hidden, np.arange(len(special)) < txt_len, special, projection)
    with pytest.raises(ValueError, match="example 4: hidden_states"):
        neighbors.example_entries(4, hidden[:1], np.arange(len(special)) < txt_len, special, projection)
    index = _Index(tmp_path / "db")
    index.add(0, hidden, txt_len, special)
    with index.env.begin(buffers=True) as txn:
        with pytest.raises(TypeError, match="example 0: hidden_rows gave float32"):
            neighbors.search(txn, index.nn, hidden[0, 1], True, 0, 0, [0], index.projection,
                             lambda ex_id: index.examples[ex_id][0][0].astype(np.float32))
