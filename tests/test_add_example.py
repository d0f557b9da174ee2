"""Live adds: the job runner, the "Add example" panel's checks, and the panel in headless Chromium."""
import base64
import io
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from app import ids
from app.context import AppContext
from app.database.database import VliLmdb
from app.database.models import VL_Model, load_model
from app.jobs import DONE, ERROR, PREPROCESSING, QUEUED, RUNNING, JobRunner
from app.panels import add_example
from app.panels.add_example import (MAX_BYTES, InputError, check_image_bytes, decode_upload, format_size,
                                    help_text, start_job)
from conftest import browser_available
from helpers import fast_tsne  # noqa: F401 (autouse fixture: t-SNE is A's, tested there)
from tiny_vilt import build_tiny_vilt

QUESTION = "what color is the circle ?"


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
    return load_model("vilt", [build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"))], progress=False)


def png_bytes(size=(80, 50), fmt="PNG", seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "pair.png"
    path.write_bytes(png_bytes())
    return str(path)


@pytest.fixture
def db(tmp_path, vilt, image_file):
    """A writable database holding one example made by the tiny ViLT (example 0)."""
    db = VliLmdb(tmp_path / "db", read_only=False)
    db.add_record(vilt.data_setup(0, image_file, QUESTION))
    yield db
    db.close()


def snapshot(db):
    return db.example_ids(), db.pending_keys(), db.n_layers


class Gate(VL_Model):
    """Wraps a model: every call waits until both workers are inside, then until ``release``."""

    def __init__(self, inner, parties=2):
        self.inner = inner
        self.barrier = threading.Barrier(parties, timeout=60)
        self.release = threading.Event()

    def data_setup(self, ex_id, image_location, input_text, label=None):
        self.barrier.wait()
        assert self.release.wait(60)
        return self.inner.data_setup(ex_id, image_location, input_text, label=label)


class Raises(VL_Model):
    def data_setup(self, ex_id, image_location, input_text):
        raise RuntimeError("CUDA out of memory\n(pretend)")


class BadRecord(VL_Model):
    def __init__(self, inner):
        self.inner = inner

    def data_setup(self, ex_id, image_location, input_text):
        record = self.inner.data_setup(ex_id, image_location, input_text)
        record["attention"] = record["attention"][:, :, :-1]  # one key short
        return record


# --------------------------------------------------------------------------------------------- jobs
def test_two_concurrent_adds_get_distinct_ids_and_reads_keep_working(db, vilt, image_file):
    gate = Gate(vilt)
    runner = JobRunner(db, gate, workers=2)
    try:
        a = runner.submit(image_file, QUESTION, label="red")
        b = runner.submit(image_file, "what shape is left ?")
        deadline = time.time() + 60
        while not all(runner.status(j)["state"] == RUNNING for j in (a, b)):  # both inside the model
            assert time.time() < deadline, (runner.status(a), runner.status(b))
            time.sleep(0.02)
        assert db.example_ids() == [0] and db.example(0).text == QUESTION  # reads meanwhile
        assert len(db.attention(0, 1, None, [1])) == len(db.example(0).tokens)
        gate.release.set()
        sa, sb = runner.wait(a, 120), runner.wait(b, 120)
    finally:
        gate.release.set()
        runner.shutdown()
    assert sa["state"] == DONE and sb["state"] == DONE, (sa, sb)
    assert sa["ex_id"] != sb["ex_id"] and {sa["ex_id"], sb["ex_id"]} == {1, 2}
    assert db.example_ids() == [0, 1, 2]
    assert db.example(sa["ex_id"]).prediction["label"] == "red" and db.example(sb["ex_id"]).text.startswith("what shape")
    assert os.path.exists(image_file)  # delete_image was not asked for


@pytest.mark.parametrize("model, message", [
    (Raises(), "RuntimeError: CUDA out of memory (pretend)"),
    ("bad-record", "field 'attention': expected shape"),
])
def test_a_failing_add_leaves_the_database_unchanged(db, vilt, tmp_path, model, message):
    if model == "bad-record":
        model = BadRecord(vilt)
    before = snapshot(db)
    temp = tmp_path / "upload.png"
    temp.write_bytes(png_bytes())
    runner = JobRunner(db, model)
    try:
        status = runner.wait(runner.submit(str(temp), QUESTION, delete_image=True), 120)
    finally:
        runner.shutdown()
    assert status["state"] == ERROR and message in status["message"] and "\n" not in status["message"]
    assert status["ex_id"] is None
    assert snapshot(db) == before
    assert not temp.exists()  # the temporary upload is removed either way


def test_job_states(db, vilt, image_file):
    seen = []

    class Watching(VL_Model):
        def data_setup(self, ex_id, image_location, input_text):
            seen.append(runner.status(job)["state"])
            return vilt.data_setup(ex_id, image_location, input_text)

    runner = JobRunner(db, Watching())
    block = threading.Event()
    runner._pool.submit(block.wait)  # occupy the worker so the job is seen queued
    try:
        job = runner.submit(image_file, QUESTION)
        assert runner.status(job)["state"] == QUEUED
        block.set()
        final = runner.wait(job, 120)
    finally:
        block.set()
        runner.shutdown()
    assert seen == [RUNNING] and final == {"state": DONE, "message": "example 1 added", "ex_id": 1}
    unknown = runner.status("job-999")
    assert unknown["state"] == ERROR and "forgotten" in unknown["message"]
    assert PREPROCESSING == "preprocessing…"


def test_any_server_process_answers_for_a_job(db, vilt, image_file):
    """gunicorn -w 4: the page's poll may reach another worker than the one running the job."""
    import subprocess
    import sys

    runner = JobRunner(db, vilt)
    try:
        job = runner.submit(image_file, QUESTION)
        assert runner.wait(job, 120)["state"] == DONE
    finally:
        runner.shutdown()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); from app.jobs import JobBoard; "
            f"print(JobBoard({os.path.join(db.path, 'jobs')!r}).read({job!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "'state': 'done'" in out.stdout and "'ex_id': 1" in out.stdout
    for crafted in ("../../etc/passwd", "job-1", None, 7):  # what the page sends is never a path
        assert runner.status(crafted)["state"] == ERROR


# --------------------------------------------------------------------------------------------- panel checks
def test_check_image_bytes():
    assert check_image_bytes(png_bytes()) == ".png"
    assert check_image_bytes(png_bytes(fmt="JPEG")) == ".jpg"
    cases = [(png_bytes(fmt="GIF"), "a GIF image; only PNG and JPEG"), (b"hello", "not a PNG or JPEG"),
             (b"", "is empty"), (png_bytes()[:40], "not a PNG or JPEG"),
             (b"\x89PNG" + b"\0" * MAX_BYTES, "the limit is 10 MB")]
    for data, message in cases:
        with pytest.raises(InputError, match=message):
            check_image_bytes(data, "x.png")


def upload(data: bytes, filename="cat.png") -> dict:
    """The ADD_IMAGE store as the browser's CHECK_UPLOAD_JS fills it for a file within the limit."""
    contents = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"filename": filename, "size": len(data), "contents": contents}


def test_start_job_checks(tmp_path):
    class Jobs:
        def __init__(self):
            self.calls = []

        def submit(self, path, text, label, delete_image=False):
            self.calls.append((path, text, label, delete_image, open(path, "rb").read()))
            return "job-1"

    jobs = Jobs()
    image = upload(png_bytes())
    assert start_job(jobs, False, image, "  what ? ", "  ") == "job-1"
    path, text, label, delete, data = jobs.calls[0]
    assert (text, label, delete, data) == ("what ?", None, True, png_bytes()) and path.endswith(".png")
    os.unlink(path)
    on_disk = tmp_path / "server.jpg"
    on_disk.write_bytes(png_bytes(fmt="JPEG"))
    for args, message in [
        ((image, "", None), "type a question"),
        ((None, "q", None), "drop or choose an image"),
        (({"filename": "a.png", "size": 3, "contents": "data:image/png;base64,@@@"}, "q", None),
         "a.png could not be read"),
        (({"filename": "big.png", "size": MAX_BYTES + 1, "contents": None}, "q", None),
         "big.png is 10 MB; the limit is 10 MB"),
        (("not a store", "q", None), "the upload could not be read"),
        ((image, ["not", "text"], None), "the text could not be read"),
        ((None, "q", None, str(on_disk)), "paths and URLs are not accepted"),
    ]:
        with pytest.raises(InputError, match=message):
            start_job(jobs, False, *args)
    assert start_job(jobs, True, None, "q", "red", str(on_disk)) == "job-1"
    assert jobs.calls[-1][2] == "red" and jobs.calls[-1][0].endswith(".jpg")
    os.unlink(jobs.calls[-1][0])
    for location, message in [("file:///etc/passwd", "only local paths and http"),
                              (str(tmp_path / "none.png"), "no such file")]:
        with pytest.raises(InputError, match=message):
            start_job(jobs, True, None, "q", None, location)
    with pytest.raises(InputError):
        decode_upload("no comma here", None)


def test_sizes_are_shown_in_a_readable_unit():
    cases = {0: "0 bytes", 1: "1 byte", 450: "450 bytes", 1023: "1023 bytes", 1024: "1 KB", 1536: "1.5 KB",
             300 * 1024: "300 KB", 2**20: "1 MB", MAX_BYTES: "10 MB", 30 * 2**20 + 2**19: "30.5 MB"}
    assert {n: format_size(n) for n in cases} == cases


def test_help_says_what_images_the_model_expects(vilt):
    class Hinted(VL_Model):
        def data_setup(self, ex_id, image_location, input_text):
            return {}

        def input_hint(self):
            return "scenes like those in shapes_vqa/heldout/ (96×96)"

    assert help_text(vilt).endswith("PNG or JPEG, up to 10 MB.")  # the tiny ViLT says nothing
    assert help_text(Hinted()).endswith("up to 10 MB. This model expects scenes like those in "
                                        "shapes_vqa/heldout/ (96×96).")


def component_ids(component):
    found = set()
    if getattr(component, "id", None) is not None:
        found.add(component.id)
    children = getattr(component, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if hasattr(child, "to_plotly_json"):
            found |= component_ids(child)
    return found


def test_path_field_only_with_allow_paths(db, vilt):
    without = component_ids(add_example.layout(AppContext(db=db, model=vilt)))
    assert ids.ADD_UPLOAD in without and ids.ADD_TEXT in without and ids.ADD_PATH not in without
    assert ids.ADD_PATH in component_ids(add_example.layout(AppContext(db=db, model=vilt, allow_paths=True)))


# --------------------------------------------------------------------------------------------- browser
OVERLAY_Z = (f"const gd = document.getElementById('{ids.IMAGE_GRAPH}').querySelector('.js-plotly-plot');"
             "const z = gd && gd._fullData && gd._fullData[0] && gd._fullData[0].z;"
             "return z ? Array.from(z, r => Array.from(r, v => (v === null || isNaN(v)) ? null : v)) : null;")


def wait_for_overlay(dash_duo, expected, timeout=15):
    """The image overlay's heatmap (rows x cols) once it shows ``expected`` (the patches' attention,
    row-major), or what it shows when ``timeout`` runs out (None when there is no heatmap)."""
    deadline, z = time.time() + timeout, None
    while time.time() < deadline:
        z = dash_duo.driver.execute_script(OVERLAY_Z)
        z = None if z is None else np.array(z, dtype=float)
        if z is not None and z.size == expected.size and np.allclose(z.ravel(), expected, rtol=1e-3, atol=1e-6):
            break
        time.sleep(0.1)
    return z


@pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")
def test_add_example_in_the_browser(dash_duo, db, vilt, tmp_path, request, monkeypatch):
    from app.server import create_app

    limit = 64 * 1024  # a file over the limit, small enough to upload quickly
    monkeypatch.setattr(add_example, "MAX_BYTES", limit)
    app = create_app(db, model=vilt)
    request.addfinalizer(app.vli_context.jobs.shutdown)
    dash_duo.start_server(app)
    dash_duo.wait_for_element("#" + ids.ADD_UPLOAD, timeout=15)
    assert not dash_duo.find_elements("#" + ids.ADD_PATH)  # no --allow-paths

    # Not an image (whatever its name says): refused with a message, nothing added.
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    file_input = dash_duo.find_element(f"#{ids.ADD_UPLOAD} input[type=file]")
    file_input.send_keys(str(fake))
    dash_duo.wait_for_contains_text("#" + ids.ADD_FILE_INFO, "not a PNG or JPEG", timeout=10)
    dash_duo.find_element("#" + ids.ADD_TEXT).send_keys(QUESTION)
    dash_duo.find_element("#" + ids.ADD_SUBMIT).click()
    dash_duo.wait_for_contains_text("#" + ids.ADD_STATUS, "not a PNG or JPEG", timeout=10)
    assert db.example_ids() == [0]

    # A real image: the job runs, the new example is selected and shown.
    real = tmp_path / "real.png"
    real.write_bytes(png_bytes(seed=3))
    dash_duo.find_element(f"#{ids.ADD_UPLOAD} input[type=file]").send_keys(str(real))
    dash_duo.wait_for_contains_text("#" + ids.ADD_FILE_INFO, "real.png", timeout=10)
    dash_duo.find_element("#" + ids.ADD_LABEL).send_keys("red")
    dash_duo.find_element("#" + ids.ADD_SUBMIT).click()
    dash_duo.wait_for_contains_text("#" + ids.ADD_STATUS, "Example 1 added.", timeout=60)
    assert db.example_ids() == [0, 1]
    dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, "Example 1", timeout=10)
    dash_duo.wait_for_contains_text("#" + ids.PREDICTION, "label: red", timeout=10)
    assert not dash_duo.find_element("#" + ids.ADD_SUBMIT).get_attribute("disabled")
    dash_duo.wait_for_text_to_equal("#" + ids.EXAMPLE_COUNT, "2 examples · 2 layers × 4 heads", timeout=10)
    assert dash_duo.find_element("#" + ids.ADD_LABEL).get_attribute("value") == ""  # the question stays
    assert dash_duo.find_element("#" + ids.ADD_TEXT).get_attribute("value") == QUESTION

    # Its attention overlay: click the text token "circle" (index 5) and read the heatmap.
    token = f'[id=\'{{"index":5,"type":"{ids.TOKEN}"}}\']'
    dash_duo.wait_for_text_to_equal(token, "circle", timeout=10)
    dash_duo.find_element(token).click()
    info = db.example(1)
    expected = db.attention(1, db.n_layers - 1, None, [5])[info.txt_len + 1:]  # patches, row-major
    z = wait_for_overlay(dash_duo, expected)
    assert z is not None and z.shape == info.grid == (4, 6)
    np.testing.assert_allclose(z.ravel(), expected, rtol=1e-3, atol=1e-6)

    # A file over the limit: named with its size, and the image chosen before is never used instead.
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(size=(200, 150), seed=5))
    size = big.stat().st_size
    assert size > limit
    dash_duo.find_element(f"#{ids.ADD_UPLOAD} input[type=file]").send_keys(str(big))
    message = f"big.png is {format_size(size)}; the limit is 64 KB"
    dash_duo.wait_for_contains_text("#" + ids.ADD_FILE_INFO, message, timeout=10)
    dash_duo.find_element("#" + ids.ADD_SUBMIT).click()
    dash_duo.wait_for_contains_text("#" + ids.ADD_STATUS, message, timeout=10)
    assert db.example_ids() == [0, 1]
    assert dash_duo.get_logs() == []


