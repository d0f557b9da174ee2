"""The attention rollout (Abnar & Zuidema 2020, app.database.analysis.attention_rollout) through layers
1..l+1, for every layer l, from the attention alone.

Table ``rollout``, key ``E/LLL``: float16 ``(n, n)`` holding the rollout * 2**rollout_exp (description).
An example stored compact has none: its rollout is computed on read from the exact head means.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from app.database.analyses import ATTENTION, Analysis, ExampleArrays, Stored, register
from app.database.analysis import attention_rollout, rollout_mixing
from app.database.keys import layer_key, scaled_float16

__all__ = ["Rollout", "ROLLOUT"]


class Rollout(Analysis):
    name = "rollout"
    needs = (ATTENTION,)
    field = "attention"
    table = "rollout"
    stage = "rollout"

    def compute(self, example: ExampleArrays) -> Stored:
        if example.compact:
            return Stored(info={"rollout_exp": 0})
        r = example.record
        rollout16, exp = scaled_float16(attention_rollout(r.attention))
        return Stored({layer_key(r.ex_id, layer): rollout16[layer].tobytes() for layer in range(r.n_layers)},
                      {"rollout_exp": exp})

    def stored_keys(self, ex_id: int, info: dict, n_layers: int) -> list[tuple[bytes, str]]:
        if info.get("compact"):
            return []
        return [(layer_key(ex_id, layer), f"rollout up to layer {layer}") for layer in range(n_layers)]

    def read(self, db, ex_id: int, layer: int, queries: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
        """float32 (n,): the rollout through layers 1..layer+1 of ``queries``, averaged over them."""
        info = db.example(ex_id)
        layer = db._check_layer(layer, hidden=False)
        rows, n = db._query_rows(queries, info.n_tokens, "rollout"), info.n_tokens
        if info.reduction is not None:  # not stored: from the exact means, one row vector through the layers
            weights = np.zeros(n)
            np.add.at(weights, rows, 1.0 / len(rows))
            everyone = np.arange(n)
            for below in range(layer, -1, -1):
                weights = weights @ rollout_mixing(db._attention_rows(info, below, None, everyone))
            return weights.astype(np.float32)
        with db._read() as txn:
            view = np.frombuffer(db._get(txn, self.table, layer_key(info.ex_id, layer), ex_id,
                                         f"rollout up to layer {layer}"), dtype="<f2").reshape(n, n)
            picked = view[rows]
        return picked.astype(np.float32).mean(axis=0) * np.float32(2.0 ** -info.rollout_exp)


ROLLOUT = register(Rollout())
