"""Head statistics (app.database.stats): one number per layer and head for every statistic, from the
attention alone; the record's own custom metrics are stored with them.

Table ``stats``, key ``E``: float32 ``(n_statistics, n_layers, n_heads)``, the built-ins of
``stats.STATISTICS`` in order, then the example's custom metrics (their names in the description's
``custom_metrics``).
"""
from __future__ import annotations

import json

import numpy as np

from app.database.analyses import ATTENTION, Analysis, ExampleArrays, Stored, register
from app.database.keys import example_key
from app.database.stats import STATISTICS, head_statistics

__all__ = ["HeadStatistics", "HEAD_STATISTICS"]


class HeadStatistics(Analysis):
    name = "head_statistics"
    needs = (ATTENTION,)
    field = "attention"
    table = "stats"
    what = "head statistics"
    stage = "statistics"

    def compute(self, example: ExampleArrays) -> Stored:
        r = example.record
        statistics = head_statistics(r.attention, r.is_text, r.special, r.coords, r.image.shape[:2], r.grids,
                                     r.patch_grid)
        values = list(statistics.values()) + [r.custom_metrics[m] for m in r.custom_metrics]
        return Stored({example_key(r.ex_id): np.stack(values).astype("<f4").tobytes()},
                      {"custom_metrics": list(r.custom_metrics)})

    def read(self, db, ex_id: int) -> dict[str, np.ndarray]:
        """{name: float32 (n_layers, n_heads)} for db.statistic_names(); NaN where undefined/absent."""
        ex_id = int(ex_id)
        with db._read() as txn:
            raw = db._get(txn, self.table, example_key(ex_id), ex_id, self.what)
            values = np.frombuffer(raw, dtype="<f4").reshape(-1, db.n_layers, db.n_heads).copy()
            custom = json.loads(bytes(db._get(txn, "info", example_key(ex_id), ex_id, "description")))["custom_metrics"]
        names = list(STATISTICS) + custom
        result = {name: values[i] for i, name in enumerate(names)}
        for name in db.statistic_names():
            if name not in result:
                result[name] = np.full((db.n_layers, db.n_heads), np.nan, np.float32)
        return {name: result[name] for name in db.statistic_names()}


HEAD_STATISTICS = register(HeadStatistics())
