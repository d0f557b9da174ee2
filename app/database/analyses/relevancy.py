"""Gradient relevancy of the prediction (Chefer et al. 2021, app.database.analysis.gradient_relevancy):
computed by the model's adapter with a backward pass (the ViLT adapter does), stored from the record.

Table ``relevancy``, key ``E``: float32 ``(n, n)``, rows = queries; absent when the record had none.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from app.database.analyses import GRADIENTS, MODEL, Analysis, ExampleArrays, Stored, register
from app.database.keys import example_key

__all__ = ["Relevancy", "RELEVANCY"]


class Relevancy(Analysis):
    name = "relevancy"
    needs = (MODEL, GRADIENTS)
    field = "relevancy"
    table = "relevancy"
    what = "relevancy"
    optional = True

    def compute(self, example: ExampleArrays) -> Stored:
        r = example.record
        if r.relevancy is None:
            return Stored()
        return Stored({example_key(r.ex_id): r.relevancy.astype("<f4").tobytes()})

    def read(self, db, ex_id: int, queries: Union[int, Sequence[int], np.ndarray]) -> Optional[np.ndarray]:
        """float32 (n,): the relevancy of every token for ``queries`` (rows averaged); None without one."""
        info = db.example(ex_id)
        rows, n = db._query_rows(queries, info.n_tokens, "relevancy"), info.n_tokens
        with db._read() as txn:
            try:
                raw = db._get(txn, self.table, example_key(info.ex_id), ex_id, self.what)
            except KeyError:
                return None
            return np.frombuffer(raw, dtype="<f4").reshape(n, n)[rows].mean(axis=0)


RELEVANCY = register(Relevancy())
