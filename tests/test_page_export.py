"""Downloads: the data behind the current view as CSV / .npy, checked against the database, and the
one-file HTML report, through Flask's test client as the browser calls them."""
import base64
import csv
import io
import json

import numpy as np
import pytest

from app import ids
from app.server import create_app
from test_page_validation import NO_UPDATE, Page

SEL = f"{ids.SEL_STORE}.data"
HEAD = f"{ids.HEAD_STORE}.data"


@pytest.fixture
def page(small_db):
    return Page(create_app(small_db))


def download(page, output_trigger: str, values: dict) -> dict:
    deps = [d for d in page.deps if f"{ids.DOWNLOAD}.data" in d["output"]
            and output_trigger in [f"{x['id']}.{x['property']}" for x in d["inputs"]]]
    assert len(deps) == 1
    status, response = page.post_to(deps[0], output_trigger, values)
    assert status == 200, status
    return response[ids.DOWNLOAD]["data"]


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))


def test_attention_csv_holds_the_weights_shown(page, small_db):
    values = {f"{ids.EXPORT_ATTENTION}.n_clicks": 1, SEL: {"ex": 0, "tokens": [3, 4]},
              HEAD: {"layer": 1, "head": 2}, f"{ids.EXAMPLE_READY}.data": 0, f"{ids.ATT_METHOD}.value": "attention"}
    data = download(page, f"{ids.EXPORT_ATTENTION}.n_clicks", values)
    assert data["filename"] == "vl-interpret-example-0-attention.csv"
    table = rows(data["content"])
    expected = small_db.attention(0, 1, 2, [3, 4])
    info = small_db.example(0)
    assert len(table) == info.n_tokens
    np.testing.assert_allclose([float(r["attention"]) for r in table], expected, rtol=1e-7)
    assert table[3]["label"] == info.tokens[3] and table[3]["kind"] == "text"
    patch = next(i for i, c in enumerate(info.coords) if c is not None)
    assert (int(table[patch]["x"]), int(table[patch]["y"])) == info.coords[patch]
    values[f"{ids.ATT_METHOD}.value"] = "rollout"
    table = rows(download(page, f"{ids.EXPORT_ATTENTION}.n_clicks", values)["content"])
    np.testing.assert_allclose([float(r["rollout"]) for r in table], small_db.rollout(0, 1, [3, 4]), rtol=1e-7)


def test_nothing_selected_or_crafted_values_download_nothing(page):
    for sel in ({"ex": 0, "tokens": []}, {"ex": 0, "tokens": [-1]}, "x"):
        deps = [d for d in page.deps if f"{ids.DOWNLOAD}.data" in d["output"]
                and f"{ids.EXPORT_ATTENTION}.n_clicks" in [f"{x['id']}.{x['property']}" for x in d["inputs"]]]
        status, _ = page.post_to(deps[0], f"{ids.EXPORT_ATTENTION}.n_clicks",
                                 {f"{ids.EXPORT_ATTENTION}.n_clicks": 1, SEL: sel, f"{ids.EXAMPLE_READY}.data": 0})
        assert status == NO_UPDATE


def test_statistics_csv_and_matrix_npy_match_the_database(page, small_db):
    data = download(page, f"{ids.EXPORT_STATISTICS}.n_clicks",
                    {f"{ids.EXPORT_STATISTICS}.n_clicks": 1, f"{ids.EXAMPLE_SELECT}.value": 1})
    table = rows(data["content"])
    stats = small_db.head_statistics(1)
    assert len(table) == len(stats) * small_db.n_layers * small_db.n_heads
    for r in table:
        want = stats[r["statistic"]][int(r["layer"]) - 1, int(r["head"]) - 1]
        assert (r["value"] == "" and np.isnan(want)) or float(r["value"]) == pytest.approx(float(want), rel=1e-6)
    data = download(page, f"{ids.EXPORT_MATRIX}.n_clicks", {f"{ids.EXPORT_MATRIX}.n_clicks": 1,
                                                             f"{ids.EXAMPLE_SELECT}.value": 2,
                                                             HEAD: {"layer": 2, "head": None}})
    assert data["filename"].endswith("attention-layer3-mean.npy") and data["base64"]
    matrix = np.load(io.BytesIO(base64.b64decode(data["content"])), allow_pickle=False)
    np.testing.assert_array_equal(matrix, small_db.attention_matrix(2, 2, None))


def test_report_is_one_html_file_with_the_example_and_the_view(page, small_db):
    data = download(page, f"{ids.EXPORT_REPORT}.n_clicks", {
        f"{ids.EXPORT_REPORT}.n_clicks": 1, f"{ids.EXAMPLE_SELECT}.value": 2, f"{ids.HEAD_STAT}.value": "txt2img",
        f"{ids.HEAD_ZSCORE}.value": [], HEAD: {"layer": 0, "head": 1}, SEL: {"ex": 2, "tokens": [3]},
        f"{ids.ATT_METHOD}.value": "attention"})
    html = data["content"]
    assert data["filename"] == "vl-interpret-example-2.html"
    assert html.startswith("<!DOCTYPE html>") and "Example 2" in html and "data:image/png;base64," in html
    assert "prediction <b>yes</b>" in html and "label <b>no</b>" in html  # small_db's example 2
    assert "attention from circle" in html and "layer 1, head 2" in html
    assert html.count("Plotly.newPlot") == 2 and "<script src=" not in html  # plotly.js inside: works offline
    weight = small_db.attention(2, 0, 1, [3])[1]
    assert f'title="{weight:.4f}"' in html  # the text tint carries each token's value
    assert json.dumps(small_db.example(2).tokens[1])[1:-1] in html
