"""preprocess() throughput by stage, and the quality of the stored t-SNE maps.

    python bench/preprocess.py [-n 8] [--quick]

Builds ``n`` synthetic 250-token examples (12 layers x 12 heads, hidden 768; bench/make_db.py)
through the public API, prints seconds per example for each stage of ``VliLmdb.preprocess``
(``PreprocessReport.stage_seconds``; the compute stages of the next example overlap the write of
the current one, so they can sum to more than the total), MB/example on disk, and the
trustworthiness (sklearn.manifold.trustworthiness, k = 5) of the stored maps next to scikit-learn's
default TSNE on the same stored hidden states (bench/tsne_quality.py's helpers).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, scratch_dir  # noqa: E402
from bench.make_db import build  # noqa: E402
from bench.tsne_quality import sklearn_maps, trust  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=8, help="examples (default 8)")
    p.add_argument("--maps", type=int, nargs="*", default=None, help="layers compared with scikit-learn")
    p.add_argument("--quick", action="store_true", help="2 examples, 3 maps of one example compared")
    args = p.parse_args(argv)
    n = 2 if args.quick else args.n
    out = scratch_dir("vli-bench-pre-")
    print(f"machine: {machine()}")
    from app.database.tsne import tsne_maps
    tsne_maps(np.random.default_rng(0).normal(size=(2, 20, 8)).astype(np.float32))  # import torch first
    r = build(out, n, chunk=n, quiet=True)
    total = r["preprocess_s"] / n
    print(f"preprocess: {n} examples of 12x12 heads, 250 tokens, hidden 768: {total:.3f} s/example "
          f"({1 / total:.2f} examples/s), {r['disk_mb'] / n:.1f} MB/example on disk")
    for stage, s in r["stages"].items():
        print(f"  {stage:12s} {s / n:7.3f} s/example")

    from app.database.database import VliLmdb
    db = VliLmdb(out)
    try:
        layers = args.maps if args.maps else ([0, 6, 12] if args.quick else list(range(0, 13, 2)))
        exs = db.example_ids()[:1 if args.quick else 2]
        ours, theirs = [], []
        t_sk = 0.0
        for ex in exs:
            hidden = np.stack([db.hidden_states(ex, l) for l in layers]).astype(np.float32)
            maps = np.stack([db.tsne(ex, l) for l in layers])
            t = time.perf_counter()
            sk = sklearn_maps(hidden)
            t_sk += time.perf_counter() - t
            ours.append(trust(hidden, maps))
            theirs.append(trust(hidden, sk))
        ours, theirs = np.concatenate(ours), np.concatenate(theirs)
        print(f"trustworthiness (k=5) over {len(ours)} maps (examples {exs}, layers {layers}): "
              f"stored maps {ours.mean():.3f} (worst {ours.min():.3f}), scikit-learn TSNE {theirs.mean():.3f} "
              f"(worst {theirs.min():.3f}); difference mean {np.mean(ours - theirs):+.3f}, "
              f"worst {np.min(ours - theirs):+.3f}; scikit-learn took {t_sk / len(ours):.2f} s/map")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
