"""Write a small example database of random data: the documented example of the record format.

    python db_example.py [--out example_database1]

Creates four examples (450x800 images, 12 layers, 12 heads, hidden size 768) in ``example_database1/``
and preprocesses them: three in the original layout (text first, then a 2x3 grid of image patches) and
one as a decoder VLM writes it (image tokens inside the prompt, two patch grids, a generated answer, a
per-patch logit lens).  Run the app on it with ``python run_app.py -d example_database1``.  The database
is re-created from scratch.
"""
import argparse
import os
import pickle
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app.database.database import VliLmdb  # noqa: E402

N_LAYERS, N_HEADS, HIDDEN = 12, 12, 768
GRID_ROWS, GRID_COLS = 2, 3
IMAGE_H, IMAGE_W = 450, 800


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def random_example(ex_id, rng):
    """One record, as a user's extraction script would build it."""
    words = ["what", "color", "is", "the", "shape"][: 3 + ex_id]
    text_tokens = ["[CLS]"] + words + ["[SEP]"]  # text first; [CLS]/[SEP] are special tokens
    image_tokens = [f"img_{i}" for i in range(GRID_ROWS * GRID_COLS)]
    tokens = text_tokens + image_tokens
    n_tokens = len(tokens)
    # A blocky random image (16x16 blocks upscaled) keeps the PNG small.
    blocks = rng.integers(0, 256, size=(IMAGE_H // 15 + 1, IMAGE_W // 16 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 15, axis=0), 16, axis=1)[:IMAGE_H, :IMAGE_W]
    return {
        # int: the example's id; also the key the record is stored under (str(ex_id)).
        "ex_id": ex_id,
        # (H, W, 3) array with values 0-255 (any int or float dtype): the image the model saw.
        "image": image,
        # list[str]: the text tokens first, then the image tokens.
        "tokens": tokens,
        # int: how many of the tokens are text tokens (the rest are image tokens).
        "txt_len": len(text_tokens),
        # one (x, y) per image token: the patch's column and row in the patch grid, top-left (0, 0).
        # Patches may be listed in any order; an image-side special token (e.g. ViLT's image
        # "[CLS]") would have None.  Empty or None for a text-only example.
        "img_coords": [(i % GRID_COLS, i // GRID_COLS) for i in range(GRID_ROWS * GRID_COLS)],
        # optional (rows, cols): the patch grid. Give it whenever you know it: without it the grid is
        # guessed from the largest coordinate, wrong when no patch of the last row/column is kept.
        "grid": (GRID_ROWS, GRID_COLS),
        # (n_layers, n_heads, n_tokens, n_tokens): attention weights, rows = queries (each row
        # sums to 1, as a softmax does), columns = keys.
        "attention": softmax(rng.normal(size=(N_LAYERS, N_HEADS, n_tokens, n_tokens)) * 2).astype(np.float32),
        # (n_layers + 1, n_tokens, hidden): hidden states before layer 1, then after each layer.
        "hidden_states": rng.normal(size=(N_LAYERS + 1, n_tokens, HIDDEN)).astype(np.float32),
        # optional bool: whether the model answered correctly (or None if unknown). Left out here:
        # a prediction with a label (below) gives it, as prediction == label.
        # optional {name: (n_layers, n_heads)}: per-head numbers of your own, shown with the
        # built-in statistics.
        "custom_metrics": {"random_metric": rng.random((N_LAYERS, N_HEADS))},
        # optional: what the model predicted, its score, and the expected answer (label).
        "prediction": {"answer": ["red", "blue", "green"][ex_id], "score": 0.5 + 0.1 * ex_id, "label": "red"},
        # optional str: the raw input text.
        "text": " ".join(words) + "?",
    }


def decoder_example(ex_id, rng):
    """A record in a decoder VLM's layout: tokens in sequence order, each with its modality; the image
    seen through two grids (a 2x3 base grid over the whole image and a 4x6 grid over its left half,
    say a high-resolution crop), and an answer the model generated."""
    prompt = ["<s>", "USER", ":"]
    base = [(x, y, 0) for y in range(2) for x in range(3)]     # (x, y, grid): patch x, y of grid 0
    detail = [(x, y, 1) for y in range(4) for x in range(6)]   # ... and of grid 1
    question = ["what", "color", "is", "the", "shape", "?", "ASSISTANT", ":"]
    answer = ["red", "</s>"]
    tokens = prompt + ["<image>"] * (len(base) + len(detail)) + question + answer
    n_tokens = len(tokens)
    # causal attention: a query attends to itself and the tokens before it
    causal = np.tril(np.ones((n_tokens, n_tokens), bool))
    logits = np.where(causal, rng.normal(size=(N_LAYERS, N_HEADS, n_tokens, n_tokens)) * 2, -np.inf)
    blocks = rng.integers(0, 256, size=(IMAGE_H // 15 + 1, IMAGE_W // 16 + 1, 3), dtype=np.uint8)
    return {
        "ex_id": ex_id,
        "image": np.repeat(np.repeat(blocks, 15, axis=0), 16, axis=1)[:IMAGE_H, :IMAGE_W],
        "tokens": tokens,
        # "text" or "image" per token, so tokens may come in any order (no txt_len needed)
        "modality": ["text"] * len(prompt) + ["image"] * (len(base) + len(detail)) + ["text"] * (len(question) + 2),
        # one entry per image token in sequence order: (x, y) on the first grid, (x, y, g) on grid g,
        # None for an image-side token that is no patch (a row-end newline, an image start marker)
        "img_coords": base + detail,
        # every grid: its size and the pixel box (left, top, right, bottom) of the image it covers
        "grids": [{"name": "base", "rows": 2, "cols": 3, "box": [0, 0, IMAGE_W, IMAGE_H]},
                  {"name": "left half, high resolution", "rows": 4, "cols": 6, "box": [0, 0, IMAGE_W // 2, IMAGE_H]}],
        # how many tokens at the end the model generated (offered as queries, shown as the answer)
        "generated": len(answer),
        # which tokens are special (chat-template markers), when their names alone do not say
        "special": [t in ("<s>", "</s>") for t in tokens],
        "attention": softmax(logits).astype(np.float32),
        "hidden_states": rng.normal(size=(N_LAYERS + 1, n_tokens, HIDDEN)).astype(np.float32),
        # optional: the per-patch logit lens, what each image token "says": for every hidden-state layer
        # (before layer 1, then after each), one [word, probability] per image token in sequence order, the
        # top word of the model's final norm + LM head applied to that token's hidden state there
        "patch_lens": patch_lens(len(base) + len(detail), rng),
        "prediction": {"answer": "red", "score": 0.8, "label": "red"},
        "text": "what color is the shape?",
    }


def patch_lens(n_image_tokens, rng):
    """A made-up per-patch logit lens: random words, more probable in later layers (a real one comes from
    the model, e.g. the ``-m hf`` adapter)."""
    words = ["red", "blue", "green", "shape", "circle", "square", "the", "image"]
    lens = []
    for layer in range(N_LAYERS + 1):
        confidence = (layer + 1) / (N_LAYERS + 1)
        probabilities = rng.uniform(0.5, 1.0, n_image_tokens) * confidence
        lens.append([[words[rng.integers(len(words))], float(p)] for p in probabilities])
    return lens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example_database1", help="database folder (re-created)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    rng = np.random.default_rng(0)
    data = [random_example(ex_id, rng) for ex_id in range(3)] + [decoder_example(3, rng)]

    db = VliLmdb(db_dir=args.out, read_only=False)
    for ex in data:
        db[str(ex["ex_id"])] = pickle.dumps(ex, protocol=pickle.HIGHEST_PROTOCOL)
    report = db.preprocess()
    db.close()
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
