"""What grows with the number of examples N: start-up, memory, interaction latency, nearest-token search.

    python bench/scale.py [--sizes 100 1000 2000] [--reps 20] [--real-tsne] [--quick]

For each N a database of N examples of a smaller shape (4 layers x 4 heads, 250 tokens, hidden 256;
bench/make_db.py, t-SNE replaced by PCA unless --real-tsne: the maps' values do not change what
the app costs) is built, then the real server (run_app.py) is started and measured:
start-up (process start to the first 200 on GET /), resident memory (psutil RSS) after visiting
min(N, 100) examples, the interaction cascades (bench/interactions.py's replay), the
nearest-token search (``db.nearest_other_modality`` called directly, median / p95 ms), and the
database-wide token map of the last layer (app.database.token_map, --map-tokens tokens, default
20 000): its fit time and the fitting process's peak memory, in a fresh process; and the dataset
panel's views (table filter, dataset heatmap, contrast, drill-down: bench/dataset.py's timing) over a
second database of N examples of 12 x 12 heads, where the head statistics are what they cost.
--quick uses N = 20, 100, 200 and 5 repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import anon_mb, machine, rss_mb, scratch_dir, start_server, stats_ms  # noqa: E402
from bench.dataset import VIEWS, build_views_db, view_costs  # noqa: E402
from bench.interactions import Replayer, db_shape, measure  # noqa: E402
from bench.make_db import build  # noqa: E402

SHAPE = dict(layers=4, heads=4, text=40, grid=(14, 15), hidden=256, image=384)
KEY = ["select another example", "click a text token", "box-select image patches", "click a head",
       "move the t-SNE layer", "hover a t-SNE point", "open the attention matrix"]


def nearest_cost(path: str, queries: int = 40, seed: int = 0) -> tuple[float, float]:
    from app.database.database import VliLmdb

    db = VliLmdb(path)
    try:
        rng = np.random.default_rng(seed)
        ids = db.example_ids()
        times = []
        db.nearest_other_modality(ids[0], 0, 1)  # warm-up (projection)
        while len(times) < queries:
            ex = int(rng.choice(ids))
            info = db.example(ex)
            tok = int(rng.integers(0, info.n_tokens))
            if info.special[tok]:
                continue
            layer = int(rng.integers(0, db.n_layers + 1))
            t = time.perf_counter()
            db.nearest_other_modality(ex, layer, tok)
            times.append(time.perf_counter() - t)
        return stats_ms(times)
    finally:
        db.close()


FIT_SCRIPT = """
import json, resource, sys, time
from app.database.database import VliLmdb
from app.database.token_map import fit_token_map
db = VliLmdb(sys.argv[1])
t = time.perf_counter()
token_map = fit_token_map(db, db.n_layers, int(sys.argv[2]))
print(json.dumps({"fit_s": time.perf_counter() - t, "tokens": len(token_map),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def token_map_cost(path: str, max_tokens: int) -> dict:
    """Fit time (s), peak resident memory (MB) and size of the last layer's token map, in a fresh process
    (what the page's first request for the map costs; openTSNE uses every core)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", FIT_SCRIPT, path, str(max_tokens)], cwd=root, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_size(n: int, reps: int, real_tsne: bool, keep: str = "", map_tokens: int = 20_000) -> dict:
    path = keep or scratch_dir(f"vli-bench-scale-{n}-")
    t0 = time.perf_counter()
    built = build(path, n, chunk=64, fast_tsne=not real_tsne, quiet=True, **SHAPE)
    row = {"n": n, "build_s": time.perf_counter() - t0, "disk_mb_per_ex": built["disk_mb"] / n}
    row["nn_med"], row["nn_p95"] = nearest_cost(path)
    row["map"] = token_map_cost(path, map_tokens)
    row["views"] = view_costs(build_views_db(os.path.join(scratch_dir(f"vli-bench-views-{n}-"), "db"), n), reps)
    shape = db_shape(path)
    server = start_server(path)
    try:
        row["startup_s"] = server.ready_seconds
        row["rss_start_mb"], row["anon_start_mb"] = rss_mb(server.proc.pid), anon_mb(server.proc.pid)
        rep = Replayer(server.url)
        rep.page_load()
        for ex in shape["ex_ids"][:100]:
            rep.interact({("example-select", "value"): ex})
        rep.close()
        row["rss_100_mb"], row["anon_100_mb"] = rss_mb(server.proc.pid), anon_mb(server.proc.pid)
        row["lat"] = {k: stats_ms([c.seconds for c in v]) for k, v in measure(server.url, shape, reps, only=KEY).items()}
        row["rss_end_mb"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 2000])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--real-tsne", action="store_true", help="real t-SNE maps (much slower to build)")
    p.add_argument("--quick", action="store_true", help="N = 20, 100, 200 and 5 repetitions")
    p.add_argument("--map-tokens", type=int, default=20_000, help="tokens of the token map (default 20 000)")
    args = p.parse_args(argv)
    sizes, reps = ([20, 100, 200], 5) if args.quick else (args.sizes, args.reps)
    print(f"machine: {machine()}")
    print(f"shape: {SHAPE['layers']} layers x {SHAPE['heads']} heads, 250 tokens, hidden {SHAPE['hidden']}"
          f"{'' if args.real_tsne else ' (PCA maps)'}; {reps} repetitions per interaction")
    rows = []
    for n in sizes:
        row = one_size(n, reps, args.real_tsne, map_tokens=args.map_tokens)
        rows.append(row)
        print(f"N={n}: built in {row['build_s']:.0f} s, {row['disk_mb_per_ex']:.2f} MB/example", flush=True)
    print(f"\n{'N':>6s} {'start s':>8s} {'RSS MB':>7s} {'RSS100':>7s} {'RSSend':>7s} {'own':>5s} {'own100':>6s} {'nn med':>7s} {'nn p95':>7s}  "
          + "  ".join(f"{k[:14]:>14s}" for k in KEY))
    for r in rows:
        lat = "  ".join(f"{r['lat'].get(k, (np.nan, np.nan))[0]:6.0f}/{r['lat'].get(k, (np.nan, np.nan))[1]:<7.0f}"
                        for k in KEY)
        print(f"{r['n']:6d} {r['startup_s']:8.2f} {r['rss_start_mb']:7.0f} {r['rss_100_mb']:7.0f} {r['rss_end_mb']:7.0f} "
              f"{r['anon_start_mb']:5.0f} {r['anon_100_mb']:6.0f} "
              f"{r['nn_med']:7.1f} {r['nn_p95']:7.1f}  {lat}")
    print("(latencies: median/p95 ms of the whole cascade; RSS100 after visiting min(N, 100) examples; "
          "own: the server's own memory (RssAnon), without the mapped database pages; "
          "nn: nearest_other_modality ms)")
    print(f"\n{'N':>6s} {'map tokens':>10s} {'fit s':>7s} {'peak MB':>8s}   (token map of the last layer)")
    for r in rows:
        print(f"{r['n']:6d} {r['map']['tokens']:10d} {r['map']['fit_s']:7.1f} {r['map']['peak_mb']:8.0f}")
    views = rows[0]["views"]
    print(f"\ndataset views, {views['layers']} layers x {views['heads']} heads, {views['statistics']} statistics "
          "(p50/p95 ms; index: MB, ms to read it once per database version)")
    print(f"{'N':>6s} {'index':>12s}  " + "  ".join(f"{k:>16s}" for k in VIEWS))
    for r in rows:
        v = r["views"]
        print(f"{r['n']:6d} {v['index_mb']:5.1f}/{v['load_ms']:<6.0f}  "
              + "  ".join(f"{v['views'][k][0]:8.1f}/{v['views'][k][1]:<7.1f}" for k in VIEWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
