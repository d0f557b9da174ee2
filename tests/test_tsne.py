"""t-SNE maps: shape, determinism, tiny maps, and quality against scikit-learn."""

import numpy as np
import pytest
from sklearn.manifold import TSNE, trustworthiness
from sklearn.neighbors import KNeighborsClassifier

from app.database.tsne import tsne_maps


def clusters(n_maps=2, n=60, dim=32, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    centres = rng.normal(0, 10, (k, dim))
    x = centres[labels][None] + rng.normal(0, 1, (n_maps, n, dim))
    return x.astype(np.float32), labels


def test_shape_and_dtype():
    x, _ = clusters(n_maps=3, n=40)
    y = tsne_maps(x)
    assert y.shape == (3, 40, 2)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))


def test_deterministic():
    x, _ = clusters(n_maps=2, n=50)
    np.testing.assert_array_equal(tsne_maps(x), tsne_maps(x.copy()))
    np.testing.assert_array_equal(tsne_maps(x, seed=3), tsne_maps(x, seed=3))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 14])
def test_small_maps(n):
    x = np.random.default_rng(n).normal(size=(3, n, 16))
    y = tsne_maps(x)
    assert y.shape == (3, n, 2)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, tsne_maps(x))
    if n == 1:
        np.testing.assert_array_equal(y, 0)
    if n >= 2:
        assert np.ptp(y[0], axis=0).max() > 0  # points are not collapsed onto one


def test_identical_points_do_not_break():
    x = np.ones((2, 10, 8), dtype=np.float32)
    y = tsne_maps(x)
    assert y.shape == (2, 10, 2) and np.all(np.isfinite(y))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="n_maps, n_points, dim"):
        tsne_maps(np.zeros((5, 4)))
    bad = np.zeros((1, 5, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tsne_maps(bad)


def test_clusters_stay_separated():
    x, labels = clusters(n_maps=2, n=90, k=3)
    for y in tsne_maps(x):
        knn = KNeighborsClassifier(n_neighbors=5).fit(y, labels)
        assert knn.score(y, labels) > 0.97


def test_trustworthiness_close_to_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 80, 24)).astype(np.float32)
    x[:, :40] += 2.0
    ours = tsne_maps(x)
    for h, y in zip(x, ours):
        reference = TSNE(random_state=0).fit_transform(h)
        assert trustworthiness(h, y, n_neighbors=5) >= trustworthiness(h, reference, n_neighbors=5) - 0.02


def test_consecutive_maps_share_orientation():
    x, _ = clusters(n_maps=2, n=60)
    x[1] = x[0] + np.random.default_rng(5).normal(0, 0.01, x[0].shape)
    y = tsne_maps(x)
    # Nearly identical layers give nearly identical maps (up to scale; aligned, not rotated or mirrored).
    for axis in range(2):
        assert np.corrcoef(y[0][:, axis], y[1][:, axis])[0, 1] > 0.9
