"""app.database.analysis against hand-made examples with exact values and against naive loops."""
import math

import numpy as np
import pytest
import torch

from app.database.analysis import (
    attention_entropy,
    attention_rollout,
    auc,
    deletion_order,
    gradient_relevancy,
    mean_attention_distance,
)
from tiny_vilt import build_tiny_vilt


def random_attention(seed, n_layers=3, n_heads=2, n=6, zeros=False):
    """Row-stochastic (layers, heads, n, n) float32; with ``zeros`` a third of the weights are exactly 0."""
    rng = np.random.default_rng(seed)
    weights = rng.random((n_layers, n_heads, n, n)) ** 3
    if zeros:
        weights[rng.random(weights.shape) < 1 / 3] = 0.0
        weights[..., 0] += 1e-3  # no empty row
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def matmul_loops(a, b):
    n, m, p = len(a), len(b), len(b[0])
    return [[sum(a[i][k] * b[k][j] for k in range(m)) for j in range(p)] for i in range(n)]


# ---------------------------------------------------------------------------------------------- rollout
def rollout_loops(attention):
    """Abnar & Zuidema, one entry at a time: R_l = Â_l · R_{l-1}."""
    n_layers, n_heads, n, _ = attention.shape
    result, previous = [], None
    for layer in range(n_layers):
        mixed = [[0.5 * sum(float(attention[layer, h, q, k]) for h in range(n_heads)) / n_heads
                  + (0.5 if q == k else 0.0) for k in range(n)] for q in range(n)]
        mixed = [[value / sum(row) for value in row] for row in mixed]
        previous = mixed if previous is None else matmul_loops(mixed, previous)
        result.append(previous)
    return np.array(result)


def test_rollout_multiplies_each_layer_on_the_left():
    # layer 1: both tokens read token 0; layer 2: both read token 1.
    # Â_1 = [[1, 0], [.5, .5]], Â_2 = [[.5, .5], [0, 1]]: query 0 after layer 2 keeps half of itself
    # (all token 0) and takes half of token 1 after layer 1 (half token 0): 3/4 from token 0.
    attention = np.array([[[[1, 0], [1, 0]]], [[[0, 1], [0, 1]]]], dtype=np.float32)
    rollout = attention_rollout(attention)
    assert rollout.shape == (2, 2, 2) and rollout.dtype == np.float32
    np.testing.assert_array_equal(rollout[0], [[1, 0], [0.5, 0.5]])
    np.testing.assert_array_equal(rollout[1], [[0.75, 0.25], [0.5, 0.5]])  # Â_1 · Â_2 = [[.5, .5], [.25, .75]]


