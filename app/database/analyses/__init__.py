"""The registry of per-example analyses: what preprocessing computes and stores for every example.

Each analysis is one module of this package holding one :class:`Analysis` (registered at import). It
declares what it needs (:data:`NEEDS`), computes its stored values from one validated record
(:meth:`Analysis.compute`), says under which keys of its own table they lie (:meth:`Analysis.stored_keys`,
for merging) and reads them back (:meth:`Analysis.read`, behind ``VliLmdb.read_analysis(name, ...)``).
Preprocessing (:mod:`app.database.pipeline`) runs every registered analysis in turn; the storage layer
knows nothing of Dash, and a panel shows what ``read`` returns.

What an analysis needs decides where it runs: one that needs only the attention or the hidden states is
computed here, from the record; one that needs the model or its gradients (relevancy, the logit lenses)
is computed by the live model's adapter at extraction and arrives as an optional record field
(``Analysis.field``, validated by :mod:`app.database.records`), which preprocessing stores.

Built in, in the order they run: head statistics, t-SNE maps, rollout, relevancy, logit lens, patch lens
(docs/ARCHITECTURE.md says how to add one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from app.database.keys import CORE_TABLES, example_key
from app.database.records import OPTIONAL_FIELDS, REQUIRED_FIELDS, Record

__all__ = ["ATTENTION", "HIDDEN_STATES", "MODEL", "GRADIENTS", "NEEDS", "ExampleArrays", "Stored", "Analysis",
           "register", "registered", "get", "tables"]

ATTENTION = "attention"
HIDDEN_STATES = "hidden states"
MODEL = "the model"          # computed by the live model's adapter: a record field
GRADIENTS = "gradients"      # the same, with a backward pass
NEEDS = (ATTENTION, HIDDEN_STATES, MODEL, GRADIENTS)


@dataclass(frozen=True)
class ExampleArrays:
    """What an analysis computes from: one validated record in stored order, and what storage keeps of it."""

    record: Record
    stored_hidden: np.ndarray  # float32 (n_layers + 1, n, d): the hidden states as stored whole (float16, clipped)
    compact: bool              # the attention is stored reduced (app.database.compact): per-layer products are not


@dataclass
class Stored:
    """What an analysis stores for one example."""

    values: dict[bytes, bytes] = field(default_factory=dict)  # key -> value, in the analysis's table
    info: dict[str, Any] = field(default_factory=dict)        # small fields of the example's description


class Analysis:
    """One per-example analysis (see the module docstring); subclasses set the class attributes."""

    name: str                      # the registry's key (VliLmdb.read_analysis)
    needs: tuple[str, ...]         # of NEEDS
    field: str                     # the record field a failure is reported under (the one it reads, for MODEL)
    table: Optional[str] = None    # its LMDB table; None: it lives in the description alone
    what: str = ""                 # the value as messages name it ("example 7, <what>: damaged")
    stage: str = "encode"          # its key in PreprocessReport.stage_seconds
    optional: bool = False         # an example may have no value (a record without the field)

    def compute(self, example: ExampleArrays) -> Stored:
        raise NotImplementedError

    def stored_keys(self, ex_id: int, info: dict, n_layers: int) -> list[tuple[bytes, str]]:
        """(key, what) of every value example ``ex_id`` (description ``info``) has in ``table``."""
        return [(example_key(ex_id), self.what)] if self.table else []

    def warm_up(self) -> None:
        """Called before a preprocess() with records to process (e.g. to compile kernels), before its
        progress bar starts."""

    def read(self, db, ex_id: int, *args):
        raise NotImplementedError


_REGISTERED: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to what preprocessing runs (before any database is opened: its table is opened
    with the environment). Raises ValueError for a declaration that cannot work."""
    name = getattr(analysis, "name", None)
    if not isinstance(name, str) or not name or name in _REGISTERED:
        raise ValueError(f"analysis {name!r}: needs a name of its own (registered: {', '.join(_REGISTERED)})")
    unknown = [need for need in analysis.needs if need not in NEEDS]
    if not analysis.needs or unknown:
        raise ValueError(f"analysis {name!r}: needs must be some of {NEEDS}, got {analysis.needs}")
    if (MODEL in analysis.needs or GRADIENTS in analysis.needs) and analysis.field not in OPTIONAL_FIELDS:
        raise ValueError(f"analysis {name!r} needs {' and '.join(analysis.needs)}, which preprocessing does not "
                         f"have: it stores an optional record field, not {analysis.field!r}")
    if analysis.field not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        raise ValueError(f"analysis {name!r}: field {analysis.field!r} is no record field")
    taken = {t.decode() for t in CORE_TABLES} | set(tables())
    if analysis.table is not None and analysis.table in taken:
        raise ValueError(f"analysis {name!r}: table {analysis.table!r} is taken")
    _REGISTERED[name] = analysis
    return analysis


def registered() -> tuple[Analysis, ...]:
    """Every registered analysis, in the order preprocessing runs them."""
    return tuple(_REGISTERED.values())


def get(name: str) -> Analysis:
    try:
        return _REGISTERED[name]
    except KeyError:
        raise KeyError(f"no analysis {name!r} (registered: {', '.join(_REGISTERED)})") from None


def tables() -> tuple[str, ...]:
    """The tables of the registered analyses."""
    return tuple(a.table for a in _REGISTERED.values() if a.table is not None)


# The built-in analyses register themselves, in this order.
from app.database.analyses import statistics, tsne_maps, rollout, relevancy  # noqa: E402,F401,I001
from app.database.analyses import logit_lens, patch_lens  # noqa: E402,F401,I001
