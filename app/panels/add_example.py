"""The "Add example" panel: run the live model on an uploaded image and a question.

Present only when the app was started with a model (``run_app.py -m NAME ...``). The image is
dropped on / picked in a ``dcc.Upload`` (PNG or JPEG, at most :data:`MAX_BYTES`; both checked on
the server by opening the bytes with Pillow, whatever the file is called), saved to a temporary
file in :func:`upload_dir` and handed to :class:`app.jobs.JobRunner`. A ``dcc.Interval`` polls the
job ("running the model…", "preprocessing…") and is disabled again when it ends; on success the new
example is added to the example dropdown and selected, and the header's count is refreshed; on
failure the message is shown and the database is unchanged.

Every upload goes through a clientside callback first, into the ``ADD_IMAGE`` store: it measures
the file in the browser and keeps its contents only when they are within :data:`MAX_BYTES`, so a
file too large is named with its size (never sent to the server) and a new upload always replaces
the previous one, even when it is refused. (``dcc.Upload``'s own ``max_size`` and ``accept`` drop a
file silently: no callback fires, and the image chosen before would be used.) The server refuses
request bodies over :data:`MAX_REQUEST_BYTES` (app.server), the hard limit.

With ``--allow-paths`` (``ctx.allow_paths``) a text field also accepts a regular file on the server
or an http(s) URL (redirects only to http(s), the whole download within :data:`FETCH_SECONDS`).
Without it the field is not in the page and the callback refuses paths.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import socket
import stat
import tempfile
import threading
import time
import urllib.parse
import urllib.request

from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate
from PIL import Image, UnidentifiedImageError

from app import ids, page
from app.jobs import DONE, ERROR, FINISHED, JobRunner, shorten
from app.panels.common import panel
from app.panels.example import example_options

MAX_BYTES = 10 * 1024 * 1024  # largest accepted image file
# largest request body: an upload arrives base64-encoded (4/3) in a JSON callback body, with the text
MAX_REQUEST_BYTES = MAX_BYTES * 4 // 3 + 2**20
MAX_PIXELS = 40_000_000  # largest accepted image (width x height), against decompression bombs
FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
POLL_MS = 400
FETCH_SECONDS = 20  # a URL's whole download, however slowly the server sends it
STALE_UPLOAD_SECONDS = 3600  # an upload file older than this is a leftover (jobs take seconds)
UPLOAD_PREFIX = "vli-add-"  # + the server's pid: a file of a process that is gone is a leftover

# ADD_UPLOAD.contents -> ADD_IMAGE.data, in the browser (see the module docstring): the decoded size
# from the base64 length, and the contents only when they are within the limit.
CHECK_UPLOAD_JS = """
function (contents, filename) {
    if (typeof contents !== "string") { return null; }
    const comma = contents.indexOf(",");
    const padding = contents.endsWith("==") ? 2 : (contents.endsWith("=") ? 1 : 0);
    const size = comma < 0 ? 0 : Math.max(0, Math.floor((contents.length - comma - 1) * 3 / 4) - padding);
    return {filename: filename || null, size: size, contents: size > %d ? null : contents};
}
"""


class InputError(ValueError):
    """What the user gave cannot be used; the message is shown in the page."""


def format_size(n_bytes: int) -> str:
    """450 bytes, 12.3 KB, 4.5 MB: the unit that keeps the number readable."""
    if n_bytes < 1024:
        return f"{n_bytes} byte" + ("" if n_bytes == 1 else "s")
    value, unit = (n_bytes / 1024, "KB") if n_bytes < 1024**2 else (n_bytes / 1024**2, "MB")
    return f"{value:.1f}".removesuffix(".0") + " " + unit


def _too_large(name: str, n_bytes: int) -> str:
    return f"{name} is {format_size(n_bytes)}; the limit is {format_size(MAX_BYTES)}"


def help_text(model) -> str:
    """The panel's help: what it does, and what images the model expects when it says so."""
    text = ("Run the loaded model on a new image and text: the result is stored as a new example and "
            f"selected. PNG or JPEG, up to {format_size(MAX_BYTES)}.")
    hint = model.input_hint()
    return f"{text} This model expects {shorten(' '.join(hint.split()), 200)}." if hint else text


def check_image_bytes(data: bytes, name: str = "the file") -> str:
    """Return the file suffix for PNG/JPEG ``data``; raise :class:`InputError` otherwise."""
    if not data:
        raise InputError(f"{name} is empty")
    if len(data) > MAX_BYTES:
        raise InputError(_too_large(name, len(data)))
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InputError(f"{name} is {width} x {height} pixels; the limit is {MAX_PIXELS:,} pixels")
            img.verify()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InputError(f"{name} is not a PNG or JPEG image") from None
    if fmt not in FORMATS:
        raise InputError(f"{name} is a {fmt} image; only PNG and JPEG are accepted")
    return FORMATS[fmt]


