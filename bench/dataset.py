"""The dataset panel at scale: how long its views take over N examples of 12 x 12 heads.

    python bench/dataset.py [--n 2000] [--quick] [--repeat 30] [--db EXISTING_DB]

Builds a database of N examples with bench/make_db.py (t-SNE replaced by PCA, and few tokens: the
views read only the per-head statistics, whose size does not depend on the token count), then reads
it once into the in-memory index (app.database.dataset) and prints p50/p95 of what each interaction
computes and serialises, as the panel's callbacks do: the table filter (filters, filter row, sort,
page), the dataset heatmap (mean and spread per head), the contrast (Mann–Whitney U per head and
Benjamini–Hochberg) and the drill-down (examples ranked by one head). --quick: 200 examples.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, scratch_dir, stats_ms  # noqa: E402
from bench.make_db import WORDS, build  # noqa: E402


def timed(fn, repeat: int) -> list[float]:
    out = []
    for k in range(repeat):
        t0 = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - t0)
    return out


VIEWS = ("table filter", "dataset heatmap", "contrast", "drill-down")
VIEW_SHAPE = dict(layers=12, heads=12, text=12, grid=(4, 4), hidden=32, image=64)  # few tokens: see above


def build_views_db(path: str, n: int) -> str:
    """A database of ``n`` examples of 12 x 12 heads for the dataset views (PCA maps, few tokens)."""
    build(path, n, chunk=50, fast_tsne=True, quiet=True, **VIEW_SHAPE)
    return path


def view_costs(path: str, repeat: int) -> dict:
    """The index's size and read time, and p50 / p95 ms of each of VIEWS (``repeat`` calls each) as the
    panel's callbacks compute and serialise them, over the database at ``path``."""
    from dash._utils import to_json  # noqa: PLC0415

    from app.database import dataset as ds  # noqa: PLC0415
    from app.database.database import VliLmdb  # noqa: PLC0415
    from app.panels import dataset as panel  # noqa: PLC0415

    db = VliLmdb(path)
    t0 = time.perf_counter()
    index = ds.load_index(db)
    load_s = time.perf_counter() - t0
    cache = ds.cache_for(db)
    cache.get()
    stats = list(index.stat_names)
    rng = np.random.default_rng(0)
    L, H = db.n_layers, db.n_heads
    all_ids = [int(i) for i in index.ex_ids]

    def table(k):
        column = ds.Column(stats[k % len(stats)], int(rng.integers(L)), None if k % 3 == 0 else int(rng.integers(H)))
        low = float(np.nanpercentile(index.column(column), 20))
        state = panel.TableState(ds.ExampleFilter(text=str(WORDS[k % len(WORDS)]), correctness="correct" if k % 2 else "",
                                                  low=low), column, query="{score} > 0.1",
                                 sort_by=({"column_id": "value", "direction": "desc"},), page=1)
        view = panel.table_view(cache.get(), state)
        to_json([view["rows"], view["filtered"], panel.table_columns(column)])

    def heatmap(k):
        filtered = all_ids if k % 2 else all_ids[: len(all_ids) // 2]
        fig, text = panel.dataset_view(cache.get(), filtered, stats[k % len(stats)], "mean", "correct", None)
        to_json(fig)

    def contrast(k):
        fig, text = panel.dataset_view(cache.get(), all_ids, stats[k % len(stats)], "contrast",
                                       "correct" if k % 2 else "rest", None)
        to_json(fig)

    def drill(k):
        column = ds.Column(stats[k % len(stats)], int(rng.integers(L)), int(rng.integers(H)))
        children, ranked = panel.ranked_children(cache.get(), all_ids, column)
        to_json(children)

    costs = {"examples": len(index), "layers": L, "heads": H, "statistics": len(stats),
             "index_mb": index.values.nbytes / 2**20, "load_ms": load_s * 1000,
             "views": {name: stats_ms(timed(fn, repeat)) for name, fn in zip(VIEWS, (table, heatmap, contrast, drill))}}
    db.close()
    return costs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="examples (default 2000)")
    p.add_argument("--quick", action="store_true", help="200 examples")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per interaction (default 30)")
    p.add_argument("--db", help="an existing database to time instead of building one")
    args = p.parse_args(argv)
    n = 200 if args.quick else args.n
    path = args.db
    if path is None:
        t0 = time.perf_counter()
        path = build_views_db(os.path.join(scratch_dir("vli-bench-dataset-"), "db"), n)
        print(f"built {n} examples in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    costs = view_costs(path, args.repeat)
    print(f"machine: {machine()}")
    print(f"examples {costs['examples']}, {costs['layers']} layers x {costs['heads']} heads, {costs['statistics']} "
          f"statistics: index {costs['index_mb']:.1f} MB, read once per database version in {costs['load_ms']:.0f} ms")
    for name, (p50, p95) in costs["views"].items():
        print(f"{name:<16} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
