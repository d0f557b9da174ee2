"""Preprocessing: validate a record, run every registered analysis on it (app.database.analyses), encode
the core values (attention, hidden states, the image, the nearest-token index) and commit the example.

``preprocess()`` does it for every pending record, computing the next example in a worker thread while
the current one is written; ``add_record()`` for one record at once (live models, the extractor).
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from app.database import analyses, compact, neighbors, safe_pickle
from app.database.checksum import open_value
from app.database.keys import FLOAT16_MAX, example_key, key_name, layer_key, png_bytes, scaled_float16, source_hash
from app.database.records import Record, RecordError, validate_record
from app.database.writes import ExampleShape, PreparedExample, Writes

__all__ = ["Pipeline", "PreprocessReport", "PIPELINE"]

PIPELINE = True  # preprocess(): compute the next example in a worker thread (False: one by one, to measure)
CORE_STAGES = ("unpickle", "validate", "index", "encode", "write")


@dataclass
class PreprocessReport:
    """What :meth:`VliLmdb.preprocess` did.

    stage_seconds sums each stage over examples; the compute stages of the next example run in
    a worker thread while the current one is written, so their sum can exceed total_seconds.
    """

    added: list[int] = field(default_factory=list)
    failed: dict[Union[int, str], str] = field(default_factory=dict)
    # pending records found already stored: an interrupted run had committed the example but not
    # yet cleared its raw record
    already: list[int] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    def __str__(self) -> str:
        text = f"preprocessed {len(self.added)} example(s) in {self.total_seconds:.1f} s"
        if self.failed:
            text += (f"; {len(self.failed)} record(s) failed and stay pending "
                     f"(fix them and run preprocess() again)")
        return text



class Pipeline(Writes):
    """Preprocessing (see :class:`app.database.store.VliLmdb`)."""

    def add_record(self, record: dict) -> int:
        """Validate, preprocess and commit one record in one transaction; return its ex_id.

        Raises RecordError (nothing written) for an invalid record or an ex_id already in use;
        any other failure while preparing it is reported as a RecordError too.
        """
        start = time.perf_counter()
        ex_id = record.get("ex_id") if isinstance(record, dict) else None
        normal = _as_record_error(ex_id, "record", lambda: validate_record(
            record, special_tokens=self.special_tokens, expected=self._expected_dims()))
        seconds = {"validate": time.perf_counter() - start}
        prepared = self._prepare(normal, None, None, seconds)
        self._commit(prepared)
        return normal.ex_id

    def preprocess(self, progress: bool = True) -> PreprocessReport:
        """Validate and convert every pending record (see PreprocessReport); bad ones stay pending.

        Any failure of one record (not only an invalid field: an unexpected error anywhere in its
        processing) refuses that record alone, reported with its example and field; the others land.
        The next example is computed in a worker thread while the current one is written.
        """
        self._write().abort()  # fail early when read-only
        report = PreprocessReport()
        start = time.perf_counter()
        keys = [k.encode() for k in self.pending_keys()]
        keys.sort(key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        stages = dict.fromkeys(CORE_STAGES + tuple(a.stage for a in analyses.registered()), 0.0)
        expected = [self._expected_dims()]

        def compute(key: bytes) -> Union[PreparedExample, RecordError, int]:
            try:
                return self._compute_pending(key, expected)
            except RecordError as error:
                return error

        bar = None
        if keys:
            for analysis in analyses.registered():
                analysis.warm_up()
        if progress and keys:
            from tqdm.auto import tqdm  # noqa: PLC0415
            bar = tqdm(total=len(keys), desc="preprocess", unit="example")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-preprocess")
        queue = deque()
        try:
            upcoming = iter(keys)

            def submit_next() -> None:
                for next_key in upcoming:
                    queue.append((next_key, executor.submit(compute, next_key)))
                    break

            submit_next()
            while queue:
                key, future = queue.popleft()
                result = future.result()
                if PIPELINE:  # compute the next example while this one is written
                    submit_next()
                if isinstance(result, PreparedExample):
                    for stage, value in result.seconds.items():
                        stages[stage] = stages.get(stage, 0.0) + value
                    try:
                        t = time.perf_counter()
                        self._commit(result)
                        stages["write"] += time.perf_counter() - t
                        report.added.append(result.example.ex_id)
                    except RecordError as error:
                        result = error
                elif isinstance(result, int):
                    report.already.append(result)
                if isinstance(result, RecordError):
                    report.failed[key_name(key)] = str(result)
                    message = f"✗ not added, kept pending: {result}"
                    if bar is not None:
                        bar.write(message, file=sys.stderr)
                    else:
                        print(message, file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                if not PIPELINE:
                    submit_next()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
        self._remove_pending_if_empty()
        report.stage_seconds = stages
        report.total_seconds = time.perf_counter() - start
        if report.failed or progress:
            print(str(report), file=sys.stderr)
        return report

    def _compute_pending(self, key: bytes, expected: list) -> Union[PreparedExample, int]:
        """The prepared example of one pending record, or its ex_id when it is already stored
        (its raw record is then cleared). Raises RecordError for any failure."""
        name = key_name(key)
        t = time.perf_counter()
        with self._pending() as env:
            raw = None
            if env is not None:
                with env.begin() as txn:
                    sealed = txn.get(key)
                    raw = None if sealed is None else bytes(
                        _as_record_error(name, "record", lambda: open_value(sealed, "the pending raw record")))
        if raw is None:
            raise RecordError(name, "record", "disappeared from the pending records (preprocessed elsewhere?)")
        source = source_hash(raw)
        if isinstance(name, int) and self.stored_source(name) == source:
            self._clear_pending(key, source)
            return name
        try:
            record = safe_pickle.loads(raw)
        except Exception as error:  # corrupt or unsafe pickle: kept pending, reported
            raise RecordError(name, "record", f"could not unpickle: {_one_line(error)}") from None
        del raw
        seconds = {"unpickle": time.perf_counter() - t}
        t = time.perf_counter()
        normal = _as_record_error(name, "record", lambda: validate_record(
            record, special_tokens=self.special_tokens, expected=expected[0], ex_id=name))
        if normal.ex_id != name:
            raise RecordError(name, "ex_id", f"the record's ex_id {normal.ex_id} differs from its key {name!r}; "
                              f"store it as db[str(ex_id)]")
        if expected[0] is None:
            expected[0] = (normal.n_layers, normal.n_heads, normal.hidden_size)
        seconds["validate"] = time.perf_counter() - t
        return self._prepare(normal, key, source, seconds)


    def _prepare(self, normal: Record, key: Optional[bytes], source: Optional[str],
                 seconds: dict[str, float]) -> PreparedExample:
        ex_id, n = normal.ex_id, normal.n_tokens
        # Everything derived from the hidden states uses what is stored (float16, clipped), so
        # that the nearest-token index and the maps agree with the values a reader gets back.
        hidden16 = np.clip(normal.hidden_states, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2")
        stored_hidden = hidden16.astype(np.float32)
        reduced = compact.plan(normal.n_layers, normal.n_heads, n, normal.hidden_size)
        example = analyses.ExampleArrays(record=normal, stored_hidden=stored_hidden, compact=reduced is not None)
        values: dict[str, dict[bytes, bytes]] = {}
        computed_info = {}
        for analysis in analyses.registered():  # from the full values, before anything is reduced
            t = time.perf_counter()
            stored = _as_record_error(ex_id, analysis.field, lambda: analysis.compute(example))
            if analysis.table is not None:
                values[analysis.table] = stored.values
            computed_info.update(stored.info)
            seconds[analysis.stage] = seconds.get(analysis.stage, 0.0) + time.perf_counter() - t

        t = time.perf_counter()
        if reduced is not None:  # the index is built on what the search will read back: the reconstruction
            hidden_blobs, kept_variance = zip(*(compact.encode_hidden(layer, reduced[1]) for layer in stored_hidden))
            hidden16 = np.stack([compact.decode_hidden(blob, n, normal.hidden_size, reduced[1])
                                 for blob in hidden_blobs])
            stored_hidden = hidden16.astype(np.float32)
        else:
            hidden_blobs = [layer.tobytes() for layer in hidden16]
        projection, projection_bytes = self._projection_for(hidden16, normal.special)
        values["nn"] = _as_record_error(ex_id, "hidden_states", lambda: neighbors.example_entries(
            ex_id, stored_hidden, normal.is_text, normal.special, projection))
        seconds["index"] = seconds.get("index", 0.0) + time.perf_counter() - t

        t = time.perf_counter()
        info = {"ex_id": ex_id, "tokens": normal.tokens, "txt_len": normal.txt_len,
                "special": normal.special.tolist(), "coords": normal.coords, "grid": normal.grid,
                "modality": "".join("t" if t else "i" for t in normal.is_text),
                "grids": [g.as_json() for g in normal.grids], "generated": normal.generated,
                "image_size": list(normal.image.shape[:2]), "accuracy": normal.accuracy,
                "prediction": normal.prediction, "text": normal.text, "notes": normal.notes,
                "source": source, **computed_info}
        if len(normal.grids) > 1:
            info["patch_grid"] = normal.patch_grid.tolist()
        attention16, info["attention_exp"] = scaled_float16(normal.attention)
        if reduced is None:
            attention_blobs = [layer.tobytes() for layer in attention16]
        else:
            attention_blobs, kept_mass = zip(*(compact.encode_attention(layer, reduced[0]) for layer in attention16))
            reduction = compact.Compact(top_keys=reduced[0], kept_mass=float(np.mean(kept_mass)),
                                        components=reduced[1], kept_variance=float(np.mean(kept_variance)))
            info["compact"] = reduction.as_json()
            info["notes"] = list(normal.notes) + [reduction.note()]
        ekey = example_key(ex_id)
        image_png = _as_record_error(ex_id, "image", lambda: png_bytes(normal.image))
        values.update({
            "info": {ekey: json.dumps(info).encode()},
            "ids": {ekey: b""},
            "image": {ekey: image_png},
            "attention": {layer_key(ex_id, layer): blob for layer, blob in enumerate(attention_blobs)},
            "hidden": {layer_key(ex_id, layer): blob for layer, blob in enumerate(hidden_blobs)},
        })
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - t
        shape = ExampleShape(ex_id=ex_id, n_layers=normal.n_layers, n_heads=normal.n_heads,
                             hidden_size=normal.hidden_size, is_text=normal.is_text, special=normal.special,
                             hidden16=hidden16, custom_metrics=list(normal.custom_metrics),
                             metric_descriptions=normal.metric_descriptions)
        return PreparedExample(example=shape, key=key, source=source, values=values, projection=projection_bytes,
                               seconds=seconds)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_record_error(ex_id, field_name: str, compute):
    """``compute()``, with any failure but a RecordError turned into one for ``field_name``: one bad
    record must never abort a whole preprocess() (or leave a traceback instead of a message)."""
    try:
        return compute()
    except RecordError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with the example and the field
        raise RecordError(ex_id, field_name, f"could not be processed: {_one_line(error)}") from None
