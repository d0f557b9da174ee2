"""Start VL-InterpreT on a database: ``python run_app.py -d DB [-p PORT] [--host HOST] [-m NAME PARAM ...]``.

See ``python run_app.py --help``; for a multi-process server see :mod:`app.server` (gunicorn).
"""
import sys

from app.server import main

if __name__ == "__main__":
    sys.exit(main())
