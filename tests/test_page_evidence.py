"""The page's evidence beyond raw attention, through Flask's test client as the browser calls it: the
attention panel's rollout method shows the stored rollout of the selected tokens (checked against a
rollout computed here from the stored attention), the attention method is unchanged, the distance tab
plots the stored mean attention distance (checked against a distance computed here), and crafted
method values are refused."""
import base64
import json

import numpy as np
import pytest

from app import figures, ids
from app.panels import tokens as tokens_panel
from app.server import create_app
from conftest import N_HEADS, N_LAYERS
from test_page_validation import NO_UPDATE, Page

METHOD = f"{ids.ATT_METHOD}.value"
SEL = f"{ids.SEL_STORE}.data"
HEAD = f"{ids.HEAD_STORE}.data"
TABS = f"{ids.VIEW_TABS}.value"
TEXT_TOKEN = 3  # "circle"
FLOAT16_ATOL = 2e-3  # stored attention and rollout are float16


@pytest.fixture
def page(small_db):
    return Page(create_app(small_db))


def decode(spec) -> np.ndarray:
    """A typed-array spec of figures.typed_array back to numpy."""
    a = np.frombuffer(base64.b64decode(spec["bdata"]), dtype={"f4": np.float32, "i4": np.int32}[spec["dtype"]])
    return a.reshape([int(s) for s in spec["shape"].split(",")]) if "shape" in spec else a


def patched(figure_patch: dict, *location) -> object:
    """The value a Dash Patch response assigns at ``location`` (e.g. "data", 0, "z")."""
    found = [op["params"]["value"] for op in figure_patch["operations"]
             if op["operation"] == "Assign" and op["location"] == list(location)]
    assert len(found) == 1, location
    return found[0]


def rollout_from_attention(db, ex_id: int, layer: int) -> np.ndarray:
    """Abnar & Zuidema's rollout through layers 1..layer+1, from the stored attention matrices."""
    n = db.example(ex_id).n_tokens
    product = np.eye(n)
    for l in range(layer + 1):
        mixed = 0.5 * db.attention_matrix(ex_id, l, None).astype(np.float64) + 0.5 * np.eye(n)
        product = (mixed / mixed.sum(axis=1, keepdims=True)) @ product
    return product


def show(page, method, tokens, head=None, trigger=METHOD):
    """(status, ATT_STORE data, overlay patch, title text) of the attention panel for a selection."""
    values = {METHOD: method, SEL: {"ex": 0, "tokens": tokens}}
    if head is not None:
        values[HEAD] = head
    status, resp = page.post(f"{ids.ATT_STORE}.data", trigger, values)
    if status != 200:
        return status, None, None, None
    return status, resp[ids.ATT_STORE]["data"], resp[ids.IMAGE_GRAPH]["figure"], \
        json.dumps(resp[ids.ATT_TITLE]["children"], ensure_ascii=False)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_rollout_shows_the_stored_rollout_of_a_text_token(page, small_db, layer):
    info = small_db.example(0)
    for head in (None, 2):  # heads do not apply to the rollout
        status, store, patch, title = show(page, "rollout", [TEXT_TOKEN], {"layer": layer, "head": head})
        assert status == 200
        expected = small_db.rollout(0, layer, [TEXT_TOKEN])
        n_shown = len(store["w"])  # text tokens and the image [CLS]
        np.testing.assert_allclose(store["w"], expected[:n_shown], atol=5e-5)  # rounded to 4 decimals
        np.testing.assert_allclose(store["w"], rollout_from_attention(small_db, 0, layer)[TEXT_TOKEN, :n_shown],
                                   atol=FLOAT16_ATOL)
        z = decode(patched(patch, "data", 0, "z"))
        np.testing.assert_array_equal(z, figures.overlay_grid(expected, info.coords, info.grid))
        assert store["name"] == "rollout" and store["sel"] == [TEXT_TOKEN]
        assert "rollout" in patched(patch, "data", 0, "hovertemplate")
        layers = "layer 1" if layer == 0 else f"layers 1–{layer + 1}"
        assert "From ‘circle’ — " in title
        assert f"rollout through {layers} (all heads, with the residual)" in title


