"""Upgrade a database written by an older VL-InterpreT to this schema, in place, losing nothing.

    python -m app.database.upgrade DB [DB ...]

Schema 1 to 2: every value gets its checksum, each example's head statistics are recomputed from its
stored attention (cross- and intra-modal became the mean of both directions, and "to special tokens"
was added; custom metrics are kept as they are), the nearest-token index is rebuilt in its exact form,
and the raw records still pending move into ``DB/pending/``. Each example is upgraded in its own write
transaction and remembered, so an interrupted upgrade resumes where it stopped; the schema version
changes last, and until then this version of VL-InterpreT refuses to read the database (so nobody
reads a half-upgraded one). The file is written in place, never replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import lmdb
import numpy as np
from tqdm import tqdm

from app.database import neighbors
from app.database.analysis import attention_rollout
from app.database.checksum import seal_value
from app.database.stats import head_statistics
from app.database.records import Grid
from app.database.environment import DatabaseError, pending_environment, sub_dbs
from app.database.environment import open_lmdb as _open_lmdb
from app.database.keys import SCHEMA_VERSION
from app.database.keys import example_key as _ekey, layer_key as _lkey, scaled_float16 as _scaled_float16
from app.database.store import VliLmdb

__all__ = ["upgrade", "main"]

V1_STATISTICS = 7  # txt2img, img2txt, txt2txt, img2img, img2img_nodiag, cross_modal, intra_modal
PROGRESS_DB = b"upgrade_progress"  # ex_id keys done, plus b"state" (the index being rebuilt) and
# b"projection" (its projection), JSON


def upgrade(path: str, progress: bool = True) -> Optional[int]:
    """Upgrade the database at ``path`` to :data:`SCHEMA_VERSION`; return how many examples were
    rewritten, None when it already was at that version. Raises DatabaseError for anything that is
    not a database of a known older schema."""
    quoted = repr(os.fspath(path))
    env = _open_lmdb(os.fspath(path), quoted, readonly=False, max_dbs=len(sub_dbs()) + 6)
    try:
        try:
            meta = env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            raise DatabaseError(f"{quoted} is not a VL-InterpreT database (no 'meta' table)") from None
        with env.begin() as txn:
            version = VliLmdb._stored_schema(txn.get(b"schema_version", db=meta), quoted)
        if version == SCHEMA_VERSION:
            return None
        if version != 1:
            raise VliLmdb._schema_error(version, quoted)
        return _upgrade_v1(env, meta, os.fspath(path), progress)
    finally:
        env.close()


def _upgrade_v1(env, meta, path: str, progress: bool) -> int:
    dbs = {name.decode(): env.open_db(name, create=True) for name in sub_dbs()[1:]}
    done_db = env.open_db(PROGRESS_DB, create=True)
    with env.begin() as txn:
        settings = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=meta)}
        ex_ids = [int(bytes(k)) for k in txn.cursor(db=dbs["info"]).iternext(values=False)]
        state = txn.get(b"state", db=done_db)
        state = json.loads(bytes(state)) if state is not None else None
        done = {int(bytes(k)) for k in txn.cursor(db=done_db).iternext(values=False) if bytes(k).isdigit()}
    plain = {k: json.loads(v) for k, v in settings.items() if k != "nn_projection"}
    n_layers, n_heads = plain.get("n_layers"), plain.get("n_heads")
    if state is None:
        state = {"tail": [], "shards": 0}
        with env.begin(write=True) as txn:
            txn.drop(dbs["nn"], delete=False)  # the approximate index of schema 1: rebuilt below
            txn.put(b"state", json.dumps(state).encode(), db=done_db)
    projection = _projection(env, dbs, done_db, ex_ids)
    todo = [e for e in ex_ids if e not in done]
    for ex_id in tqdm(todo, desc=f"upgrading {path}", unit="example", disable=not progress):
        with env.begin(write=True) as txn:
            _upgrade_example(txn, dbs, ex_id, n_layers, n_heads, projection, state)
            txn.put(_ekey(ex_id), b"", db=done_db)
            txn.put(b"state", json.dumps(state).encode(), db=done_db)
    _move_pending(env, path)
    with env.begin(write=True) as txn:
        for key, value in plain.items():
            txn.put(key.encode(), seal_value(json.dumps(value).encode()), db=meta)
        if projection is not None:
            txn.put(b"nn_projection", seal_value(projection.astype("<f4").tobytes()), db=meta)
            txn.put(b"nn_dim", seal_value(json.dumps(int(projection.shape[-1])).encode()), db=meta)
        txn.put(b"nn_tail", seal_value(json.dumps(state["tail"]).encode()), db=meta)
        txn.put(b"nn_shards", seal_value(json.dumps(state["shards"]).encode()), db=meta)
        txn.put(b"schema_version", seal_value(json.dumps(SCHEMA_VERSION).encode()), db=meta)
        txn.drop(done_db, delete=True)
    return len(todo)


def _projection(env, dbs, done_db, ex_ids) -> Optional[np.ndarray]:
    """The nearest-token projection of the upgraded index: fitted on the first example, as
    preprocess() does, and kept across an interrupted upgrade."""
    with env.begin() as txn:
        saved = txn.get(b"projection", db=done_db)
        if saved is not None:
            saved = json.loads(bytes(saved))
            return np.frombuffer(bytes.fromhex(saved["data"]), "<f4").reshape(saved["shape"])
        if not ex_ids:
            return None
        info = json.loads(bytes(txn.get(_ekey(ex_ids[0]), db=dbs["info"])))
        hidden = _hidden(txn, dbs, ex_ids[0], info)
    projection = neighbors.make_projection(hidden, np.array(info["special"], bool))
    with env.begin(write=True) as txn:
        txn.put(b"projection", json.dumps({"shape": list(projection.shape),
                                           "data": projection.astype("<f4").tobytes().hex()}).encode(), db=done_db)
    return projection


def _hidden(txn, dbs, ex_id: int, info: dict) -> np.ndarray:
    """(L + 1, n, d) float16 hidden states of a schema-1 example."""
    layers, layer = [], 0
    while (raw := txn.get(_lkey(ex_id, layer), db=dbs["hidden"])) is not None:
        layers.append(np.frombuffer(bytes(raw), "<f2").reshape(len(info["tokens"]), -1))
        layer += 1
    return np.stack(layers)


def _upgrade_example(txn, dbs, ex_id: int, n_layers: int, n_heads: int, projection, state: dict) -> None:
    ekey = _ekey(ex_id)
    info = json.loads(bytes(txn.get(ekey, db=dbs["info"])))
    n = len(info["tokens"])
    special = np.array(info["special"], bool)
    info.setdefault("notes", [])
    info.setdefault("source", None)
    info.setdefault("attention_exp", 0)
    attention16 = [np.frombuffer(bytes(txn.get(_lkey(ex_id, layer), db=dbs["attention"])), "<f2")
                   for layer in range(n_layers)]
    attention = np.stack(attention16).reshape(n_layers, n_heads, n, n).astype(np.float32) \
        * np.float32(2.0 ** -info["attention_exp"])
    old_stats = np.frombuffer(bytes(txn.get(ekey, db=dbs["stats"])), "<f4").reshape(-1, n_layers, n_heads)
    coords = [None if c is None else tuple(c) for c in info["coords"]]
    height, width = info["image_size"]
    grids = () if info["grid"] is None else (Grid("", *info["grid"], (0, 0, width, height)),)
    is_text = np.arange(n) < info["txt_len"]  # schema 1 stored text first
    patch_grid = [-1 if c is None else 0 for c in coords]
    stats = list(head_statistics(attention, is_text, special, coords, (height, width), grids,
                                 patch_grid).values()) + list(old_stats[V1_STATISTICS:])
    hidden = _hidden(txn, dbs, ex_id, info)
    for name, key, value in (("ids", ekey, b""),
                             ("stats", ekey, np.stack(stats).astype("<f4").tobytes()),
                             ("image", ekey, bytes(txn.get(ekey, db=dbs["image"]))),
                             ("tsne", ekey, bytes(txn.get(ekey, db=dbs["tsne"])))):
        txn.put(key, seal_value(value), db=dbs[name])
    for layer, values in enumerate(attention16):
        txn.put(_lkey(ex_id, layer), seal_value(values.tobytes()), db=dbs["attention"])
    rollout16, info["rollout_exp"] = _scaled_float16(attention_rollout(attention))
    for layer, values in enumerate(rollout16):
        txn.put(_lkey(ex_id, layer), seal_value(values.tobytes()), db=dbs["rollout"])
    txn.put(ekey, seal_value(json.dumps(info).encode()), db=dbs["info"])
    for layer, values in enumerate(hidden):
        txn.put(_lkey(ex_id, layer), seal_value(values.tobytes()), db=dbs["hidden"])
    for key, value in neighbors.example_entries(ex_id, hidden, is_text, special, projection).items():
        txn.put(key, value, db=dbs["nn"])
    state["tail"].append(ex_id)
    if len(state["tail"]) >= neighbors.SHARD_EXAMPLES:
        neighbors.seal(txn, dbs["nn"], state["tail"], state["shards"], len(hidden))
        state["shards"] += 1
        state["tail"] = []


def _move_pending(env, path: str) -> None:
    """Schema 1 kept raw records in the main file: move them to DB/pending/ (copied, then deleted)."""
    try:
        old = env.open_db(b"pending", create=False)
    except lmdb.NotFoundError:
        return
    with env.begin() as txn:
        records = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=old)]
    if records:
        with pending_environment(path, create=True) as pending, pending.begin(write=True) as txn:
            for key, value in records:
                txn.put(key, seal_value(value))
    with env.begin(write=True) as txn:
        txn.drop(old, delete=True)


def main(argv=None, prog: str = "python -m app.database.upgrade") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("databases", nargs="+", metavar="DB", help="database folder(s) to upgrade in place")
    args = parser.parse_args(argv)
    status = 0
    for path in args.databases:
        try:
            count = upgrade(path)
        except DatabaseError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}: " + (f"already at schema version {SCHEMA_VERSION}" if count is None else
                             f"upgraded to schema version {SCHEMA_VERSION} ({count} example(s) rewritten)"),
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
