"""Time and quality of the t-SNE maps of app/database/tsne.py against scikit-learn.

Prints, per method and case, the seconds for all maps of the case (one tsne_maps call per example)
and the trustworthiness (sklearn.manifold.trustworthiness, n_neighbors=5) per map minus that of
scikit-learn's default `TSNE(random_state=0)` on the same map, perplexity clipped to (n - 1) / 3 as
ours (mean and worst over the maps). Cases: synthetic examples of 13 maps x 768 dims, clustered
(14, 30, 50, 100, 250, 600 points) or Gaussian noise (150, 250, 600 points), and every example and
layer of example_database2 (30 examples x 5 layers of about 48 tokens, hidden size 64).

    python bench/tsne_quality.py            # every case; openTSNE too where installed (minutes)
    python bench/tsne_quality.py --quick    # 5 maps of some cases, 6 database examples, ours only (<1 min idle)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.manifold import TSNE, trustworthiness
from threadpoolctl import threadpool_limits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from app.database.database import DatabaseError, VliLmdb  # noqa: E402
from app.database.tsne import tsne_maps, wait_until_compiled  # noqa: E402


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


def database_hidden(path: str, every: int = 1) -> list[np.ndarray]:
    """Every `every`-th example's hidden states, (n_layers + 1, n_tokens, hidden) each."""
    with VliLmdb(path) as db:
        return [np.stack([db.hidden_states(ex_id, layer) for layer in range(db.n_layers + 1)])
                for ex_id in db.example_ids()[::every]]


def sklearn_maps(hidden: np.ndarray) -> np.ndarray:
    n = hidden.shape[1]
    # One OpenMP thread: with two, each of its ~1000 iterations meets a barrier, and on a busy
    # machine a map of 250 points took 10-25 s instead of 1.3 s.
    with threadpool_limits(1, user_api="openmp"):
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


def run_case(fn, examples: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """Seconds for `fn` on every example of a case, and the trustworthiness of every map."""
    seconds, trusts = 0.0, []
    for hidden in examples:
        t = time.perf_counter()
        maps = fn(hidden)
        seconds += time.perf_counter() - t
        trusts.append(trust(hidden, maps))
    return seconds, np.concatenate(trusts)


def cases(quick: bool, db_path: str) -> list[tuple[str, list[np.ndarray]]]:
    """(name, examples): each example is one tsne_maps call of (n_maps, n_points, dim)."""
    if quick:
        return [("clustered", [clustered_hidden(n=250)[::3]]), ("clustered", [clustered_hidden(n=50)[::3]]),
                ("noise", [noise_hidden(n=150)[::3]]), ("database", database_hidden(db_path, every=5))]
    out = [(kind, [gen(n=n)]) for n in (250, 600) for kind, gen in
           (("clustered", clustered_hidden), ("noise", noise_hidden))]
    out += [("clustered", [clustered_hidden(n=n)]) for n in (14, 30, 50, 100)]
    out += [("noise", [noise_hidden(n=150)]), ("database", database_hidden(db_path))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller cases, ours only, under a minute")
    ap.add_argument("--db", default=os.path.join(ROOT, "example_database2"),
                    help="database whose hidden states make the 'database' case (default: example_database2)")
    args = ap.parse_args()
    try:
        all_cases = cases(args.quick, args.db)
    except DatabaseError as e:
        sys.exit(f"error: {e}")

    methods = {"ours": tsne_maps}
    if not args.quick:
        try:
            import openTSNE  # noqa: F401, PLC0415 - optional: only compared where installed
            methods["openTSNE"] = opentsne_maps
        except ImportError:
            print("openTSNE is not installed (pip install openTSNE): compared with sklearn only")
    wait_until_compiled(print)  # compile or load the numba kernels outside the timings
    tsne_maps(noise_hidden(2, 20, 8))  # and start numba's threads
    for n in (250,) if args.quick else (250, 600):
        t, _ = timed(tsne_maps, clustered_hidden(n=n))
        print(f"ours, all 13 maps x {n} x 768: {t:.3f} s (1-min load average {os.getloadavg()[0]:.1f})")

    print(f"{'method':10s} {'data':10s} {'maps':>4s} {'n':>4s} {'seconds':>8s} "
          f"{'trust':>6s} {'d mean':>7s} {'d worst':>7s}")
    for kind, examples in all_cases:
        n_maps = sum(len(h) for h in examples)
        n = round(np.mean([h.shape[1] for h in examples]))  # database examples differ in tokens
        sk_t, sk_trust = run_case(sklearn_maps, examples)
        print(f"{'sklearn':10s} {kind:10s} {n_maps:4d} {n:4d} {sk_t:8.3f} {sk_trust.mean():6.3f} {0:7.3f} {0:7.3f}")
        for name, fn in methods.items():
            t, trusts = run_case(fn, examples)
            d = trusts - sk_trust
            print(f"{name:10s} {kind:10s} {n_maps:4d} {n:4d} {t:8.3f} {trusts.mean():6.3f} "
                  f"{d.mean():+7.3f} {d.min():+7.3f}")


if __name__ == "__main__":
    main()