def test_rollout_of_a_box_selection_is_the_mean_of_the_patches_rollouts(page, small_db):
    info = small_db.example(0)
    patches = [info.coords.index((x, y)) for y in range(2) for x in range(3)]
    trigger = f"{ids.IMAGE_GRAPH}.selectedData"
    status, resp = page.post(SEL, trigger, {trigger: {"points": [{"customdata": t} for t in patches]}})
    assert status == 200
    status, store, patch, title = show(page, "rollout", resp[ids.SEL_STORE]["data"]["tokens"], trigger=SEL)
    assert status == 200
    rows = rollout_from_attention(small_db, 0, N_LAYERS - 1)[sorted(patches)].mean(axis=0)
    z = decode(patched(patch, "data", 0, "z"))
    np.testing.assert_array_equal(z, figures.overlay_grid(small_db.rollout(0, N_LAYERS - 1, sorted(patches)),
                                                          info.coords, info.grid))
    np.testing.assert_allclose(z, figures.overlay_grid(rows, info.coords, info.grid), atol=FLOAT16_ATOL)
    assert "6 tokens (averaged)" in title


def test_the_attention_method_is_the_selected_heads_attention(page, small_db):
    info = small_db.example(0)
    status, store, patch, title = show(page, "attention", [TEXT_TOKEN], {"layer": 1, "head": 2})
    assert status == 200
    matrix = small_db.attention_matrix(0, 1, 2)
    np.testing.assert_allclose(store["w"], matrix[TEXT_TOKEN, :len(store["w"])], atol=5e-5)
    z = decode(patched(patch, "data", 0, "z"))
    np.testing.assert_allclose(z, figures.overlay_grid(matrix[TEXT_TOKEN], info.coords, info.grid), rtol=1e-6)
    assert store["name"] == "attention"
    assert "Attention from ‘circle’ — " in title and "layer 2, head 3" in title
    # and differs from the rollout (the switch changes what is shown)
    _, rolled, _, _ = show(page, "rollout", [TEXT_TOKEN], {"layer": 1, "head": 2})
    assert np.abs(np.array(rolled["w"]) - np.array(store["w"])).max() > 0.01


def test_the_help_line_defines_the_chosen_method(page):
    assert page.props[ids.ATT_METHOD_HELP]["children"] == tokens_panel.METHODS["attention"][1]
    for method, expected in (("rollout", "Abnar & Zuidema 2020"), ("attention", "selected head's weights")):
        status, resp = page.post(f"{ids.ATT_METHOD_HELP}.children", METHOD, {METHOD: method})
        assert status == 200 and expected in resp[ids.ATT_METHOD_HELP]["children"]


@pytest.mark.parametrize("method", ["Rollout", "", "gradient", None, 1, True, ["rollout"], {"m": "rollout"}])
def test_crafted_methods_are_refused(page, method):
    for trigger in (METHOD, SEL):
        status, *_ = show(page, method, [TEXT_TOKEN], trigger=trigger)
        assert status == NO_UPDATE, (trigger, method)
    status, _ = page.post(f"{ids.ATT_METHOD_HELP}.children", METHOD, {METHOD: method})
    assert status == NO_UPDATE


def distance_from_attention(db, ex_id: int) -> np.ndarray:
    """Mean attention distance (pixels) of every head, from the stored attention: for each image
    query, the weighted distance between patch centres over the image keys, weights renormalised."""
    info = db.example(ex_id)
    (height, width), (rows, cols) = info.image_size, info.grid
    image = [i for i, c in enumerate(info.coords) if c is not None]
    centres = np.array([((info.coords[i][0] + 0.5) * width / cols, (info.coords[i][1] + 0.5) * height / rows)
                        for i in image])
    pixels = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(axis=-1))
    out = np.zeros((db.n_layers, db.n_heads))
    for layer in range(db.n_layers):
        for head in range(db.n_heads):
            w = db.attention_matrix(ex_id, layer, head).astype(np.float64)[np.ix_(image, image)]
            out[layer, head] = ((w * pixels).sum(axis=1) / w.sum(axis=1)).mean()
    return out


def test_the_distance_tab_plots_the_stored_distance(page, small_db):
    status, resp = page.post(f"{ids.DISTANCE_GRAPH}.figure", TABS, {TABS: "distance"})
    assert status == 200
    trace = resp[ids.DISTANCE_GRAPH]["figure"]["data"][0]
    stored = small_db.head_statistics(0)["distance"]
    assert stored.shape == (N_LAYERS, N_HEADS) and np.isfinite(stored).all()
    np.testing.assert_array_equal(decode(trace["y"]), stored.ravel())
    np.testing.assert_array_equal(decode(trace["x"]), np.repeat(np.arange(1, N_LAYERS + 1), N_HEADS))
    np.testing.assert_allclose(decode(trace["y"]), distance_from_attention(small_db, 0).ravel(), rtol=2e-3)
    assert trace["text"][N_HEADS + 1] == f"layer 2, head 2: {stored[1, 1]:.1f} px"


