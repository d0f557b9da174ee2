"""Nearest token of the other modality, across all examples, by exact cosine in a layer's hidden space.

The answer is exact (the highest cosine over every stored non-special token of the other modality,
ties to the lowest ``(ex_id, token)``), computed on the stored float16 hidden states; the index only
decides which of them need to be read.

Index (per hidden-state layer 0..n_layers and per modality, text ``t`` / image ``i``): every
non-special token's stored hidden state ``h`` (float16) is normalised, ``u = h / |h|``, and split by
the layer's projection ``P`` (hidden_size x dim, orthonormal columns) into ``a = Pᵀu`` and the
residual norm ``r = |u - P a|``. A row of the index is ``[a, r]`` (float32), its
id ``(ex_id, token)`` (int32). For a query ``q`` split into ``b, s`` likewise, Cauchy–Schwarz on the
residuals gives ``cos(u, q) <= a·b + r·s``: one matrix-vector product over the index bounds every
cosine. :func:`search` then computes exact cosines in descending order of bound, in batches, until
the best exact cosine exceeds every bound left, which proves it is the maximum.

The projection is fitted once, on the database's first example (the top principal directions of its
unit hidden states, per layer, see :func:`make_projection`), and never changes, so that all stored
rows share it. Real hidden states are anisotropic (a few dominant and outlier directions hold most
of their energy), so the residuals are small and the bounds leave a small fraction of the tokens
to read exactly. The slack of a bound is about ``r·s``, the residual share of the energy: where the
states are isotropic the bounds prune nothing and the search becomes a scan of the other modality's
stored hidden states (each example read once, its rows scored in blocks), still exact. The fit
affects only the speed, never the answer (bench/nearest.py measures both).

Storage is append-only, and memory is flat in the number of examples:

* each new example writes one *tail* value per layer and modality;
* when :data:`SHARD_EXAMPLES` examples sit in the tail, they are sealed into one *shard* value per
  layer and modality (written once, never rewritten), in the same write transaction.

Every value is written with :func:`~app.database.checksum.seal_value` and read through
:func:`~app.database.checksum.open_value`. Special tokens are never indexed, nor queried.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from app.database.checksum import CorruptValueError, open_value, seal_value

__all__ = ["Neighbor", "SearchCost", "DIM", "SHARD_EXAMPLES", "BOUND_SLACK", "make_projection",
           "example_entries", "seal", "search", "tail_key", "shard_keys"]

DIM = 64               # projected dimension (the index holds DIM + 1 float32 per token)
SHARD_EXAMPLES = 64    # examples sealed into one shard value (bounds the tail a query walks)
PROJECTION_SEED = 20230601
# Added to every bound before it is compared with an exact cosine: covers float32 rounding (each
# below 1e-5) of the projection's orthonormality, of a and r, of the bound's dot product and of
# the exact cosine.
BOUND_SLACK = 1e-4
SEEDS = 8              # exact cosines computed first, for a first lower bound on the answer
FIRST_BATCH = 32       # exact cosines in the first batch after the seeds; batches then grow 8x
BATCH_GROWTH = 8
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Neighbor:
    """The closest token of the other modality: its example, position (stored order), cosine."""

    ex_id: int
    token: int
    similarity: float


@dataclass
class SearchCost:
    """What one query touched, for benchmarks and tests."""

    values_read: int = 0        # shard and tail values scanned
    points_scanned: int = 0     # bounds computed (= tokens of the other modality)
    bytes_scanned: int = 0      # bytes of index rows read (zero-copy)
    exact_cosines: int = 0      # exact cosines computed on stored hidden states
    examples_read: int = 0      # examples whose hidden states were read
    seconds: float = 0.0


def _stored(hidden: np.ndarray) -> np.ndarray:
    """The hidden states as the database stores them (float16, clipped), as float32."""
    return np.clip(np.asarray(hidden, np.float32), -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16).astype(np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("...i,...i->...", rows, rows))[..., None]
    return rows / np.where(norms > 0, norms, 1)


def _principal_directions(units: np.ndarray, k: int) -> np.ndarray:
    """(d, <= k) orthonormal top right singular vectors of float64 rows (m, d), from the smaller
    Gram matrix (an eigendecomposition of m x m or d x d, much cheaper than an SVD)."""
    if len(units) <= units.shape[1]:
        values, vectors = np.linalg.eigh(units @ units.T)
        vectors = units.T @ vectors
    else:
        values, vectors = np.linalg.eigh(units.T @ units)
    order = np.argsort(-values)[:k]
    order = order[values[order] > values.max(initial=0.0) * 1e-12]  # drop the null space
    directions = vectors[:, order]
    return directions / np.linalg.norm(directions, axis=0)


def make_projection(hidden: np.ndarray, special: np.ndarray, dim: int = DIM,
                    seed: int = PROJECTION_SEED) -> np.ndarray:
    """Per layer, an orthonormal (hidden_size, min(dim, hidden_size)) basis fitted on one example.

    hidden: (L + 1, n, hidden_size); special: (n,) bool. The columns span the top principal
    directions of the example's unit (float16-stored) non-special hidden states, completed with
    seeded random directions when the example has fewer tokens than ``dim``. Returns float32
    (L + 1, hidden_size, dim).
    """
    hidden = np.asarray(hidden)
    width = hidden.shape[-1]
    dim = min(dim, width)
    rng = np.random.default_rng(seed)
    layers = []
    for states in _stored(hidden[:, ~np.asarray(special, bool)]):
        fitted = _principal_directions(_unit(states).astype(np.float64), dim)
        q, r = np.linalg.qr(np.hstack([fitted, rng.standard_normal((width, dim - fitted.shape[1]))]))
        layers.append(q * np.sign(np.diag(r)))  # the fitted directions come first, as they were
    return np.ascontiguousarray(np.stack(layers), dtype=np.float32)


def _index_rows(units: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """float32 (..., m, dim + 1) rows ``[a, r]`` of unit rows (..., m, d): a = Pᵀu and the residual
    norm r = |u - P a|, measured directly, not as sqrt(1 - |a|²), which loses all precision when a
    row lies almost in the projected subspace."""
    a = units @ projection
    residual = np.linalg.norm(units - a @ np.swapaxes(projection, -1, -2), axis=-1, keepdims=True)
    return np.concatenate([a, residual], axis=-1).astype("<f4")


def tail_key(layer: int, modality: str, ex_id: int) -> tuple[bytes, bytes]:
    """(rows key, ids key) of one example's tail value."""
    base = b"t/%03d/%s/%010d" % (layer, modality.encode(), ex_id)
    return base + b"/v", base + b"/i"