def test_rollout_means_the_heads_before_adding_the_identity():
    attention = np.array([[[[1, 0], [0, 1]], [[0, 1], [1, 0]]]], dtype=np.float32)  # mean: uniform
    np.testing.assert_allclose(attention_rollout(attention)[0], [[0.75, 0.25], [0.25, 0.75]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollout_matches_loops_and_rows_sum_to_one(seed):
    attention = random_attention(seed, n_layers=4, n_heads=3, n=5)
    attention[1] *= 0.97  # rows that do not quite sum to 1 (as stored in float16) are renormalised
    rollout = attention_rollout(attention)
    np.testing.assert_allclose(rollout, rollout_loops(attention), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-6)


def test_rollout_of_identity_attention_is_the_identity():
    attention = np.broadcast_to(np.eye(4, dtype=np.float32), (3, 2, 4, 4))
    np.testing.assert_array_equal(attention_rollout(attention), np.broadcast_to(np.eye(4), (3, 4, 4)))


def test_rollout_refuses_bad_input():
    with pytest.raises(ValueError, match=r"attention: expected .*got shape \(2, 3, 3\)"):
        attention_rollout(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="attention: negative weight"):
        attention_rollout(-np.ones((1, 1, 2, 2)))


# ------------------------------------------------------------------------------------ attention distance
def distance_loops(attention, coords, image_size, grid):
    height, width = image_size
    rows, cols = grid
    image = [i for i, c in enumerate(coords) if c is not None]
    centre = {i: ((coords[i][0] + 0.5) * width / cols, (coords[i][1] + 0.5) * height / rows) for i in image}
    n_layers, n_heads = attention.shape[:2]
    out = np.full((n_layers, n_heads), np.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            per_query = []
            for q in image:
                mass = sum(float(attention[layer, head, q, k]) for k in image)
                if mass == 0:
                    continue
                per_query.append(sum(float(attention[layer, head, q, k]) * math.dist(centre[q], centre[k])
                                     for k in image) / mass)
            if per_query:
                out[layer, head] = sum(per_query) / len(per_query)
    return out


def two_patch_attention(rows):
    """One layer, one head; tokens: text, patch a, patch b."""
    return np.array([[rows]], dtype=np.float32)


@pytest.mark.parametrize("image_size, grid, coords, pitch", [
    ((10, 40), (1, 2), [(0, 0), (1, 0)], 20.0),   # side by side: W / cols
    ((30, 8), (2, 1), [(0, 0), (0, 1)], 15.0),    # one above the other: H / rows
    ((6, 8), (2, 2), [(0, 0), (1, 1)], 5.0),      # diagonal of a 4 x 3 cell: 5
])
def test_distance_to_the_other_patch_is_the_pitch(image_size, grid, coords, pitch):
    others = two_patch_attention([[1, 0, 0], [0.4, 0, 0.6], [0.1, 0.9, 0]])  # patches read text and each other
    got = mean_attention_distance(others, [None] + coords, image_size, grid)
    assert got.shape == (1, 1) and got.dtype == np.float32
    assert got[0, 0] == pytest.approx(pitch, rel=1e-6)  # text mass renormalised away
    halves = two_patch_attention([[1, 0, 0], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25]])
    assert mean_attention_distance(halves, [None] + coords, image_size, grid)[0, 0] == pytest.approx(pitch / 2)
    selves = two_patch_attention([[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]])
    assert mean_attention_distance(selves, [None] + coords, image_size, grid)[0, 0] == 0.0


def test_distance_skips_queries_that_give_no_mass_to_the_image():
    attention = two_patch_attention([[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0]])  # patch a reads only text
    coords = [None, (0, 0), (1, 0)]
    assert mean_attention_distance(attention, coords, (10, 40), (1, 2))[0, 0] == pytest.approx(20.0)
    nothing = two_patch_attention([[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    assert np.isnan(mean_attention_distance(nothing, coords, (10, 40), (1, 2))[0, 0])


def test_distance_is_nan_without_image_tokens():
    got = mean_attention_distance(random_attention(0, n=3), [None] * 3, (10, 10), None)
    assert got.shape == (3, 2) and np.isnan(got).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_distance_matches_loops(seed):
    rng = np.random.default_rng(seed)
    grid = (3, 4)
    cells = [(x, y) for y in range(grid[0]) for x in range(grid[1])]
    kept = [cells[i] for i in rng.permutation(len(cells))[:7]]  # a sampled, unsorted subset
    coords = [None, None, None] + kept[:3] + [None] + kept[3:]  # text, patches, image [CLS], patches
    attention = random_attention(seed, n_layers=2, n_heads=3, n=len(coords), zeros=True)
    attention[0, 1, 4, [3, 4, 5, 7, 8, 9, 10]] = 0  # one query with no image mass
    attention[0, 1, 4] /= attention[0, 1, 4].sum()
    want = distance_loops(attention, coords, (45, 64), grid)
    np.testing.assert_allclose(mean_attention_distance(attention, coords, (45, 64), grid), want, rtol=1e-5)


def test_distance_refuses_bad_input():
    attention = random_attention(0, n=3)
    with pytest.raises(ValueError, match="coords: 2 entries for 3 tokens"):
        mean_attention_distance(attention, [None, (0, 0)], (10, 10), (1, 1))
    with pytest.raises(ValueError, match=r"coords: token 2 has coordinate \(2, 0\), outside the 1 x 2 grid"):
        mean_attention_distance(attention, [None, (0, 0), (2, 0)], (10, 10), (1, 2))
    with pytest.raises(ValueError, match="grid: expected a positive"):
        mean_attention_distance(attention, [None, (0, 0), (1, 0)], (10, 10), (0, 2))


# --------------------------------------------------------------------------------------------- entropy
def entropy_loops(attention, special):
    n_layers, n_heads, n, _ = attention.shape
    queries = [q for q in range(n) if special is None or not special[q]]
    out = np.full((n_layers, n_heads), np.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            if queries:
                out[layer, head] = sum(
                    -sum(float(p) * math.log(float(p)) for p in attention[layer, head, q] if p > 0)
                    for q in queries) / len(queries)
    return out


def test_entropy_of_uniform_rows_is_log_n_and_of_one_hot_rows_zero():
    uniform = np.full((2, 3, 5, 5), 0.2, dtype=np.float32)
    got = attention_entropy(uniform)
    assert got.shape == (2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, math.log(5), rtol=1e-6)
    np.testing.assert_array_equal(attention_entropy(np.broadcast_to(np.eye(5, dtype=np.float32), (2, 3, 5, 5))), 0)


def test_entropy_leaves_special_tokens_out_as_queries_only():
    # token 0 is special; query 1 splits its mass between the special key and key 2: log 2 nats.
    attention = np.array([[[[1 / 3, 1 / 3, 1 / 3], [0.5, 0, 0.5], [0, 0, 1]]]], dtype=np.float32)
    special = np.array([True, False, False])
    assert attention_entropy(attention, special)[0, 0] == pytest.approx(math.log(2) / 2)
    assert attention_entropy(attention)[0, 0] == pytest.approx((math.log(3) + math.log(2)) / 3)
    assert np.isnan(attention_entropy(attention, np.ones(3, dtype=bool))[0, 0])


@pytest.mark.parametrize("special", [None, [True, False, False, True, False, False, True]])
def test_entropy_matches_loops(special):
    attention = random_attention(3, n=7, zeros=True)
    special = None if special is None else np.array(special)
    np.testing.assert_allclose(attention_entropy(attention, special), entropy_loops(attention, special),
                               rtol=1e-5)


def test_entropy_refuses_a_special_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"special: expected shape \(6,\)"):
        attention_entropy(random_attention(0), np.zeros(5, dtype=bool))


# ---------------------------------------------------------------------------------- gradient relevancy
def relevancy_loops(attentions, gradients):
    n_layers, n_heads, n, _ = attentions.shape
    relevancy = [[1.0 if q == k else 0.0 for k in range(n)] for q in range(n)]
    for layer in range(n_layers):
        cam = [[sum(max(float(gradients[layer, h, q, k]) * float(attentions[layer, h, q, k]), 0.0)
                    for h in range(n_heads)) / n_heads for k in range(n)] for q in range(n)]
        added = matmul_loops(cam, relevancy)
        relevancy = [[relevancy[q][k] + added[q][k] for k in range(n)] for q in range(n)]
    return np.array(relevancy)


def test_relevancy_of_two_layers_by_hand():
    # layer 1: token 1 is relevant to query 0; layer 2: token 0 to query 1. Each head's negative
    # products are clamped away before the two heads are averaged (averaging first would give
    # (4 - 2) / 2 = 1 instead of (4 + 0) / 2 = 2 at layer 1).
    attentions = np.array([[[[0, 1], [0, 1]], [[0, 1], [0, 1]]],
                           [[[1, 0], [1, 0]], [[1, 0], [1, 0]]]], dtype=np.float32)
    gradients = np.array([[[[0, 4], [0, 0]], [[0, -2], [0, -3]]],
                          [[[0, 0], [2, 0]], [[-1, 0], [2, 0]]]], dtype=np.float32)
    relevancy = gradient_relevancy(attentions, gradients)
    assert relevancy.shape == (2, 2) and relevancy.dtype == np.float32
    # R1 = I + [[0, 2], [0, 0]] = [[1, 2], [0, 1]]; Ā2 = [[0, 0], [2, 0]]; R2 = R1 + Ā2 · R1 = [[1, 2], [2, 5]]
    # (the other order, R1 + R1 · Ā2, would give [[5, 2], [2, 1]])
    np.testing.assert_array_equal(relevancy, [[1, 2], [2, 5]])


@pytest.mark.parametrize("seed", [0, 1])
def test_relevancy_matches_loops(seed):
    attentions = random_attention(seed, n_layers=3, n_heads=2, n=5)
    gradients = np.random.default_rng(seed + 10).normal(size=attentions.shape).astype(np.float32)
    np.testing.assert_allclose(gradient_relevancy(attentions, gradients), relevancy_loops(attentions, gradients),
                               rtol=1e-5, atol=1e-6)


def test_relevancy_with_no_positive_evidence_is_the_identity():
    attentions = random_attention(0)
    np.testing.assert_array_equal(gradient_relevancy(attentions, -attentions), np.eye(6))


def test_relevancy_refuses_gradients_of_another_shape():
    with pytest.raises(ValueError, match=r"gradients: shape \(3, 2, 5, 5\) differs"):
        gradient_relevancy(random_attention(0), random_attention(0, n=5))


def test_relevancy_on_a_tiny_vilt_matches_a_torch_computation(tmp_path):
    """Gradients from ``torch.autograd.grad`` on ``output_attentions`` fed to gradient_relevancy equal
    the rule computed in torch from gradients captured the way Chefer et al.'s code does (a hook on each
    layer's attention probabilities, filled by ``backward``)."""
    from transformers import ViltForQuestionAnswering

    model = ViltForQuestionAnswering.from_pretrained(build_tiny_vilt(tmp_path / "vqa"),
                                                     attn_implementation="eager").eval()
    torch.manual_seed(0)
    input_ids = torch.tensor([[2, 5, 6, 7, 8, 9, 25, 3]])  # [CLS] what color is the shape ? [SEP]
    pixel_values = torch.rand(1, 3, 64, 96) * 2 - 1  # 4 x 6 patches
    hooked = {}

    def keep_gradient(layer):
        def forward_hook(module, inputs, outputs):
            probabilities = outputs[1]
            hooked[layer] = [probabilities, None]
            probabilities.register_hook(lambda grad: hooked[layer].__setitem__(1, grad))
        return forward_hook

    handles = [block.attention.attention.register_forward_hook(keep_gradient(i))
               for i, block in enumerate(model.vilt.encoder.layer)]
    try:
        out = model(input_ids=input_ids, pixel_values=pixel_values, pixel_mask=torch.ones(1, 64, 96, dtype=torch.long),
                    output_attentions=True, return_dict=True)
        score = out.logits[0, int(out.logits[0].argmax())]
        attentions = out.attentions
        gradients = torch.autograd.grad(score, attentions, retain_graph=True)
        score.backward()
    finally:
        for handle in handles:
            handle.remove()

    got = gradient_relevancy(torch.stack([a[0] for a in attentions]).detach().numpy(),
                             torch.stack([g[0] for g in gradients]).numpy())

    n = attentions[0].shape[-1]
    assert n == 8 + 1 + 24
    relevancy = torch.eye(n, dtype=torch.float64)
    for layer in range(len(hooked)):
        probabilities, grad = hooked[layer]
        cam = (grad[0].double() * probabilities[0].detach().double()).clamp(min=0).mean(dim=0)
        relevancy = relevancy + cam @ relevancy
    want = relevancy.numpy()
    assert not np.allclose(want, np.eye(n))  # the gradients carry evidence
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ perturbation test
@pytest.mark.parametrize("positive", [True, False])
def test_deletion_order_matches_a_sort_with_ties_by_index(positive):
    relevance = np.array([0.3, 0.9, 0.3, -0.1, 0.9, 0.0, 0.3])
    sign = -1 if positive else 1
    want = sorted(range(len(relevance)), key=lambda i: (sign * relevance[i], i))
    got = deletion_order(relevance, positive=positive)
    assert got.tolist() == want
    assert want == ([1, 4, 0, 2, 6, 5, 3] if positive else [3, 5, 0, 2, 6, 1, 4])


def test_deletion_order_refuses_nan():
    with pytest.raises(ValueError, match="relevance: holds NaN"):
        deletion_order([0.1, np.nan])


def test_auc_is_the_trapezoid_area():
    assert auc([0, 1], [1, 1]) == 1.0
    assert auc([0, 0.5, 1], [1, 0, 1]) == 0.5
    rng = np.random.default_rng(0)
    fractions = np.sort(rng.random(9))
    scores = rng.random(9)
    want = sum((fractions[i + 1] - fractions[i]) * (scores[i] + scores[i + 1]) / 2 for i in range(8))
    assert auc(fractions, scores) == pytest.approx(want)


def test_auc_refuses_fractions_out_of_order_or_range():
    with pytest.raises(ValueError, match="fractions: expected non-decreasing"):
        auc([0, 0.6, 0.5], [1, 1, 1])
    with pytest.raises(ValueError, match="fractions: expected non-decreasing values in"):
        auc([0, 1.5], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        auc([0, 1], [1])
