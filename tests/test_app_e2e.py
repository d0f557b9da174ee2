"""End-to-end: the app in headless Chromium (dash_duo) on a small database made in tmp_path."""
import time

import numpy as np
import pytest
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.keys import Keys

from app import figures, ids
from app.database.models import VL_Model
from app.server import create_app
from conftest import GRID, N_LAYERS, browser_available
from test_page_display import scale_rgb

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs /usr/bin/chromium and chromedriver")

GD = "document.getElementById('{}').querySelector('.js-plotly-plot')"


def token_css(i):
    return f'[id=\'{{"index":{i},"type":"{ids.TOKEN}"}}\']'


def graph_js(dash_duo, graph_id, expr):
    """Evaluate ``expr`` with ``gd`` bound to the Plotly div of a dcc.Graph."""
    return dash_duo.driver.execute_script(f"const gd = {GD.format(graph_id)}; if (!gd) return null; {expr}")


def overlay_z(dash_duo):
    """The image overlay heatmap's z as plotted (Plotly's full data, after typed-array decoding)."""
    z = graph_js(dash_duo, ids.IMAGE_GRAPH,
                 "const z = gd._fullData && gd._fullData[0] && gd._fullData[0].z;"
                 "return z ? Array.from(z, r => Array.from(r, v => (v === null || isNaN(v)) ? null : v)) : null;")
    return None if z is None else np.array(z, dtype=float)


def click_graph_point(dash_duo, graph_id, x, y, hover_s: float = 0.0):
    """A real mouse click at data coordinates (x, y) of a Plotly graph; with ``hover_s``, the mouse moves
    onto the point and rests there that long first (WebGL traces pick the hovered point a frame later)."""
    px, py = graph_js(dash_duo, graph_id,
                      "const r = gd.querySelector('.nsewdrag').getBoundingClientRect();"
                      "const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;"
                      f"return [r.left + xa.l2p({x}), r.top + ya.l2p({y})];")
    ab = ActionBuilder(dash_duo.driver)
    if hover_s:
        ab.pointer_action.move_to_location(px - 3, py).move_to_location(px, py).pause(hover_s)
    else:
        ab.pointer_action.move_to_location(px, py)
    ab.pointer_action.click()
    ab.perform()


def wait_for_steady_plot(dash_duo, graph_id, timeout=10):
    """Until the plot area's place on the screen is the same in two reads 0.3 s apart."""
    where = "const r = gd.querySelector('.nsewdrag').getBoundingClientRect(); return [r.left, r.top, r.width, r.height];"
    end = time.time() + timeout
    last = None
    while time.time() < end:
        now = graph_js(dash_duo, graph_id, where)
        if now is not None and now == last:
            return
        last = now
        time.sleep(0.3)
    raise AssertionError(f"{graph_id} kept moving")


def close(z, expected):
    return z is not None and z.shape == expected.shape and bool(np.allclose(z, expected, rtol=1e-5))


def drag_select(dash_duo, graph_id, x0, y0, x1, y1):
    """A real box selection by mouse drag from (x0, y0) to (x1, y1), data coordinates."""
    a = graph_js(dash_duo, graph_id, "const r = gd.querySelector('.nsewdrag').getBoundingClientRect();"
                 f"return [r.left + gd._fullLayout.xaxis.l2p({x0}), r.top + gd._fullLayout.yaxis.l2p({y0}),"
                 f"r.left + gd._fullLayout.xaxis.l2p({x1}), r.top + gd._fullLayout.yaxis.l2p({y1})];")
    ab = ActionBuilder(dash_duo.driver)
    ab.pointer_action.move_to_location(a[0], a[1]).pointer_down()
    for k in range(1, 11):  # plotly needs intermediate moves to start a drag
        ab.pointer_action.move_to_location(a[0] + (a[2] - a[0]) * k / 10, a[1] + (a[3] - a[1]) * k / 10)
    ab.pointer_action.pointer_up()
    ab.perform()


