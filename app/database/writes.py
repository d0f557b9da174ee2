"""The write side of a database: pending raw records, ids, and the commit of a prepared example in one
write transaction (all or nothing), shared by preprocessing (pipeline.py) and merging (import_example).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from app.database import analyses, neighbors
from app.database.checksum import CHECKSUM_BYTES, open_value, seal_value
from app.database.keys import example_key, hidden_array, is_text_of, layer_key, source_hash
from app.database.reads import ExampleInfo, Reads
from app.database.records import MAX_NOTE_CHARS, RecordError

__all__ = ["Writes", "ExampleShape", "PreparedExample", "MAX_NOTES"]

MAX_NOTES = 200  # per example: its description is read whenever it is opened


@dataclass
class ExampleShape:
    """What committing an example needs to know of it besides its values."""

    ex_id: int
    n_layers: int
    n_heads: int
    hidden_size: int
    is_text: np.ndarray              # (n,) bool
    special: np.ndarray              # (n,) bool
    hidden16: np.ndarray             # (L + 1, n, d) float16 as stored: to index it under another projection
    custom_metrics: list[str]
    metric_descriptions: dict[str, str]


@dataclass
class PreparedExample:
    """Everything one example writes, computed outside the write transaction."""

    example: ExampleShape
    key: Optional[bytes]               # pending key, None for add_record
    source: Optional[str]              # xxh3 of the pending raw pickle, None for add_record
    values: dict[str, dict[bytes, bytes]]  # table -> key -> value
    projection: bytes
    seconds: dict[str, float]


class Writes(Reads):
    """Pending records, ids and commits (see :class:`app.database.store.VliLmdb`)."""

    def __setitem__(self, key: Union[str, int], value: bytes) -> None:
        """Store a raw pickled record under ``str(ex_id)``, pending until preprocess()."""
        key = str(key)
        if not key:
            raise KeyError("the key must be a non-empty str (str(ex_id))")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"db[{key!r}] = ... expects pickle bytes "
                            f"(pickle.dumps(record)), got {type(value).__name__}")
        self._write().abort()  # fail early when read-only
        with self._pending(create=True) as env, env.begin(write=True) as txn:
            txn.put(key.encode(), seal_value(value))
        if key.isdigit() and len(key) <= 10:
            with self._write() as txn:
                self._bump_next_id(txn, int(key))

    def discard_pending(self, key: Union[str, int]) -> bool:
        """Delete a pending raw record; True if there was one."""
        self._write().abort()  # fail early when read-only
        with self._pending() as env:
            if env is None:
                return False
            with env.begin(write=True) as txn:
                found = txn.delete(str(key).encode())
        self._remove_pending_if_empty()
        return found

    def _bump_next_id(self, txn, ex_id: int) -> None:
        if (self._meta("next_id", txn) or 0) <= ex_id:
            self._put_meta(txn, "next_id", ex_id + 1)

    def reserve_example_id(self) -> int:
        """Atomically hand out an id no example or pending record uses (threads and processes)."""
        with self._write() as txn, self._pending() as pending:
            pending_txn = pending.begin() if pending is not None else None
            try:
                ex_id = self._meta("next_id", txn) or 0
                while (txn.get(example_key(ex_id), db=self._dbs["info"]) is not None
                       or (pending_txn is not None and pending_txn.get(str(ex_id).encode()) is not None)):
                    ex_id += 1
            finally:
                if pending_txn is not None:
                    pending_txn.abort()
            self._put_meta(txn, "next_id", ex_id + 1)
            return ex_id

    def add_notes(self, ex_id: int, notes: Sequence[str]) -> ExampleInfo:
        """Append ``notes`` to example ``ex_id``'s (shown with the example and in its report), all in one
        write transaction that changes nothing else; return the updated description. For results that
        belong with the example but are not part of it (interventions' outcomes). KeyError when absent;
        RecordError (naming the example and the field ``notes``), nothing written, for an empty or too
        long note, or too many."""
        ex_id = int(ex_id)
        if isinstance(notes, str) or not all(isinstance(note, str) and note.strip() for note in notes):
            raise RecordError(ex_id, "notes", "expected a list of non-empty str")
        notes = [note.strip() for note in notes]
        for note in notes:
            if len(note) > MAX_NOTE_CHARS:
                raise RecordError(ex_id, "notes", f"a note is {len(note):,} characters long; at most "
                                  f"{MAX_NOTE_CHARS:,} are stored")
        with self._write() as txn:
            info = json.loads(bytes(self._get(txn, "info", example_key(ex_id), ex_id, "description")))
            if len(info["notes"]) + len(notes) > MAX_NOTES:
                raise RecordError(ex_id, "notes", f"the example has {len(info['notes'])} notes; at most "
                                  f"{MAX_NOTES} are kept")
            info["notes"] += notes
            txn.put(example_key(ex_id), seal_value(json.dumps(info).encode()), db=self._dbs["info"])
        with self._lock:
            self._cache.pop(ex_id, None)
        return self.example(ex_id)

    def _expected_dims(self) -> Optional[tuple[int, int, int]]:
        dims = (self._meta("n_layers"), self._meta("n_heads"), self._meta("hidden_size"))
        return None if dims[0] is None else dims

    def _projection_for(self, hidden16: np.ndarray, special: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The nearest-token projection (neighbors.py) an example's index entries are made for: the
        database's, or for its first example one fitted on that example's stored hidden states."""
        with self._read() as txn:
            raw = txn.get(b"nn_projection", db=self._dbs["meta"])
            projection_bytes = None if raw is None else bytes(open_value(raw, "the nearest-token projection"))
        if projection_bytes is None:
            projection = neighbors.make_projection(hidden16, special)
            return projection, projection.astype("<f4").tobytes()
        n_hidden, hidden_size = hidden16.shape[0], hidden16.shape[2]
        return np.frombuffer(projection_bytes, dtype="<f4").reshape(n_hidden, hidden_size, -1), projection_bytes

    def import_example(self, source: "Reads", ex_id: int, new_id: Optional[int] = None) -> int:
        """Copy example ``ex_id`` of the database ``source`` into this one as ``new_id`` (default: the
        same id), every stored value as it is (each checked on the way), the nearest-token index entries
        computed for this database's projection; return the id. For merging databases (shards of one
        extraction): nothing is recomputed, so the copy equals the original. Raises RecordError when the id
        is taken or the model's shape differs; CorruptValueError when a value of the source is damaged."""
        ex_id = int(ex_id)
        new_id = ex_id if new_id is None else int(new_id)
        info = dict(json.loads(bytes(source._read_value("info", example_key(ex_id), ex_id, "description"))))
        dims = (source.n_layers, source.n_heads, source.hidden_size)
        mine = self._expected_dims()
        if mine is not None and tuple(mine) != dims:
            raise RecordError(new_id, "attention", f"the source database's model has {dims[0]} layers, {dims[1]} "
                              f"heads, hidden size {dims[2]}; this one {mine[0]}, {mine[1]}, {mine[2]}")
        layers = range(dims[0])
        copied = {"image": {example_key(new_id): source._read_value("image", example_key(ex_id), ex_id, "image")},
                  "attention": {layer_key(new_id, l): source._read_value("attention", layer_key(ex_id, l), ex_id,
                                                                        f"attention of layer {l}") for l in layers},
                  "hidden": {layer_key(new_id, l): source._read_value("hidden", layer_key(ex_id, l), ex_id,
                                                                     f"hidden states of layer {l}")
                             for l in range(dims[0] + 1)}}
        for analysis in analyses.registered():
            if analysis.table is None:
                continue
            items = copied[analysis.table] = {}
            for (key, what), (new_key, _) in zip(analysis.stored_keys(ex_id, info, dims[0]),
                                                 analysis.stored_keys(new_id, info, dims[0])):
                try:
                    items[new_key] = source._read_value(analysis.table, key, ex_id, what)
                except KeyError:
                    if not analysis.optional:
                        raise
        stored = source.example(ex_id)
        hidden16 = np.stack([hidden_array(copied["hidden"][layer_key(new_id, l)], stored, dims[2])
                             for l in range(dims[0] + 1)])
        special = np.array(info["special"], dtype=bool)
        is_text = is_text_of(info)
        info["ex_id"] = new_id
        copied["info"] = {example_key(new_id): json.dumps(info).encode()}
        copied["ids"] = {example_key(new_id): b""}
        projection, projection_bytes = self._projection_for(hidden16, special)
        copied["nn"] = neighbors.example_entries(new_id, hidden16, is_text, special, projection)
        descriptions = {name: source.metric_description(name) for name in info["custom_metrics"]}
        shape = ExampleShape(ex_id=new_id, n_layers=dims[0], n_heads=dims[1], hidden_size=dims[2], is_text=is_text,
                             special=special, hidden16=hidden16, custom_metrics=list(info["custom_metrics"]),
                             metric_descriptions={k: v for k, v in descriptions.items() if v is not None})
        self._commit(PreparedExample(example=shape, key=None, source=info.get("source"), values=copied,
                                     projection=projection_bytes, seconds={}))
        return new_id

    def _clear_pending(self, key: bytes, source: str) -> None:
        """Delete a pending raw record once its example is stored, unless it was rewritten meanwhile."""
        with self._pending() as env:
            if env is None:
                return
            with env.begin(write=True) as txn:
                sealed = txn.get(key)
                if sealed is not None and source_hash(bytes(sealed)[:-CHECKSUM_BYTES]) == source:
                    txn.delete(key)

    def _commit(self, prepared: PreparedExample) -> None:
        """Write one prepared example in one transaction (all or nothing); then clear its pending
        raw record (a crash in between is noticed by the next preprocess() from info's source)."""
        normal, ex_id = prepared.example, prepared.example.ex_id
        with self._write() as txn:
            dims = (self._meta("n_layers", txn), self._meta("n_heads", txn), self._meta("hidden_size", txn))
            if dims[0] is not None:
                for name, got, want, field_name in (("layers", normal.n_layers, dims[0], "attention"),
                                                    ("heads", normal.n_heads, dims[1], "attention"),
                                                    ("hidden size", normal.hidden_size, dims[2], "hidden_states")):
                    if got != want:
                        raise RecordError(ex_id, field_name, f"{got} {name}, but the database has {want} {name}")
            else:
                self._put_meta(txn, "n_layers", normal.n_layers)
                self._put_meta(txn, "n_heads", normal.n_heads)
                self._put_meta(txn, "hidden_size", normal.hidden_size)
                self._put_meta(txn, "special_tokens", list(self.special_tokens))
                self._put_meta(txn, "nn_dim", len(prepared.projection) // 4 // normal.hidden_size
                               // (normal.n_layers + 1))
                self._put_meta(txn, "nn_tail", [])
                self._put_meta(txn, "nn_shards", 0)
                txn.put(b"nn_projection", seal_value(prepared.projection), db=self._dbs["meta"])
            stored_projection = bytes(open_value(txn.get(b"nn_projection", db=self._dbs["meta"]),
                                                 "the nearest-token projection"))
            if stored_projection != prepared.projection:  # another example set it meanwhile
                projection = np.frombuffer(stored_projection, dtype="<f4").reshape(
                    normal.n_layers + 1, normal.hidden_size, -1)
                prepared.values["nn"] = neighbors.example_entries(
                    ex_id, normal.hidden16, normal.is_text, normal.special, projection)
            if txn.get(example_key(ex_id), db=self._dbs["info"]) is not None:
                raise RecordError(ex_id, "ex_id", f"example {ex_id} is already in the database "
                                  f"(use db.reserve_example_id() for a new id, or discard_pending({ex_id!r}))")
            for name, items in prepared.values.items():
                if name == "nn":  # neighbors.py seals its own values
                    db = self._dbs["nn"]
                    for key, value in items.items():
                        txn.put(key, value, db=db)
                    continue
                db = self._dbs[name]
                for key, value in items.items():
                    txn.put(key, seal_value(value), db=db)
            custom = self._meta("custom_metrics", txn) or []
            new = [m for m in normal.custom_metrics if m not in custom]
            if new:
                self._put_meta(txn, "custom_metrics", custom + new)
            if normal.metric_descriptions:
                described = self._meta("metric_descriptions", txn) or {}
                if any(described.get(k) != v for k, v in normal.metric_descriptions.items()):
                    self._put_meta(txn, "metric_descriptions", {**described, **normal.metric_descriptions})
            tail = (self._meta("nn_tail", txn) or []) + [ex_id]
            if len(tail) >= neighbors.SHARD_EXAMPLES:
                shard = self._meta("nn_shards", txn) or 0
                neighbors.seal(txn, self._dbs["nn"], tail, shard, normal.n_layers + 1)
                self._put_meta(txn, "nn_shards", shard + 1)
                tail = []
            self._put_meta(txn, "nn_tail", tail)
            self._bump_next_id(txn, ex_id)
        if prepared.key is not None:
            self._clear_pending(prepared.key, prepared.source)

