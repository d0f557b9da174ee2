"""Callbacks refuse crafted values: requests built by hand and POSTed to /_dash-update-component (as a
browser would, see bench/interactions.py) with out-of-range or malformed values get "no update"
(HTTP 204), never a server error and never a negative index that numpy would wrap round."""
import json
import time

import numpy as np
import pytest

from app import ids
from app.server import create_app
from conftest import GRID, N_HEADS, N_LAYERS, TEXT

N_TOKENS = len(TEXT) + 1 + GRID[0] * GRID[1]  # text, the image [CLS], the patches
NO_UPDATE = 204


class Page:
    """The app's callbacks as the browser calls them: each input and state is taken from the served
    layout unless the test gives it (``{"id.prop": value}``)."""

    def __init__(self, app):
        self.client = app.server.test_client()
        self.deps = [d for d in json.loads(self.client.get("/_dash-dependencies").data)
                     if not d.get("clientside_function")]
        self.props = {}
        self._register(json.loads(self.client.get("/_dash-layout").data))

    def _register(self, node):
        if isinstance(node, list):
            for item in node:
                self._register(item)
        elif isinstance(node, dict):
            props = node.get("props", {})
            if isinstance(props.get("id"), str):
                self.props[props["id"]] = props
            for value in props.values():
                self._register(value)

    def dependency(self, output: str, trigger: str) -> dict:
        """The server callback whose first output is ``output`` ("id.prop") and with input ``trigger``."""
        found = [d for d in self.deps
                 if _outputs(d)[0].split("@")[0] == output
                 and trigger in [f"{x['id']}.{x['property']}" for x in d["inputs"]]]
        assert len(found) == 1, (output, trigger, len(found))
        return found[0]

    def post(self, output: str, trigger: str, values: dict = None):
        """(HTTP status, {"id": {"prop": value}} response) of the callback fired by ``trigger``."""
        return self.post_to(self.dependency(output, trigger), trigger, values or {})

    def post_to(self, d: dict, trigger: str, values: dict):
        """``post`` for the callback of dependency ``d``."""

        def fill(specs):
            out = []
            for x in specs:
                key = f"{x['id']}.{x['property']}"
                value = values[key] if key in values else self.props.get(x["id"], {}).get(x["property"])
                out.append({"id": x["id"], "property": x["property"], "value": value})
            return out

        outs = [{"id": o.rsplit(".", 1)[0], "property": o.rsplit(".", 1)[1].split("@")[0]} for o in _outputs(d)]
        body = {"output": d["output"], "outputs": outs if len(outs) > 1 else outs[0],
                "inputs": fill(d["inputs"]), "state": fill(d["state"]), "changedPropIds": [trigger]}
        r = self.client.post("/_dash-update-component", data=json.dumps(body), content_type="application/json")
        return r.status_code, (json.loads(r.data)["response"] if r.status_code == 200 else None)


def _outputs(d) -> list[str]:
    out = d["output"]
    return out[2:-2].split("...") if out.startswith("..") else [out]


@pytest.fixture
def page(small_db):
    return Page(create_app(small_db))


BAD_NUMBERS = [-1, -N_TOKENS, N_TOKENS, 10 ** 12, 1.5, "3", None, True, [3], {"i": 3}]


def test_a_plain_token_click_is_answered(page):
    """The reference request (so that the refusals below are refusals of the values only)."""
    status, resp = page.post(f"{ids.SEL_STORE}.data", f"{ids.TOKEN_CLICK}.data",
                             {f"{ids.TOKEN_CLICK}.data": {"index": 3, "t": 1}})
    assert status == 200
    assert resp[ids.SEL_STORE]["data"] == {"ex": 0, "tokens": [3]}


@pytest.mark.parametrize("index", BAD_NUMBERS)
def test_token_click_index_out_of_range_or_malformed_is_refused(page, index):
    status, _ = page.post(f"{ids.SEL_STORE}.data", f"{ids.TOKEN_CLICK}.data",
                          {f"{ids.TOKEN_CLICK}.data": {"index": index, "t": 1}})
    assert status == NO_UPDATE