def wait_until(cond, timeout=8, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if isinstance(v, np.ndarray) or v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_app_end_to_end(dash_duo, small_db):
    app = create_app(small_db)
    dash_duo.start_server(app)
    dash_duo.wait_for_element(token_css(3), timeout=10)
    assert dash_duo.find_element("#" + ids.PREDICTION).text.startswith("incorrect")  # example 0
    head_title = dash_duo.find_element("#" + ids.HEAD_TITLE)
    assert f"layer {N_LAYERS}, mean of heads" in head_title.text

    # Click a text token: the overlay over the image appears with the grid's shape and the numbers
    # of the stored attention (last layer, mean of heads), and the token is outlined.
    dash_duo.find_element(token_css(3)).click()
    info = small_db.example(0)
    expected = figures.overlay_grid(small_db.attention(0, N_LAYERS - 1, None, [3]), info.coords, info.grid)
    wait_until(lambda: close(overlay_z(dash_duo), expected), what="overlay heatmap")
    assert overlay_z(dash_duo).shape == GRID
    assert graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd._fullData[0].showscale;") is True
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "circle")
    assert "outline" in dash_duo.find_element(token_css(3)).get_attribute("style")
    assert dash_duo.find_element(token_css(4)).get_attribute("title").startswith("attention ")
    # The text tint is on the image's colour scale, from 0 to the highest attention of a word.
    att = small_db.attention(0, N_LAYERS - 1, None, [3])
    top = max(att[i] for i in range(info.txt_len) if not info.special[i])
    tint = dash_duo.driver.execute_script(
        f"return getComputedStyle(document.querySelector({token_css(4)!r})).backgroundColor;")
    got = np.array([float(v) for v in tint[tint.index("(") + 1:-1].split(",")[:3]])
    np.testing.assert_allclose(got, scale_rgb(figures.ATTENTION_SCALE, min(1.0, att[4] / top)), atol=1.5)

    # Click a head cell (layer 2, head 3): the selection store, the title and the overlay follow.
    click_graph_point(dash_duo, ids.HEAD_GRAPH, 2, 1)
    dash_duo.wait_for_contains_text("#" + ids.HEAD_TITLE, "layer 2, head 3")
    att = small_db.attention(0, 1, 2, [3])
    expected = figures.overlay_grid(att, info.coords, info.grid)
    wait_until(lambda: close(overlay_z(dash_duo), expected), what="overlay of head 3")
    shape = graph_js(dash_duo, ids.HEAD_GRAPH, "const s = gd.layout.shapes[0]; return [s.x0, s.y0];")
    assert shape == [1.5, 0.5]

    # Switch to the rollout: the title, the help line and the overlay follow; then back.
    dash_duo.find_element(f"#{ids.ATT_METHOD} input[value='rollout']").click()
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "rollout through layers 1–2 (all heads, with the residual)")
    assert "Abnar & Zuidema 2020" in dash_duo.find_element("#" + ids.ATT_METHOD_HELP).text
    expected = figures.overlay_grid(small_db.rollout(0, 1, [3]), info.coords, info.grid)
    wait_until(lambda: close(overlay_z(dash_duo), expected), what="rollout overlay")
    assert dash_duo.find_element(token_css(4)).get_attribute("title").startswith("rollout ")
    dash_duo.find_element(f"#{ids.ATT_METHOD} input[value='attention']").click()
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "layer 2, head 3")

    # Click an image patch: the side switches to image and the overlay shows that patch's attention.
    click_graph_point(dash_duo, ids.IMAGE_GRAPH, 15, 5)  # cell (x=1, y=0) of 10x10-pixel patches
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "patch (1, 0)")
    tok = info.coords.index((1, 0))
    expected = figures.overlay_grid(small_db.attention(0, 1, 2, [tok]), info.coords, info.grid)
    wait_until(lambda: close(overlay_z(dash_duo), expected), what="patch overlay")
    assert dash_duo.find_element(f"#{ids.SIDE} input[value='image']").is_selected()

    # Box-select six patches (cells x 0..2, y 0..1): the overlay is the mean of all six rows.
    drag_select(dash_duo, ids.IMAGE_GRAPH, 1, 1, 29, 19)
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "6 tokens (averaged)")
    toks = [info.coords.index((x, y)) for y in range(2) for x in range(3)]
    rows = np.stack([small_db.attention(0, 1, 2, [t]) for t in toks])
    expected = figures.overlay_grid(rows.mean(axis=0), info.coords, info.grid)
    wait_until(lambda: close(overlay_z(dash_duo), expected), what="averaged overlay of six patches")
    assert len(graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd.layout.shapes;")) == 6
    drawn = "return [(gd.layout.selections || []).length, gd.data[1].selectedpoints == null];"
    assert graph_js(dash_duo, ids.IMAGE_GRAPH, drawn)[0] == 1  # the box stays drawn while it is the selection

    # A text token click replaces the box selection: the box and the highlighted patches go.
    dash_duo.find_element(token_css(4)).click()
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "‘red’")
    wait_until(lambda: graph_js(dash_duo, ids.IMAGE_GRAPH, drawn) == [0, True], what="box selection cleared")

    # Enter in the opacity box applies the value typed there.
    box = dash_duo.find_element(".opacity-slider input[type='number']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("0.3", Keys.ENTER)
    wait_until(lambda: graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd.data[0].opacity;") == 0.3,
               what="opacity from the number box")

    # Move the t-SNE slider to "before layer 1": the title changes.
    assert graph_js(dash_duo, ids.TSNE_GRAPH, "return gd.layout.title.text;").startswith(
        f"Hidden states after layer {N_LAYERS}")
    thumb = dash_duo.find_element(".layer-slider [role='slider']")
    thumb.click()
    thumb.send_keys(Keys.HOME)  # the slider's keyboard interface: Home = the first mark
    wait_until(lambda: (graph_js(dash_duo, ids.TSNE_GRAPH, "return gd.layout.title.text;") or "").startswith(
        "Hidden states before layer 1"), what="t-SNE title")
    # The slider names that layer "emb" (its tooltip, as its marks), and has no number box saying 0.
    tooltip = f"{ids.TSNE_LAYER}-tooltip-1-content"
    assert dash_duo.driver.execute_script(f"return document.getElementById('{tooltip}').textContent;") == "emb"
    assert dash_duo.find_elements(".layer-slider input") == []

    # Switch example with the "next" button: new tokens, selection cleared, empty-state hint.
    dash_duo.find_element("#" + ids.EXAMPLE_NEXT).click()
    dash_duo.wait_for_text_to_equal("#" + ids.PREDICTION + " .badge", "correct")
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "Click a text token")
    wait_until(lambda: graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd._fullData[0].showscale;") is False,
               what="empty overlay")

    # With nothing selected (an empty overlay), clicking a patch still selects it.
    click_graph_point(dash_duo, ids.IMAGE_GRAPH, 5, 15)  # cell (x=0, y=1)
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "patch (0, 1)")

    # Play shows a pause icon that is drawn (a CSS shape: the "⏸" glyph is missing from the fonts).
    dash_duo.find_element("#" + ids.PLAY).click()
    dash_duo.wait_for_element(f"#{ids.PLAY} .icon-pause", timeout=8)
    icon = dash_duo.find_element(f"#{ids.PLAY} .icon-pause")
    assert icon.size["width"] >= 6 and icon.size["height"] >= 6
    dash_duo.find_element("#" + ids.PLAY).click()
    dash_duo.wait_for_element(f"#{ids.PLAY} .icon-play", timeout=8)

    assert dash_duo.get_logs() == [], "browser console has errors"


