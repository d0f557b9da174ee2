"""Evidence beyond raw attention: rollout, attention distance and entropy, gradient relevancy.

Pure numpy, arrays in and arrays out (float64 inside, float32 out), for preprocessing and extraction.
Attention arrays are ``(layers, heads, query, key)``: rows are queries and sum to 1.

* :func:`attention_rollout`, Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers":
  the residual connection is modelled as ``Â_l = 0.5 · mean_heads(A_l) + 0.5 · I`` (rows renormalised
  to 1), and the rollout up to layer ``l`` is ``R_l = Â_l · Â_{l-1} · … · Â_1``. Row ``q`` of ``R_l``
  is how much query ``q`` after layer ``l`` draws on each input token.
* :func:`mean_attention_distance`, Dosovitskiy et al. 2021 (ViT, Fig. 7) and Raghu et al. 2021 ("Do
  Vision Transformers See Like Convolutional Neural Networks?"): the attention-weighted pixel distance
  between an image query's patch and the image keys' patches, averaged over the image queries. Unlike
  a pure-image ViT, a vision-language model sends part of each query's mass to text, so each query's
  weights are renormalised over the image keys: the value stays a distance in pixels.
* :func:`attention_entropy`: the mean over queries of the Shannon entropy (nats) of the attention
  rows, as used to tell broad heads from focused ones (e.g. Clark et al. 2019, "What Does BERT Look
  At?").
* :func:`gradient_relevancy`, Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for
  Interpreting Bi-Modal and Encoder-Decoder Transformers", rules 5 and 6 for self-attention:
  ``R = I``, then for every layer from the first ``R ← R + Ā_l · R`` with
  ``Ā_l = mean_heads((∇A_l ⊙ A_l)⁺)``.
* :func:`deletion_order` and :func:`auc`: the positive / negative perturbation test of the same paper
  (remove image tokens from the most, or least, relevant first; the area under the score curve).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.special

__all__ = ["attention_rollout", "mean_attention_distance", "attention_entropy", "gradient_relevancy",
           "deletion_order", "auc"]


def _attention_array(attention, name: str = "attention") -> np.ndarray:
    """``attention`` as float64 ``(layers, heads, n, n)``, or a ValueError naming it."""
    array = np.asarray(attention, dtype=np.float64)
    if array.ndim != 4 or array.shape[-1] != array.shape[-2] or 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty (layers, heads, n_tokens, n_tokens) array, "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: holds NaN or inf")
    return array


def _weights(attention) -> np.ndarray:
    """An attention array that must also be non-negative (it is used as probabilities)."""
    array = _attention_array(attention)
    if (array < 0).any():
        raise ValueError(f"attention: negative weight {array.min():g} (attention weights are probabilities)")
    return array


def rollout_mixing(head_mean: np.ndarray) -> np.ndarray:
    """``Â`` of the rollout from a layer's mean attention over heads ``(..., n, n)``: half of it plus half
    the identity (the residual stream), rows renormalised; float64. The diagonal keeps every row > 0."""
    n = head_mean.shape[-1]
    mixed = 0.5 * np.asarray(head_mean, dtype=np.float64) + 0.5 * np.eye(n)
    return mixed / mixed.sum(axis=-1, keepdims=True)


def attention_rollout(attention) -> np.ndarray:
    """The attention rollout up to every layer (Abnar & Zuidema 2020).

    attention: ``(layers, heads, query, key)``.
    Returns float32 ``(layers, query, key)``: ``[l]`` is the rollout through layers ``1 … l + 1``.

    Multiplication order: ``Â_l[q, k]`` is how much query ``q`` after layer ``l`` takes from token
    ``k`` after layer ``l - 1``, and ``R_{l-1}[k, j]`` how much that token took from input token
    ``j``; chaining the two sums over ``k``, ``R_l = Â_l · R_{l-1}``: each layer's matrix is applied on
    the left of the product accumulated from the first layer up, as in the paper (and in Chefer et al.'s
    ``compute_rollout_attention``); ``R_{l-1} · Â_l`` would chain the layers backwards.
    Every ``Â_l`` is row-stochastic, so every row of every ``R_l`` sums to 1.
    """
    mixed = rollout_mixing(_weights(attention).mean(axis=1))  # (layers, n, n)
    rollout = np.empty_like(mixed)
    rollout[0] = mixed[0]
    for layer in range(1, len(mixed)):
        rollout[layer] = mixed[layer] @ rollout[layer - 1]
    return rollout.astype(np.float32)


def _patch_centres(coords: Sequence, image: np.ndarray, image_size, grid, patch_grid=None,
                   grids=None) -> np.ndarray:
    """The centres, (m, 2) pixels (x, y), of the patches of the tokens ``image`` (m indices into coords):
    on the one ``grid`` over the whole image, or on each token's grid ``grids[patch_grid[i]]``."""
    height, width = (float(v) for v in image_size)
    if not (height > 0 and width > 0):
        raise ValueError(f"image_size: expected a positive (height, width), got {tuple(image_size)}")
    cells = np.asarray([coords[i] for i in image], dtype=np.float64)
    if cells.ndim != 2 or cells.shape[1] != 2:
        raise ValueError(f"coords: expected (x, y) pairs or None, got entries of shape {cells.shape[1:]}")
    if grids is None:
        boxes = np.array([[0.0, 0.0, width, height, *grid]] * len(image))
    else:
        boxes = np.array([[*grids[patch_grid[i]].box, *grids[patch_grid[i]].shape] for i in image], dtype=np.float64)
    rows, cols = boxes[:, 4], boxes[:, 5]
    if (rows <= 0).any() or (cols <= 0).any():
        raise ValueError(f"grid: expected a positive (rows, cols), got {tuple(grid)}")
    outside = (cells < 0).any(axis=1) | (cells[:, 0] >= cols) | (cells[:, 1] >= rows)
    if outside.any():
        token = int(image[outside][0])
        raise ValueError(f"coords: token {token} has coordinate {tuple(coords[token])}, outside the "
                         f"{int(rows[outside][0])} x {int(cols[outside][0])} grid")
    pitch = np.stack([(boxes[:, 2] - boxes[:, 0]) / cols, (boxes[:, 3] - boxes[:, 1]) / rows], axis=1)
    return boxes[:, :2] + (cells + 0.5) * pitch


