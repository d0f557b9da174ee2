"""A LLaVA-1.5-7B-shaped example: how much it takes on disk (stored compact, app.database.compact) and how
long every interaction takes on it.

    python bench/large_example.py [--reps 10] [--examples 2] [--quick]

The synthetic record has the shape of LLaVA-1.5-7B on one image: 32 layers x 32 heads, 5 system-prompt
tokens, 576 image tokens (24 x 24), 50 question tokens and 5 generated ones (636 in all), hidden size
4096. Its attention is causal and peaked like a language model's (a sink on the first token, heavy-
tailed logits), its hidden states low-rank plus noise with a few huge dimensions ("massive
activations"). Prints the stored bytes per sub-database, the preprocessing time, the reduction's
measured kept mass and variance, then the replayed interactions of bench/interactions.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, scratch_dir, start_server  # noqa: E402
from bench.interactions import db_shape, measure, print_table  # noqa: E402

LAYERS, HEADS, HIDDEN, GRID = 32, 32, 4096, 24
PREFIX, QUESTION, GENERATED = 5, 50, 5


def llava_shaped_record(ex_id: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + ex_id)
    n_image = GRID * GRID
    n = PREFIX + n_image + QUESTION + GENERATED
    modality = ["text"] * PREFIX + ["image"] * n_image + ["text"] * (QUESTION + GENERATED)
    causal = np.tril(np.ones((n, n), bool))
    attention = np.empty((LAYERS, HEADS, n, n), np.float32)
    for layer in range(LAYERS):  # one layer at a time: float32 logits of all layers would take 1.7 GB more
        logits = rng.standard_t(3, size=(HEADS, n, n)).astype(np.float32) * 1.5
        logits[..., 0] += 4.0  # the attention sink
        logits = np.where(causal, logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        attention[layer] = logits / logits.sum(axis=-1, keepdims=True)
    basis = rng.standard_normal((64, HIDDEN)).astype(np.float32)
    hidden = (rng.standard_normal((LAYERS + 1, n, 64)).astype(np.float32) @ basis
              + rng.standard_normal((LAYERS + 1, n, HIDDEN)).astype(np.float32) * 0.5)
    hidden[:, :, :4] *= 200.0  # a few massive activations
    tokens = (["<s>", "A", "chat", "USER", ":"] + ["<image>"] * n_image
              + [f"w{i}" for i in range(QUESTION)] + [f"a{i}" for i in range(GENERATED)])
    return {"ex_id": ex_id, "image": rng.integers(0, 256, (336, 336, 3), dtype=np.uint8), "tokens": tokens,
            "modality": modality, "img_coords": [(x, y) for y in range(GRID) for x in range(GRID)],
            "grid": (GRID, GRID), "attention": attention, "hidden_states": hidden, "generated": GENERATED,
            "text": "a question", "prediction": {"answer": "an answer", "score": 0.5, "label": None}}


def stored_bytes(db, ex_id: int) -> dict[str, int]:
    """Bytes of the values of one example, per sub-database: the keys of its id, and its entries of the
    nearest-token index (while they are in the index's tail, as after one add)."""
    from app.database import neighbors  # noqa: PLC0415

    prefix = b"%010d" % ex_id
    sizes = {}
    with db._read() as txn:  # a benchmark may look inside
        for name, handle in db._dbs.items():
            cursor = txn.cursor(db=handle)
            total = 0
            if name == b"nn":
                for layer in range(db.n_layers + 1):
                    for modality in ("t", "i"):
                        total += sum(len(txn.get(key, b"", db=handle)) for key in neighbors.tail_key(layer, modality, ex_id))
            elif cursor.set_range(prefix):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    total += len(key) + len(value)
            sizes[name] = total
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one example, 3 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.examples = 3, 1
    from app.database.store import VliLmdb  # noqa: PLC0415

    path = scratch_dir("vli-bench-large-")
    print(f"machine: {machine()}")
    with VliLmdb(path, read_only=False, special_tokens=("<s>",)) as db:
        for ex_id in range(args.examples):
            record = llava_shaped_record(ex_id)
            full = record["attention"].size * 2 + record["hidden_states"].size * 2
            start = time.perf_counter()
            db.add_record(record)
            seconds = time.perf_counter() - start
            del record
            sizes = stored_bytes(db, ex_id)
            total = sum(sizes.values())
            info = db.example(ex_id)
            print(f"example {ex_id}: {info.n_tokens} tokens, {LAYERS} x {HEADS} heads, hidden {HIDDEN}: "
                  f"{full / 1e6:.0f} MB as float16, stored in {total / 1e6:.1f} MB (preprocessed in {seconds:.1f} s)")
            print("  " + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sizes.items() if size))
            print(f"  reduction: {info.reduction}")
    shape = db_shape(path)
    server = start_server(path)
    try:
        print(f"server ready in {server.ready_seconds:.2f} s")
        print_table(measure(server.url, shape, args.reps),
                    f"replayed cascades on the large example(s), {args.reps} repetitions (median / p95):")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