def test_tsne_tooltip_neighbor_and_statistics(dash_duo, small_db):
    app = create_app(small_db)
    dash_duo.start_server(app)
    dash_duo.wait_for_element(token_css(3), timeout=10)
    wait_until(lambda: graph_js(dash_duo, ids.TSNE_GRAPH, "return gd._fullData && gd._fullData.length;"),
               what="t-SNE map")

    # Hovering an image dot of the t-SNE map shows a thumbnail with the patch outlined.
    px, py = graph_js(dash_duo, ids.TSNE_GRAPH,
                      "const r = gd.querySelector('.nsewdrag').getBoundingClientRect(); const t = gd._fullData[1];"
                      "return [r.left + gd._fullLayout.xaxis.l2p(t.x[0]), r.top + gd._fullLayout.yaxis.l2p(t.y[0])];")
    ab = ActionBuilder(dash_duo.driver)
    ab.pointer_action.move_to_location(px, py)
    ab.perform()
    dash_duo.wait_for_element(f"#{ids.TSNE_TOOLTIP} img.thumb", timeout=8)
    assert "patch (" in dash_duo.find_element(f"#{ids.TSNE_TOOLTIP} .thumb-label").text

    # Select a text token: the nearest image token across the database is named; open it.
    dash_duo.find_element(token_css(3)).click()
    dash_duo.wait_for_contains_text("#" + ids.NEIGHBOR_INFO, "Closest image token")
    nb = small_db.nearest_other_modality(0, N_LAYERS, 3)
    assert f"cosine similarity {nb.similarity:.3f}" in dash_duo.find_element("#" + ids.NEIGHBOR_INFO).text
    dash_duo.find_element("#" + ids.NEIGHBOR_OPEN).click()
    label = figures.token_labels(small_db.example(nb.ex_id).tokens, small_db.example(nb.ex_id).coords)[nb.token]
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, f"‘{label}’")
    dash_duo.wait_for_contains_text("#" + ids.EXAMPLE_SELECT, f"Example {nb.ex_id}")

    # z-score toggle: the help text says so and the head grid holds z-scores (mean 0).
    dash_duo.find_element(f"#{ids.HEAD_ZSCORE} input").click()
    dash_duo.wait_for_contains_text("#" + ids.HEAD_STAT_HELP, "z-scored over all heads of this example")
    z = graph_js(dash_duo, ids.HEAD_GRAPH, "return Array.from(gd._fullData[0].z, r => Array.from(r));")
    assert abs(float(np.nanmean(np.array(z, dtype=float)))) < 1e-4

    # The text-only example opens without errors (no grid, no overlay).
    dash_duo.select_dcc_dropdown("#" + ids.EXAMPLE_SELECT, value="Example 3")
    dash_duo.wait_for_element(token_css(4), timeout=8)
    dash_duo.find_element(token_css(1)).click()
    dash_duo.wait_for_contains_text("#" + ids.ATT_TITLE, "Attention from ‘is’")

    # The attention matrix: its title is not under plotly's tool bar.
    dash_duo.find_elements("#" + ids.VIEW_TABS + " .tab")[1].click()
    wait_until(lambda: graph_js(dash_duo, ids.MATRIX_GRAPH, "return gd._fullData && gd._fullData.length;"),
               what="attention matrix")
    title, bar = dash_duo.driver.execute_script(
        f"const g = document.getElementById('{ids.MATRIX_GRAPH}');"
        "return [g.querySelector('.gtitle'), g.querySelector('.modebar')].map(e => {"
        "const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; });")
    assert title[1] >= bar[3] or title[2] <= bar[0], (title, bar)

    assert dash_duo.get_logs() == [], "browser console has errors"


