"""2-D t-SNE maps of one example's hidden states, one map per layer.

Provisional implementation (scikit-learn per map); a faster batched version replaces it.
"""

from __future__ import annotations

import numpy as np


def tsne_maps(hidden: np.ndarray, seed: int = 0) -> np.ndarray:
    """Embed each map's points in 2-D.

    hidden: (n_maps, n_points, dim) float. Returns float32 (n_maps, n_points, 2).
    Deterministic for a given input and seed; works for any n_points >= 1.
    """
    from sklearn.manifold import TSNE

    hidden = np.asarray(hidden, dtype=np.float64)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (n_maps, n_points, dim), got shape {hidden.shape}")
    n_maps, n, _ = hidden.shape
    out = np.zeros((n_maps, n, 2), dtype=np.float32)
    if n < 4:
        for m in range(n_maps):
            out[m] = _pca2(hidden[m])
        return out
    perplexity = min(30.0, (n - 1) / 3.0)
    for m in range(n_maps):
        out[m] = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(hidden[m])
    return out


def _pca2(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    out = np.zeros((x.shape[0], 2))
    if x.shape[0] < 2:
        return out
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(2, s.size)
    out[:, :k] = u[:, :k] * s[:k]
    return out
