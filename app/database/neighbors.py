"""Nearest token of the other modality, across all examples, by cosine in a layer's hidden space.

Index (per hidden-state layer 0..n_layers and per modality, text ``t`` / image ``i``):
every non-special token's hidden state is normalised to unit length, projected with a fixed
seeded random orthogonal matrix ``P`` (hidden_size x :data:`DIM`, stored in the database's meta)
and normalised again; the projected vectors are float32 rows, their ids ``(ex_id, token)`` int32.

Storage is append-only, and memory is flat in the number of examples:

* each new example writes one *tail* value per layer and modality;
* when :data:`SHARD_EXAMPLES` examples sit in the tail, they are sealed into one *shard* value per
  layer and modality (written once, never rewritten), in the same write transaction.

A query (:func:`search`) streams over the shards and tail values of one layer and the other
modality with zero-copy ``np.frombuffer`` views (one matrix-vector product each), keeps the best
:data:`RERANK` approximate candidates, and reranks them by exact cosine against the stored
full hidden states (float16).  Special tokens are never indexed, nor queried.

Cost at N examples of T tokens: one pass over ``N * T_other * DIM * 4`` bytes of the mapped file
(read, not copied) plus :data:`RERANK` hidden-state rows; see :class:`SearchCost`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

__all__ = ["Neighbor", "SearchCost", "DIM", "RERANK", "SHARD_EXAMPLES", "make_projection",
           "project", "example_entries", "search", "tail_key", "shard_keys"]

DIM = 64               # projected dimension
RERANK = 64            # approximate candidates reranked exactly
SHARD_EXAMPLES = 64    # examples sealed into one shard value (bounds the tail a query walks)
PROJECTION_SEED = 20230601


@dataclass(frozen=True)
class Neighbor:
    """The closest token of the other modality: its example, position (stored order), cosine."""

    ex_id: int
    token: int
    similarity: float


@dataclass
class SearchCost:
    """What one query touched, for benchmarks."""

    values_read: int = 0        # shard and tail values scanned
    points_scanned: int = 0     # projected vectors scored
    bytes_scanned: int = 0      # bytes of projected vectors read (zero-copy)
    reranked: int = 0           # exact cosines computed
    seconds: float = 0.0


def make_projection(hidden_size: int, dim: int = DIM, seed: int = PROJECTION_SEED) -> np.ndarray:
    """A (hidden_size, min(dim, hidden_size)) float32 matrix with orthonormal columns."""
    rng = np.random.default_rng(seed)
    dim = min(dim, hidden_size)
    q, r = np.linalg.qr(rng.standard_normal((hidden_size, dim)))
    q *= np.sign(np.diag(r))  # make the factorisation unique
    return np.ascontiguousarray(q, dtype=np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


def project(hidden: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Unit-normalise rows of ``hidden`` (..., d), project, normalise again: float32 (..., dim)."""
    return _unit(_unit(np.asarray(hidden, dtype=np.float32)) @ projection).astype(np.float32)


def tail_key(layer: int, modality: str, ex_id: int) -> tuple[bytes, bytes]:
    """(vectors key, ids key) of one example's tail value."""
    base = b"t/%03d/%s/%010d" % (layer, modality.encode(), ex_id)
    return base + b"/v", base + b"/i"


def shard_keys(layer: int, modality: str, shard: int) -> tuple[bytes, bytes]:
    """(vectors key, ids key) of a sealed shard."""
    base = b"s/%03d/%s/%06d" % (layer, modality.encode(), shard)
    return base + b"/v", base + b"/i"


def example_entries(ex_id: int, hidden: np.ndarray, txt_len: int, special: np.ndarray,
                    projection: np.ndarray) -> dict[bytes, bytes]:
    """The tail values of one example: hidden (L + 1, n, d) float32 in stored token order."""
    n = hidden.shape[1]
    is_text = np.arange(n) < txt_len
    projected = project(hidden, projection)  # (L + 1, n, dim)
    entries = {}
    for modality, mask in (("t", is_text & ~special), ("i", ~is_text & ~special)):
        tokens = np.flatnonzero(mask)
        ids = np.stack([np.full(len(tokens), ex_id), tokens], axis=1).astype("<i4")
        for layer in range(hidden.shape[0]):
            vkey, ikey = tail_key(layer, modality, ex_id)
            entries[vkey] = np.ascontiguousarray(projected[layer, tokens], dtype="<f4").tobytes()
            entries[ikey] = ids.tobytes()
    return entries


