"""The "Add example" panel: run the live model on an uploaded image and a question.

Present only when the app was started with a model (``run_app.py -m NAME ...``). The image is
dropped on / picked in a ``dcc.Upload`` (PNG or JPEG, at most :data:`MAX_BYTES`; both checked on
the server by opening the bytes with Pillow, whatever the file is called), saved to a temporary
file and handed to :class:`app.jobs.JobRunner`. A ``dcc.Interval`` polls the job ("running the
model…", "preprocessing…") and is disabled again when it ends; on success the new example is
added to the example dropdown and selected, on failure the message is shown and the database is
unchanged.

With ``--allow-paths`` (``ctx.allow_paths``) a text field also accepts a file path on the server
or an http(s) URL. Without it the field is not in the page and the callback refuses paths.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.request

from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate
from PIL import Image, UnidentifiedImageError

from app import ids
from app.jobs import DONE, ERROR, FINISHED, JobRunner
from app.panels.common import panel

MAX_BYTES = 10 * 1024 * 1024  # largest accepted image file
MAX_PIXELS = 40_000_000  # largest accepted image (width x height), against decompression bombs
FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
POLL_MS = 400
HELP = ("Run the loaded model on a new image and text: the result is stored as a new example and "
        "selected. PNG or JPEG, up to 10 MB.")


class InputError(ValueError):
    """What the user gave cannot be used; the message is shown in the page."""


def _example_options(db) -> list[dict]:
    # Same format as the example panel's dropdown (app/panels/example.py).
    try:
        from app.panels.example import example_options  # noqa: PLC0415 - if the example panel exposes it
    except ImportError:
        return [{"label": f"Example {i}", "value": i} for i in db.example_ids()]
    return example_options(db)


def check_image_bytes(data: bytes, name: str = "the file") -> str:
    """Return the file suffix for PNG/JPEG ``data``; raise :class:`InputError` otherwise."""
    if not data:
        raise InputError(f"{name} is empty")
    if len(data) > MAX_BYTES:
        raise InputError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB")
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
    except (ValueError, binascii.Error):
        raise InputError(f"{name} could not be read") from None


def read_path_or_url(location: str) -> bytes:
    """Bytes of a server file or an http(s) URL (only ever called with ``--allow-paths``)."""
    location = location.strip()
    if location.lower().startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(location, timeout=20) as response:  # noqa: S310 - scheme checked
                data = response.read(MAX_BYTES + 1)
        except Exception as e:  # noqa: BLE001 - any network failure is a message in the page
            raise InputError(f"cannot download {location}: {e}") from None
        if len(data) > MAX_BYTES:
            raise InputError(f"{location} is larger than {MAX_BYTES // 2**20} MB")
        return data
    if "://" in location:
        raise InputError("only local paths and http(s) URLs are accepted")
    path = os.path.expanduser(location)
    if not os.path.isfile(path):
        raise InputError(f"no such file on the server: {location}")
    if os.path.getsize(path) > MAX_BYTES:
        raise InputError(f"{location} is larger than {MAX_BYTES // 2**20} MB")
    with open(path, "rb") as f:
        return f.read()


def save_temp(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="vli-add-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def layout(ctx):
    path_field = []
    if ctx.allow_paths:
        path_field = [dcc.Input(id=ids.ADD_PATH, type="text", debounce=False, className="add-input",
                                placeholder="…or a file path on the server / an http(s) URL")]
    return html.Div(panel(
        "Add example", HELP,
        dcc.Upload(id=ids.ADD_UPLOAD, multiple=False, max_size=MAX_BYTES, accept="image/png,image/jpeg",
                   className="add-upload",
                   children=html.Div(["Drag and drop an image here, or ", html.A("choose a file")])),
        html.Div(id=ids.ADD_FILE_INFO, className="add-file-info"),
        *path_field,
        dcc.Input(id=ids.ADD_TEXT, type="text", placeholder="Question / text", className="add-input"),
        dcc.Input(id=ids.ADD_LABEL, type="text", placeholder="Expected answer (optional)", className="add-input"),
        html.Button("Run model and add", id=ids.ADD_SUBMIT, className="add-submit"),
        html.Div(id=ids.ADD_STATUS, className="add-status", role="status"),
        dcc.Interval(id=ids.ADD_POLL, interval=POLL_MS, disabled=True),
        dcc.Store(id=ids.ADD_JOB),
        class_name="add-example",
    ), id=ids.ADD_PANEL)


def _status(text: str, kind: str):
    return html.Span(text, className=f"add-{kind}")


def register_callbacks(app, ctx):
    if ctx.jobs is None:
        ctx.jobs = JobRunner(ctx.db, ctx.model)
    jobs = ctx.jobs
    db = ctx.db

    @app.callback(Output(ids.ADD_FILE_INFO, "children"),
                  Input(ids.ADD_UPLOAD, "contents"), State(ids.ADD_UPLOAD, "filename"),
                  prevent_initial_call=True)
    def show_file(contents, filename):
        if not contents:
            return ""
        try:
            data = decode_upload(contents, filename)
            check_image_bytes(data, filename or "the upload")
        except InputError as e:
            return _status(str(e), "error")
        return f"{filename or 'image'} ({len(data) / 1024:.0f} KB)"

    submit_states = [State(ids.ADD_UPLOAD, "contents"), State(ids.ADD_UPLOAD, "filename"),
                     State(ids.ADD_TEXT, "value"), State(ids.ADD_LABEL, "value")]
    if ctx.allow_paths:
        submit_states.append(State(ids.ADD_PATH, "value"))

    @app.callback(Output(ids.ADD_JOB, "data"), Output(ids.ADD_POLL, "disabled"),
                  Output(ids.ADD_STATUS, "children"), Output(ids.ADD_SUBMIT, "disabled"),
                  Input(ids.ADD_SUBMIT, "n_clicks"), *submit_states, prevent_initial_call=True)
    def submit(n_clicks, contents, filename, text, label, location=None):
        if not n_clicks:
            raise PreventUpdate
        try:
            job_id = start_job(jobs, ctx.allow_paths, contents, filename, text, label, location)
        except InputError as e:
            return None, True, _status(str(e), "error"), False
        return job_id, False, _status("queued…", "running"), True

    @app.callback(Output(ids.ADD_STATUS, "children", allow_duplicate=True),
                  Output(ids.ADD_POLL, "disabled", allow_duplicate=True),
                  Output(ids.ADD_SUBMIT, "disabled", allow_duplicate=True),
                  Output(ids.EXAMPLE_SELECT, "options", allow_duplicate=True),
                  Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Input(ids.ADD_POLL, "n_intervals"), State(ids.ADD_JOB, "data"),
                  prevent_initial_call=True)
    def poll(_n, job_id):
        if not job_id:
            return no_update, True, False, no_update, no_update
        status = jobs.status(job_id)
        if status["state"] not in FINISHED:
            return _status(status["message"], "running"), False, True, no_update, no_update
        if status["state"] == ERROR:
            return _status(f"Not added: {status['message']}", "error"), True, False, no_update, no_update
        assert status["state"] == DONE
        ex_id = status["ex_id"]
        return (_status(f"Example {ex_id} added.", "done"), True, False, _example_options(db), ex_id)


def start_job(jobs, allow_paths, contents, filename, text, label, location=None) -> str:
    """Check the inputs, save the image to a temporary file and submit the job; return its id.

    Raises :class:`InputError` with the message for the page.
    """
    text = (text or "").strip()
    if not text:
        raise InputError("type a question or text first")
    label = (label or "").strip() or None
    if contents:
        data = decode_upload(contents, filename)
        name = filename or "the upload"
    elif location and location.strip():
        if not allow_paths:
            raise InputError("paths and URLs are not accepted (start the app with --allow-paths)")
        data = read_path_or_url(location)
        name = location.strip()
    else:
        raise InputError("drop or choose an image first")
    suffix = check_image_bytes(data, name)
    path = save_temp(data, suffix)
    return jobs.submit(path, text, label, delete_image=True)
