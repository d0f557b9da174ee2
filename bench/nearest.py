"""Nearest token of the other modality: query time and recall@1 against brute force, by kind of state.

    python bench/nearest.py [-n 2000] [--text 40 --image 210] [--hidden 768] [--queries 30]
                            [--dim 64] [--kinds structured-1,structured-3,...] [--quick]

For each kind of hidden state, builds the index of ``n`` examples (one hidden-state layer; ``text``
tokens with [CLS] and [SEP], then ``image`` patch tokens) directly through app/database/neighbors.py
into an LMDB environment in a temporary folder: hidden states stored as checksummed float16 values,
as the database stores them, index values sealed every ``SHARD_EXAMPLES`` examples. Then times
``neighbors.search`` for ``queries`` random text queries (which scan the image tokens, the larger
side) and as many image queries, and checks every answer against a brute-force float64 cosine over
all stored tokens of the other modality.

Kinds (``hidden``-d, generated per example from one shared "model" where not isotropic):

* ``structured-1``, ``structured-3``, ``structured-20``: a shared mean direction, a modality offset,
  5 outlier dimensions and a 32-d content subspace with a decaying spectrum, where tokens are
  occurrences of 4 000 shared "concepts" (as real transformer states: a few dominant and outlier
  directions); isotropic noise holds 1 %, 3 % or 20 % of the energy. The bounds' slack is the
  residual norms' product, about that share: the more noise, the less they prune.
* ``make-db``: bench/make_db.py's hidden states at its last layer (per-example clusters, 3 outlier
  dimensions x 20, isotropic token noise): the repository's benchmark database.
* ``isotropic``: standard normal states; nothing can be pruned and the search is a scan.

Prints, per kind and query direction: median / p95 ms, mean exact cosines and examples read per
query, and recall@1 (an answer counts when its brute-force cosine is within 1e-6 of the maximum,
the float32 resolution of the search's cosines).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import lmdb
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from app.database import neighbors  # noqa: E402
from app.database.checksum import open_value, seal_value  # noqa: E402
from bench.common import du_mb, machine, scratch_dir  # noqa: E402
from bench.make_db import synthetic_record  # noqa: E402

KINDS = ("structured-1", "structured-3", "structured-20", "make-db", "isotropic")
NOISE_SHARE = {"structured-1": 0.01, "structured-3": 0.03, "structured-20": 0.20}


class StateModel:
    """Shared structure of one kind of synthetic hidden states (see the module docstring)."""

    def __init__(self, kind: str, hidden: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kind, self.hidden = kind, hidden
        self.mean = rng.normal(0, 0.5, hidden)
        self.modality = rng.normal(0, 0.3, (2, hidden))
        self.outliers = rng.choice(hidden, 5, replace=False)
        scales = 3.0 * 0.9 ** np.arange(32)
        self.basis = np.linalg.qr(rng.normal(size=(hidden, 32)))[0].T * scales[:, None]  # (32, hidden)
        self.concepts = rng.normal(size=(4000, 32))
        structured = (self.mean @ self.mean + np.mean(np.sum(self.modality ** 2, axis=1))
                      + 5 * (6.0 ** 2 + 1.5 ** 2) + np.sum(scales ** 2) * (1 + 0.3 ** 2))
        share = NOISE_SHARE.get(kind, 1.0)
        self.noise = np.sqrt(structured * share / (1 - share) / hidden) if share < 1 else 1.0

    def example(self, rng: np.random.Generator, n_text: int, n_image: int) -> np.ndarray:
        """float32 (1, n_text + n_image, hidden): one hidden-state layer of one example."""
        n = n_text + n_image
        if self.kind == "isotropic":
            return rng.standard_normal((1, n, self.hidden), dtype=np.float32)
        if self.kind == "make-db":
            record = synthetic_record(int(rng.integers(2 ** 31)), n_heads=1, n_text=n_text,
                                      grid=(1, n_image), hidden=self.hidden, image_size=16)
            return record["hidden_states"][-1:]
        image = np.arange(n) >= n_text
        codes = self.concepts[rng.integers(0, len(self.concepts), n)] + 0.3 * rng.normal(size=(n, 32))
        states = self.mean + self.modality[image.astype(int)] + codes @ self.basis
        states[:, self.outliers] += 6.0 + 1.5 * rng.normal(size=(n, 5))
        states += self.noise * rng.normal(size=(n, self.hidden))
        return states[None].astype(np.float32)


class BenchIndex:
    """The store's use of neighbors.py, without store.py: one hidden-state layer."""

    def __init__(self, path: str, hidden: int, dim: int):
        self.env = lmdb.open(path, map_size=1 << 36, max_dbs=2, writemap=True, sync=False)
        self.nn, self.hidden_db = self.env.open_db(b"nn"), self.env.open_db(b"hidden")
        self.hidden, self.dim = hidden, dim
        self.projection, self.tail, self.shards = None, [], 0

    def add(self, txn, ex_id: int, states: np.ndarray, txt_len: int, special: np.ndarray) -> None:
        if self.projection is None:
            self.projection = neighbors.make_projection(states, special, dim=self.dim)
        for key, value in neighbors.example_entries(ex_id, states, np.arange(len(special)) < txt_len, special, self.projection).items():
            txn.put(key, value, db=self.nn)
        stored = np.clip(states[0], -65504, 65504).astype("<f2")
        txn.put(b"%010d" % ex_id, seal_value(stored.tobytes()), db=self.hidden_db)
        self.tail.append(ex_id)
        if len(self.tail) >= neighbors.SHARD_EXAMPLES:
            neighbors.seal(txn, self.nn, self.tail, self.shards, 1)
            self.shards, self.tail = self.shards + 1, []

    def search(self, ex_id: int, token: int, query_is_text: bool):
        with self.env.begin(buffers=True) as txn:
            def hidden_rows(other: int) -> np.ndarray:
                raw = open_value(txn.get(b"%010d" % other, db=self.hidden_db), f"example {other}")
                return np.frombuffer(raw, dtype="<f2").reshape(-1, self.hidden)

            query = hidden_rows(ex_id)[token].astype(np.float32)
            return neighbors.search(txn, self.nn, query, query_is_text, 0, self.shards, list(self.tail),
                                    self.projection, hidden_rows)