def decode_upload(contents: str, filename: str | None) -> bytes:
    """The bytes of a ``dcc.Upload`` data URL (``data:<type>;base64,<data>``)."""
    name = filename or "the upload"
    try:
        header, payload = contents.split(",", 1)
        if ";base64" not in header:
            raise ValueError
        return base64.b64decode(payload, validate=True)
    except (ValueError, AttributeError, binascii.Error):
        raise InputError(f"{name} could not be read") from None


def upload_bytes(image) -> tuple[bytes, str]:
    """The bytes and the name of the ``ADD_IMAGE`` store (made by :data:`CHECK_UPLOAD_JS`, but
    sent by the browser: checked like any input); a file the browser found too large is refused."""
    if not isinstance(image, dict) or not isinstance(image.get("filename") or "", str):
        raise InputError("the upload could not be read")
    name = shorten(image.get("filename") or "the upload", 100)
    contents = image.get("contents")
    if contents is None:
        size = image.get("size")
        raise InputError(_too_large(name, size) if isinstance(size, int) and size > MAX_BYTES
                         else f"{name} could not be read")
    return decode_upload(contents, name), name


# --------------------------------------------------------------------------------------------- paths, URLs
class _Deadline:
    """Shuts the sockets of one download when its time is up: a socket timeout bounds each read,
    not a server that sends one byte every few seconds."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:  # wakes a read blocked in another thread, unlike close()
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _tracked_connection(base, deadline: _Deadline):
    class Connection(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = lambda *a, **k: deadline.track(socket.create_connection(*a, **k))

    return Connection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._connection = _tracked_connection(http.client.HTTPConnection, deadline)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._connection = _tracked_connection(http.client.HTTPSConnection, deadline)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib's own handler also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise InputError(f"{shorten(req.full_url, 100)} redirects to a {scheme}: URL; only http(s) "
                             "redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str) -> bytes:
    name = shorten(url, 100)
    deadline = _Deadline(FETCH_SECONDS)
    opener = urllib.request.build_opener(_HttpOnlyRedirects, _DeadlineHTTPHandler(deadline),
                                         _DeadlineHTTPSHandler(deadline))
    try:
        with opener.open(url, timeout=FETCH_SECONDS) as response:
            data = response.read(MAX_BYTES + 1)
        if deadline.expired:  # the socket was shut: what was read is cut short
            raise TimeoutError
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any network failure is a message in the page
        if deadline.expired:
            raise InputError(f"{name} took longer than {FETCH_SECONDS} s to download") from None
        raise InputError(f"cannot download {name}: {shorten(str(e), 200)}") from None
    finally:
        deadline.cancel()
    if len(data) > MAX_BYTES:
        raise InputError(f"{name} is larger than {format_size(MAX_BYTES)}")
    return data


def _read_file(location: str) -> bytes:
    """A regular file's bytes: a device (/dev/zero), a FIFO or a directory is refused, checked on
    the opened file (non-blocking, so that opening a FIFO does not wait for a writer)."""
    name = shorten(location, 100)
    try:
        fd = os.open(os.path.expanduser(location), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        raise InputError(f"no such file on the server: {name}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
        os.close(fd)
        raise InputError(f"{name} is not a regular file" if not stat.S_ISREG(info.st_mode)
                         else f"{name} is larger than {format_size(MAX_BYTES)}")
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_BYTES + 1)


def read_path_or_url(location: str) -> bytes:
    """Bytes of a server file or an http(s) URL (only ever called with ``--allow-paths``)."""
    location = location.strip()
    if location.lower().startswith(("http://", "https://")):
        return _download(location)
    if "://" in location:
        raise InputError("only local paths and http(s) URLs are accepted")
    return _read_file(location)


# --------------------------------------------------------------------------------------------- temp files
def upload_dir() -> str:
    """The folder of this user's upload files (removed by the job when it ends)."""
    user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    return os.path.join(tempfile.gettempdir(), f"vl-interpret-uploads{user}")


