"""Build a synthetic VL-InterpreT database through the public record API, and time it.

    python bench/make_db.py OUT [-n 20] [--layers 12 --heads 12 --text 40 --grid 14 15 --hidden 768
                                 --image 384] [--fast-tsne] [--quick]

Records are realistic in shape and structure: softmax attention rows (a local, a [CLS]-sink and a
random component, sharper in later layers), hidden states whose tokens sit in clusters that drift
from a "modality" grouping to a "meaning" grouping over the layers, and an image with shapes on a
gradient. Each is written as ``db[str(ex_id)] = pickle.dumps(record)`` and converted with
``db.preprocess()`` (in chunks of ``--chunk`` records, so pending raw records never pile up).

Cloning one preprocessed example under new ids would need writes below the public API (the
tables of app/database/keys.py), so it is not offered: every example is generated and preprocessed.
``--fast-tsne`` replaces the t-SNE stage (in this process only) by the first two principal
components, for databases whose purpose is the app's scaling, not preprocess timings.

Prints examples/s (generation and preprocess separately) and MB/example on disk.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import du_mb, machine  # noqa: E402

WORDS = ("what color is the shape left of circle square triangle red blue green how many are there "
         "above below small large object on right side a an in picture image show me which").split()


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def synthetic_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a colour gradient with a few filled rectangles and discs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    img = np.stack([base[0] + 50 * xx, base[1] + 50 * yy, base[2] + 30 * (xx + yy)], axis=-1)
    for _ in range(rng.integers(2, 5)):
        colour = rng.uniform(0, 255, 3)
        cx, cy, r = rng.uniform(0.15, 0.85, 2).tolist() + [float(rng.uniform(0.06, 0.18))]
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        else:
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
        img[mask] = colour
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_record(ex_id: int, n_layers: int = 12, n_heads: int = 12, n_text: int = 40,
                     grid: tuple[int, int] = (14, 15), hidden: int = 768, image_size: int = 384,
                     seed: int = 0) -> dict:
    """One record of the documented format (docs/ARCHITECTURE.md), deterministic per (seed, ex_id).

    n_text counts [CLS] and [SEP]; grid is (rows, cols) of image patches listed row-major.
    """
    rng = np.random.default_rng(seed * 1_000_003 + ex_id)
    n_words = max(n_text - 2, 0)
    text = ["[CLS]"] + [WORDS[k] for k in rng.integers(0, len(WORDS), n_words)] + ["[SEP]"]
    text = text[:n_text]
    rows, cols = grid
    coords = [(x, y) for y in range(rows) for x in range(cols)]
    tokens = text + [f"patch_{x}_{y}" for x, y in coords]
    n, t = len(tokens), len(text)

    # Attention (n_layers, n_heads, n, n): local + sink + random logits, sharper with depth.
    pos = np.zeros((n, 2), np.float32)
    pos[:t, 0] = np.arange(t)
    if coords:
        pos[t:] = np.asarray(coords, np.float32) + 1000.0  # image tokens far from text tokens
    dist = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)
    local = -np.minimum(dist, 50.0) / 3.0
    logits = rng.normal(0, 1, (n_layers, n_heads, n, n)).astype(np.float32)
    mix = rng.uniform(0, 2, (n_layers, n_heads, 1, 1)).astype(np.float32)
    logits += mix * local[None, None]
    sink = rng.uniform(0, 4, (n_layers, n_heads, 1)).astype(np.float32)
    logits[..., 0] += sink
    sharp = np.linspace(1.0, 3.0, n_layers, dtype=np.float32)[:, None, None, None]
    attention = softmax(logits * sharp)

    # Hidden states (n_layers + 1, n, hidden): clusters drifting from modality to meaning.
    n_clusters = 6
    early = np.r_[np.zeros(t, int), np.ones(n - t, int)]
    late = rng.integers(0, n_clusters, n)
    c_early = rng.normal(0, 3, (2, hidden)).astype(np.float32)
    c_late = rng.normal(0, 3, (n_clusters, hidden)).astype(np.float32)
    token = rng.normal(0, 1, (n, hidden)).astype(np.float32)
    states = np.empty((n_layers + 1, n, hidden), np.float32)
    for layer in range(n_layers + 1):
        a = layer / max(n_layers, 1)
        drift = rng.normal(0, 2, hidden).astype(np.float32)
        states[layer] = (1 - a) * c_early[early] + a * c_late[late] + drift + token * (1.0 + 0.5 * a)
        states[layer, :, :3] *= 20  # outlier dimensions, as real transformers have

    return {
        "ex_id": ex_id,
        "image": synthetic_image(image_size, rng),
        "tokens": tokens,
        "txt_len": t,
        "img_coords": coords,
        "attention": attention,
        "hidden_states": states,
        "accuracy": bool(rng.random() < 0.7),
        "prediction": {"answer": str(WORDS[ex_id % len(WORDS)]), "score": float(rng.random()), "label": None},
        "text": " ".join(text[1:-1]) + "?",
    }


def pca_tsne_maps(hidden: np.ndarray) -> np.ndarray:
    """A fast stand-in for app.database.tsne.tsne_maps (--fast-tsne): first two principal components."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    x = np.asarray(hidden, np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    out = np.empty(x.shape[:2] + (2,), np.float32)
    # One BLAS thread: on a busy 2-core machine OpenBLAS's threads made this SVD 18x slower.
    with threadpool_limits(1):
        for m in range(x.shape[0]):
            u, s, _ = np.linalg.svd(x[m], full_matrices=False)
            out[m] = u[:, :2] * s[:2]
    return out


