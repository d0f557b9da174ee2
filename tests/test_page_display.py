"""What the page shows, without a browser: one attention colour scale (figures, the text tint of
app/assets/vli.js run in node, the legend), the Play icons, box/lasso selections cleared when the
selection is replaced, trailing [PAD] tokens collapsed, the example's notes, the layer slider."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import plotly
import pytest

from app import figures, ids
from app.database.store import ExampleInfo
from app.panels import example, heads, tokens
from app.server import create_app
from test_layout import components
from test_page_validation import Page

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLI_JS = os.path.join(ROOT, "app", "assets", "vli.js")


def plotly_js_viridis() -> list:
    """The "Viridis" stops of the plotly.js that dcc.Graph loads (plotly's package data)."""
    path = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index('Viridis:[[')
    body = text[start:text.index(']]', start) + 2]
    return [[float(p), c] for p, c in re.findall(r'\[([\d.]+),"(#[0-9a-f]{6})"\]', body)]


def rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[k:k + 2], 16) for k in (1, 3, 5)], dtype=float)


def readable_on(background: np.ndarray) -> str:
    """Black or white text, whichever has the higher WCAG contrast ratio with the background."""
    c = background / 255
    lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ [0.2126, 0.7152, 0.0722])
    return "#000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#fff"


def scale_rgb(scale, a: float) -> np.ndarray:
    """Independent reference: each channel linearly interpolated between the stops."""
    pos = [p for p, _ in scale]
    cols = np.array([rgb(c) for _, c in scale])
    return np.array([np.interp(a, pos, cols[:, k]) for k in range(3)])


def test_attention_scale_is_plotly_viridis():
    ref = plotly_js_viridis()
    assert len(ref) == len(figures.ATTENTION_SCALE) == 17
    for (p, c), (rp, rc) in zip(figures.ATTENTION_SCALE, ref):
        assert p == pytest.approx(rp, abs=1e-9) and c == rc


def test_the_image_and_the_matrix_run_from_zero_to_their_highest_value():
    z = np.array([[0.02, 0.3], [np.nan, 0.1]], dtype=np.float32)
    state = figures.overlay_state(z, (2, 2))
    assert state["colorscale"] == figures.ATTENTION_SCALE
    assert state["zmin"] == 0 and state["zmax"] == pytest.approx(0.3)
    m = np.array([[0.2, 0.7], [0.05, 0.05]], dtype=np.float32)
    trace = figures.attention_matrix_figure(m, ["a", "b"], ["a", "b"], "t").data[0]
    assert list(map(list, trace.colorscale)) == [[p, c] for p, c in figures.ATTENTION_SCALE]
    assert (trace.zmin, trace.zmax, trace.zauto) == (0, pytest.approx(0.7), False)
    empty = figures.overlay_state(None, (2, 2))
    assert set(empty) == set(state)  # the empty state overwrites every key the Patch set


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run app/assets/vli.js")
def test_text_tint_uses_the_same_scale_with_readable_text():
    """vli.tint in node: background = the scale at w / max (clipped), black or white text."""
    scale = figures.ATTENTION_SCALE
    att = {"w": [0.0, 0.05, 0.1, 0.2, 0.07], "max": 0.1, "sel": [1]}
    script = (
        "global.window = {}; global.document = {addEventListener() {}};"
        f"require({json.dumps(VLI_JS)});"
        f"const out = window.dash_clientside.vli.tint({json.dumps(att)}, [0, 1, 2, 3, 4].map(i => ({{index: i}})),"
        f" {json.dumps(scale)});"
        "console.log(JSON.stringify({out, emb: window.dccFunctions.vliLayerLabel(0),"
        " three: window.dccFunctions.vliLayerLabel(3)}));")
    result = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    styles, titles = result["out"]
    for k, w in enumerate(att["w"]):
        got = np.array([int(v) for v in re.findall(r"\d+", styles[k]["backgroundColor"])], dtype=float)
        expected = scale_rgb(scale, min(1.0, w / att["max"]))
        np.testing.assert_allclose(got, expected, atol=0.51)
        assert styles[k]["color"] == readable_on(expected)
        assert titles[k] == f"attention {w:.4f}"
    assert styles[0]["color"] == "#fff" and styles[2]["color"] == "#000"  # on dark purple, on yellow
    assert styles[1]["outline"].startswith("2px solid")
    assert (result["emb"], result["three"]) == ("emb", "3")