def seal(txn, db, tail: list[int], shard: int, n_hidden_layers: int) -> None:
    """Concatenate the tail values of ``tail`` into shard ``shard`` and delete them."""
    for layer in range(n_hidden_layers):
        for modality in "ti":
            vectors, ids = [], []
            for ex_id in tail:
                vkey, ikey = tail_key(layer, modality, ex_id)
                vectors.append(bytes(txn.get(vkey, db=db)))
                ids.append(bytes(txn.get(ikey, db=db)))
                txn.delete(vkey, db=db)
                txn.delete(ikey, db=db)
            svkey, sikey = shard_keys(layer, modality, shard)
            txn.put(svkey, b"".join(vectors), db=db)
            txn.put(sikey, b"".join(ids), db=db)


def search(txn, db, query: np.ndarray, query_is_text: bool, layer: int, n_shards: int,
           tail: Iterable[int], projection: np.ndarray,
           hidden_row: Callable[[int, int], np.ndarray],
           rerank: int = RERANK) -> tuple[Optional[Neighbor], SearchCost]:
    """The closest token of the other modality to ``query`` (d,) at ``layer``.

    hidden_row(ex_id, token) -> float32 (d,) reads a stored hidden state for the exact rerank
    (inside the same transaction).  Returns (None, cost) when the other modality has no tokens.
    """
    start = time.perf_counter()
    cost = SearchCost()
    modality = "i" if query_is_text else "t"
    q = project(query[None], projection)[0]
    dim = projection.shape[1]
    keys = [shard_keys(layer, modality, s) for s in range(n_shards)]
    keys += [tail_key(layer, modality, ex_id) for ex_id in tail]
    kept_scores, kept_chunks, kept_rows = [], [], []
    for chunk, (vkey, _) in enumerate(keys):
        raw = txn.get(vkey, db=db)
        if raw is None or len(raw) == 0:
            continue
        vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dim)  # zero-copy view of the map
        scores = np.einsum("ij,j->i", vectors, q)  # single-threaded: no BLAS thread pool per request
        cost.values_read += 1
        cost.points_scanned += len(scores)
        cost.bytes_scanned += len(raw)
        rows = np.argpartition(scores, -rerank)[-rerank:] if len(scores) > rerank else np.arange(len(scores))
        kept_scores.append(scores[rows])
        kept_chunks.append(np.full(len(rows), chunk))
        kept_rows.append(rows)
    if not kept_scores:
        cost.seconds = time.perf_counter() - start
        return None, cost
    scores, chunks, rows = (np.concatenate(kept_scores), np.concatenate(kept_chunks),
                            np.concatenate(kept_rows))
    if len(scores) > rerank:
        top = np.argpartition(scores, -rerank)[-rerank:]
        chunks, rows = chunks[top], rows[top]
    best_ids = np.empty((len(rows), 2), np.int64)
    for chunk in np.unique(chunks):  # read ids only for the chunks that hold candidates
        ids = np.frombuffer(txn.get(keys[chunk][1], db=db), dtype="<i4").reshape(-1, 2)
        mine = chunks == chunk
        best_ids[mine] = ids[rows[mine]]
    query_unit = _unit(np.asarray(query, np.float32))
    rows = np.stack([hidden_row(int(e), int(t)) for e, t in best_ids])
    exact = _unit(rows) @ query_unit
    cost.reranked = len(exact)
    # highest cosine; ties broken by (ex_id, token) so that the answer is reproducible
    order = np.lexsort((best_ids[:, 1], best_ids[:, 0], -exact))
    i = order[0]
    cost.seconds = time.perf_counter() - start
    return Neighbor(int(best_ids[i, 0]), int(best_ids[i, 1]), float(exact[i])), cost
