"""The reduced storage of examples too large to store whole (a 7B decoder VLM's prompt of 600+ tokens).

A LLaVA-1.5-7B-shaped example (32 layers x 32 heads, ~640 tokens, hidden 4096) holds ~0.8 GB of float16
attention and ~170 MB of hidden states. Above :data:`COMPACT_ABOVE` bytes of full storage an example is
stored *compact*, within about 100 MB, so that every view still works:

- **statistics, t-SNE maps and the nearest-token index** are computed from the full values before
  anything is reduced, so they are exact;
- **the mean over heads** of every layer's attention is kept whole (float16 like all attention): the
  "mean of heads" views, the attention matrix of the mean, and the rollout (computed on read from these
  means, Abnar & Zuidema's definition only needs them) are exact;
- **each head** keeps, for every query, its ``k`` largest weights (key index and weight); the other
  weights read as 0. ``k`` fills :data:`HEAD_BUDGET` bytes (at least :data:`MIN_TOP_KEYS`), and the mass
  kept is measured and shown with the example;
- **hidden states** keep, per layer, their mean and :data:`HIDDEN_COMPONENTS` principal directions of the
  example's tokens (float16) with every token's coefficients (float32); the fraction of the variance kept
  is shown. The nearest-token search reads these reconstructions, consistently with its index.

Layouts of one layer's ``attention`` value: ``mean`` float16 ``(n, n)``, then ``keys`` uint16
``(heads, n, k)``, then ``weights`` float16 ``(heads, n, k)``, all scaled by ``2**attention_exp`` like full
attention. One hidden-state layer: ``mean`` float32 ``(d,)``, ``basis`` float16 ``(r, d)``, ``coefficients``
float32 ``(n, r)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["COMPACT_ABOVE", "HEAD_BUDGET", "HIDDEN_COMPONENTS", "Compact", "full_bytes", "plan",
           "encode_attention", "head_rows", "mean_rows", "encode_hidden", "decode_hidden"]

COMPACT_ABOVE = 96 * 2**20      # bytes of full storage above which an example is stored compact
HEAD_BUDGET = 40 * 2**20        # bytes for the per-head top-k weights of all layers
MIN_TOP_KEYS = 4
HIDDEN_COMPONENTS = 48          # principal directions kept per hidden-state layer
MAX_KEYS = 2**16                # key indices are stored as uint16
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Compact:
    """How an example was reduced (stored in its description, shown with it)."""

    top_keys: int               # weights kept per query and head
    kept_mass: float            # mean over layers, heads and queries of the attention mass kept
    components: int             # principal directions per hidden-state layer
    kept_variance: float        # mean over layers of the fraction of the hidden states' variance kept

    def as_json(self) -> dict:
        return {"top_keys": self.top_keys, "kept_mass": self.kept_mass, "components": self.components,
                "kept_variance": self.kept_variance}

    def note(self) -> str:
        return (f"stored reduced (a large example): each head keeps its {self.top_keys} largest weights per query "
                f"({100 * self.kept_mass:.1f} % of the attention mass on average; the rest reads as 0); the mean "
                f"of heads, the rollout, the statistics and the t-SNE maps are exact; hidden states keep "
                f"{self.components} principal directions per layer ({100 * self.kept_variance:.1f} % of the "
                f"variance), which the nearest-token search uses")


def full_bytes(n_layers: int, n_heads: int, n_tokens: int, hidden_size: int) -> int:
    """Bytes of an example's attention, rollout and hidden states stored whole (float16)."""
    return 2 * (n_layers * n_heads * n_tokens ** 2 + n_layers * n_tokens ** 2 + (n_layers + 1) * n_tokens * hidden_size)


