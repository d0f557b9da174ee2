"""What a request can cost the server: body size, log lines, page messages, URL and file reads for
``--allow-paths``, and the upload files a killed server leaves behind (the "Add example" panel)."""
import base64
import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from app import ids
from app.database.models import VL_Model
from app.jobs import MESSAGE_CHARS
from app.panels import add_example
from app.panels.add_example import MAX_BYTES, MAX_REQUEST_BYTES, InputError, read_path_or_url
from app.server import create_app
from helpers import fast_tsne, make_db, make_record  # noqa: F401 (fast_tsne: autouse fixture)

QUESTION = "what is it ?"


class FakeModel(VL_Model):
    """Writes make_record's records (2 layers x 2 heads, hidden 8: the database's); ``error``:
    raise it instead."""

    def __init__(self, error=None):
        self.error = error

    def data_setup(self, ex_id, image_location, input_text):
        if self.error:
            raise ValueError(self.error)
        self.load_image(image_location)
        return make_record(ex_id, text=input_text)


def png_bytes(size=(6, 4), seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture
def db(tmp_path):
    db, report = make_db(tmp_path / "db", [make_record(0), make_record(1)])
    assert not report.failed
    yield db
    db.close()


@pytest.fixture
def make_app(db, request):
    def make(model=None, allow_paths=True):
        app = create_app(db, model=model or FakeModel(), allow_paths=allow_paths)
        request.addfinalizer(app.vli_context.jobs.shutdown)
        return app
    return make


def callback_body(app, outputs, inputs, state=()):
    """The JSON body the browser posts for the server callback whose outputs are ``outputs``
    ("id.prop", in order); ``inputs`` and ``state``: (id, prop, value)."""
    def spec(text):
        component, prop = text.split(".", 1)
        return {"id": component, "property": prop}

    for key in app.callback_map:
        keys = key.strip(".").split("...") if key.startswith("..") else [key]
        if [k.split("@")[0] for k in keys] == outputs:
            return {"output": key, "outputs": [spec(k) for k in keys] if key.startswith("..") else spec(key),
                    "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
                    "state": [{"id": i, "property": p, "value": v} for i, p, v in state],
                    "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"]}
    raise AssertionError(f"no callback with outputs {outputs}")


def post(app, body):
    return app.server.test_client().post("/_dash-update-component", json=body)


def submit(app, image=None, text=QUESTION, label=None, location=None):
    body = callback_body(app, [f"{ids.ADD_JOB}.data", f"{ids.ADD_POLL}.disabled", f"{ids.ADD_STATUS}.children",
                               f"{ids.ADD_SUBMIT}.disabled"],
                         [(ids.ADD_SUBMIT, "n_clicks", 1)],
                         [(ids.ADD_IMAGE, "data", image), (ids.ADD_TEXT, "value", text),
                          (ids.ADD_LABEL, "value", label), (ids.ADD_PATH, "value", location)])
    r = post(app, body)
    assert r.status_code == 200, r.data[:300]
    return r.get_json()["response"]


def status_text(response) -> str:
    return response[ids.ADD_STATUS]["children"]["props"]["children"]


# --------------------------------------------------------------------------------------------- body size
def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(make_app):
    app = make_app()
    client = app.server.test_client()
    r = client.post("/_dash-update-component", data=b"x" * (MAX_REQUEST_BYTES + 1),
                    content_type="application/json")
    assert r.status_code == 413
    text = r.get_data(as_text=True)
    assert "Request too large" in text and "10 MB" in text and len(text) < 200


def test_an_image_at_the_limit_still_fits_in_a_request(make_app):
    """The limit allows for base64 (4/3) and the JSON around it: a 10 MB upload is checked, not 413."""
    app = make_app()
    image = {"filename": "big.png", "size": MAX_BYTES, "contents": data_url(b"\x89PNG" + b"\0" * (MAX_BYTES - 4))}
    body = callback_body(app, [f"{ids.ADD_FILE_INFO}.children"], [(ids.ADD_IMAGE, "data", image)])
    assert len(json.dumps(body)) < MAX_REQUEST_BYTES
    r = post(app, body)
    assert r.status_code == 200
    assert "big.png is not a PNG or JPEG image" in json.dumps(r.get_json())