def mean_attention_distance(attention, coords: Sequence, image_size, grid, patch_grid=None,
                            grids=None) -> np.ndarray:
    """Mean attention distance of every head, in pixels of the stored image (Dosovitskiy et al.;
    Raghu et al.).

    attention: ``(layers, heads, query, key)``.
    coords: one entry per token, ``(x, y)`` for an image patch (top-left ``(0, 0)``) or None.
    image_size: ``(H, W)`` of the stored image; grid: ``(rows, cols)``. Patch ``(x, y)`` is centred at
    ``((x + 0.5) · W / cols, (y + 0.5) · H / rows)``. With several grids (``grids``: the example's
    :class:`~app.database.records.Grid` s, ``patch_grid``: each token's), a patch is centred in its cell of
    its grid's box, so distances between grids (a tile and the thumbnail) are distances on the image.
    Returns float32 ``(layers, heads)``::

        distance[l, h] = mean_q  sum_k A[l, h, q, k] · ‖pos(q) − pos(k)‖ / sum_k A[l, h, q, k]

    over image queries ``q`` and image keys ``k``. The division renormalises each query's weights over
    the image keys: in a vision-language model part of the mass goes to text and special tokens, and
    without it a head would look "local" merely for reading text. A query that gives no mass to image
    keys is skipped; NaN when no image query is left (or the example has no image tokens).
    """
    weights = _weights(attention)
    if len(coords) != weights.shape[-1]:
        raise ValueError(f"coords: {len(coords)} entries for {weights.shape[-1]} tokens (one per token, "
                         f"None for tokens without a patch)")
    image = np.array([i for i, c in enumerate(coords) if c is not None], dtype=np.intp)
    if len(image) == 0:
        return np.full(weights.shape[:2], np.nan, dtype=np.float32)
    centres = _patch_centres(coords, image, image_size, grid, patch_grid, grids)
    distance = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)  # (m, m) pixels
    # one gather of the image block, in float32 (the weights are checked above), sums in float64
    image_weights = np.asarray(attention, dtype=np.float32)[:, :, image[:, None], image]  # (layers, heads, m, m)
    mass = image_weights.sum(axis=-1, dtype=np.float64)  # (layers, heads, m)
    weighted = np.einsum("lhqk,qk->lhq", image_weights, distance.astype(np.float32), dtype=np.float64)
    kept = mass > 0
    per_query = np.divide(weighted, mass, out=np.zeros_like(weighted), where=kept)
    count = kept.sum(axis=-1)
    total = per_query.sum(axis=-1)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0).astype(np.float32)