def plan(n_layers: int, n_heads: int, n_tokens: int, hidden_size: int):
    """``(top_keys, components)`` for an example of this shape, or None when it is stored whole."""
    if full_bytes(n_layers, n_heads, n_tokens, hidden_size) <= COMPACT_ABOVE:
        return None
    if n_tokens > MAX_KEYS:
        raise ValueError(f"{n_tokens} tokens: at most {MAX_KEYS} can be stored")
    top_keys = int(np.clip(HEAD_BUDGET // (n_layers * n_heads * n_tokens * 4), MIN_TOP_KEYS, n_tokens))
    return top_keys, min(HIDDEN_COMPONENTS, n_tokens, hidden_size)


def encode_attention(layer: np.ndarray, top_keys: int) -> tuple[bytes, float]:
    """One layer's scaled float16 attention ``(heads, n, n)`` as stored compact, and the mean mass kept."""
    heads, n, _ = layer.shape
    weights32 = layer.astype(np.float32)
    mean = weights32.mean(axis=0).astype("<f2")
    keys = np.argpartition(-weights32, top_keys - 1, axis=-1)[..., :top_keys] if top_keys < n \
        else np.broadcast_to(np.arange(n), (heads, n, n))
    kept = np.take_along_axis(layer, keys, axis=-1)
    total = weights32.sum(axis=-1, dtype=np.float64)
    fraction = np.divide(kept.astype(np.float64).sum(axis=-1), total, out=np.ones_like(total), where=total > 0)
    blob = mean.tobytes() + keys.astype("<u2").tobytes() + kept.astype("<f2").tobytes()
    return blob, float(fraction.mean())


def _split(raw, heads: int, n: int, top_keys: int):
    mean = np.frombuffer(raw, "<f2", n * n).reshape(n, n)
    keys = np.frombuffer(raw, "<u2", heads * n * top_keys, offset=2 * n * n).reshape(heads, n, top_keys)
    weights = np.frombuffer(raw, "<f2", heads * n * top_keys, offset=2 * n * n + 2 * keys.size)
    return mean, keys, weights.reshape(heads, n, top_keys)


def mean_rows(raw, heads: int, n: int, top_keys: int, rows: np.ndarray) -> np.ndarray:
    """float32 ``(len(rows), n)`` of the (scaled) mean over heads."""
    return _split(raw, heads, n, top_keys)[0][rows].astype(np.float32)


def head_rows(raw, heads: int, n: int, top_keys: int, head: int, rows: np.ndarray) -> np.ndarray:
    """float32 ``(len(rows), n)`` of one head (scaled): its kept weights, 0 elsewhere."""
    _, keys, weights = _split(raw, heads, n, top_keys)
    out = np.zeros((len(rows), n), np.float32)
    np.put_along_axis(out, keys[head, rows].astype(np.intp), weights[head, rows].astype(np.float32), axis=-1)
    return out


def encode_hidden(states: np.ndarray, components: int) -> tuple[bytes, float]:
    """One layer's hidden states ``(n, d)`` as stored compact, and the fraction of their variance kept."""
    states = np.asarray(states, dtype=np.float64)
    mean = states.mean(axis=0)
    centred = states - mean
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    basis = directions[:components].astype("<f2")
    coefficients = centred @ basis.astype(np.float64).T  # against the basis as stored
    total = float((singular ** 2).sum())
    kept = float((singular[:components] ** 2).sum()) / total if total > 0 else 1.0
    return mean.astype("<f4").tobytes() + basis.tobytes() + coefficients.astype("<f4").tobytes(), kept


def decode_hidden(raw, n: int, hidden_size: int, components: int) -> np.ndarray:
    """float16 ``(n, d)`` (the type of hidden states stored whole): the hidden states rebuilt from their
    stored principal directions."""
    mean = np.frombuffer(raw, "<f4", hidden_size)
    basis = np.frombuffer(raw, "<f2", components * hidden_size, offset=4 * hidden_size).reshape(components,
                                                                                               hidden_size)
    coefficients = np.frombuffer(raw, "<f4", n * components,
                                 offset=4 * hidden_size + 2 * basis.size).reshape(n, components)
    rebuilt = coefficients @ basis.astype(np.float32) + mean
    return np.clip(rebuilt, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2")