def shard_keys(layer: int, modality: str, shard: int) -> tuple[bytes, bytes]:
    """(rows key, ids key) of a sealed shard."""
    base = b"s/%03d/%s/%06d" % (layer, modality.encode(), shard)
    return base + b"/v", base + b"/i"


def example_entries(ex_id: int, hidden: np.ndarray, is_text: np.ndarray, special: np.ndarray,
                    projection: np.ndarray) -> dict[bytes, bytes]:
    """The sealed tail values of one example.

    is_text, special: (n,) bool, each token's modality and whether it is special (not indexed).
    hidden: (L + 1, n, d) in stored token order, float32 or the stored float16 (it is rounded to
    float16 as stored either way, so that the bounds hold for the cosines the search computes);
    projection: (L + 1, d, dim) from :func:`make_projection`.
    """
    if not 0 <= ex_id < 2 ** 31:
        raise ValueError(f"example {ex_id}: ex_id must be in 0..2**31-1 (the index stores ids as int32)")
    stored = _stored(hidden)
    if projection.shape[:2] != (stored.shape[0], stored.shape[2]):
        raise ValueError(f"example {ex_id}: hidden_states {stored.shape} do not match the nearest-token "
                         f"projection {projection.shape} (layers + 1, hidden size, dim)")
    rows = _index_rows(_unit(stored), projection)  # (L + 1, n, dim + 1), all layers at once
    is_text = np.asarray(is_text, dtype=bool)
    entries = {}
    for modality, mask in (("t", is_text & ~special), ("i", ~is_text & ~special)):
        tokens = np.flatnonzero(mask)
        ids = np.stack([np.full(len(tokens), ex_id), tokens], axis=1).astype("<i4")
        for layer in range(stored.shape[0]):
            vkey, ikey = tail_key(layer, modality, ex_id)
            entries[vkey] = seal_value(np.ascontiguousarray(rows[layer, tokens]).tobytes())
            entries[ikey] = seal_value(ids.tobytes())
    return entries