class NoModel(VL_Model):
    """Stands in for a live model: the "Add example" panel is on the page; nothing is submitted."""

    def data_setup(self, ex_id, image_location, input_text):
        raise AssertionError("not used")


def set_viewport(dash_duo, width, height):
    dash_duo.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    time.sleep(0.5)  # plotly's graphs follow their containers' size


def rect(dash_duo, element_id):
    return dash_duo.driver.execute_script(
        f"const r = document.getElementById('{element_id}').getBoundingClientRect();"
        "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, height: r.height};")


def test_layout_uses_the_screen(dash_duo, tmp_path, monkeypatch):
    """At 1440x900 everything, the "Add example" panel's status line included, is on screen without
    scrolling; at 1920x1080 the graphs grow into the room; the image keeps its place when the overlay's
    colour bar appears."""
    import app.database.analyses.tsne_maps as tsne_analysis
    from helpers import fake_tsne_maps, make_db, make_record

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)

    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
    text = ["[CLS]", "what", "color", "is", "the", "triangle", "?", "[SEP]"]
    db, _ = make_db(tmp_path / "db", [make_record(0, text_tokens=text, grid=(6, 6), n_layers=4, n_heads=4,
                                                  image_cls=True, image_hw=(96, 96))])
    dash_duo.start_server(create_app(db, model=NoModel()))
    set_viewport(dash_duo, 1440, 900)
    dash_duo.wait_for_element(token_css(3), timeout=10)
    # The three columns fit the window; the dataset panel sits below them, reached by scrolling.
    scroll = "return document.querySelector('main.grid').getBoundingClientRect().bottom - window.innerHeight;"
    assert dash_duo.driver.execute_script(scroll) <= 0
    assert rect(dash_duo, ids.ADD_STATUS)["height"] > 0 and rect(dash_duo, ids.ADD_STATUS)["bottom"] <= 900
    plot = "return gd.querySelector('.nsewdrag').getBoundingClientRect().toJSON();"
    bare = graph_js(dash_duo, ids.IMAGE_GRAPH, plot)
    dash_duo.find_element(token_css(3)).click()
    wait_until(lambda: graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd._fullData[0].showscale;") is True,
               what="overlay colour bar")
    assert graph_js(dash_duo, ids.IMAGE_GRAPH, plot) == bare
    small = {k: rect(dash_duo, k)["height"] for k in (ids.IMAGE_GRAPH, ids.TSNE_GRAPH)}

    set_viewport(dash_duo, 1920, 1080)
    wait_until(lambda: rect(dash_duo, ids.IMAGE_GRAPH)["height"] >= small[ids.IMAGE_GRAPH] + 150,
               what="a taller image at 1920x1080")
    assert rect(dash_duo, ids.TSNE_GRAPH)["height"] >= small[ids.TSNE_GRAPH] + 150
    assert dash_duo.driver.execute_script(scroll) <= 0
    # The columns reach down to the last sixth of the screen (no third of it left empty).
    assert max(rect(dash_duo, i)["bottom"] for i in (ids.IMAGE_GRAPH, ids.TSNE_GRAPH)) >= 1080 * 5 / 6
    assert dash_duo.get_logs() == [], "browser console has errors"