def test_the_distance_tab_of_a_text_only_example_says_why_it_is_empty(page, small_db):
    assert np.isnan(small_db.head_statistics(3)["distance"]).all()
    status, resp = page.post(f"{ids.DISTANCE_GRAPH}.figure", f"{ids.EXAMPLE_SELECT}.value",
                             {TABS: "distance", f"{ids.EXAMPLE_SELECT}.value": 3})
    assert status == 200
    fig = resp[ids.DISTANCE_GRAPH]["figure"]
    assert len(decode(fig["data"][0]["y"])) == 0
    assert [a["text"].replace("<br>", " ") for a in fig["layout"]["annotations"]] == [figures.DISTANCE_EMPTY]


def test_the_distance_is_computed_only_when_its_tab_is_visible(page, monkeypatch, small_db):
    reads = []
    monkeypatch.setattr(type(small_db), "head_statistics", lambda self, ex_id: reads.append(ex_id))
    for tab in ("tsne", "matrix"):
        status, _ = page.post(f"{ids.DISTANCE_GRAPH}.figure", f"{ids.EXAMPLE_SELECT}.value",
                              {TABS: tab, f"{ids.EXAMPLE_SELECT}.value": 1})
        assert status == NO_UPDATE
    assert reads == []


def test_relevancy_shows_the_stored_relevancy_and_says_when_there_is_none(tmp_path, page, small_db):
    status, store, patch, title = show(page, "relevancy", [TEXT_TOKEN], {"layer": 0, "head": None})
    assert status == 200 and store is None and "has no gradient relevancy" in title  # small_db's records have none
    from helpers import make_db, make_record
    record = make_record(0, grid=(2, 3))
    n = len(record["tokens"])
    record["relevancy"] = np.eye(n) + np.random.default_rng(1).random((n, n))
    db, _ = make_db(tmp_path / "with-relevancy", [record])
    page = Page(create_app(db))
    status, store, patch, title = show(page, "relevancy", [1, 2], {"layer": 0, "head": None})
    assert status == 200 and store["name"] == "relevancy" and "gradient relevancy for the prediction" in title
    expected = record["relevancy"][[1, 2]].mean(axis=0)  # make_record's patches are already row-major
    np.testing.assert_allclose(store["w"], expected[:len(store["w"])], atol=5e-5)
    z = decode(patched(patch, "data", 0, "z"))
    info = db.example(0)
    np.testing.assert_allclose(z, figures.overlay_grid(expected.astype(np.float32), info.coords, info.grid),
                               rtol=1e-6)
    db.close()


def test_logit_lens_tab_shows_the_stored_lens_and_says_when_there_is_none(tmp_path, page):
    status, resp = page.post(f"{ids.LENS_GRAPH}.figure", TABS, {TABS: "lens", f"{ids.EXAMPLE_SELECT}.value": 0})
    assert status == 200 and "no logit lens" in resp[ids.LENS_NOTE]["children"]
    from helpers import make_db, make_record
    lens = [[["red", 0.4], ["blue", 0.3]], [["red", 0.6], ["green", 0.2]], [["blue", 0.9], ["red", 0.05]]]
    db, _ = make_db(tmp_path / "lens", [make_record(0, logit_lens=lens)])
    page = Page(create_app(db))
    status, resp = page.post(f"{ids.LENS_GRAPH}.figure", TABS, {TABS: "lens", f"{ids.EXAMPLE_SELECT}.value": 0})
    assert status == 200 and resp[ids.LENS_NOTE]["children"] == ""
    trace = resp[ids.LENS_GRAPH]["figure"]["data"][0]
    np.testing.assert_allclose(decode(trace["z"]), [[p for _, p in row] for row in lens])
    assert trace["y"] == ["emb", "1", "2"] and trace["text"][2][0] == "blue<br>0.90"
    status, _ = page.post(f"{ids.LENS_GRAPH}.figure", TABS, {TABS: "lens", f"{ids.EXAMPLE_SELECT}.value": -1})
    assert status == NO_UPDATE
    db.close()
