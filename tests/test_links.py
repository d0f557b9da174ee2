"""Links that reopen a view (app/panels/links.py): the query string written for a view, read back
into the same view, every crafted part ignored; and the two callbacks as the browser calls them
(the Page harness): the URL written for a view, and a URL restored into each component."""
import numpy as np
import pytest

from app import ids
from app.panels import links
from app.panels.links import VIEW, component_values, default_state, search_to_state, state_to_search, view_state
from app.server import create_app
from conftest import GRID, TEXT
from test_page_validation import NO_UPDATE, Page

N_LAYERS, N_HEADS = 3, 4
N_TOKENS = len(TEXT) + 1 + GRID[0] * GRID[1]  # text, the image [CLS], the patches
SEARCH = f"{ids.URL}.search"
REQUEST = f"{ids.LINK_REQUEST}.data"
VIEW_KEYS = [f"{cid}.{prop}" for cid, prop in VIEW]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Examples 0 and 1 (text, an image [CLS] and a 4x5 grid; a custom metric "my metric") and the
    text-only example 7 (no example 2: an id that names nothing), 3 layers x 4 heads."""
    import app.database.analyses.tsne_maps as tsne_analysis
    from helpers import fake_tsne_maps, make_db, make_record

    rng = np.random.default_rng(0)
    records = [make_record(i, text_tokens=TEXT, grid=GRID, n_layers=N_LAYERS, n_heads=N_HEADS, hidden=8,
                           image_cls=True, image_hw=(40, 50), custom_metrics={"my metric": rng.random((3, 4))})
               for i in (0, 1)]
    records.append(make_record(7, text_tokens=TEXT[:5], grid=None, n_layers=N_LAYERS, n_heads=N_HEADS, hidden=8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tsne_analysis, "tsne_maps", fake_tsne_maps)
        mp.setattr(tsne_analysis, "tsne_ready", lambda: None)
        database, report = make_db(tmp_path_factory.mktemp("links") / "db", records)
    assert not report.failed, report.failed
    yield database
    database.close()


@pytest.fixture(scope="module")
def page(db):
    return Page(create_app(db))


def state(**changes) -> dict:
    """The opening view of the test database (example 0, the last layer's mean of heads, nothing
    selected, the first statistic, t-SNE after the last layer...) with ``changes``."""
    opening = {"ex": 0, "tokens": [], "side": "text", "head": {"layer": N_LAYERS - 1, "head": None},
               "stat": "txt2img", "z": False, "method": "attention", "tsne": N_LAYERS, "tab": "tsne", "text": "",
               "answer": "", "correct": "", "low": None, "high": None, "value_stat": "txt2img",
               "value_head": {"layer": N_LAYERS - 1, "head": None}}
    assert set(changes) <= set(opening)
    return {**opening, **changes}


# A view with every part but the answer filter changed, and its query string, written by hand.
RICH = state(ex=1, head={"layer": 1, "head": 2}, tokens=[3, 12], side="image", stat="my metric", z=True,
             method="rollout", tsne=0, tab="matrix", text="red", correct="incorrect", low=0.25, high=2.0,
             value_stat="my metric", value_head={"layer": 0, "head": None})
RICH_SEARCH = ("?ex=1&layer=2&head=3&tokens=3,12&side=image&stat=my%20metric&z=1&method=rollout&tsne=0"
               "&tab=matrix&q=red&correct=incorrect&min=0.25&max=2&vstat=my%20metric&vlayer=1")


def test_the_opening_view_is_the_layouts(db, page):
    """The state of an empty query is the page as it opens (so that a link leaves out what is the
    same), and it is written as its example alone."""
    assert default_state(db) == state()
    assert view_state(db, [page.props[cid].get(prop) for cid, prop in VIEW]) == state()
    assert state_to_search(state(), db) == "?ex=0"
    assert search_to_state("", db) == state()
    assert [tab["props"]["value"] for tab in page.props[ids.VIEW_TABS]["children"]] == list(links.TABS)


def test_a_view_is_written_short_and_read_back(db):
    assert state_to_search(RICH, db) == RICH_SEARCH
    assert search_to_state(RICH_SEARCH, db) == RICH
    assert search_to_state(RICH_SEARCH[1:], db) == RICH  # without its "?"
    # A layer without a head is that layer's mean; "mean" says the same; a number box's 3.0 is "3".
    assert search_to_state("?ex=0&layer=1", db) == search_to_state("?ex=0&layer=1&head=mean", db) == \
        state(head={"layer": 0, "head": None})
    assert state_to_search(state(low=3.0, high=-0.5), db) == "?ex=0&min=3&max=-0.5"
    assert state_to_search(state(low=1e300), db) == "?ex=0&min=1e%2B300"  # "+" is a space in a query
    assert search_to_state("?ex=0&min=1e%2B300", db) == state(low=1e300)
    assert search_to_state("?ex=0&q=a%20b%26c&answer=%C3%A9", db) == state(text="a b&c", answer="é")
    assert state_to_search(state(text="a b&c", answer="é"), db) == "?ex=0&q=a%20b%26c&answer=%C3%A9"


def test_components_and_state_are_one_view(db):
    """What the restore sets in the components reads back as the same state."""
    values = component_values(RICH)
    assert values[:6] == [1, {"ex": 1, "tokens": [3, 12]}, "image", {"layer": 1, "head": 2}, "my metric", ["z"]]
    assert values[9:] == ["red", None, "incorrect", 0.25, 2.0, "my metric", 0, "mean"]
    assert view_state(db, values) == RICH


@pytest.mark.parametrize("search, changes", [
    ("?ex=2", {}),  # no such example
    ("?ex=99&tokens=3", {}),  # the tokens go with their unknown example
    ("?tokens=3", {}),  # tokens name no example
    ("?ex=1&tokens=3,999", {"ex": 1}),
    ("?ex=1&tokens=-1", {"ex": 1}),
    ("?ex=1&tokens=1.5", {"ex": 1}),
    ("?ex=1&tokens=", {"ex": 1}),
    ("?ex=1&tokens=" + ",".join(["3"] * (N_TOKENS + 1)), {"ex": 1}),  # more than the example has
    ("?ex=1&tokens=4,3,4", {"ex": 1, "tokens": [4, 3]}),  # a repeat counts once
    ("?ex=7&tokens=5", {"ex": 7}),  # the text-only example has 5 tokens
    ("?ex=-1", {}), ("?ex=+1", {}), ("?ex=1.0", {}), ("?ex=%D9%A1", {}),  # -1, +1, 1.0, Arabic-Indic 1
    ("?ex=" + "9" * 40, {}),  # beyond any id: never looked up
    ("?ex=1&ex=0", {"ex": 1}),  # the first of repeated parameters
    ("?ex=0&layer=0", {}), ("?ex=0&layer=4", {}), ("?ex=0&layer=2&head=5", {}), ("?ex=0&layer=2&head=0", {}),
    ("?ex=0&head=2", {}), ("?ex=0&layer=x", {}), ("?ex=0&layer=2&head=2", {"head": {"layer": 1, "head": 1}}),
    ("?ex=0&side=left", {}), ("?ex=0&stat=nope", {}), ("?ex=0&z=yes", {}), ("?ex=0&z=0", {}),
    ("?ex=0&method=magic", {}), ("?ex=0&tsne=4", {}), ("?ex=0&tsne=emb", {}), ("?ex=0&tsne=0", {"tsne": 0}),
    ("?ex=0&tab=settings", {}), ("?ex=0&correct=maybe", {}), ("?ex=0&min=nan", {}), ("?ex=0&max=inf", {}),
    ("?ex=0&min=abc", {}), ("?ex=0&min=-1e400", {}), ("?ex=0&vstat=nope", {}), ("?ex=0&vlayer=9", {}),
    ("?ex=0&vlayer=1&vhead=4", {"value_head": {"layer": 0, "head": 3}}),
    ("?ex=1&layer=9&tokens=2&stat=nope&tab=matrix", {"ex": 1, "tokens": [2], "tab": "matrix"}),  # parts apart
    ("?%00=%ff&&=&ex", {}), ("ex=1", {"ex": 1}), ("", {}), (None, {}), (5, {}), (["?ex=1"], {}), ({"ex": 1}, {}),
])
def test_crafted_parts_are_ignored(db, page, search, changes):
    """Each part that names nothing here is the opening view's; the rest of the link still counts.
    The restore callback, given the same link, sets that view (never a server error)."""
    expected = state(**changes)
    assert search_to_state(search, db) == expected
    status, resp = page.post(f"{ids.EXAMPLE_SELECT}.value", REQUEST, {REQUEST: search})
    assert status == 200
    assert shown_after(page, resp) == component_values(expected)


def shown_after(page, resp) -> list:
    """The VIEW components' values once the restore's response is applied to the opening page."""
    return [resp.get(cid, {}).get(prop, page.props[cid].get(prop)) for cid, prop in VIEW]


def test_restore_sets_each_component_the_example_first(page):
    status, resp = page.post(f"{ids.EXAMPLE_SELECT}.value", REQUEST, {REQUEST: RICH_SEARCH})
    assert status == 200
    # tokens.select_tokens, fired by the example and the side at once, reads the first changed
    # input as its trigger: the example's, for which it keeps a selection made for that example.
    assert list(resp)[0] == ids.EXAMPLE_SELECT
    assert {key: resp[key.split(".")[0]][key.split(".")[1]] for key in VIEW_KEYS if key.split(".")[0] in resp} == {
        f"{ids.EXAMPLE_SELECT}.value": 1, f"{ids.SEL_STORE}.data": {"ex": 1, "tokens": [3, 12]},
        f"{ids.SIDE}.value": "image", f"{ids.HEAD_STORE}.data": {"layer": 1, "head": 2},
        f"{ids.HEAD_STAT}.value": "my metric", f"{ids.HEAD_ZSCORE}.value": ["z"],
        f"{ids.ATT_METHOD}.value": "rollout", f"{ids.TSNE_LAYER}.value": 0, f"{ids.VIEW_TABS}.value": "matrix",
        f"{ids.DATASET_TEXT}.value": "red", f"{ids.DATASET_CORRECT}.value": "incorrect",
        f"{ids.DATASET_LOW}.value": 0.25, f"{ids.DATASET_HIGH}.value": 2.0,
        f"{ids.DATASET_STAT}.value": "my metric", f"{ids.DATASET_LAYER}.value": 0}  # not the unchanged ones
    assert ids.PLAY_INTERVAL not in resp  # not playing: nothing to stop
    assert resp[ids.LINK_SHOWN]["data"] == RICH_SEARCH

    # The selection it restored is kept by the tokens panel, fired by the example it set.
    restored = dict(zip(VIEW_KEYS, shown_after(page, resp)))
    status, _ = page.post(f"{ids.SEL_STORE}.data", f"{ids.EXAMPLE_SELECT}.value", restored)
    assert status == NO_UPDATE


def test_restoring_the_view_shown_redraws_only_its_example(page):
    """Back to a view that differs in one part (here the t-SNE layer) sets that part and the example
    (which redraws the example's views), and leaves the rest, the dataset filters' table page included;
    Play, if playing, stops."""
    shown = {**view_values(RICH), f"{ids.PLAY_INTERVAL}.disabled": False}
    search = RICH_SEARCH.replace("tsne=0", "tsne=2")
    status, resp = page.post(f"{ids.EXAMPLE_SELECT}.value", REQUEST, {**shown, REQUEST: search})
    assert status == 200
    assert {cid: list(props) for cid, props in resp.items()} == {
        ids.EXAMPLE_SELECT: ["value"], ids.TSNE_LAYER: ["value"], ids.PLAY_INTERVAL: ["disabled"],
        ids.PLAY: ["children"], ids.LINK_SHOWN: ["data"]}
    assert resp[ids.TSNE_LAYER]["value"] == 2 and resp[ids.PLAY_INTERVAL]["disabled"] is True


def test_restore_leaves_an_empty_database_alone(tmp_path):
    from helpers import make_db

    empty, _ = make_db(tmp_path / "empty", [])
    empty_page = Page(create_app(empty))
    assert search_to_state("?ex=0&layer=1", empty)["ex"] is None
    status, _ = empty_page.post(f"{ids.EXAMPLE_SELECT}.value", REQUEST, {REQUEST: "?ex=0&layer=1"})
    assert status == NO_UPDATE
    status, _ = empty_page.post(SEARCH, f"{ids.SEL_STORE}.data", {})
    assert status == NO_UPDATE
    empty.close()


def view_values(view: dict) -> dict:
    """The VIEW components showing ``view``, as the Page harness takes them."""
    return dict(zip(VIEW_KEYS, component_values(view)))


def test_a_new_view_writes_its_link(page, db):
    """A token clicked and a head chosen on example 1: the URL written decodes to that view."""
    view = state(ex=1, tokens=[4], head={"layer": 1, "head": 2})
    status, resp = page.post(SEARCH, f"{ids.SEL_STORE}.data", {**view_values(view), SEARCH: "?ex=1"})
    assert status == 200
    written = resp[ids.URL]["search"]
    assert written == "?ex=1&layer=2&head=3&tokens=4"
    assert resp[ids.LINK_SHOWN]["data"] == written  # the gate does not restore what was written
    assert search_to_state(written, db) == view


def test_the_view_a_url_names_writes_nothing(page):
    """No history entry for a view restored from the URL, even from a link written otherwise."""
    for search in (RICH_SEARCH, "?vlayer=1&vstat=my%20metric&max=2.0&min=0.25&correct=incorrect&q=red&tab=matrix"
                                "&tsne=0&method=rollout&z=1&stat=my%20metric&side=image&tokens=3,12&head=3"
                                "&layer=2&ex=1&ex=0&unknown=1"):
        status, _ = page.post(SEARCH, f"{ids.EXAMPLE_SELECT}.value", {**view_values(RICH), SEARCH: search})
        assert status == NO_UPDATE, search
    # The page as it opens (no query) is the opening view: nothing to write.
    status, _ = page.post(SEARCH, f"{ids.EXAMPLE_SELECT}.value", {**view_values(state()), SEARCH: ""})
    assert status == NO_UPDATE


def test_play_writes_one_entry_when_it_stops(page):
    view = {**view_values(state(tokens=[2])), SEARCH: ""}
    status, _ = page.post(SEARCH, f"{ids.SEL_STORE}.data", {**view, f"{ids.PLAY_INTERVAL}.disabled": False})
    assert status == NO_UPDATE
    status, resp = page.post(SEARCH, f"{ids.PLAY_INTERVAL}.disabled", {**view, f"{ids.PLAY_INTERVAL}.disabled": True})
    assert status == 200 and resp[ids.URL]["search"] == "?ex=0&tokens=2"


@pytest.mark.parametrize("key, value", [
    (f"{ids.EXAMPLE_SELECT}.value", 2), (f"{ids.EXAMPLE_SELECT}.value", 10 ** 40),
    (f"{ids.SEL_STORE}.data", {"ex": 0, "tokens": [-1]}), (f"{ids.HEAD_STORE}.data", {"layer": 9, "head": None}),
    (f"{ids.HEAD_ZSCORE}.value", ["z", "z"]), (f"{ids.TSNE_LAYER}.value", 1.5), (f"{ids.VIEW_TABS}.value", "x"),
    (f"{ids.DATASET_LOW}.value", float("nan")), (f"{ids.DATASET_HEAD}.value", 4), (f"{ids.DATASET_TEXT}.value", 3),
])
def test_a_crafted_view_writes_no_link(page, key, value):
    status, _ = page.post(SEARCH, key, {**view_values(state()), SEARCH: "?ex=1", key: value})
    assert status == NO_UPDATE


def test_the_page_carries_the_link_pieces(page):
    """The Location has no search of its own in the layout (it then reports the address it is opened
    on), the gate starts from the empty search, and the copy button is Dash's Clipboard."""
    assert "search" not in page.props[ids.URL] and page.props[ids.URL]["refresh"] is False
    assert page.props[ids.LINK_SHOWN]["data"] == ""
    assert page.props[ids.COPY_LINK]["children"] == "Copy link"