@pytest.mark.parametrize("ex_id", [99, -1, "0", 1.5, None, [0], True, 2 ** 31, 10 ** 600])
def test_unknown_example_ids_are_refused_by_every_callback_they_reach(page, ex_id):
    trigger = f"{ids.EXAMPLE_SELECT}.value"
    for output in (f"{ids.TEXT_TOKENS}.children", f"{ids.SEL_STORE}.data", f"{ids.HEAD_GRAPH}.figure",
                   f"{ids.TSNE_GRAPH}.figure", f"{ids.MATRIX_GRAPH}.figure"):
        status, _ = page.post(output, trigger, {trigger: ex_id, f"{ids.VIEW_TABS}.value": "matrix"
                                                if output.startswith(ids.MATRIX_GRAPH) else "tsne"})
        assert status == NO_UPDATE, output
    status, _ = page.post(f"{ids.PREDICTION}.children", trigger, {trigger: ex_id})
    assert status == NO_UPDATE


def test_image_click_on_a_patch_and_crafted_points(page, small_db):
    info = small_db.example(0)
    tok = info.coords.index((2, 1))
    trigger = f"{ids.IMAGE_GRAPH}.clickData"
    status, resp = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: {"points": [{"customdata": tok}]}})
    assert status == 200 and resp[ids.SEL_STORE]["data"]["tokens"] == [tok]
    for crafted in ({"points": [{"customdata": -1}]}, {"points": [{"customdata": -5}]},
                    {"points": [{"customdata": N_TOKENS}]}, {"points": [{"customdata": "x"}]},
                    {"points": []}, {"points": "abc"}, {"points": [None]}, "abc", None):
        status, _ = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: crafted})
        assert status == NO_UPDATE, crafted


def test_box_selection_is_deduplicated_and_capped(page, small_db):
    info = small_db.example(0)
    toks = [info.coords.index((x, 0)) for x in range(3)]
    trigger = f"{ids.IMAGE_GRAPH}.selectedData"
    points = [{"customdata": t} for t in toks + toks[:2]] + [{"customdata": -3}]  # repeats, an invalid one
    status, resp = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: {"points": points}})
    assert status == 200 and resp[ids.SEL_STORE]["data"]["tokens"] == sorted(toks)

    t0 = time.perf_counter()  # 10⁵ points: 1.8 MB, under the server's request size limit
    many = {"points": [{"customdata": toks[0]}] * 10 ** 5}
    status, _ = page.post(f"{ids.SEL_STORE}.data", trigger, {trigger: many})
    assert status == NO_UPDATE  # more points than the example has tokens: no browser sends that
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("tokens", [[-1], [N_TOKENS], [0, -2], ["1"], [1.5], "12", list(range(10 ** 6))])
def test_crafted_selected_tokens_are_refused(page, tokens):
    """SEL_STORE as the attention, the t-SNE marks and Play read it: -1 would wrap to the last token."""
    sel = {f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": tokens}}
    for output, trigger in ((f"{ids.ATT_STORE}.data", f"{ids.SEL_STORE}.data"),
                            (f"{ids.TSNE_GRAPH}.figure", f"{ids.SEL_STORE}.data"),
                            (f"{ids.SEL_STORE}.data", f"{ids.PLAY_INTERVAL}.n_intervals")):
        status, _ = page.post(output, trigger, {**sel, f"{ids.PLAY_INTERVAL}.disabled": False})
        assert status == NO_UPDATE, (output, tokens)


def test_repeated_selected_tokens_count_once(page, small_db):
    status, resp = page.post(f"{ids.ATT_STORE}.data", f"{ids.SEL_STORE}.data",
                             {f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [3, 3, 4, 3]}})
    assert status == 200
    store = resp[ids.ATT_STORE]["data"]
    assert store["sel"] == [3, 4]
    expected = small_db.attention_matrix(0, N_LAYERS - 1, None)[[3, 4]].mean(axis=0)  # last layer, mean of heads
    np.testing.assert_allclose(store["w"], expected[:len(store["w"])], atol=1e-4)


