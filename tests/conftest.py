"""Shared fixtures: headless Debian Chromium for dash.testing's ``dash_duo``, and a small database.

dash.testing builds its Chrome driver with ``webdriver.Chrome(options=...)``; selenium 4.2 then
starts the ``chromedriver`` found on PATH, which we make sure is /usr/bin/chromedriver (the one that
matches /usr/bin/chromium). The options come from dash's ``pytest_setup_options`` hook below.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

CHROMIUM = os.environ.get("DASH_TEST_CHROMEPATH", "/usr/bin/chromium")
CHROMEDRIVER_DIR = "/usr/bin"

if os.path.exists(os.path.join(CHROMEDRIVER_DIR, "chromedriver")) and \
        shutil.which("chromedriver") != os.path.join(CHROMEDRIVER_DIR, "chromedriver"):
    os.environ["PATH"] = CHROMEDRIVER_DIR + os.pathsep + os.environ.get("PATH", "")


def pytest_setup_options():
    """dash.testing hook: the ChromeOptions for dash_duo (a fresh profile per browser)."""
    from selenium.webdriver.chrome.options import Options

    profile = tempfile.mkdtemp(prefix="vli-chromium-")
    atexit.register(shutil.rmtree, profile, ignore_errors=True)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1440,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return options  # pluggy collects hook results into the list dash.testing expects


def browser_available() -> bool:
    return os.path.exists(CHROMIUM) and shutil.which("chromedriver") is not None


TEXT = ["[CLS]", "is", "the", "circle", "red", "[SEP]", "left", "of", "it", "[SEP]"]
N_LAYERS, N_HEADS = 3, 4
GRID = (4, 5)


@pytest.fixture
def small_db(tmp_path, monkeypatch):
    """A preprocessed database of three examples (10 text tokens, an image [CLS] and a 4x5 patch grid,
    3 layers x 4 heads, one custom metric) and a text-only example 3; t-SNE replaced by a fast
    stand-in. Opened read-only."""
    from helpers import fake_tsne_maps, make_db, make_record

    import app.database.analyses.tsne_maps as tsne_analysis
    from app.database.database import VliLmdb

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)
    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
    rng = np.random.default_rng(0)
    records = [make_record(i, text_tokens=TEXT, grid=GRID, n_layers=N_LAYERS, n_heads=N_HEADS, hidden=8,
                           image_cls=True, image_hw=(40, 50),
                           custom_metrics={"my metric": rng.random((N_LAYERS, N_HEADS))})
               for i in range(3)]
    records.append(make_record(3, text_tokens=TEXT[:5], grid=None, n_layers=N_LAYERS, n_heads=N_HEADS, hidden=8,
                               image_hw=(40, 50)))  # text only: no patches
    records[2]["accuracy"] = None
    records[2]["prediction"] = {"answer": "yes", "score": 0.9, "label": "no"}
    path = tmp_path / "db"
    db, report = make_db(path, records)
    assert not report.failed, report.failed
    db.close()
    ro = VliLmdb(path)
    yield ro
    ro.close()