def build(out: str, n: int, *, layers: int = 12, heads: int = 12, text: int = 40, grid=(14, 15),
          hidden: int = 768, image: int = 384, chunk: int = 16, fast_tsne: bool = False, seed: int = 0,
          quiet: bool = False) -> dict:
    """Create ``out`` from scratch with ``n`` examples; return the timings (seconds, MB)."""
    from app.database.database import VliLmdb

    if fast_tsne:
        import app.database.analyses.tsne_maps as tsne_analysis  # noqa: PLC0415 - in-process stand-in, see the docstring
        tsne_analysis.tsne_maps = pca_tsne_maps
        tsne_analysis.tsne_ready = lambda: None  # the kernels are not used
    if os.path.exists(out):
        shutil.rmtree(out)
    gen_s = pre_s = 0.0
    pickled = 0
    stages: dict[str, float] = {}
    db = VliLmdb(out, read_only=False)
    try:
        for start in range(0, n, chunk):
            t0 = time.perf_counter()
            for ex_id in range(start, min(start + chunk, n)):
                blob = pickle.dumps(synthetic_record(ex_id, layers, heads, text, tuple(grid), hidden, image, seed),
                                    protocol=pickle.HIGHEST_PROTOCOL)
                pickled += len(blob)
                db[str(ex_id)] = blob
            gen_s += time.perf_counter() - t0
            report = db.preprocess(progress=False)
            if report.failed:
                raise RuntimeError(f"preprocess failed: {report.failed}")
            pre_s += report.total_seconds
            for k, v in report.stage_seconds.items():
                stages[k] = stages.get(k, 0.0) + v
            if not quiet:
                print(f"  {min(start + chunk, n)}/{n} examples", file=sys.stderr, flush=True)
    finally:
        db.close()
    disk = du_mb(out)
    return {"n": n, "generate_s": gen_s, "preprocess_s": pre_s, "stages": stages, "disk_mb": disk,
            "pickle_mb": pickled / 2**20}


def add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--text", type=int, default=40, help="text tokens, [CLS] and [SEP] included (default 40)")
    p.add_argument("--grid", type=int, nargs=2, default=(14, 15), metavar=("ROWS", "COLS"),
                   help="image patch grid (default 14 x 15 = 210 patches)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--image", type=int, default=384, help="image side in pixels (default 384)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="database folder (re-created)")
    p.add_argument("-n", type=int, default=20, help="number of examples (default 20)")
    add_shape_args(p)
    p.add_argument("--chunk", type=int, default=16, help="records written before each preprocess()")
    p.add_argument("--fast-tsne", action="store_true", help="PCA instead of t-SNE (app-scaling databases)")
    p.add_argument("--quick", action="store_true", help="at most 5 examples")
    args = p.parse_args(argv)
    n = min(args.n, 5) if args.quick else args.n
    r = build(args.out, n, layers=args.layers, heads=args.heads, text=args.text, grid=args.grid,
              hidden=args.hidden, image=args.image, chunk=args.chunk, fast_tsne=args.fast_tsne)
    tokens = args.text + args.grid[0] * args.grid[1]
    print(f"machine: {machine()}")
    print(f"shape: {args.layers} layers x {args.heads} heads, {tokens} tokens ({args.text} text + "
          f"{args.grid[0]}x{args.grid[1]} patches), hidden {args.hidden}, {args.image}x{args.image} image"
          f"{', t-SNE replaced by PCA' if args.fast_tsne else ''}")
    print(f"examples          {n}")
    print(f"generate          {n / r['generate_s']:.2f} examples/s ({r['generate_s'] / n:.3f} s/example, "
          f"pickle {r['pickle_mb'] / n:.1f} MB/example)")
    print(f"preprocess        {n / r['preprocess_s']:.2f} examples/s ({r['preprocess_s'] / n:.3f} s/example)")
    print("  stages (s/example, summed; compute overlaps the write): " +
          ", ".join(f"{k} {v / n:.3f}" for k, v in r["stages"].items()))
    print(f"disk              {r['disk_mb'] / n:.2f} MB/example ({r['disk_mb']:.1f} MB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
