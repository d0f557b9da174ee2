"""The documented entry point: ``from app.database.database import VliLmdb``.

A thin shim over :mod:`app.database.store`.  When this file is imported as the top-level module
``database`` (``from database import VliLmdb`` from inside ``app/database/``, as the original
VL-InterpreT scripts did), it first puts the repository root on ``sys.path``.
"""
import os
import sys

if __name__ == "database":  # imported from inside app/database/
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

from app.database.store import (  # noqa: E402
    SCHEMA_VERSION, CorruptValueError, DatabaseError, ExampleInfo, Neighbor, PreprocessReport, RecordError,
    SearchCost, VliLmdb)

__all__ = ["VliLmdb", "DatabaseError", "RecordError", "CorruptValueError", "ExampleInfo", "PreprocessReport",
           "Neighbor", "SearchCost", "SCHEMA_VERSION"]
