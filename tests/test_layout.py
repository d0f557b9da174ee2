"""The page opens on the first example already drawn in the layout, so that loading it costs no
callback round trip and each figure is drawn once (no browser needed)."""
import base64

import numpy as np

from app import figures, ids
from app.panels import heads
from app.server import create_app
from conftest import N_LAYERS


def components(layout) -> dict:
    return {c.id: c for c in layout._traverse() if isinstance(getattr(c, "id", None), str)}


def decode(spec) -> np.ndarray:
    """A typed-array spec of figures.typed_array back to numpy."""
    a = np.frombuffer(base64.b64decode(spec["bdata"]), dtype={"f4": np.float32, "i4": np.int32}[spec["dtype"]])
    return a.reshape([int(s) for s in spec["shape"].split(",")]) if "shape" in spec else a


def test_page_opens_with_the_first_example_drawn(small_db):
    app = create_app(small_db)
    page = components(app.layout())
    first = small_db.example_ids()[0]
    info = small_db.example(first)

    assert page[ids.EXAMPLE_SELECT].value == first
    stat = heads.statistic_options(small_db)[0]["value"]
    head_fig = page[ids.HEAD_GRAPH].figure
    np.testing.assert_allclose(decode(head_fig.data[0].z), small_db.head_statistics(first)[stat], rtol=1e-6)
    assert page[ids.HEAD_STORE].data == heads.default_head(small_db)
    assert "mean of heads" in str(page[ids.HEAD_TITLE].children)

    tokens_shown = [span["props"]["children"] for seg in page[ids.TEXT_TOKENS].children for span in seg.children]
    assert tokens_shown == list(info.tokens[:info.txt_len])
    assert page[ids.IMAGE_GRAPH].figure.layout.images[0].source.startswith("data:image/png;base64,")
    assert page[ids.SEL_STORE].data == {"ex": first, "tokens": []}
    assert page[ids.EXAMPLE_READY].data == first

    tsne = page[ids.TSNE_GRAPH].figure
    pts = small_db.tsne(first, N_LAYERS)
    text_trace = tsne.data[0]
    np.testing.assert_allclose(decode(text_trace.x), pts[text_trace.customdata, 0], rtol=1e-6)
    assert page[ids.TSNE_READY].data == {"ex": first, "layer": N_LAYERS}
    assert tsne.layout.title.text == figures.tsne_title(N_LAYERS, small_db.n_layers)


def test_no_callback_fires_on_page_load(small_db):
    """Everything the page shows first is in the layout: a callback firing on load would redraw."""
    app = create_app(small_db)
    fired = [c["output"] for c in app._callback_list if not c.get("prevent_initial_call")]
    assert fired == []


def test_empty_database_page(tmp_path):
    from helpers import make_db

    db, _ = make_db(tmp_path / "empty", [])
    page = components(create_app(db).layout())
    assert page[ids.EXAMPLE_SELECT].value is None
    assert getattr(page[ids.HEAD_GRAPH], "figure", None) is None


def test_page_json_is_reused_until_the_database_changes(tmp_path, monkeypatch):
    """The served layout is cached per database version: a second load gets the same JSON without
    building it, and an example added meanwhile (a write) shows in the next load."""
    import json

    import app.database.analyses.tsne_maps as tsne_analysis
    from helpers import fake_tsne_maps, make_db, make_record

    monkeypatch.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)

    monkeypatch.setattr(tsne_analysis, "tsne_ready", lambda: None)
    db, _ = make_db(tmp_path / "db", [make_record(0), make_record(1)])
    app = create_app(db)
    client = app.server.test_client()
    builds = []
    build = app._layout
    app._layout = lambda: builds.append(1) or build()

    def listed():
        page = json.loads(client.get("/_dash-layout").data)
        return [o["value"] for o in _find(page, ids.EXAMPLE_SELECT)["props"]["options"]]

    assert listed() == [0, 1]
    first_load = len(builds)  # Dash may also build one at its first request, to validate it
    assert listed() == [0, 1] and len(builds) == first_load
    db.add_record(make_record(7))
    assert listed() == [0, 1, 7] and len(builds) == first_load + 1


def _find(node, component_id):
    """The JSON component with ``component_id`` in a serialised layout."""
    if isinstance(node, dict):
        if node.get("props", {}).get("id") == component_id:
            return node
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find(child, component_id)
        if found is not None:
            return found
    return None


def test_index_page_does_not_carry_the_example(small_db):
    """Dash puts its validation layout into every index page: it must hold the component ids only,
    not a second copy of the first example's figures and image (the layout request brings those)."""
    app = create_app(small_db)
    client = app.server.test_client()
    index = client.get("/").data.decode()
    assert f'"{ids.HEAD_GRAPH}"' in index  # the ids are there, for callback validation
    assert ";base64," not in index  # plotly's JSON writes the data URI as data:image\u002fpng;base64,...
    assert ";base64," in client.get("/_dash-layout").data.decode()
