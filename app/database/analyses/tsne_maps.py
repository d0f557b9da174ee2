"""t-SNE maps of every hidden-state layer (app.database.tsne), from the hidden states as stored (float16),
so that the maps agree with the values a reader gets back.

Table ``tsne``, key ``E``: float32 ``(n_layers + 1, n, 2)``.
"""
from __future__ import annotations

import numpy as np

from app.database.analyses import HIDDEN_STATES, Analysis, ExampleArrays, Stored, register
from app.database.keys import example_key
from app.database.records import RecordError

__all__ = ["TsneMaps", "TSNE_MAPS", "tsne_maps", "tsne_ready"]


def tsne_maps(hidden: np.ndarray) -> np.ndarray:
    """(n_maps, n_points, dim) -> (n_maps, n_points, 2) float32 (tests replace it by a fast stand-in)."""
    from app.database.tsne import tsne_maps as maps  # noqa: PLC0415 (heavy import, only when writing)
    return maps(hidden)


def tsne_ready() -> None:
    """The t-SNE kernels compiled or loaded (a line says so when that is the first run's compile), so that
    a progress bar's ETA never counts it."""
    from app.database.tsne import wait_until_compiled  # noqa: PLC0415
    wait_until_compiled()


class TsneMaps(Analysis):
    name = "tsne"
    needs = (HIDDEN_STATES,)
    field = "hidden_states"
    table = "tsne"
    what = "t-SNE maps"
    stage = "tsne"

    def compute(self, example: ExampleArrays) -> Stored:
        r = example.record
        maps = np.asarray(tsne_maps(example.stored_hidden), dtype="<f4")
        if maps.shape != (r.n_layers + 1, r.n_tokens, 2):
            raise RecordError(r.ex_id, self.field, f"t-SNE returned shape {maps.shape}, expected "
                              f"{(r.n_layers + 1, r.n_tokens, 2)}")
        return Stored({example_key(r.ex_id): maps.tobytes()})

    def warm_up(self) -> None:
        tsne_ready()

    def read(self, db, ex_id: int, layer: int) -> np.ndarray:
        """float32 (n, 2): the t-SNE map of the hidden states at layer 0 .. n_layers."""
        info = db.example(ex_id)
        layer = db._check_layer(layer, hidden=True)
        with db._read() as txn:
            raw = db._get(txn, self.table, example_key(info.ex_id), info.ex_id, self.what)
            return np.frombuffer(raw, dtype="<f4").reshape(-1, info.n_tokens, 2)[layer].copy()


TSNE_MAPS = register(TsneMaps())