def test_one_legend_states_the_scale(small_db):
    page = Page(create_app(small_db))
    status, resp = page.post(f"{ids.ATT_STORE}.data", f"{ids.SEL_STORE}.data",
                             {f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [3]}})
    assert status == 200
    title = json.dumps(resp[ids.ATT_TITLE]["children"], ensure_ascii=False)
    assert figures.css_gradient(figures.ATTENTION_SCALE) in title
    store = resp[ids.ATT_STORE]["data"]
    plain = ~small_db.example(0).special[:len(store["w"])]
    assert store["max"] == pytest.approx(max(np.array(store["w"])[plain]), abs=1e-4)
    assert f"text 0 – {store['max']:.3g}" in title
    att = small_db.attention(0, small_db.n_layers - 1, None, [3])
    info = small_db.example(0)
    image_max = max(att[i] for i, c in enumerate(info.coords) if c is not None)
    assert f"image 0 – {image_max:.3g}" in title
    assert page.props[ids.ATT_SCALE]["data"] == figures.ATTENTION_SCALE  # what vli.tint reads


def test_css_gradient_lists_every_stop():
    assert figures.css_gradient([[0.0, "#000000"], [0.25, "#ff0000"], [1.0, "#ffffff"]]) == \
        "linear-gradient(to right, #000000 0.0%, #ff0000 25.0%, #ffffff 100.0%)"


def _operations(patch) -> dict:
    """{location: value} of a Patch's Assign operations (as the response carries it)."""
    return {tuple(op["location"]): op["params"]["value"] for op in patch["operations"]
            if op["operation"] == "Assign"}


BOX = {"points": [{"customdata": 12}, {"customdata": 13}], "range": {"x": [0, 20], "y": [0, 10]}}


@pytest.mark.parametrize("trigger, value", [
    (f"{ids.CLEAR_SELECTION}.n_clicks", 1),
    (f"{ids.TOKEN_CLICK}.data", {"index": 3, "t": 1}),
    (f"{ids.TSNE_GRAPH}.clickData", {"points": [{"customdata": 4, "curveNumber": 0}]}),
    (f"{ids.PLAY}.n_clicks", 1),
])
def test_a_drawn_box_selection_goes_when_the_selection_is_replaced(small_db, trigger, value):
    page = Page(create_app(small_db))
    status, resp = page.post(f"{ids.SEL_STORE}.data", trigger,
                             {trigger: value, f"{ids.IMAGE_GRAPH}.selectedData": BOX,
                              f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [12, 13]}})
    assert status == 200
    ops = _operations(resp[ids.IMAGE_GRAPH]["figure"])
    assert ops == {("layout", "selections"): [], ("data", 1, "selectedpoints"): None}
    assert resp[ids.IMAGE_GRAPH]["selectedData"] is None  # nothing drawn any more
    status, resp = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: value})  # no box drawn:
    assert status == 200 and ids.IMAGE_GRAPH not in resp  # no redraw of the image for nothing


def test_opening_the_nearest_token_of_this_example_clears_a_drawn_box(small_db):
    page = Page(create_app(small_db))
    status, resp = page.post(f"{ids.EXAMPLE_SELECT}.value", f"{ids.NEIGHBOR_OPEN}.n_clicks",
                             {f"{ids.NEIGHBOR_OPEN}.n_clicks": 1, f"{ids.IMAGE_GRAPH}.selectedData": BOX,
                              f"{ids.NEIGHBOR_STORE}.data": {"ex": 0, "token": 3}})
    assert status == 200 and resp[ids.SEL_STORE]["data"] == {"ex": 0, "tokens": [3]}
    assert _operations(resp[ids.IMAGE_GRAPH]["figure"]) == {("layout", "selections"): [],
                                                             ("data", 1, "selectedpoints"): None}


def test_the_box_selection_itself_stays_drawn(small_db):
    page = Page(create_app(small_db))
    trigger = f"{ids.IMAGE_GRAPH}.selectedData"
    status, resp = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: BOX})
    assert status == 200 and resp[ids.SEL_STORE]["data"]["tokens"] == [12, 13]
    assert ids.IMAGE_GRAPH not in resp


def test_play_shows_css_icons_not_the_missing_pause_glyph(small_db):
    page = Page(create_app(small_db))
    status, resp = page.post(f"{ids.SEL_STORE}.data", f"{ids.PLAY}.n_clicks", {f"{ids.PLAY}.n_clicks": 1})
    assert status == 200 and resp[ids.PLAY_INTERVAL]["disabled"] is False
    label = json.dumps(resp[ids.PLAY]["children"], ensure_ascii=False)
    assert "icon-pause" in label and "Pause" in label and "⏸" not in label
    assert "icon-play" in json.dumps(components(create_app(small_db).layout())[ids.PLAY].to_plotly_json()["props"],
                                     default=lambda c: c.to_plotly_json())