BUNDLED = {"vilt": ("example_database2", ["-m", "vilt", "shapes_vqa/vilt-shapes"]),
           "llava": ("example_database3", ["-m", "hf", "shapes_vqa/llava-shapes"])}


@pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")
@pytest.mark.parametrize("bundled", list(BUNDLED))
def test_bundled_model_in_the_browser(dash_duo, tmp_path, bundled):
    """The README's commands on a copy of a bundled database with its model loaded (``run_app.py -d DB
    -m vilt shapes_vqa/vilt-shapes``, ``-m hf shapes_vqa/llava-shapes``): upload a scene the model never
    saw, ask about it, and see the new example with the model's (right) answer and the attention overlay
    of the question's shape word; it is still stored after the server stops."""
    import shutil
    import socket
    import subprocess
    import sys

    from app import figures
    from shapes_vqa import scenes

    database, model_args = BUNDLED[bundled]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    db_dir = tmp_path / "db"
    shutil.copytree(os.path.join(root, database), db_dir, ignore=shutil.ignore_patterns("lock.mdb"))
    with VliLmdb(db_dir) as before:
        new_id, n_layers = max(before.example_ids()) + 1, before.n_layers
    ex = next(e for e in scenes.generate(10, seed=4321) if e.qtype == "color")
    scene = tmp_path / "scene.png"
    Image.fromarray(ex.scene.image).save(scene)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "run_app.py", "-d", str(db_dir), "-p", str(port), *model_args],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:  # until the server listens (the model loads first)
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "run_app.py did not start listening within 120 s"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        dash_duo.driver.get(f"http://127.0.0.1:{port}/")
        dash_duo.wait_for_element("#" + ids.ADD_UPLOAD, timeout=30)
        dash_duo.find_element(f"#{ids.ADD_UPLOAD} input[type=file]").send_keys(str(scene))
        dash_duo.wait_for_contains_text("#" + ids.ADD_FILE_INFO, "scene.png", timeout=10)
        dash_duo.find_element("#" + ids.ADD_TEXT).send_keys(ex.question)
        dash_duo.find_element("#" + ids.ADD_LABEL).send_keys(ex.answer)
        dash_duo.find_element("#" + ids.ADD_SUBMIT).click()
        dash_duo.wait_for_contains_text("#" + ids.ADD_STATUS, f"Example {new_id} added.", timeout=120)
        dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, f"Example {new_id}", timeout=10)
        dash_duo.wait_for_contains_text("#" + ids.PREDICTION, f"Prediction: {ex.answer}", timeout=10)
        assert dash_duo.find_element(f"#{ids.PREDICTION} .badge").text == "correct"

        shape = scenes.question_words(ex.question)[4]  # "what color is the <shape>?"
        with VliLmdb(db_dir) as db:
            info = db.example(new_id)
            index = next(i for i, t in enumerate(info.tokens) if info.is_text[i] and t.strip("▁Ġ ") == shape)
            expected = figures.overlay_grid(db.attention(new_id, n_layers - 1, None, [index]), info.coords,
                                            info.grid)
        token = f'[id=\'{{"index":{index},"type":"{ids.TOKEN}"}}\']'
        dash_duo.wait_for_text_to_equal(token, info.tokens[index], timeout=10)
        dash_duo.find_element(token).click()
        z = wait_for_overlay(dash_duo, expected.ravel())
        grid = scenes.SCENE_SIZE // 16
        assert z is not None and z.shape == info.grid == (grid, grid)
        np.testing.assert_allclose(z, expected, rtol=1e-3, atol=1e-6)
        assert dash_duo.get_logs() == []
    finally:
        server.terminate()
        server.wait(30)
    with VliLmdb(db_dir) as after:  # written to the database: there for the next start
        assert after.example_ids()[-1] == new_id and after.example(new_id).text == ex.question
