"""The logit lens (nostalgebraist 2020): the model's own head applied after every layer, up to ten
answers per hidden-state layer. Computed by the adapter (the ViLT adapter at the pooled token, ``-m hf``
where the answer starts) and small, so it lives in the description (``logit_lens``), read with the example.
"""
from __future__ import annotations

from typing import Optional

from app.database.analyses import MODEL, Analysis, ExampleArrays, Stored, register

__all__ = ["LogitLens", "LOGIT_LENS"]


class LogitLens(Analysis):
    name = "logit_lens"
    needs = (MODEL,)
    field = "logit_lens"
    optional = True

    def compute(self, example: ExampleArrays) -> Stored:
        return Stored(info={"logit_lens": example.record.logit_lens})

    def read(self, db, ex_id: int) -> Optional[list]:
        """Per hidden-state layer [[answer, probability], ...]; None when the example has none."""
        return db.example(ex_id).logit_lens


LOGIT_LENS = register(LogitLens())