def fake_info(text_tokens, n_image=0, notes=(), generated=0):
    special = [t.startswith("[") for t in text_tokens] + [False] * n_image
    n = len(text_tokens) + n_image
    return ExampleInfo(ex_id=0, tokens=tuple(text_tokens) + tuple(f"p{i}" for i in range(n_image)),
                       txt_len=len(text_tokens), special=np.array(special),
                       coords=(None,) * len(text_tokens) + tuple((i, 0) for i in range(n_image)),
                       grid=(1, n_image) if n_image else None, image_size=(16, 16 * max(n_image, 1)),
                       accuracy=True, prediction=None, text="q", notes=tuple(notes),
                       is_text=np.arange(n) < len(text_tokens), generated=generated,
                       patch_grid=np.array([-1] * len(text_tokens) + [0] * n_image))


def shown(segments):
    """Per segment: the clickable token indices, and the texts of the other items."""
    out = []
    for seg in segments:
        items = [c["props"] for c in seg.children]
        out.append(([p["id"]["index"] for p in items if "id" in p],
                    [p["children"] for p in items if "id" not in p]))
    return out


def test_trailing_pads_collapse_into_one_note():
    after_sep = fake_info(["[CLS]", "what", "[SEP]", "[PAD]", "[PAD]", "[PAD]"], n_image=2)
    segments, _ = tokens.token_elements(after_sep)
    assert shown(segments) == [([0, 1, 2], ["+3 [PAD]"])]
    no_sep = fake_info(["[CLS]", "a", "[PAD]", "b", "[PAD]", "[PAD]"])
    assert shown(tokens.token_elements(no_sep)[0]) == [([0, 1, 2, 3], ["+2 [PAD]"])]  # an inner [PAD] stays
    assert tokens.shown_text_tokens(fake_info(["[CLS]", "a", "[SEP]"])) == [0, 1, 2]


def test_play_stops_at_the_last_token_shown(tmp_path, monkeypatch):
    import app.database.analyses.tsne_maps as tsne_analysis
    from helpers import fake_tsne_maps, make_db, make_record

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)

    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
    text = ["[CLS]", "a", "b", "[SEP]", "[PAD]", "[PAD]"]
    db, report = make_db(tmp_path / "db", [make_record(0, text_tokens=text)])
    assert not report.failed
    page = Page(create_app(db))
    tick = f"{ids.PLAY_INTERVAL}.n_intervals"
    values = {f"{ids.PLAY_INTERVAL}.disabled": False, f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [2]}}
    status, resp = page.post(f"{ids.SEL_STORE}.data", tick, values)
    assert resp[ids.SEL_STORE]["data"]["tokens"] == [3] and resp[ids.PLAY_INTERVAL]["disabled"] is True
    values[f"{ids.SEL_STORE}.data"] = {"ex": 0, "tokens": [3]}
    status, resp = page.post(f"{ids.SEL_STORE}.data", tick, values)
    assert ids.SEL_STORE not in resp and resp[ids.PLAY_INTERVAL]["disabled"] is True  # no step onto a [PAD]


def test_notes_show_in_the_prediction_bar():
    note = "the text was cut to the model's 40 tokens"
    children = example.prediction_children(fake_info(["a"], notes=(note,)))
    notes = [c for c in children if c.className == "note"]
    assert len(notes) == 1 and notes[0].title == note and notes[0].children[1] == note
    no_field = example.prediction_children(fake_info(["a"]))  # an ExampleInfo without ``notes``
    assert not [c for c in no_field if c.className == "note"]


def test_layer_slider_names_layer_zero_emb(small_db):
    slider = components(create_app(small_db).layout())[ids.TSNE_LAYER]
    assert slider.marks[0] == "emb"
    assert slider.allow_direct_input is False  # its number box showed 0 where the marks say "emb"
    assert slider.tooltip["transform"] == "vliLayerLabel"  # defined in vli.js, run above


def test_head_summary_height_follows_the_layers(small_db):
    graph = components(create_app(small_db).layout())[ids.HEAD_GRAPH]
    assert graph.style["height"] == heads.head_graph_height(small_db.n_layers)
    assert heads.head_graph_height(4) == \
        f"min(calc(4 * var(--head-row) + {heads.HEAD_AXES_PX}px), var(--head-graph-max))"
    margin = figures.head_summary_figure(np.zeros((4, 2), np.float32), "s").layout.margin
    assert margin.t + margin.b == heads.HEAD_AXES_PX