def save_temp(data: bytes, suffix: str) -> str:
    folder = upload_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def clean_stale_uploads() -> int:
    """Remove upload files left by a server killed during a job: those of a process that is gone,
    and any older than :data:`STALE_UPLOAD_SECONDS`. Returns how many were removed."""
    folder = upload_dir()
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = re.fullmatch(re.escape(UPLOAD_PREFIX) + r"(\d+)-.*", name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        try:
            if time.time() - os.path.getmtime(path) > STALE_UPLOAD_SECONDS or not _process_alive(int(match[1])):
                os.unlink(path)
                removed += 1
        except OSError:  # removed meanwhile by its job
            pass
    return removed


def layout(ctx):
    path_field = []
    if ctx.allow_paths:
        path_field = [dcc.Input(id=ids.ADD_PATH, type="text", debounce=False, className="add-input",
                                placeholder="…or a file path on the server / an http(s) URL")]
    return html.Div(panel(
        "Add example", help_text(ctx.model),
        # no max_size / accept: both drop a file without a word (see the module docstring)
        dcc.Upload(id=ids.ADD_UPLOAD, multiple=False, className="add-upload",
                   children=html.Div(["Drag and drop an image here, or ", html.A("choose a file")])),
        dcc.Store(id=ids.ADD_IMAGE),
        html.Div(id=ids.ADD_FILE_INFO, className="add-file-info"),
        *path_field,
        dcc.Input(id=ids.ADD_TEXT, type="text", placeholder="Question / text", className="add-input"),
        dcc.Input(id=ids.ADD_LABEL, type="text", placeholder="Expected answer (optional)", className="add-input"),
        html.Button("Run model and add", id=ids.ADD_SUBMIT, className="add-submit"),
        html.Div(id=ids.ADD_STATUS, className="add-status", role="status"),  # right under the button
        dcc.Interval(id=ids.ADD_POLL, interval=POLL_MS, disabled=True),
        dcc.Store(id=ids.ADD_JOB),
        class_name="add-example",
    ), id=ids.ADD_PANEL)


def _status(text: str, kind: str):
    return html.Span(shorten(text), className=f"add-{kind}")


def register_callbacks(app, ctx):
    clean_stale_uploads()  # start-up: files of a server killed during a job
    if ctx.jobs is None:
        ctx.jobs = JobRunner(ctx.db, ctx.model)
    jobs = ctx.jobs
    db = ctx.db

    app.clientside_callback(CHECK_UPLOAD_JS % MAX_BYTES, Output(ids.ADD_IMAGE, "data"),
                            Input(ids.ADD_UPLOAD, "contents"), State(ids.ADD_UPLOAD, "filename"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.ADD_FILE_INFO, "children"), Input(ids.ADD_IMAGE, "data"),
                  prevent_initial_call=True)
    def show_file(image):
        if not image:
            return ""
        try:
            data, name = upload_bytes(image)
            check_image_bytes(data, name)
        except InputError as e:
            return _status(str(e), "error")
        return f"{name} ({format_size(len(data))})"

    submit_states = [State(ids.ADD_IMAGE, "data"), State(ids.ADD_TEXT, "value"), State(ids.ADD_LABEL, "value")]
    if ctx.allow_paths:
        submit_states.append(State(ids.ADD_PATH, "value"))

    @app.callback(Output(ids.ADD_JOB, "data"), Output(ids.ADD_POLL, "disabled"),
                  Output(ids.ADD_STATUS, "children"), Output(ids.ADD_SUBMIT, "disabled"),
                  Input(ids.ADD_SUBMIT, "n_clicks"), *submit_states, prevent_initial_call=True)
    def submit(n_clicks, image, text, label, location=None):
        if not n_clicks:
            raise PreventUpdate
        try:
            job_id = start_job(jobs, ctx.allow_paths, image, text, label, location)
        except InputError as e:
            return None, True, _status(str(e), "error"), False
        return job_id, False, _status("queued…", "running"), True

    @app.callback(Output(ids.ADD_STATUS, "children", allow_duplicate=True),
                  Output(ids.ADD_POLL, "disabled", allow_duplicate=True),
                  Output(ids.ADD_SUBMIT, "disabled", allow_duplicate=True),
                  Output(ids.EXAMPLE_SELECT, "options", allow_duplicate=True),
                  Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Output(ids.EXAMPLE_COUNT, "children", allow_duplicate=True),
                  Output(ids.ADD_LABEL, "value"),
                  Input(ids.ADD_POLL, "n_intervals"), State(ids.ADD_JOB, "data"),
                  prevent_initial_call=True)
    def poll(_n, job_id):
        unchanged = (no_update,) * 4
        if not job_id:
            return no_update, True, False, *unchanged
        status = jobs.status(job_id)
        if status["state"] not in FINISHED:
            return _status(status["message"], "running"), False, True, *unchanged
        if status["state"] == ERROR:
            return _status(f"Not added: {status['message']}", "error"), True, False, *unchanged
        assert status["state"] == DONE
        ex_id = status["ex_id"]
        # the question stays (ask another about the same kind of image); its expected answer does not
        return (_status(f"Example {ex_id} added.", "done"), True, False, example_options(db), ex_id,
                page.example_count_text(db, len(db.example_ids())), "")


def _typed_text(value, what: str) -> str:
    if value is not None and not isinstance(value, str):  # the browser sends it: checked like any input
        raise InputError(f"the {what} could not be read")
    return (value or "").strip()


def start_job(jobs, allow_paths, image, text, label, location=None) -> str:
    """Check the inputs (``image``: the ``ADD_IMAGE`` store, or None), save the image to a temporary
    file and submit the job; return its id. Raises :class:`InputError` with the message for the page.
    """
    text = _typed_text(text, "text")
    if not text:
        raise InputError("type a question or text first")
    label = _typed_text(label, "expected answer") or None
    location = _typed_text(location, "path")
    if image:
        data, name = upload_bytes(image)
    elif location:
        if not allow_paths:
            raise InputError("paths and URLs are not accepted (start the app with --allow-paths)")
        data = read_path_or_url(location)
        name = shorten(location, 100)
    else:
        raise InputError("drop or choose an image first")
    suffix = check_image_bytes(data, name)
    path = save_temp(data, suffix)
    return jobs.submit(path, text, label, delete_image=True)
