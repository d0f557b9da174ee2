"""The Dash app factory and the command line behind ``run_app.py``.

``create_app(db, model=None, allow_paths=False)`` builds the app on an open :class:`VliLmdb` (or a
database path). ``serve(db=..., model=None, params=(), allow_paths=False)`` returns the Flask server,
for WSGI servers; gunicorn calls it as an application factory::

    gunicorn -w 4 -b 127.0.0.1:6006 'app.server:serve(db="example_database1")'
    gunicorn -w 2 --threads 4 -b 127.0.0.1:6006 'app.server:serve(db="example_database2", model="vilt", params=["shapes_vqa/vilt-shapes"])'

(each worker opens the database after the fork). With a live model every worker loads its own copy
of the model; an "Add example" job runs in the worker that took the request, and its state is a file
in ``DB/jobs/`` (app.jobs.JobBoard), so whichever worker answers the page's poll reports it. The
database-wide token map is fitted by the worker that is asked first and kept in ``DB/token_maps/``
for the others (fit them ahead with ``python -m app.database.token_map DB`` when serving many users).

``run_app.py`` (:func:`main`) binds the port before loading the model, so that a busy port is
reported at once, and says it runs only once it listens. A live model whose layers, heads or hidden
size differ from the database's (:meth:`VL_Model.dimensions`) is refused at start-up.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from typing import Optional, Sequence

import dash
from dash._utils import to_json
from werkzeug.exceptions import RequestEntityTooLarge

from app import ids, page
from app.context import AppContext
from app.database.database import CorruptValueError, DatabaseError, VliLmdb
from app.database.token_map import DEFAULT_MAX_TOKENS
from app.jobs import BOUNDED_LOG_RECORDS, shorten
from app.panels import add_example, dataset, example, heads, hidden, interventions, links, token_map, tokens
from app.panels.add_example import MAX_BYTES, MAX_REQUEST_BYTES, format_size
from app.panels.common import error_style

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


def create_app(db, model=None, allow_paths: bool = False, map_tokens: int = DEFAULT_MAX_TOKENS) -> dash.Dash:
    """Build the Dash app on ``db`` (a VliLmdb or a database directory). With a live ``model`` the
    database must be writable ("Add example"); a read-only one is reopened for writing. ``map_tokens``:
    how many tokens the database-wide token map samples."""
    if not isinstance(db, VliLmdb):
        db = open_database(db, writable=model is not None)
    elif model is not None and db.read_only:
        path = db.path
        db.close()
        db = open_database(path, writable=True)
    ctx = AppContext(db=db, model=model, allow_paths=allow_paths, map_tokens=map_tokens)
    add_panel = add_example if model is not None else None
    app = _VliDash(db, name=__name__, title=page.TITLE, assets_folder=ASSETS, update_title=None,
                   suppress_callback_exceptions=False, on_error=show_damaged_example)
    _limit_requests(app)
    # Dash sends its validation layout (every component id, for checking callbacks) inside every
    # index page; by default that is a first build of the layout, figures and image included
    # (~400 kB for a large example), so give it the same components without an example drawn.
    app.validation_layout = page.page_layout(ctx, add_panel, drawn=False)
    app.layout = lambda: page.page_layout(ctx, add_panel)  # per page load: new examples show after a reload
    for panel in (example, heads, tokens, hidden, dataset, token_map):
        panel.register_callbacks(app, ctx)
    links.register_callbacks(app, ctx)
    if add_panel is not None:
        add_panel.register_callbacks(app, ctx)
    if interventions.available(ctx):
        interventions.register_callbacks(app, ctx)
    app.vli_context = ctx  # for tests and benchmarks
    _warm_up()
    return app


def show_damaged_example(error: Exception) -> None:
    """Dash's error handler for every callback: a damaged stored value (CorruptValueError, which names
    the example and what is damaged) is said in the page's banner, and the rest keeps working; any
    other error propagates as usual (logged, a 500 for that request)."""
    if not isinstance(error, CorruptValueError):
        raise error
    dash.set_props(ids.PAGE_ERROR, {"children": f"{shorten(str(error))}: pick another example; restore the "
                                                 f"database from a backup to recover this one.",
                                    "style": error_style("shown")})


def _limit_requests(app: dash.Dash) -> None:
    """Refuse request bodies over MAX_REQUEST_BYTES before reading them (an upload arrives
    base64-encoded in a JSON body: one of 200 MB took 1.26 GB of memory before the image check),
    and bound every log line: Flask logs a failing request's exception, whose message may quote
    the whole body."""
    server = app.server
    server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    @server.errorhandler(RequestEntityTooLarge)
    def _too_large(_error):
        return (f"Request too large: the limit is {format_size(MAX_REQUEST_BYTES)} "
                f"(images up to {format_size(MAX_BYTES)}).\n", 413, {"Content-Type": "text/plain; charset=utf-8"})

    for logger in (server.logger, app.logger, logging.getLogger("werkzeug")):
        logger.addFilter(BOUNDED_LOG_RECORDS)


def _warm_up() -> None:
    """Pay plotly's and Dash's lazy imports (~0.3 s) at start-up, not in the first user's request."""
    import numpy as np

    from app import figures

    to_json(figures.head_summary_figure(np.zeros((1, 1), np.float32), "warm-up"))


def _load_model(name: str, params: Sequence[str]):
    from app.database.models import load_model

    return load_model(name, list(params))