def test_decoder_example_in_the_browser(dash_duo, tmp_path, monkeypatch):
    """A decoder VLM's example as a person sees it: the prompt with the image's place in it, the generated
    answer, and a grid switch that redraws the overlay of a generated word on the other grid's region."""
    import app.database.analyses.tsne_maps as tsne_analysis
    from helpers import fake_tsne_maps, make_db, make_decoder_record

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)
    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
    db, _ = make_db(tmp_path / "db", [make_decoder_record(0, grids=((2, 2), (1, 3)))], special_tokens=("<s>",))
    info = db.example(0)
    dash_duo.start_server(create_app(db))
    dash_duo.wait_for_element(token_css(0), timeout=10)
    text = dash_duo.find_element("#" + ids.TEXT_TOKENS).text
    assert "[image · 7 patches]" in text and "answer:" in text
    assert text.index("USER") < text.index("[image") < text.index("what") < text.index("answer:") < text.index("red")
    red = info.n_tokens - 2
    dash_duo.find_element(token_css(red)).click()
    weights = db.attention(0, db.n_layers - 1, None, [red])
    wait_until(lambda: close(overlay_z(dash_duo), weights[info.patch_grid == 0].reshape(2, 2)),
               what="the first grid's overlay of the generated word")
    labels = [e.text for e in dash_duo.find_elements(f"#{ids.GRID_SWITCH} label")]
    assert labels == ["grid 0 (2×2)", "grid 1 (1×3)"]
    dash_duo.find_elements(f"#{ids.GRID_SWITCH} input")[1].click()
    wait_until(lambda: close(overlay_z(dash_duo), np.array([weights[info.patch_grid == 1]])),
               what="the second grid's overlay")
    assert graph_js(dash_duo, ids.IMAGE_GRAPH, "return gd._fullData[0].x0;") == 24 + 4
    assert dash_duo.get_logs() == []


def test_attention_csv_download_holds_the_database_numbers(dash_duo, small_db):
    """Select a text token, press CSV: the file the browser saves has, for every token, the weight the
    database gives (the layer mean of the last layer, the head summary's default selection)."""
    import csv
    import os

    dash_duo.start_server(create_app(small_db))
    dash_duo.wait_for_element(token_css(3), timeout=10).click()
    wait_until(lambda: overlay_z(dash_duo) is not None and np.isfinite(overlay_z(dash_duo)).any(),
               what="the overlay of token 3")
    dash_duo.find_element("#" + ids.EXPORT_ATTENTION).click()
    path = os.path.join(dash_duo.download_path, "vl-interpret-example-0-attention.csv")
    wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, what="the downloaded CSV")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("# example 0: attention from")
    rows = list(csv.DictReader(lines[1:]))
    expected = small_db.attention(0, N_LAYERS - 1, None, [3])
    assert [int(r["token"]) for r in rows] == list(range(len(expected)))
    np.testing.assert_allclose([float(r["attention"]) for r in rows], expected, rtol=1e-6)
    info = small_db.example(0)
    assert [r["kind"] for r in rows] == ["special" if info.special[i] else info.modality(i) for i in range(len(rows))]
