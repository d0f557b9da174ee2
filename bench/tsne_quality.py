"""Time and quality of the t-SNE maps of app/database/tsne.py against scikit-learn.

Prints, per method and data set, the seconds for all maps of one example and the trustworthiness
(sklearn.manifold.trustworthiness, n_neighbors=5) per map minus that of scikit-learn's default
`TSNE(random_state=0)` on the same map (mean and worst over the maps).

    python bench/tsne_quality.py            # 13 maps x 250 and x 600 points, all methods (minutes)
    python bench/tsne_quality.py --quick    # 13 x 250 clustered, ours only vs sklearn on 5 maps (<1 min idle)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.manifold import TSNE, trustworthiness

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from app.database.tsne import tsne_maps  # noqa: E402


def clustered_hidden(n_maps=13, n=250, dim=768, n_clusters=6, seed=0) -> np.ndarray:
    """Hidden-state-like data: tokens in clusters that drift and regroup across layers.

    Two groupings of the tokens (think "modality" early and "meaning" late); layer l mixes their
    cluster centres with weight l / (n_maps - 1), adds a layer-specific direction and per-token noise,
    plus a few heavy outlier dimensions as real transformers have.
    """
    rng = np.random.default_rng(seed)
    early = rng.integers(0, 2, n)
    late = rng.integers(0, n_clusters, n)
    c_early = rng.normal(0, 1, (2, dim)) * 3
    c_late = rng.normal(0, 1, (n_clusters, dim)) * 3
    token = rng.normal(0, 1, (n, dim))
    out = np.empty((n_maps, n, dim), dtype=np.float32)
    for m in range(n_maps):
        a = m / max(n_maps - 1, 1)
        drift = rng.normal(0, 1, dim) * 2
        x = (1 - a) * c_early[early] + a * c_late[late] + drift + token * (1.0 + 0.5 * a)
        x[:, :3] *= 20  # outlier dimensions
        out[m] = x
    return out


def noise_hidden(n_maps=13, n=250, dim=768, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_maps, n, dim)).astype(np.float32)


def sklearn_maps(hidden: np.ndarray) -> np.ndarray:
    n = hidden.shape[1]
    return np.stack([TSNE(random_state=0, perplexity=min(30.0, (n - 1) / 3)).fit_transform(h) for h in hidden])


def opentsne_maps(hidden: np.ndarray) -> np.ndarray:
    import openTSNE

    n = hidden.shape[1]
    return np.stack([
        np.asarray(openTSNE.TSNE(perplexity=min(30.0, (n - 1) / 3), random_state=0, n_jobs=2).fit(h))
        for h in hidden
    ])


def trust(hidden: np.ndarray, maps: np.ndarray) -> np.ndarray:
    return np.array([trustworthiness(h, y, n_neighbors=5) for h, y in zip(hidden, maps)])


def timed(fn, hidden):
    t = time.perf_counter()
    maps = fn(hidden)
    return time.perf_counter() - t, maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one case, ours only, under a minute")
    args = ap.parse_args()

    tsne_maps(noise_hidden(2, 20, 8))  # compile or load the numba kernels outside the timings
    if args.quick:
        cases = [("clustered", clustered_hidden(n=250)[::3])]
        methods = {"ours": tsne_maps}
    else:
        cases = [(kind, gen(n=n)) for n in (250, 600) for kind, gen in
                 (("clustered", clustered_hidden), ("noise", noise_hidden))]
        cases.append(("clustered", clustered_hidden(n=14)))
        methods = {"ours": tsne_maps, "openTSNE": opentsne_maps}
    for n in (250,) if args.quick else (250, 600):
        t, _ = timed(tsne_maps, clustered_hidden(n=n))
        print(f"ours, all 13 maps x {n} x 768: {t:.3f} s (1-min load average {os.getloadavg()[0]:.1f})")

    print(f"{'method':10s} {'data':10s} {'maps':>4s} {'n':>4s} {'seconds':>8s} "
          f"{'trust':>6s} {'d mean':>7s} {'d worst':>7s}")
    for kind, hidden in cases:
        sk_t, sk_maps = timed(sklearn_maps, hidden)
        sk_trust = trust(hidden, sk_maps)
        print(f"{'sklearn':10s} {kind:10s} {hidden.shape[0]:4d} {hidden.shape[1]:4d} {sk_t:8.3f} "
              f"{sk_trust.mean():6.3f} {0:7.3f} {0:7.3f}")
        for name, fn in methods.items():
            t, maps = timed(fn, hidden)
            d = trust(hidden, maps) - sk_trust
            print(f"{name:10s} {kind:10s} {hidden.shape[0]:4d} {hidden.shape[1]:4d} {t:8.3f} "
                  f"{(sk_trust + d).mean():6.3f} {d.mean():+7.3f} {d.min():+7.3f}")


if __name__ == "__main__":
    main()