def model_mismatch(db: VliLmdb, model) -> Optional[str]:
    """Why ``model`` cannot add examples to ``db`` (one line), or None: its layers, heads or hidden
    size differ from the database's. Unknown on either side (``dimensions()`` None, no example yet)
    is left to the first add, whose record is validated."""
    dims = model.dimensions()
    ours = (db.n_layers, db.n_heads, db.hidden_size)
    if dims is None or None in ours or tuple(int(d) for d in dims) == tuple(ours):
        return None
    return (f"model {type(model).__name__} has {dims[0]} layers x {dims[1]} heads, hidden size {dims[2]}, "
            f"but the database {db.path} has {ours[0]} layers x {ours[1]} heads, hidden size {ours[2]}: "
            "load the model the database was made with")


def serve(db: str = "example_database1", model: Optional[str] = None, params: Sequence[str] = (),
          allow_paths: bool = False):
    """WSGI application factory (the Flask server), e.g. for gunicorn; see the module docstring."""
    loaded = _load_model(model, params) if model else None
    database = open_database(db)  # create_app reopens it for writing with a model
    mismatch = model_mismatch(database, loaded) if loaded is not None else None
    if mismatch:
        database.close()
        raise SystemExit(f"error: {mismatch}")
    return create_app(database, model=loaded, allow_paths=allow_paths).server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_app.py", description="VL-InterpreT: explore the attention and hidden states of a "
        "vision-language transformer, stored in a preprocessed database.")
    p.add_argument("-d", "--database", required=True, metavar="DB",
                   help="database directory (made by db_example.py or the extractor, then preprocessed)")
    p.add_argument("-p", "--port", default="6006", help="port (default 6006; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    p.add_argument("-m", "--model", nargs="+", metavar=("NAME", "PARAM"),
                   help="live model for “Add example”: a module of app/database/models and its "
                        "parameters, e.g. -m vilt shapes_vqa/vilt-shapes")
    p.add_argument("--allow-paths", action="store_true",
                   help="let the page name files on this server or URLs as images for new examples")
    p.add_argument("--map-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"tokens sampled for the database-wide token map (default {DEFAULT_MAX_TOKENS:,}; "
                        f"python -m app.database.token_map fits its maps ahead of time)")
    p.add_argument("--debug", action="store_true",
                   help="Dash debug mode (dev tools, Werkzeug's debugger, reloading off); loopback hosts only")
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text[:20]!r}")
    return value


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_port(text: str) -> Optional[int]:
    """The port number, 0 (any free port) to 65535, or None."""
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the app on this machine: every address it stands for is
    a loopback one (127.x, ::1, "localhost"); "", "0.0.0.0" and "::" mean every interface."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def network_warning(host: str, with_model: bool) -> str:
    """The one-line warning printed when the app listens beyond this machine."""
    what = "open the app and add examples with the loaded model" if with_model else "open the app"
    return f"warning: listening on {host or 'every interface'}: anyone on your network can {what}"


def app_url(host: str, port: int) -> str:
    """The address to open: this machine's name when the host is every interface."""
    if host in ("", "0.0.0.0", "::"):
        return f"http://{socket.gethostname()}:{port}/ (on this machine http://127.0.0.1:{port}/)"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on (host, port), the address family chosen as Werkzeug does."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _serve_forever(server) -> None:
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    port = parse_port(args.port)
    if port is None:
        return _fail(f"invalid port {args.port[:20]!r}: use a number from 1 to 65535 (0: any free port)")
    local = is_loopback(args.host)
    if args.debug and not local:
        return _fail(f"--debug exposes Werkzeug's debugger, which runs any code it is sent: use it only "
                     f"with a loopback --host such as 127.0.0.1, not {args.host or 'every interface'}")
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
    try:  # before the model loads (seconds): a busy port is said at once
        listener = _listen(args.host, port)
    except OSError as e:
        return _fail(f"cannot listen on {args.host or 'every interface'} port {port}: {e.strerror or e}")
    try:
        return _run(args, db, listener, local)
    finally:
        listener.close()


def _run(args, db: VliLmdb, listener: socket.socket, local: bool) -> int:
    """Load the model, build the app and serve it on ``listener`` (already bound)."""
    from werkzeug.serving import make_server

    model = None
    if args.model:
        from app.database.tsne import compile_in_background  # noqa: PLC0415 - only with a live model
        compile_in_background()  # the first "Add example" needs the t-SNE kernels: build them meanwhile
        name, params = args.model[0], args.model[1:]
        try:  # load_model prints its own progress lines
            model = _load_model(name, params)
        except Exception as e:  # ModelLoadError, or anything the model's constructor raised
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return _fail(f"cannot load model {name}: {msg}" if type(e).__name__ != "ModelLoadError" else msg)
        mismatch = model_mismatch(db, model)
        if mismatch:
            return _fail(mismatch)
        db.close()
        try:
            db = open_database(args.database, writable=True)
        except Exception as e:
            return _fail(f"cannot open {args.database} for writing (needed to add examples): {e}".splitlines()[0])
    app = create_app(db, model=model, allow_paths=args.allow_paths, map_tokens=args.map_tokens)
    wsgi = app.server
    if app.enable_dev_tools(debug=args.debug, dev_tools_hot_reload=False):
        from werkzeug.debug import DebuggedApplication

        app.server.debug = True  # exceptions reach the debugger
        wsgi = DebuggedApplication(app.server, evalex=True)
    server = make_server(args.host, 0, wsgi, threaded=True, fd=listener.fileno())
    try:
        if not local:
            print(network_warning(args.host, model is not None), file=sys.stderr, flush=True)
        print(f"VL-InterpreT is running: open {app_url(args.host, server.port)} in your browser "
              "(Ctrl-C to stop)", flush=True)
        _serve_forever(server)
    finally:
        server.server_close()
        if app.vli_context.jobs is not None:
            app.vli_context.jobs.shutdown(wait=False)
    return 0
