"""Per-head attention statistics, computed for every layer and head at once.

Definition (one number per layer and head): the tokens of an example are split into two groups,
*text* and *image* by each token's modality (in any order); special tokens (``[CLS]``, ``[SEP]``,
image-side ``[CLS]``, ...) belong to neither group, as queries **or** keys.  A statistic
``A -> B`` is the mean, over the queries of group ``A``, of the attention mass the query gives to
the keys of group ``B``::

    stat[l, h] = mean_{q in A} sum_{k in B} attention[l, h, q, k]

The attention is used raw, as the model produced it: rows are **not** renormalised after the
special tokens are dropped, so a head that sends most of its mass to ``[CLS]`` scores low
everywhere (which is what one wants to see).

* ``img2img_nodiag`` leaves out each image query's attention to itself (``k != q``).
* ``cross_modal`` is the mean of the two directions, ``(txt2img + img2txt) / 2``, and ``intra_modal``
  the mean ``(txt2txt + img2img) / 2``, as the original VL-InterpreT defined them: each direction
  weighs the same whatever the number of tokens of each modality (pooling all queries instead would
  let the larger modality, usually the image, decide the value).  With one modality only,
  ``intra_modal`` is that modality's own statistic.
* ``to_special``: the mean over all non-special queries of the mass they give to special tokens,
  i.e. what the other statistics leave out (``[CLS]``/``[SEP]`` often take most of a head's mass).

Two statistics describe a head's shape rather than where its mass goes (app/database/analysis.py):

* ``entropy``: the mean over non-special queries of the Shannon entropy (nats) of their attention
  rows: low for heads that focus on a token or two, high (up to log n) for heads that spread out.
* ``distance``: the mean attention distance in pixels of the stored image (Dosovitskiy et al.;
  Raghu et al.): for image queries, the attention-weighted distance between patch centres over the
  image keys (weights renormalised over them), averaged over the image queries.

A statistic whose query or key group is empty (a text-only or image-only example, or one whose
tokens are all special) is NaN; ``cross_modal`` needs both modalities.  The app shows NaN as "n/a".
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from app.database.analysis import attention_entropy, mean_attention_distance

__all__ = ["STATISTICS", "head_statistics"]

RAW = ("; raw weights: the mass special tokens take is not renormalised away (see “to special tokens”)")

#: key -> (label, description), in display order.
STATISTICS: "OrderedDict[str, tuple[str, str]]" = OrderedDict([
    ("txt2img", ("text → image",
                 "mean over text queries of the attention mass given to image tokens" + RAW)),
    ("img2txt", ("image → text",
                 "mean over image queries of the attention mass given to text tokens" + RAW)),
    ("txt2txt", ("text → text",
                 "mean over text queries of the attention mass given to text tokens" + RAW)),
    ("img2img", ("image → image",
                 "mean over image queries of the attention mass given to image tokens" + RAW)),
    ("img2img_nodiag", ("image → image (no self)",
                        "as image → image, leaving out each token's attention to itself" + RAW)),
    ("cross_modal", ("cross-modal (both directions)",
                     "mean of text → image and image → text, so that each direction weighs the same" + RAW)),
    ("intra_modal", ("intra-modal (both modalities)",
                     "mean of text → text and image → image (one of them when the example has one "
                     "modality)" + RAW)),
    ("to_special", ("to special tokens",
                    "mean over all text and image queries of the attention mass given to special tokens "
                    "([CLS], [SEP], …): the mass every other statistic leaves out")),
    ("entropy", ("attention entropy",
                 "mean over text and image queries of the entropy (nats) of their attention: low = "
                 "focused on a few tokens, high (up to ln n) = spread out")),
    ("distance", ("mean attention distance (pixels)",
                  "for image queries, the attention-weighted distance in pixels between patch centres, "
                  "over image keys (weights renormalised over them), averaged over the image queries "
                  "(Dosovitskiy et al. 2021)")),
])


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values[..., q]`` over the queries where ``mask`` is true; NaN when none is."""
    count = int(mask.sum())
    if count == 0:
        return np.full(values.shape[:-1], np.nan, dtype=np.float32)
    return (values[..., mask].sum(axis=-1, dtype=np.float64) / count).astype(np.float32)


def head_statistics(attention: np.ndarray, is_text: np.ndarray, special: np.ndarray, coords=None,
                    image_size=None, grids=(), patch_grid=None) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STATISTICS` for all layers and heads.

    attention: (n_layers, n_heads, n_tokens, n_tokens), rows are queries, columns keys.
    is_text: (n_tokens,) bool, each token's modality (tokens in any order).
    special: (n_tokens,) bool, true for special tokens (excluded from queries and keys).
    coords, image_size, grids, patch_grid: per token (x, y) or None, the stored image's (H, W), the
    example's patch grids (:class:`~app.database.records.Grid`) and each token's grid (-1: none), for the
    mean attention distance (NaN without them).
    Returns {key: float32 (n_layers, n_heads)}, in the order of :data:`STATISTICS`.
    """
    attention = np.asarray(attention, dtype=np.float32)
    n = attention.shape[-1]
    special = np.asarray(special, dtype=bool)
    is_text = np.asarray(is_text, dtype=bool)
    if is_text.shape != (n,):
        raise ValueError(f"is_text: expected one bool per token ({n}), got shape {is_text.shape}")
    text = is_text & ~special
    image = ~is_text & ~special
    # (L, H, n): mass each query gives to the non-special keys of each group (one matmul each).
    to_text = attention @ text.astype(np.float32)
    to_image = attention @ image.astype(np.float32)
    to_special = attention @ special.astype(np.float32)
    self_attention = np.diagonal(attention, axis1=-2, axis2=-1)  # (L, H, n)
    both = text.any() and image.any()
    nan = np.full(attention.shape[:2], np.nan, dtype=np.float32)

    def needs(group_ok: bool, value: np.ndarray) -> np.ndarray:
        return value if group_ok else nan

    txt2img = needs(both, _masked_mean(to_image, text))
    img2txt = needs(both, _masked_mean(to_text, image))
    txt2txt = _masked_mean(to_text, text)
    img2img = _masked_mean(to_image, image)
    if both:
        intra = (txt2txt + img2img) / 2
    else:  # one modality (or none): its own statistic, NaN when neither has a query
        intra = txt2txt if text.any() else img2img
    return OrderedDict([
        ("txt2img", txt2img),
        ("img2txt", img2txt),
        ("txt2txt", txt2txt),
        ("img2img", img2img),
        ("img2img_nodiag", _masked_mean(to_image - self_attention, image)),
        ("cross_modal", needs(both, (txt2img + img2txt) / 2)),
        ("intra_modal", intra.astype(np.float32)),
        ("to_special", _masked_mean(to_special, text | image)),
        ("entropy", attention_entropy(attention, special) if (text | image).any() else nan),
        ("distance", mean_attention_distance(attention, coords, image_size, grids[0].shape, patch_grid, grids)
         if coords is not None and grids else nan),
    ])