def attention_entropy(attention, special: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean Shannon entropy (natural log, nats; ``0 · log 0 = 0``) of the attention rows of every head.

    attention: ``(layers, heads, query, key)``.
    special: optional ``(n_tokens,)`` bool; special tokens are left out **as queries only**: every
    remaining row is used as it is, over all keys (specials included), so a head that parks its mass
    on ``[CLS]`` scores low, as it should. Rows are not renormalised.
    Returns float32 ``(layers, heads)``; NaN when every token is special. A uniform row over ``n`` keys
    has entropy ``log n``, a one-hot row 0.
    """
    weights = _weights(attention)
    n = weights.shape[-1]
    queries = np.ones(n, dtype=bool)
    if special is not None:
        special = np.asarray(special, dtype=bool)
        if special.shape != (n,):
            raise ValueError(f"special: expected shape ({n},), one flag per token, got {special.shape}")
        queries = ~special
    if not queries.any():
        return np.full(weights.shape[:2], np.nan, dtype=np.float32)
    rows = np.asarray(attention, dtype=np.float32)[:, :, queries]  # (layers, heads, queries, keys)
    # -x·log x elementwise (0 at x = 0) in float32, summed in float64: a 12 x 12 x 250² example in
    # ~50 ms instead of ~230 ms in float64 with a masked log
    entropy = scipy.special.entr(rows).sum(axis=-1, dtype=np.float64)  # (layers, heads, queries)
    return entropy.mean(axis=-1).astype(np.float32)


def gradient_relevancy(attentions, gradients) -> np.ndarray:
    """Relevancy of every token for every query (Chefer et al. 2021, self-attention rules 5 and 6).

    attentions: ``(layers, heads, query, key)``, the attention probabilities of one example.
    gradients: the same shape, the gradient of the target score (e.g. the logit of a VQA answer) with
    respect to each attention matrix.
    Returns float32 ``(query, key)``: ``R = I``, then for each layer from the first to the last
    ``R ← R + Ā_l · R`` with ``Ā_l = mean_heads(max(∇A_l ⊙ A_l, 0))`` (negatives are clamped after the
    product, before the mean over heads). Both terms use the ``R`` of the layer before, as in the
    authors' code (``R_i_i += torch.matmul(cam, R_i_i)``). Row ``q`` (e.g. the ``[CLS]`` row of a ViLT
    VQA answer) is the relevancy of every token for query ``q``.
    """
    weights = _attention_array(attentions, "attentions")
    grads = _attention_array(gradients, "gradients")
    if grads.shape != weights.shape:
        raise ValueError(f"gradients: shape {grads.shape} differs from the attentions' {weights.shape}")
    n = weights.shape[-1]
    relevancy = np.eye(n)
    for layer in range(len(weights)):
        cam = np.clip(grads[layer] * weights[layer], 0.0, None).mean(axis=0)  # (n, n)
        relevancy = relevancy + cam @ relevancy
    return relevancy.astype(np.float32)


def deletion_order(relevance, positive: bool = True) -> np.ndarray:
    """The order in which the perturbation test removes image tokens (Chefer et al. 2021, Sec. 4).

    relevance: ``(n_image_tokens,)``, the relevancy of each image token (e.g. the ``[CLS]`` row of
    :func:`gradient_relevancy` at the image tokens).
    positive: most relevant first (positive perturbation: the score should fall fast); otherwise
    least relevant first (negative perturbation: it should hold).
    Returns int ``(n_image_tokens,)`` positions into ``relevance``; ties go to the lower position.
    """
    values = np.asarray(relevance, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"relevance: expected one value per image token, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("relevance: holds NaN or inf")
    return np.argsort(-values if positive else values, kind="stable")


def auc(fractions, scores) -> float:
    """Area under the curve of ``scores`` against the removed ``fractions`` (trapezoid rule).

    fractions: ``(points,)`` non-decreasing, in ``[0, 1]``; scores: ``(points,)``, the model's score
    after each removal. A curve over ``[0, 1]`` that stays at 1 has area 1.
    """
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"fractions, scores: expected two 1-D arrays of the same length (at least 2), "
                         f"got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fractions, scores: hold NaN or inf")
    if (x < 0).any() or (x > 1).any() or (np.diff(x) < 0).any():
        raise ValueError(f"fractions: expected non-decreasing values in [0, 1], got {x.tolist()}")
    return float(np.trapezoid(y, x))