@pytest.mark.parametrize("head", [{"layer": -1, "head": None}, {"layer": N_LAYERS, "head": None},
                                  {"layer": 0, "head": N_HEADS}, {"layer": 0, "head": -1},
                                  {"layer": "0", "head": None}, {"head": 1}, "layer 1", [0, 1]])
def test_crafted_head_selections_are_refused(page, head):
    values = {f"{ids.HEAD_STORE}.data": head, f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [3]},
              f"{ids.VIEW_TABS}.value": "matrix", f"{ids.EXAMPLE_SELECT}.value": 0}
    for output in (f"{ids.ATT_STORE}.data", f"{ids.HEAD_TITLE}.children", f"{ids.MATRIX_GRAPH}.figure"):
        status, _ = page.post(output, f"{ids.HEAD_STORE}.data", values)
        assert status == NO_UPDATE, (output, head)
    status, _ = page.post(f"{ids.HEAD_GRAPH}.figure", f"{ids.HEAD_STAT}.value", values)
    assert status == NO_UPDATE


def test_head_cell_clicks(page):
    trigger = f"{ids.HEAD_GRAPH}.clickData"
    status, resp = page.post(f"{ids.HEAD_STORE}.data", trigger,
                             {trigger: {"points": [{"x": 2, "y": 1, "curveNumber": 0}]}})
    assert status == 200 and resp[ids.HEAD_STORE]["data"] == {"layer": 1, "head": 2}
    status, resp = page.post(f"{ids.HEAD_STORE}.data", trigger,
                             {trigger: {"points": [{"x": N_HEADS + 1, "y": 0.0, "curveNumber": 1}]}})
    assert status == 200 and resp[ids.HEAD_STORE]["data"] == {"layer": 0, "head": None}
    for pt in ({"x": 0, "y": -1, "curveNumber": 0}, {"x": 0, "y": N_LAYERS, "curveNumber": 0},
               {"x": N_HEADS, "y": 0, "curveNumber": 0}, {"x": -1, "y": 0, "curveNumber": 0},
               {"x": 0, "y": 0, "curveNumber": 7}, {"x": 0, "y": "1", "curveNumber": 0}, {"x": 0}):
        status, _ = page.post(f"{ids.HEAD_STORE}.data", trigger, {trigger: {"points": [pt]}})
        assert status == NO_UPDATE, pt


@pytest.mark.parametrize("layer", [-1, N_LAYERS + 1, "2", 1.5, None, [1]])
def test_crafted_tsne_layers_are_refused(page, layer):
    trigger = f"{ids.TSNE_LAYER}.value"
    status, _ = page.post(f"{ids.TSNE_GRAPH}.figure", trigger, {trigger: layer})
    assert status == NO_UPDATE
    status, _ = page.post(f"{ids.TSNE_GRAPH}.figure", f"{ids.TSNE_READY}.data",
                          {f"{ids.TSNE_READY}.data": {"ex": 0, "layer": layer},
                           f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [3]}})
    assert status == NO_UPDATE


def test_tsne_layer_zero_is_the_embeddings(page, small_db):
    trigger = f"{ids.TSNE_LAYER}.value"
    status, resp = page.post(f"{ids.TSNE_GRAPH}.figure", trigger, {trigger: 0})
    assert status == 200 and resp[ids.TSNE_READY]["data"] == {"ex": 0, "layer": 0}


