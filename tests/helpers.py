"""Small hand-made records and databases for tests (shared by every test module).

``make_record(...)`` builds a valid record dict; ``make_db(path, records)`` writes and preprocesses
them.  Both are deterministic for a given ``seed``.
"""
from __future__ import annotations

import pickle
from typing import Optional, Sequence

import numpy as np

__all__ = ["make_record", "make_decoder_record", "make_db", "fake_tsne_maps", "softmax", "fast_tsne"]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def make_record(ex_id: int, n_text: int = 4, grid: Optional[tuple[int, int]] = (2, 3),
                n_layers: int = 2, n_heads: int = 2, hidden: int = 8,
                text_tokens: Optional[Sequence[str]] = None, seed: int = 0,
                shuffle_image: bool = False, image_hw: tuple[int, int] = (32, 48),
                image_cls: bool = False, **extra) -> dict:
    """A valid record with random softmax attention and random hidden states.

    ex_id: the example id.
    n_text: number of text tokens; text_tokens overrides them (e.g. ["[CLS]", "a", "[SEP]"]);
        by default "[CLS]", "w1", ..., "[SEP]" when n_text >= 2.
    grid: (rows, cols) of image patches, or None for a text-only record (no image tokens).
    image_cls: put an image-side "[CLS]" (coordinate None) before the patches.
    shuffle_image: list the patches (with their coords) in a random order instead of row-major.
    n_layers, n_heads, hidden: model shape; attention is (n_layers, n_heads, n, n) and
        hidden_states (n_layers + 1, n, hidden).
    image_hw: (H, W) of the random uint8 image.
    extra: further fields to set or override (accuracy=..., custom_metrics=..., text=...).
    """
    rng = np.random.default_rng(seed + 1000 * ex_id)
    if text_tokens is None:
        text_tokens = (["[CLS]"] + [f"w{i}" for i in range(1, n_text - 1)] + ["[SEP]"]
                       if n_text >= 2 else [f"w{i}" for i in range(n_text)])
    text_tokens = list(text_tokens)
    coords = [] if grid is None else [(x, y) for y in range(grid[0]) for x in range(grid[1])]
    if shuffle_image:
        coords = [coords[i] for i in rng.permutation(len(coords))]
    image_tokens = [f"p{x}_{y}" for x, y in coords]
    if image_cls:
        image_tokens = ["[CLS]"] + image_tokens
        coords = [None] + coords
    tokens = text_tokens + image_tokens
    n = len(tokens)
    record = {
        "ex_id": ex_id,
        "image": rng.integers(0, 256, size=(*image_hw, 3), dtype=np.uint8),
        "tokens": tokens,
        "txt_len": len(text_tokens),
        "img_coords": coords,
        "attention": softmax(rng.normal(size=(n_layers, n_heads, n, n)) * 2).astype(np.float32),
        "hidden_states": rng.normal(size=(n_layers + 1, n, hidden)).astype(np.float32),
        "accuracy": bool(ex_id % 2),
        "text": " ".join(t for t in text_tokens if not t.startswith("[")),
    }
    record.update(extra)
    return record


def causal_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the keys up to each query (a causal language model's attention)."""
    n = logits.shape[-1]
    masked = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    return softmax(masked)


def make_decoder_record(ex_id: int, grids=((2, 3),), newline: bool = False, answer=("red", "</s>"),
                        n_layers: int = 2, n_heads: int = 2, hidden: int = 8, seed: int = 0,
                        image_hw: tuple[int, int] = (32, 48)) -> dict:
    """A decoder VLM's record: ``<s> USER :`` then the image tokens, then ``what color ? ASSISTANT :``
    and the generated ``answer``, with causal attention and the fields modality, generated, special.

    grids: (rows, cols) of each patch grid; several grids are laid side by side on the image
    (grids[g] covers the g-th vertical strip) and their tokens follow one another, grid by grid.
    newline: end each row of patches with an ``<image_newline>`` token (no patch), as LLaVA-NeXT does.
    """
    rng = np.random.default_rng(seed + 1000 * ex_id)
    height, width = image_hw
    strip = width // len(grids)
    prefix, question = ["<s>", "USER", ":"], ["what", "color", "?", "ASSISTANT", ":"]
    image_tokens, coords, boxes = [], [], []
    for g, (rows, cols) in enumerate(grids):
        boxes.append({"name": f"grid {g}", "rows": rows, "cols": cols, "box": [g * strip, 0, (g + 1) * strip, height]})
        for y in range(rows):
            for x in range(cols):
                image_tokens.append("<image>")
                coords.append((x, y, g) if len(grids) > 1 else (x, y))
            if newline:
                image_tokens.append("<image_newline>")
                coords.append(None)
    tokens = prefix + image_tokens + question + list(answer)
    n = len(tokens)
    modality = ["text"] * len(prefix) + ["image"] * len(image_tokens) + ["text"] * (len(question) + len(answer))
    record = {
        "ex_id": ex_id,
        "image": rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8),
        "tokens": tokens, "modality": modality, "img_coords": coords,
        "attention": causal_softmax(rng.normal(size=(n_layers, n_heads, n, n)) * 2).astype(np.float32),
        "hidden_states": rng.normal(size=(n_layers + 1, n, hidden)).astype(np.float32),
        "generated": len(answer),
        "special": [t in ("<s>", "</s>", "<image>", "<image_newline>") for t in tokens],
        "prediction": {"answer": " ".join(t for t in answer if t != "</s>"), "score": 0.9, "label": "red"},
        "text": "what color?",
    }
    if len(grids) > 1:
        record["grids"] = boxes
    else:
        record["grid"] = tuple(grids[0])
    return record


def fake_tsne_maps(hidden: np.ndarray) -> np.ndarray:
    """A fast stand-in for app.database.tsne.tsne_maps: the first two coordinates."""
    hidden = np.asarray(hidden, dtype=np.float32)
    out = np.zeros(hidden.shape[:2] + (2,), np.float32)
    k = min(2, hidden.shape[2])
    out[..., :k] = hidden[..., :k]
    return out


def make_db(path, records: Sequence[dict], progress: bool = False, **kwargs):
    """Write ``records`` as pending pickles into a new database at ``path``, preprocess, return
    (db opened read_only=False, report)."""
    from app.database.database import VliLmdb  # noqa: PLC0415

    db = VliLmdb(path, read_only=False, **kwargs)
    for record in records:
        db[str(record["ex_id"])] = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    report = db.preprocess(progress=progress)
    return db, report


def faithfulness_aucs(*args: str) -> dict:
    """Run ``bench/faithfulness.py *args`` and read back its AUCs: {("positive" | "negative", map): auc}."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "bench/faithfulness.py", *args], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    aucs, direction = {}, None
    for line in out.stdout.splitlines():
        if line.startswith(("positive", "negative")):
            direction = line.split()[0]
        elif "AUC" in line:
            method, _, value = line.split()[:3]
            aucs[(direction, method)] = float(value)
    return aucs


try:  # a pytest fixture for modules that preprocess: `from helpers import fast_tsne` (autouse)
    import pytest

    @pytest.fixture(autouse=True)
    def fast_tsne(monkeypatch):
        """Replace the (slow, separately tested) t-SNE by fake_tsne_maps during preprocess."""
        import app.database.analyses.tsne_maps as tsne_analysis  # noqa: PLC0415
        monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)
        monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
except ImportError:  # pragma: no cover
    pass
