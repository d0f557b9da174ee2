"""The key layout of a VL-InterpreT database and the encodings of its core values.

An LMDB environment with one named sub-database (table) per kind of value; schema version
:data:`SCHEMA_VERSION`; ``E`` = ex_id as 10 digits, ``LLL`` = layer:

==========  =====================  ==============================================================
table       key                    value
==========  =====================  ==============================================================
meta        ``schema_version``     JSON int; checked on open
meta        ``n_layers`` ...       JSON: n_layers, n_heads, hidden_size, special_tokens,
                                   custom_metrics (names), metric_descriptions, next_id, nn_dim,
                                   nn_tail, nn_shards
meta        ``nn_projection``      float32 (n_layers + 1, hidden_size, nn_dim) (see neighbors.py)
info        ``E``                  JSON: tokens, txt_len, special, coords, grid, image_size,
                                   modality ("t"/"i" per token; absent: text first), grids,
                                   patch_grid (with several grids), generated, accuracy, prediction,
                                   text, notes, attention_exp, source (xxh3 of the raw pickle),
                                   compact (compact.py), and what the analyses add: custom_metrics
                                   (names), rollout_exp, logit_lens, patch_lens (true when stored)
ids         ``E``                  empty: the example ids alone, so that listing them reads a few
                                   pages (an ``info`` value is an overflow page)
image       ``E``                  PNG bytes
attention   ``E/LLL``              float16 little-endian (heads, n, n) holding attention *
                                   2**attention_exp (info), layer 0..n_layers-1
hidden      ``E/LLL``              float16 little-endian (n, hidden), layer 0..n_layers (clipped
                                   to the float16 range, +-65 504)
            (an example whose info has ``compact``: attention and hidden in the reduced layouts of
            compact.py)
nn          see neighbors.py       bound rows [a, r] per token: tail values and sealed shards
==========  =====================  ==============================================================

The analyses (:mod:`app.database.analyses`) own the other tables: ``stats`` (head statistics),
``tsne``, ``rollout``, ``relevancy``, ``patch_lens``; each module's docstring gives its layout.

Every value carries a checksum (:mod:`app.database.checksum`), checked on every read.
"""
from __future__ import annotations

import io
from typing import Union

import numpy as np
import xxhash

from app.database import compact

__all__ = ["SCHEMA_VERSION", "CORE_TABLES", "PENDING_DIR", "PENDING_LOCK", "UPGRADE_HINT", "FLOAT16_MAX",
           "example_key", "layer_key", "key_name", "source_hash", "scaled_float16", "hidden_array", "is_text_of",
           "png_bytes", "read_only"]

SCHEMA_VERSION = 2  # 2: checksummed values, pending records in their own environment
CORE_TABLES = (b"meta", b"info", b"ids", b"image", b"attention", b"hidden", b"nn")  # meta first
PENDING_DIR = "pending"
PENDING_LOCK = "pending.lock"
UPGRADE_HINT = "python -m app.database.upgrade"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def example_key(ex_id: int) -> bytes:
    return b"%010d" % ex_id


def layer_key(ex_id: int, layer: int) -> bytes:
    return b"%010d/%03d" % (ex_id, layer)


def key_name(key: bytes) -> Union[int, str]:
    """A pending record's key as reports name it: the ex_id when it is one, else the text."""
    text = key.decode("utf-8", "replace")
    return int(text) if text.isdigit() and len(text) <= 18 else text


def source_hash(raw: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(raw)


def scaled_float16(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """``(float16(weights * 2**exp), exp)``. Attention weights are mostly tiny: scaled by 2**exp
    (exp = 14 when the largest is 1) they stay out of float16's subnormal range (12x faster to convert,
    and precise down to ~4e-9); the largest value still fits float16, and the rescale on read is exact."""
    peak = float(np.abs(weights).max()) or 1.0
    exp = int(np.clip(np.floor(np.log2(FLOAT16_MAX / peak)) - 1, -120, 120))
    return (weights * np.float32(2.0 ** exp)).astype("<f2"), exp


def hidden_array(raw, info, hidden_size: int) -> np.ndarray:
    """One layer's stored hidden states: float16 ``(n, d)`` (a zero-copy view when stored whole);
    ``info`` is the example's :class:`~app.database.reads.ExampleInfo`."""
    if info.reduction is None:
        return np.frombuffer(raw, dtype="<f2").reshape(info.n_tokens, hidden_size)
    return compact.decode_hidden(raw, info.n_tokens, hidden_size, info.reduction.components)


def is_text_of(info: dict) -> np.ndarray:
    """(n,) bool from a stored description: its ``modality`` ("t"/"i" per token), or, as written
    before any order was allowed, the first ``txt_len`` tokens."""
    if "modality" in info:
        return np.frombuffer(info["modality"].encode("ascii"), dtype=np.uint8) == ord("t")
    return np.arange(len(info["tokens"])) < info["txt_len"]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