def brute_force(stored: np.ndarray, candidates: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """float64 cosines (n_queries, n_examples * len(candidates)) against the stored float16 rows."""
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k = len(candidates)
    out = np.empty((len(q), len(stored) * k))
    for first in range(0, len(stored), 100):  # 100 examples at a time: bounded float64 copies
        rows = stored[first:first + 100, candidates].reshape(-1, stored.shape[2]).astype(np.float64)
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
        out[:, first * k:first * k + len(rows)] = q @ rows.T
    return out


def run_kind(kind: str, args, special: np.ndarray) -> None:
    n, t, d = args.n, args.text + args.image, args.hidden
    model = StateModel(kind, d)
    rng = np.random.default_rng(1)
    folder = scratch_dir("vli-nearest-")
    index = BenchIndex(folder, d, args.dim)
    stored = np.empty((n, t, d), np.float16)
    start = time.perf_counter()
    for first in range(0, n, 50):
        with index.env.begin(write=True) as txn:
            for ex_id in range(first, min(first + 50, n)):
                states = model.example(rng, args.text, args.image)
                stored[ex_id] = np.clip(states[0], -65504, 65504).astype(np.float16)
                index.add(txn, ex_id, states, args.text, special)
    build = time.perf_counter() - start
    print(f"{kind}: built {n} examples in {build:.1f} s ({build / n * 1e3:.1f} ms/example, one layer), "
          f"{du_mb(folder):.0f} MB on disk ({index.shards} shards, tail {len(index.tail)})")
    is_text = np.arange(t) < args.text
    sides = (("text -> image", is_text & ~special, ~is_text & ~special),
             ("image -> text", ~is_text & ~special, is_text & ~special))
    for name, query_side, other_side in sides:
        tokens = np.flatnonzero(query_side)
        picks = [(int(rng.integers(n)), int(rng.choice(tokens))) for _ in range(args.queries)]
        queries = np.stack([stored[e, tok].astype(np.float32) for e, tok in picks])
        cosines = brute_force(stored, np.flatnonzero(other_side), queries)
        index.search(*picks[0], name.startswith("text"))  # warm-up (page cache, projection)
        times, exact, examples, hits = [], [], [], 0
        others = np.flatnonzero(other_side)
        for q, (ex_id, token) in enumerate(picks):
            found, cost = index.search(ex_id, token, name.startswith("text"))
            times.append(cost.seconds)
            exact.append(cost.exact_cosines)
            examples.append(cost.examples_read)
            column = found.ex_id * len(others) + int(np.searchsorted(others, found.token))
            hits += cosines[q, column] >= cosines[q].max() - 1e-6
        ms = np.array(times) * 1e3
        print(f"  {name}: {len(others) * n} candidates, median {np.median(ms):7.1f} ms, "
              f"p95 {np.percentile(ms, 95):7.1f} ms, exact cosines {np.mean(exact):9.0f}, "
              f"examples read {np.mean(examples):6.0f}, recall@1 {hits / len(picks):.3f}")
    index.env.close()
    del stored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="examples")
    p.add_argument("--text", type=int, default=40, help="text tokens per example, [CLS] and [SEP] included")
    p.add_argument("--image", type=int, default=210, help="image patch tokens per example")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--queries", type=int, default=20, help="queries per direction")
    p.add_argument("--dim", type=int, default=neighbors.DIM, help="projected dimension of the index")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of " + ", ".join(KINDS))
    p.add_argument("--quick", action="store_true", help="100 examples, 10 queries per direction")
    args = p.parse_args()
    if args.quick:
        args.n, args.queries = 100, 10
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds {unknown}: choose from {', '.join(KINDS)}")
    special = np.zeros(args.text + args.image, bool)
    special[[0, args.text - 1]] = True
    print(machine())
    print(f"{args.n} examples x {args.text} text + {args.image} image tokens, hidden {args.hidden}, "
          f"index dim {args.dim}, shards of {neighbors.SHARD_EXAMPLES} examples, {args.queries} queries a direction")
    for kind in kinds:
        run_kind(kind, args, special)


if __name__ == "__main__":
    main()
