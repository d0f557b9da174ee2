"""head_statistics against explicit loops, on examples with specials in the text and an unsorted grid."""
import math

import numpy as np
import pytest

from app.database.records import validate_record
from app.database.stats import STATISTICS, head_statistics
from helpers import make_record


def loop_statistics(attention, txt_len, special, coords, image_size, grid):
    """The documented definitions, one query and one key at a time."""
    n_layers, n_heads, n, _ = attention.shape
    text = [i for i in range(n) if i < txt_len and not special[i]]
    image = [i for i in range(n) if i >= txt_len and not special[i]]
    out = {key: np.full((n_layers, n_heads), np.nan) for key in STATISTICS}

    def mean_mass(a, queries, keys_of):
        if not queries:
            return math.nan
        total = 0.0
        for q in queries:
            total += sum(a[q, k] for k in keys_of(q))
        return total / len(queries)

    for layer in range(n_layers):
        for head in range(n_heads):
            a = attention[layer, head]
            both = bool(text) and bool(image)
            out["txt2img"][layer, head] = mean_mass(a, text, lambda q: image) if both else math.nan
            out["img2txt"][layer, head] = mean_mass(a, image, lambda q: text) if both else math.nan
            out["txt2txt"][layer, head] = mean_mass(a, text, lambda q: text)
            out["img2img"][layer, head] = mean_mass(a, image, lambda q: image)
            out["img2img_nodiag"][layer, head] = mean_mass(a, image, lambda q: [k for k in image if k != q])
            # the two directions weigh the same (the original VL-InterpreT's definition)
            out["cross_modal"][layer, head] = (
                (out["txt2img"][layer, head] + out["img2txt"][layer, head]) / 2 if both else math.nan)
            if both:
                out["intra_modal"][layer, head] = (out["txt2txt"][layer, head] + out["img2img"][layer, head]) / 2
            else:
                out["intra_modal"][layer, head] = mean_mass(a, text + image, lambda q: text if q in text else image)
            specials = [k for k in range(n) if special[k]]
            out["to_special"][layer, head] = mean_mass(a, text + image, lambda q: specials)
            entropies = [-sum(a[q, k] * math.log(a[q, k]) for k in range(n) if a[q, k] > 0) for q in text + image]
            out["entropy"][layer, head] = sum(entropies) / len(entropies) if entropies else math.nan
            out["distance"][layer, head] = loop_distance(a, coords, image_size, grid)
    return out


def loop_distance(a, coords, image_size, grid):
    if grid is None:
        return math.nan
    (h, w), (rows, cols) = image_size, grid
    centre = {i: ((c[0] + 0.5) * w / cols, (c[1] + 0.5) * h / rows) for i, c in enumerate(coords) if c is not None}
    distances = []
    for q in centre:
        mass = sum(a[q, k] for k in centre)
        if mass > 0:
            distances.append(sum(a[q, k] * math.dist(centre[q], centre[k]) for k in centre) / mass)
    return sum(distances) / len(distances) if distances else math.nan


CASES = {
    "specials in text, unsorted grid, image [CLS]": dict(
        text_tokens=["[CLS]", "a", "[SEP]", "b", "[SEP]"], grid=(2, 3), shuffle_image=True, image_cls=True),
    "plain": dict(n_text=3, grid=(1, 2)),
    "text-only": dict(n_text=4, grid=None),
    "image-only": dict(text_tokens=[], grid=(2, 2)),
    "one image token": dict(n_text=3, grid=(1, 1)),
    "only specials in text": dict(text_tokens=["[CLS]", "[SEP]"], grid=(2, 2)),
}


@pytest.mark.parametrize("case", CASES)
def test_vectorised_statistics_match_loops(case):
    record = validate_record(make_record(3, n_layers=3, n_heads=2, seed=5, **CASES[case]))
    got = head_statistics(record.attention, record.is_text, record.special, record.coords,
                          record.image.shape[:2], record.grids, record.patch_grid)
    want = loop_statistics(record.attention.astype(np.float64), record.txt_len, record.special, record.coords,
                           record.image.shape[:2], record.grid)
    assert list(got) == list(STATISTICS)
    for key in STATISTICS:
        assert got[key].shape == (3, 2) and got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_statistics_do_not_depend_on_the_input_order_of_patches():
    kwargs = dict(text_tokens=["[CLS]", "a", "[SEP]"], grid=(2, 3), image_cls=True)
    ordered = validate_record(make_record(1, **kwargs))
    raw = make_record(1, **kwargs)
    perm = [0, 1, 2, 3] + [4 + i for i in np.random.default_rng(0).permutation(6)]
    shuffled = dict(raw, tokens=[raw["tokens"][i] for i in perm],
                    img_coords=[raw["img_coords"][i - 3] for i in perm[3:]],
                    attention=raw["attention"][:, :, perm][:, :, :, perm],
                    hidden_states=raw["hidden_states"][:, perm])
    a = head_statistics(ordered.attention, ordered.is_text, ordered.special)
    b = head_statistics(*(lambda r: (r.attention, r.is_text, r.special))(validate_record(shuffled)))
    for key in STATISTICS:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6)


def test_missing_groups_give_nan_and_definitions_hold():
    text_only = validate_record(make_record(0, n_text=4, grid=None))
    stats = head_statistics(text_only.attention, text_only.is_text, text_only.special)
    for key in ("txt2img", "img2txt", "img2img", "img2img_nodiag", "cross_modal"):
        assert np.isnan(stats[key]).all(), key
    np.testing.assert_allclose(stats["intra_modal"], stats["txt2txt"], rtol=1e-6)
    # raw attention, not renormalised: all mass on [CLS] gives zero everywhere
    n = 6
    attention = np.zeros((1, 1, n, n), np.float32)
    attention[..., 0] = 1.0
    special = np.array([True, False, False, False, False, False])
    stats = head_statistics(attention, np.arange(n) < 3, special)
    assert all(stats[key][0, 0] == 0 for key in STATISTICS if key not in ("to_special", "distance"))
    assert stats["to_special"][0, 0] == 1  # ... and the special-token statistic says where it went


def test_cross_modal_weighs_both_directions_equally():
    """With many more image than text queries, pooling all queries would follow image → text alone."""
    txt_len, n = 2, 12
    attention = np.zeros((1, 1, n, n), np.float32)
    attention[0, 0, :txt_len, txt_len:] = 1 / (n - txt_len)     # text queries: all mass to the image
    attention[0, 0, txt_len:, txt_len:] = 1 / (n - txt_len)     # image queries: all mass to the image
    stats = head_statistics(attention, np.arange(n) < txt_len, np.zeros(n, bool))
    assert stats["txt2img"][0, 0] == pytest.approx(1) and stats["img2txt"][0, 0] == pytest.approx(0)
    assert stats["cross_modal"][0, 0] == pytest.approx(0.5)   # pooled: 2 / 12 = 0.167
    assert stats["intra_modal"][0, 0] == pytest.approx(0.5)   # (text → text 0 + image → image 1) / 2