# --------------------------------------------------------------------------------------------- log lines
def test_log_lines_are_bounded(make_app, caplog):
    """Dash's "Callback function not found for output '<the output sent>'" goes to Flask's error
    log with its traceback; a model's error message may quote the whole text."""
    app = make_app(model=FakeModel(error="bad text: " + "y" * 1_000_000))
    with caplog.at_level(logging.INFO):
        r = post(app, {"output": "z" * 1_000_000 + ".children", "outputs": {"id": "z", "property": "children"},
                       "inputs": [], "state": [], "changedPropIds": []})
        assert r.status_code == 500
        response = submit(app, image={"filename": "a.png", "size": 10, "contents": data_url(png_bytes())})
        status = app.vli_context.jobs.wait(response[ids.ADD_JOB]["data"], 60)
    assert status["state"] == "error" and len(status["message"]) <= MESSAGE_CHARS
    failures = [r for r in caplog.records if r.name in ("app.server", "app.jobs")]
    assert {r.name for r in failures} == {"app.server", "app.jobs"}, [r.name for r in caplog.records]
    for record in failures:
        assert record.exc_info is None and "Traceback" in record.exc_text  # the traceback is kept, bounded
        lines = (record.getMessage() + "\n" + record.exc_text).splitlines()
        assert max(len(line) for line in lines) <= MESSAGE_CHARS and len(lines) < 70
        assert len(caplog.handler.format(record)) < 70 * MESSAGE_CHARS


# --------------------------------------------------------------------------------------------- page messages
def test_refusal_messages_in_the_page_are_bounded(make_app):
    app = make_app()
    location = "/no/such/" + "d" * 1_000_000
    text = status_text(submit(app, location=location))
    assert text.startswith("no such file on the server: /no/such/ddd") and text.endswith("…")
    assert len(text) <= MESSAGE_CHARS
    job = "job-" + "j" * 1_000_000  # the job store is the browser's too
    body = callback_body(app, [f"{ids.ADD_STATUS}.children", f"{ids.ADD_POLL}.disabled", f"{ids.ADD_SUBMIT}.disabled",
                               f"{ids.EXAMPLE_SELECT}.options", f"{ids.EXAMPLE_SELECT}.value",
                               f"{ids.EXAMPLE_COUNT}.children", f"{ids.ADD_LABEL}.value"],
                         [(ids.ADD_POLL, "n_intervals", 1)], [(ids.ADD_JOB, "data", job)])
    text = status_text(post(app, body).get_json()["response"])
    assert "unknown job" in text and len(text) <= MESSAGE_CHARS


def test_a_file_too_large_for_the_browser_is_named_with_its_size(make_app):
    """The browser keeps no contents over MAX_BYTES (CHECK_UPLOAD_JS): the panel says so, and
    never runs the model on anything else."""
    app = make_app()
    too_large = {"filename": "scene.png", "size": 30 * 2**20, "contents": None}
    body = callback_body(app, [f"{ids.ADD_FILE_INFO}.children"], [(ids.ADD_IMAGE, "data", too_large)])
    info = post(app, body).get_json()["response"][ids.ADD_FILE_INFO]["children"]["props"]["children"]
    assert info == "scene.png is 30 MB; the limit is 10 MB"
    response = submit(app, image=too_large)
    assert status_text(response) == "scene.png is 30 MB; the limit is 10 MB"
    assert response[ids.ADD_JOB]["data"] is None


# --------------------------------------------------------------------------------------------- URLs and paths
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/etc/passwd")
            self.end_headers()
        elif self.path == "/image.png":
            data = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:  # a slow drip: a header line, or a body byte, every 0.2 s
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            in_body = self.path == "/drip-body"
            if in_body:
                self.wfile.write(b"Content-Length: 100000\r\n\r\n")
            for i in range(100):
                if self.server.stopping.is_set():
                    return
                try:
                    self.wfile.write(b"x" if in_body else f"X-Slow-{i}: 1\r\n".encode())
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)