def _read(txn, db, key: bytes) -> memoryview:
    raw = txn.get(key, db=db)
    what = f"nearest-token index value {key.decode()!r}"
    if raw is None:
        raise CorruptValueError(f"{what}: missing (the index is damaged)")
    return open_value(raw, what)


def seal(txn, db, tail: list[int], shard: int, n_hidden_layers: int) -> None:
    """Concatenate the tail values of ``tail`` into shard ``shard`` and delete them."""
    for layer in range(n_hidden_layers):
        for modality in "ti":
            rows, ids = [], []
            for ex_id in tail:
                vkey, ikey = tail_key(layer, modality, ex_id)
                rows.append(bytes(_read(txn, db, vkey)))
                ids.append(bytes(_read(txn, db, ikey)))
                txn.delete(vkey, db=db)
                txn.delete(ikey, db=db)
            svkey, sikey = shard_keys(layer, modality, shard)
            txn.put(svkey, seal_value(b"".join(rows)), db=db)
            txn.put(sikey, seal_value(b"".join(ids)), db=db)


class _Exact:
    """Exact cosines of index entries against the query; keeps the best (cosine, ex_id, token)."""

    GATHER = 1024  # stored rows gathered (from several examples) before they are scored together
    BLOCK = 128    # of which converted to float32 at a time: reused buffers that stay in cache
    # (a fresh float32 copy of a whole example is several times slower: page faults)

    def __init__(self, txn, db, keys, offsets, query_unit, hidden_rows, cost):
        self.txn, self.db, self.keys, self.offsets = txn, db, keys, offsets
        self.query_unit, self.hidden_rows, self.cost = query_unit, hidden_rows, cost
        self.ids: dict[int, np.ndarray] = {}       # chunk -> (n, 2) ids, read once per query
        self.examples: dict[int, np.ndarray] = {}  # ex_id -> stored hidden states, read once
        self.gathered = np.empty((self.GATHER, len(query_unit)), np.float16)
        self.rows32 = np.empty((self.BLOCK, len(query_unit)), np.float32)
        self.best: Optional[tuple[float, int, int]] = None

    def _ids(self, entries: np.ndarray) -> np.ndarray:
        chunks = np.searchsorted(self.offsets, entries, side="right") - 1
        out = np.empty((len(entries), 2), np.int64)
        for chunk in np.unique(chunks):
            if chunk not in self.ids:
                self.ids[chunk] = np.frombuffer(_read(self.txn, self.db, self.keys[chunk][1]),
                                                dtype="<i4").reshape(-1, 2)
            mine = chunks == chunk
            out[mine] = self.ids[chunk][entries[mine] - self.offsets[chunk]]
        return out

    def _states(self, ex_id: int) -> np.ndarray:
        if ex_id not in self.examples:
            states = self.hidden_rows(ex_id)
            if states.dtype != np.float16 or states.ndim != 2 or states.shape[1] != len(self.query_unit):
                raise TypeError(f"example {ex_id}: hidden_rows gave {states.dtype} {states.shape}, expected the "
                                f"stored float16 (n_tokens, {len(self.query_unit)})")
            self.examples[ex_id] = states
            self.cost.examples_read += 1
        return self.examples[ex_id]

    def _score(self, m: int, out: np.ndarray) -> None:
        """out[:m] = cosines of the first m gathered rows with the query."""
        for begin in range(0, m, self.BLOCK):
            rows = self.rows32[:min(self.BLOCK, m - begin)]
            np.copyto(rows, self.gathered[begin:begin + len(rows)])
            norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
            out[begin:begin + len(rows)] = np.einsum("ij,j->i", rows, self.query_unit) / np.where(norms > 0, norms, 1)

    def update(self, entries: np.ndarray) -> None:
        ids = self._ids(entries)
        ids = ids[np.lexsort((ids[:, 1], ids[:, 0]))]  # grouped by example, each read once
        cosines = np.empty(len(ids), np.float32)
        filled, scored = 0, 0
        starts = np.flatnonzero(np.r_[True, ids[1:, 0] != ids[:-1, 0]])
        for begin, end in zip(starts, np.r_[starts[1:], len(ids)]):
            states = self._states(int(ids[begin, 0]))
            for piece in range(begin, end, self.GATHER):
                tokens = ids[piece:min(end, piece + self.GATHER), 1]
                if filled + len(tokens) > self.GATHER:
                    self._score(filled, cosines[scored:])
                    scored, filled = scored + filled, 0
                np.take(states, tokens, axis=0, out=self.gathered[filled:filled + len(tokens)])
                filled += len(tokens)
        self._score(filled, cosines[scored:])
        self.cost.exact_cosines += len(ids)
        i = np.lexsort((ids[:, 1], ids[:, 0], -cosines))[0]
        candidate = (float(cosines[i]), int(ids[i, 0]), int(ids[i, 1]))
        if self.best is None or (-candidate[0], candidate[1:]) < (-self.best[0], self.best[1:]):
            self.best = candidate


