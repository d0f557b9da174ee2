"""Storage, validation, preprocessing and analysis of VL-InterpreT databases (no Dash here).

Start with :class:`app.database.database.VliLmdb`; records are described in docs/ARCHITECTURE.md.
"""
