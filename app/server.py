"""The Dash app factory and the command line behind ``run_app.py``.

``create_app(db, model=None, allow_paths=False)`` builds the app on an open :class:`VliLmdb` (or a
database path). ``serve(db=..., model=None, params=(), allow_paths=False)`` returns the Flask server,
for WSGI servers; gunicorn calls it as an application factory::

    gunicorn -w 4 -b 127.0.0.1:6006 'app.server:serve(db="example_database1")'
    gunicorn -w 1 --threads 8 -b 127.0.0.1:6006 'app.server:serve(db="example_database2", model="vilt", params=["shapes_vqa/vilt-shapes"])'

(each worker opens the database after the fork). With a live model use one worker: "Add example"
jobs live in the memory of the process that runs them, and the page polls that process for them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import dash
from dash._utils import to_json

from app import page
from app.context import AppContext
from app.database.database import DatabaseError, VliLmdb
from app.panels import example, heads, hidden, tokens

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


class _VliDash(dash.Dash):
    """Dash, with the page's layout JSON cached per database version: it carries the first example
    drawn (a few hundred kB for a large one) and only changes when the database does, so page loads
    after the first cost a lookup instead of building and serialising every figure again."""

    def __init__(self, db: VliLmdb, **kwargs):
        super().__init__(**kwargs)
        self._db = db
        self._layout_json: tuple[int, str] = (-1, "")

    def serve_layout(self):
        version, text = self._layout_json
        if version != self._db.version():
            version = self._db.version()  # read first: a write during the build leaves it stale
            text = to_json(self.get_layout())
            self._layout_json = (version, text)
        return self.backend.make_response(text, mimetype="application/json")


def open_database(path, writable: bool = False) -> VliLmdb:
    """Open a preprocessed database; raises DatabaseError (one line) when it is not one. With
    ``writable`` (a live model adds examples) it is checked read-only first, then reopened for writing,
    so that a wrong path never creates an empty database."""
    db = VliLmdb(path)
    if not writable:
        return db
    db.close()
    return VliLmdb(path, read_only=False)


def create_app(db, model=None, allow_paths: bool = False) -> dash.Dash:
    """Build the Dash app on ``db`` (a VliLmdb or a database directory). With a live ``model`` the
    database must be writable ("Add example"); a read-only one is reopened for writing."""
    if not isinstance(db, VliLmdb):
        db = open_database(db, writable=model is not None)
    elif model is not None and db.read_only:
        path = db.path
        db.close()
        db = open_database(path, writable=True)
    ctx = AppContext(db=db, model=model, allow_paths=allow_paths)
    add_panel = None
    if model is not None:
        from app.panels import add_example as add_panel  # C2's panel (needs the model)
    app = _VliDash(db, name=__name__, title=page.TITLE, assets_folder=ASSETS, update_title=None,
                   suppress_callback_exceptions=False)
    # Dash sends its validation layout (every component id, for checking callbacks) inside every
    # index page; by default that is a first build of the layout, figures and image included
    # (~400 kB for a large example), so give it the same components without an example drawn.
    app.validation_layout = page.page_layout(ctx, add_panel, drawn=False)
    app.layout = lambda: page.page_layout(ctx, add_panel)  # per page load: new examples show after a reload
    for panel in (example, heads, tokens, hidden):
        panel.register_callbacks(app, ctx)
    if add_panel is not None:
        add_panel.register_callbacks(app, ctx)
    app.vli_context = ctx  # for tests and benchmarks
    _warm_up()
    return app


def _warm_up() -> None:
    """Pay plotly's and Dash's lazy imports (~0.3 s) at start-up, not in the first user's request."""
    import numpy as np

    from app import figures

    to_json(figures.head_summary_figure(np.zeros((1, 1), np.float32), "warm-up"))


def _load_model(name: str, params: Sequence[str]):
    from app.database.models import load_model

    return load_model(name, list(params))


def serve(db: str = "example_database1", model: Optional[str] = None, params: Sequence[str] = (),
          allow_paths: bool = False):
    """WSGI application factory (the Flask server), e.g. for gunicorn; see the module docstring."""
    loaded = _load_model(model, params) if model else None
    return create_app(open_database(db, writable=loaded is not None), model=loaded,
                      allow_paths=allow_paths).server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_app.py", description="VL-InterpreT: explore the attention and hidden states of a "
        "vision-language transformer, stored in a preprocessed database.")
    p.add_argument("-d", "--database", required=True, metavar="DB",
                   help="database directory (made by db_example.py or the extractor, then preprocessed)")
    p.add_argument("-p", "--port", type=int, default=6006, help="port (default 6006)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("-m", "--model", nargs="+", metavar=("NAME", "PARAM"),
                   help="live model for “Add example”: a module of app/database/models and its "
                        "parameters, e.g. -m vilt shapes_vqa/vilt-shapes")
    p.add_argument("--allow-paths", action="store_true",
                   help="let the page name files on this server or URLs as images for new examples")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (dev tools, reloading off)")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    print(f"Opening database {args.database} ...", file=sys.stderr, flush=True)
    try:
        db = VliLmdb(args.database)  # read-only: checks it is a preprocessed database
    except DatabaseError as e:
        return _fail(str(e).splitlines()[0] if str(e) else "not a VL-InterpreT database")
    except Exception as e:  # lmdb errors, permissions: still one line
        return _fail(f"cannot open database {args.database}: {type(e).__name__}: {e}".splitlines()[0])
    print(f"  {len(db.example_ids())} examples, {db.n_layers} layers x {db.n_heads} heads "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    model = None
    if args.model:
        name, params = args.model[0], args.model[1:]
        try:  # load_model prints its own progress lines
            model = _load_model(name, params)
        except Exception as e:  # ModelLoadError, or anything the model's constructor raised
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return _fail(f"cannot load model {name}: {msg}" if type(e).__name__ != "ModelLoadError" else msg)
        db.close()
        try:
            db = open_database(args.database, writable=True)
        except Exception as e:
            return _fail(f"cannot open {args.database} for writing (needed to add examples): {e}".splitlines()[0])
    app = create_app(db, model=model, allow_paths=args.allow_paths)
    host_shown = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    print(f"VL-InterpreT is running: open http://{host_shown}:{args.port}/ in your browser "
          "(Ctrl-C to stop)", flush=True)
    app.run(host=args.host, port=args.port, debug=args.debug)
    return 0