def search(txn, db, query: np.ndarray, query_is_text: bool, layer: int, n_shards: int,
           tail: Iterable[int], projection: np.ndarray,
           hidden_rows: Callable[[int], np.ndarray]) -> tuple[Optional[Neighbor], SearchCost]:
    """The token of the other modality with the highest cosine to ``query`` (d,) at ``layer``.

    projection: (L + 1, d, dim) as stored; hidden_rows(ex_id) -> float16 (n_tokens, d): the example's
    stored hidden states at ``layer``, read inside the same transaction (a zero-copy view: the search
    keeps the ones it reads until it returns). Returns (None, cost) when the other modality
    has no tokens.
    """
    start = time.perf_counter()
    cost = SearchCost()
    modality = "i" if query_is_text else "t"
    query_unit = _unit(np.asarray(query, np.float32))
    weights = _index_rows(query_unit[None], projection[layer])[0]  # [b, s]: bound = [a, r] · [b, s]
    keys = [shard_keys(layer, modality, shard) for shard in range(n_shards)]
    keys += [tail_key(layer, modality, ex_id) for ex_id in tail]
    bounds, sizes = [], []
    for vkey, _ in keys:
        rows = np.frombuffer(_read(txn, db, vkey), dtype="<f4").reshape(-1, len(weights))
        bounds.append(np.einsum("ij,j->i", rows, weights))  # single-threaded: no BLAS pool per request
        sizes.append(len(rows))
        cost.values_read += 1
        cost.bytes_scanned += rows.nbytes
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    cost.points_scanned = int(offsets[-1])
    if cost.points_scanned == 0:
        cost.seconds = time.perf_counter() - start
        return None, cost
    bound = np.concatenate(bounds) + np.float32(BOUND_SLACK)
    exact = _Exact(txn, db, keys, offsets, query_unit, hidden_rows, cost)
    # Seeds: the highest bounds of the values that hold the highest ones, a cheap first lower bound.
    peaks = np.array([offsets[c] + np.argmax(bound[offsets[c]:offsets[c + 1]]) for c in range(len(keys))
                      if sizes[c]])
    seeds = peaks[np.argsort(-bound[peaks], kind="stable")[:SEEDS]]
    exact.update(seeds)
    bound[seeds] = -np.inf
    left = np.flatnonzero(bound >= exact.best[0])
    left = left[np.argsort(-bound[left], kind="stable")]
    negated = -bound[left]  # ascending: the bounds in descending order, for searchsorted
    done, batch = 0, FIRST_BATCH
    while True:
        needed = int(np.searchsorted(negated, -exact.best[0], side="right"))  # bounds >= best
        if done >= needed:
            break
        take = needed - done if needed - done <= 4 * batch else batch  # little left to prune: all
        exact.update(left[done:done + take])
        done += take
        batch *= BATCH_GROWTH
    cost.seconds = time.perf_counter() - start
    return Neighbor(exact.best[1], exact.best[2], exact.best[0]), cost