@pytest.mark.parametrize("customdata", [-1, N_TOKENS, "3", 2.5])
def test_crafted_tsne_points_are_refused(page, customdata):
    trigger = f"{ids.TSNE_GRAPH}.clickData"
    status, _ = page.post(f"{ids.SEL_STORE}.data", trigger,
                          {trigger: {"points": [{"customdata": customdata, "curveNumber": 0}]}})
    assert status == NO_UPDATE
    hover = {"points": [{"customdata": customdata, "curveNumber": 1, "bbox": {"x0": 0, "y0": 0}}]}
    status, resp = page.post(f"{ids.TSNE_TOOLTIP}.show", f"{ids.TSNE_GRAPH}.hoverData",
                             {f"{ids.TSNE_GRAPH}.hoverData": hover})
    assert status == 200 and resp[ids.TSNE_TOOLTIP]["show"] is False


@pytest.mark.parametrize("neighbor", [{"ex": 0, "token": -1}, {"ex": 0, "token": N_TOKENS},
                                      {"ex": 99, "token": 0}, {"ex": "1", "token": 0}, "x", [1, 2]])
def test_crafted_neighbors_are_refused(page, neighbor):
    status, _ = page.post(f"{ids.EXAMPLE_SELECT}.value", f"{ids.NEIGHBOR_OPEN}.n_clicks",
                          {f"{ids.NEIGHBOR_OPEN}.n_clicks": 1, f"{ids.NEIGHBOR_STORE}.data": neighbor})
    assert status == NO_UPDATE


@pytest.mark.parametrize("values", [{f"{ids.MATRIX_KIND}.value": "zz"}, {f"{ids.MATRIX_KIND}.value": ["tt"]},
                                    {f"{ids.OPACITY}.value": -0.5}, {f"{ids.OPACITY}.value": "abc"},
                                    {f"{ids.OPACITY}.value": 3}, {f"{ids.HEAD_STAT}.value": ["x"]},
                                    {f"{ids.HEAD_STAT}.value": "no such statistic"}])
def test_crafted_control_values_are_refused(page, values):
    (key, _), = values.items()
    output = {ids.MATRIX_KIND: f"{ids.MATRIX_GRAPH}.figure", ids.OPACITY: f"{ids.IMAGE_GRAPH}.figure",
              ids.HEAD_STAT: f"{ids.HEAD_GRAPH}.figure"}[key.split(".")[0]]
    status, _ = page.post(output, key, {**values, f"{ids.VIEW_TABS}.value": "matrix"})
    assert status == NO_UPDATE


GARBAGE = [-1, 10 ** 9, -10 ** 9, 0.5, "x", True, [], [-1], {}, {"ex": -1, "tokens": [-1], "layer": -1}]


# A page in use (the matrix tab open, a token selected, playing, a neighbour found), so that garbage
# in one value reaches the code behind the checks of the others.
IN_USE = {f"{ids.VIEW_TABS}.value": "matrix", f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [3]},
          f"{ids.PLAY_INTERVAL}.disabled": False, f"{ids.NEIGHBOR_OPEN}.n_clicks": 1,
          f"{ids.NEIGHBOR_STORE}.data": {"ex": 1, "token": 12}, f"{ids.TOKEN_CLICK}.data": {"index": 2, "t": 1},
          f"{ids.HEAD_GRAPH}.clickData": {"points": [{"x": 1, "y": 1, "curveNumber": 0}]}}


@pytest.mark.parametrize("base", [{}, IN_USE], ids=["fresh page", "page in use"])
def test_no_callback_fails_on_garbage(page, base):
    """Every value of every server callback replaced in turn by garbage: never a server error."""
    failures = []
    for d in page.deps:
        trigger = f"{d['inputs'][0]['id']}.{d['inputs'][0]['property']}"
        for spec in d["inputs"] + d["state"]:
            key = f"{spec['id']}.{spec['property']}"
            for value in GARBAGE:
                status, _ = page.post_to(d, key if spec in d["inputs"] else trigger, {**base, key: value})
                if status not in (200, NO_UPDATE):
                    failures.append((d["output"], key, value, status))
    assert failures == []

