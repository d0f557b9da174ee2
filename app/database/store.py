"""The VL-InterpreT database, :class:`VliLmdb`: an LMDB environment with one table per kind of value.

Its parts, each a module of its own, each class built on the one before:

- :mod:`app.database.keys`: the key layout (the table of every table and key) and the encodings of the
  core values;
- :mod:`app.database.environment`: opening (the checks that say what to run), transactions, settings,
  the pending records' environment;
- :mod:`app.database.reads`: :class:`ExampleInfo` and every read the app makes;
- :mod:`app.database.writes`: pending records, ids, and the commit of one example in one transaction
  (and ``import_example``, for merging);
- :mod:`app.database.pipeline`: preprocessing, which runs every analysis registered in
  :mod:`app.database.analyses` (head statistics, t-SNE, rollout, relevancy, logit lens, patch lens).

Every value carries a checksum (:mod:`app.database.checksum`), checked on every read: a damaged value
raises :class:`CorruptValueError` naming the example and what was damaged, and the rest of the database
stays readable. Every example is written in its own write transaction. Call :meth:`VliLmdb.close`
explicitly (or use ``with``).
"""
from __future__ import annotations

from app.database.analyses.patch_lens import PatchLensLayer
from app.database.checksum import CorruptValueError
from app.database.environment import DatabaseError
from app.database.keys import SCHEMA_VERSION
from app.database.neighbors import Neighbor, SearchCost
from app.database.pipeline import Pipeline, PreprocessReport
from app.database.reads import ExampleInfo
from app.database.records import RecordError

__all__ = ["VliLmdb", "DatabaseError", "RecordError", "CorruptValueError", "ExampleInfo", "PreprocessReport",
           "Neighbor", "SearchCost", "PatchLensLayer", "SCHEMA_VERSION"]


class VliLmdb(Pipeline):
    """A VL-InterpreT database (see the module docstring and docs/ARCHITECTURE.md).

    db_dir: the database folder (LMDB ``data.mdb`` + ``lock.mdb``).
    read_only: True (the app) opens an existing, preprocessed database and never creates files;
        False (scripts, live models) creates the folder if needed and allows writes.
    special_tokens: token strings excluded from statistics; stored with the first example
        (default ``[CLS]``, ``[SEP]``, ``[PAD]``).
    cache_size: how many ExampleInfo are kept in memory.
    """