@pytest.fixture
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.stopping = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stopping.set()
    server.shutdown()
    server.server_close()


def test_url_downloads(web_server, monkeypatch):
    assert read_path_or_url(web_server + "/image.png") == png_bytes()
    with pytest.raises(InputError, match="redirects to a ftp: URL; only http"):
        read_path_or_url(web_server + "/redirect")
    monkeypatch.setattr(add_example, "FETCH_SECONDS", 1)
    for path in ("/drip-headers", "/drip-body"):  # each byte well within any socket timeout
        start = time.monotonic()
        with pytest.raises(InputError, match="took longer than 1 s to download"):
            read_path_or_url(web_server + path)
        assert time.monotonic() - start < 3, path


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    for location in ("/dev/zero", str(fifo), str(tmp_path)):
        with pytest.raises(InputError, match="is not a regular file"):
            read_path_or_url(location)
    assert time.monotonic() - start < 2  # opening the FIFO did not wait for a writer
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    assert read_path_or_url(str(image)) == png_bytes()


# --------------------------------------------------------------------------------------------- upload files
def test_leftover_uploads_are_removed_at_start(make_app, tmp_path, monkeypatch):
    monkeypatch.setattr(add_example.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = add_example.upload_dir()
    assert os.path.dirname(folder) == str(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    os.makedirs(folder)
    paths = {name: os.path.join(folder, f"vli-add-{pid}-{name}.png")
             for name, pid in [("dead", dead_pid), ("old", os.getpid()), ("fresh", os.getpid())]}
    for path in paths.values():
        open(path, "wb").close()
    two_hours_ago = time.time() - 7200
    os.utime(paths["old"], (two_hours_ago, two_hours_ago))
    other = os.path.join(folder, "notes.txt")  # not an upload: never touched
    open(other, "w").close()
    make_app()
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(paths["fresh"]), "notes.txt"])
    saved = add_example.save_temp(png_bytes(), ".png")
    assert os.path.dirname(saved) == folder and os.path.basename(saved).startswith(f"vli-add-{os.getpid()}-")


# --------------------------------------------------------------------------------------------- after an add
def test_an_add_refreshes_the_header_count_and_clears_the_expected_answer(make_app, db):
    app = make_app()
    data = png_bytes()
    image = {"filename": "tiny.png", "size": len(data), "contents": data_url(data)}
    body = callback_body(app, [f"{ids.ADD_FILE_INFO}.children"], [(ids.ADD_IMAGE, "data", image)])
    assert len(data) < 1024
    assert post(app, body).get_json()["response"][ids.ADD_FILE_INFO]["children"] == f"tiny.png ({len(data)} bytes)"
    job = submit(app, image=image, label="red")[ids.ADD_JOB]["data"]
    assert app.vli_context.jobs.wait(job, 60)["state"] == "done"
    body = callback_body(app, [f"{ids.ADD_STATUS}.children", f"{ids.ADD_POLL}.disabled", f"{ids.ADD_SUBMIT}.disabled",
                               f"{ids.EXAMPLE_SELECT}.options", f"{ids.EXAMPLE_SELECT}.value",
                               f"{ids.EXAMPLE_COUNT}.children", f"{ids.ADD_LABEL}.value"],
                         [(ids.ADD_POLL, "n_intervals", 1)], [(ids.ADD_JOB, "data", job)])
    response = post(app, body).get_json()["response"]
    assert db.example_ids() == [0, 1, 2]
    assert response[ids.EXAMPLE_COUNT]["children"] == "3 examples · 2 layers × 2 heads"
    assert response[ids.ADD_LABEL]["value"] == "" and ids.ADD_TEXT not in response  # the question stays
    assert response[ids.EXAMPLE_SELECT]["value"] == 2
