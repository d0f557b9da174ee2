"""The dataset panel's callbacks, driven through Flask's test client as the browser calls them:
filtering, sorting and paging the table, opening an example from a row or from the drill-down, the
mean and contrast views, prev/next within the filtered examples, and crafted values (no 500s)."""
import numpy as np
import pytest

from app import ids
from app.database import dataset as ds
from app.panels import dataset as panel
from app.server import create_app
from helpers import fast_tsne, make_db, make_record  # noqa: F401 - fast_tsne is an autouse fixture
from test_layout import components
from test_page_validation import NO_UPDATE, Page

N_LAYERS, N_HEADS = 2, 3
TABLE = f"{ids.DATASET_TABLE}.data"
GRAPH = f"{ids.DATASET_GRAPH}.figure"
RANKED = f"{ids.DATASET_RANKED}.children"


def dataset_app(db):
    """The app with the dataset panel's callbacks (registered here until app.server does it)."""
    app = create_app(db)
    if not any(ids.DATASET_TABLE in key for key in app.callback_map):
        panel.register_callbacks(app, app.vli_context)
    return app


@pytest.fixture
def db(tmp_path):
    """24 examples (odd ids correct) whose custom metric "m" is 10 + id at (1, 2), id elsewhere; texts
    name a colour; example 6 has no label (unknown)."""
    records = []
    for i in range(24):
        metric = np.full((N_LAYERS, N_HEADS), float(i))
        metric[1, 2] = 10.0 + i if i % 2 else float(i)
        r = make_record(i, n_layers=N_LAYERS, n_heads=N_HEADS, text=f"is it {'red' if i % 3 == 0 else 'blue'}",
                        custom_metrics={"m": metric},
                        prediction={"answer": "yes" if i % 2 else "no", "score": i / 30,
                                    "label": None if i == 6 else "yes"})
        r["accuracy"] = None if i == 6 else bool(i % 2)
        records.append(r)
    db, _ = make_db(tmp_path / "db", records)
    yield db
    db.close()


@pytest.fixture
def page(db):
    return Page(dataset_app(db))


def table_values(page, **values):
    """Post the table callback with these "id.prop" values (trigger: the first one)."""
    trigger = next(iter(values))
    status, resp = page.post(TABLE, trigger, values)
    assert status == 200, (status, values)
    return resp


def test_the_layout_draws_the_first_page_and_the_mean_heatmap(db):
    app = dataset_app(db)
    comps = components(app.layout())
    rows = comps[ids.DATASET_TABLE].data
    assert [r["id"] for r in rows] == list(range(panel.PAGE_SIZE))
    assert comps[ids.DATASET_TABLE].page_count == 3
    assert comps[ids.DATASET_FILTERED].data == list(range(24))
    stat = db.statistic_names()[0]
    expected = np.nanmean(np.stack([db.head_statistics(i)[stat] for i in range(24)]), axis=0)
    from test_layout import decode
    np.testing.assert_allclose(decode(comps[ids.DATASET_GRAPH].figure.data[0].z), expected, rtol=1e-5)


def test_filters_give_the_examples_a_loop_finds(page, db):
    resp = table_values(page, **{f"{ids.DATASET_TEXT}.value": "RED", f"{ids.DATASET_CORRECT}.value": "correct",
                                 f"{ids.DATASET_STAT}.value": "m", f"{ids.DATASET_LAYER}.value": 1,
                                 f"{ids.DATASET_HEAD}.value": 2, f"{ids.DATASET_LOW}.value": 14})
    expected = [i for i in range(24) if i % 3 == 0 and i % 2 and 10 + i >= 14]
    assert resp[ids.DATASET_FILTERED]["data"] == expected == [9, 15, 21]
    assert [r["value"] for r in resp[ids.DATASET_TABLE]["data"]] == [19.0, 25.0, 31.0]
    assert resp[ids.DATASET_STATUS]["children"].startswith("3 of 24 examples")
    assert "layer 2, head 3" in resp[ids.DATASET_TABLE]["columns"][-1]["name"]
    resp = table_values(page, **{f"{ids.DATASET_ANSWER}.value": "no"})
    assert resp[ids.DATASET_FILTERED]["data"] == [i for i in range(24) if i % 2 == 0]


def test_filter_row_sorting_and_paging(page):
    query = f"{ids.DATASET_TABLE}.filter_query"
    resp = table_values(page, **{query: "{score} >= 0.2 && {correct} = incorrect"})
    assert resp[ids.DATASET_FILTERED]["data"] == [i for i in range(6, 24, 2) if i != 6]
    sort = f"{ids.DATASET_TABLE}.sort_by"
    resp = table_values(page, **{sort: [{"column_id": "score", "direction": "desc"}],
                                 f"{ids.DATASET_TABLE}.page_current": 1})
    assert [r["id"] for r in resp[ids.DATASET_TABLE]["data"]] == list(range(13, 3, -1))
    assert resp[ids.DATASET_TABLE]["page_current"] == 1
    resp = table_values(page, **{f"{ids.DATASET_TABLE}.page_current": 7})  # past the end: the last page
    assert resp[ids.DATASET_TABLE]["page_current"] == 2 and len(resp[ids.DATASET_TABLE]["data"]) == 4


def test_a_filter_that_is_not_understood_is_said_and_changes_nothing(page):
    resp = table_values(page, **{f"{ids.DATASET_TABLE}.filter_query": "{score} > lots"})
    assert list(resp) == [ids.DATASET_STATUS] and "'lots' is not a number" in resp[ids.DATASET_STATUS]["children"]


@pytest.mark.parametrize("values", [
    {f"{ids.DATASET_LAYER}.value": 5}, {f"{ids.DATASET_LAYER}.value": -1}, {f"{ids.DATASET_HEAD}.value": "x"},
    {f"{ids.DATASET_STAT}.value": "nope"}, {f"{ids.DATASET_CORRECT}.value": "maybe"},
    {f"{ids.DATASET_TEXT}.value": ["a"]}, {f"{ids.DATASET_LOW}.value": "1"}, {f"{ids.DATASET_HIGH}.value": True},
    {f"{ids.DATASET_TABLE}.page_current": -1}, {f"{ids.DATASET_TABLE}.page_current": 1.5},
    {f"{ids.DATASET_TABLE}.sort_by": [{"column_id": "secret", "direction": "asc"}]},
    {f"{ids.DATASET_TABLE}.sort_by": "score"}, {f"{ids.DATASET_TABLE}.filter_query": {"q": 1}}])
def test_crafted_table_values_are_refused(page, values):
    status, _ = page.post(TABLE, next(iter(values)), values)
    assert status == NO_UPDATE


def test_a_row_click_opens_its_example(page):
    trigger = f"{ids.DATASET_TABLE}.active_cell"
    d = [x for x in page.deps if trigger in [f"{i['id']}.{i['property']}" for i in x["inputs"]]][0]
    status, resp = page.post_to(d, trigger, {trigger: {"row": 0, "column": 1, "column_id": "text", "row_id": 17}})
    assert status == 200 and resp[ids.EXAMPLE_SELECT]["value"] == 17
    for crafted in ({"row_id": 99}, {"row_id": "3"}, {"row_id": -1}, {}, "x", [3]):
        assert page.post_to(d, trigger, {trigger: crafted})[0] == NO_UPDATE


def test_mean_view_follows_the_filtered_examples(page, db):
    filtered = [1, 3, 5, 8]
    status, resp = page.post(GRAPH, f"{ids.DATASET_FILTERED}.data", {f"{ids.DATASET_FILTERED}.data": filtered,
                                                                       f"{ids.DATASET_STAT}.value": "m"})
    assert status == 200
    from test_layout import decode
    z = decode(resp[ids.DATASET_GRAPH]["figure"]["data"][0]["z"])
    np.testing.assert_allclose(z, np.mean([db.head_statistics(i)["m"] for i in filtered], axis=0), rtol=1e-6)
    hover = resp[ids.DATASET_GRAPH]["figure"]["data"][0]["text"][1][2]
    values = [11.0, 13.0, 15.0, 8.0]
    assert f"± {np.std(values, ddof=1):.4g}" in hover and "n = 4 examples" in hover
    assert f"{np.percentile(values, 25):.4g} / {np.median(values):.4g} / {np.percentile(values, 75):.4g}" in hover


def test_contrast_marks_the_planted_head(page):
    status, resp = page.post(GRAPH, f"{ids.DATASET_VIEW}.value", {f"{ids.DATASET_VIEW}.value": "contrast",
                                                                   f"{ids.DATASET_STAT}.value": "m"})
    assert status == 200
    fig = resp[ids.DATASET_GRAPH]["figure"]
    # correct (odd) minus incorrect (even, 6 excluded: unknown) is 1 + (mean odd - mean even) elsewhere
    stars = fig["data"][1]
    assert list(zip(stars["y"], stars["x"])) == [(1, 2)]
    assert "★ 1 of 6 heads" in resp[ids.DATASET_GRAPH_HELP]["children"]
    status, resp = page.post(GRAPH, f"{ids.DATASET_VIEW}.value", {f"{ids.DATASET_VIEW}.value": "contrast",
                                                                   f"{ids.DATASET_FILTERED}.data": [1, 3]})
    assert status == 200 and "no incorrect examples" in resp[ids.DATASET_GRAPH_HELP]["children"]


@pytest.mark.parametrize("values", [{f"{ids.DATASET_FILTERED}.data": [1, 99]},
                                    {f"{ids.DATASET_FILTERED}.data": [1, 1]},
                                    {f"{ids.DATASET_FILTERED}.data": "1,2"},
                                    {f"{ids.DATASET_FILTERED}.data": [True]},
                                    {f"{ids.DATASET_VIEW}.value": "pie"},
                                    {f"{ids.DATASET_CONTRAST}.value": None}])
def test_crafted_view_values_are_refused(page, values):
    assert page.post(GRAPH, next(iter(values)), values)[0] == NO_UPDATE


def click(page, point, **values):
    trigger = f"{ids.DATASET_GRAPH}.clickData"
    return page.post(RANKED, trigger, {trigger: {"points": [point]}, **values})


def test_drill_down_ranks_and_opens_with_the_head_selected(page):
    status, resp = click(page, {"curveNumber": 0, "x": 2, "y": 1}, **{f"{ids.DATASET_STAT}.value": "m"})
    assert status == 200
    focus = resp[ids.DATASET_FOCUS]["data"]
    assert focus["layer"] == 1 and focus["head"] == 2
    assert focus["ranked"] == [23, 21, 19, 17, 15] + [0, 2, 4, 6, 8]  # 10 + odd ids, even ids
    trigger = {"id": {"type": ids.DATASET_OPEN, "index": 1}, "property": "n_clicks"}
    d = [x for x in page.deps if x["inputs"][0]["id"] == '{"index":["ALL"],"type":"dataset-open"}'][0]
    ranked_ids = [{"id": {"type": ids.DATASET_OPEN, "index": k}, "property": "n_clicks", "value": None}
                  for k in range(10)]
    ranked_ids[1]["value"] = 1
    status, resp = post_open(page, d, ranked_ids, focus, trigger)
    assert status == 200
    assert resp[ids.EXAMPLE_SELECT]["value"] == 21 and resp[ids.HEAD_STORE]["data"] == {"layer": 1, "head": 2}
    ranked_ids[1]["value"] = None  # a button appearing is not a click
    assert post_open(page, d, ranked_ids, focus, trigger)[0] == NO_UPDATE
    ranked_ids[1]["value"] = 1
    for bad_focus in (None, {**focus, "ranked": [99] * 10}, {**focus, "layer": 7}, {**focus, "ranked": "x"}):
        assert post_open(page, d, ranked_ids, bad_focus, trigger)[0] == NO_UPDATE


def post_open(page, d, inputs, focus, trigger):
    import json
    body = {"output": d["output"], "outputs": [{"id": ids.EXAMPLE_SELECT, "property": "value"},
                                               {"id": ids.HEAD_STORE, "property": "data"}],
            "inputs": [inputs], "state": [{"id": ids.DATASET_FOCUS, "property": "data", "value": focus}],
            "changedPropIds": [json.dumps(trigger["id"], separators=(",", ":"), sort_keys=True) + ".n_clicks"]}
    r = page.client.post("/_dash-update-component", data=json.dumps(body), content_type="application/json")
    return r.status_code, (json.loads(r.data)["response"] if r.status_code == 200 else None)


def test_drill_down_on_a_layer_mean_and_refused_clicks(page):
    status, resp = click(page, {"curveNumber": 1, "x": 4, "y": 0}, **{f"{ids.DATASET_STAT}.value": "m",
                                                                       f"{ids.DATASET_FILTERED}.data": [3, 4, 5]})
    assert status == 200 and resp[ids.DATASET_FOCUS]["data"]["head"] is None
    assert resp[ids.DATASET_FOCUS]["data"]["ranked"] == [5, 4, 3, 3, 4, 5]
    for point in ({"curveNumber": 0, "x": 3, "y": 0}, {"curveNumber": 0, "x": 0, "y": -1},
                  {"curveNumber": 2, "x": 0, "y": 0}, {"curveNumber": True, "x": 0, "y": 0}):
        assert click(page, point)[0] == NO_UPDATE, point
    # the contrast view has no mean column
    assert click(page, {"curveNumber": 1, "x": 4, "y": 0}, **{f"{ids.DATASET_VIEW}.value": "contrast"})[0] == NO_UPDATE


def test_prev_next_step_within_the_filtered_examples(page):
    trigger = f"{ids.DATASET_NEXT}.n_clicks"
    values = {trigger: 1, f"{ids.DATASET_FILTERED}.data": [4, 9, 2], f"{ids.EXAMPLE_SELECT}.value": 9}
    assert page.post(f"{ids.EXAMPLE_SELECT}.value", trigger, values)[1][ids.EXAMPLE_SELECT]["value"] == 2
    values[f"{ids.EXAMPLE_SELECT}.value"] = 2
    assert page.post(f"{ids.EXAMPLE_SELECT}.value", trigger, values)[1][ids.EXAMPLE_SELECT]["value"] == 4
    prev = f"{ids.DATASET_PREV}.n_clicks"
    d = page.dependency(f"{ids.EXAMPLE_SELECT}.value", prev)
    values[f"{ids.EXAMPLE_SELECT}.value"] = 0  # outside the filtered set: previous is the last one
    assert page.post_to(d, prev, {prev: 1, **values})[1][ids.EXAMPLE_SELECT]["value"] == 2
    values[f"{ids.DATASET_FILTERED}.data"] = []
    assert page.post(f"{ids.EXAMPLE_SELECT}.value", trigger, values)[0] == NO_UPDATE


def test_panel_of_an_empty_database(tmp_path):
    db, _ = make_db(tmp_path / "empty", [])
    comps = components(dataset_app(db).layout())
    assert comps[ids.DATASET_TABLE].data == [] and comps[ids.DATASET_FILTERED].data == []
    assert comps[ids.DATASET_STATUS].children == "No examples in this database"


def test_the_table_shows_a_new_example_after_a_write(db):
    page = Page(dataset_app(db))
    db.add_record(make_record(30, n_layers=N_LAYERS, n_heads=N_HEADS,
                              custom_metrics={"m": np.zeros((N_LAYERS, N_HEADS))}))
    resp = table_values(page, **{f"{ids.DATASET_TEXT}.value": ""})
    assert resp[ids.DATASET_FILTERED]["data"][-1] == 30 and ds.cache_for(db).get().version == db.version()


def test_no_dataset_callback_fires_on_page_load(db):
    """The table and heatmap are in the layout: a callback firing on load would compute them twice."""
    app = dataset_app(db)
    assert [c["output"] for c in app._callback_list if not c.get("prevent_initial_call")] == []


def test_downloads_hold_the_numbers_behind_the_views(page, db):
    """The three CSVs, against the custom metric "m" of the fixture computed here: the filtered examples
    in table order; the mean view's mean, std and quartiles per head (and layer mean); the contrast's
    means, Mann–Whitney U p and Benjamini–Hochberg q per head; the drill-down's ranked examples."""
    import scipy.stats as sps
    from test_page_export import download, rows

    common = {f"{ids.DATASET_FILTERED}.data": [5, 1, 3, 2, 6], f"{ids.DATASET_STAT}.value": "m",
              f"{ids.DATASET_LAYER}.value": 1, f"{ids.DATASET_HEAD}.value": 2}
    data = download(page, f"{ids.EXPORT_DATASET_TABLE}.n_clicks", {f"{ids.EXPORT_DATASET_TABLE}.n_clicks": 1, **common})
    table = rows(data["content"])
    assert data["filename"] == "vl-interpret-examples.csv" and [int(r["id"]) for r in table] == [5, 1, 3, 2, 6]
    value_title = [k for k in table[0] if k.startswith("m,")][0]
    assert value_title == "m, layer 2, head 3"
    assert [float(r[value_title]) for r in table] == [15.0, 11.0, 13.0, 2.0, 6.0]  # 10 + id for odd ids
    assert [r["correct"] for r in table] == ["correct", "correct", "correct", "incorrect", "unknown"]
    assert float(table[0]["score"]) == pytest.approx(5 / 30, abs=1e-12)  # in full, not rounded as shown

    metric = {i: np.full((N_LAYERS, N_HEADS), float(i)) for i in range(24)}
    for i in range(1, 24, 2):
        metric[i][1, 2] = 10.0 + i
    filtered = [5, 1, 3, 2, 6]
    data = download(page, f"{ids.EXPORT_DATASET_VIEW}.n_clicks",
                    {f"{ids.EXPORT_DATASET_VIEW}.n_clicks": 1, f"{ids.DATASET_VIEW}.value": "mean", **common})
    grid = rows(data["content"])
    assert data["filename"] == "vl-interpret-dataset-mean.csv" and len(grid) == N_LAYERS * (N_HEADS + 1)
    x = np.stack([metric[i] for i in filtered])
    x = np.concatenate([x, x.mean(axis=2, keepdims=True)], axis=2)  # the layer mean as a last head
    for row in grid:
        layer, head = int(row["layer"]) - 1, (N_HEADS if row["head"] == "mean" else int(row["head"]) - 1)
        column = x[:, layer, head]
        assert float(row["mean"]) == pytest.approx(column.mean())
        assert float(row["std"]) == pytest.approx(column.std(ddof=1))
        assert float(row["q1"]) == pytest.approx(np.percentile(column, 25)) and int(row["n"]) == 5

    everyone = list(range(24))
    data = download(page, f"{ids.EXPORT_DATASET_VIEW}.n_clicks",
                    {f"{ids.EXPORT_DATASET_VIEW}.n_clicks": 1, f"{ids.DATASET_VIEW}.value": "contrast",
                     f"{ids.DATASET_CONTRAST}.value": "correct", **common, f"{ids.DATASET_FILTERED}.data": everyone})
    grid = rows(data["content"])
    correct, incorrect = [i for i in everyone if i % 2], [i for i in everyone if i % 2 == 0 and i != 6]
    p = np.array([[sps.mannwhitneyu([metric[i][l, h] for i in correct], [metric[i][l, h] for i in incorrect]).pvalue
                   for h in range(N_HEADS)] for l in range(N_LAYERS)])
    order = np.argsort(p, axis=None)  # Benjamini–Hochberg by hand: p * m / rank, monotone from the top
    q_sorted = np.minimum.accumulate((p.ravel()[order] * p.size / np.arange(1, p.size + 1))[::-1])[::-1]
    q = np.empty(p.size)
    q[order] = np.minimum(q_sorted, 1)
    q = q.reshape(p.shape)
    assert len(grid) == N_LAYERS * N_HEADS
    for row in grid:
        layer, head = int(row["layer"]) - 1, int(row["head"]) - 1
        assert float(row["mean correct"]) == pytest.approx(np.mean([metric[i][layer, head] for i in correct]))
        assert float(row["difference"]) == pytest.approx(
            np.mean([metric[i][layer, head] for i in correct]) - np.mean([metric[i][layer, head] for i in incorrect]))
        assert float(row["p"]) == pytest.approx(p[layer, head]) and float(row["q"]) == pytest.approx(q[layer, head])
        assert row["significant"] == ("yes" if (layer, head) == (1, 2) else "no")

    no_focus = {f"{ids.EXPORT_DATASET_RANKED}.n_clicks": 1, **common, f"{ids.DATASET_FOCUS}.data": None}
    assert page.post_to([d for d in page.deps if f"{ids.DOWNLOAD}.data" in d["output"] and any(
        x["id"] == ids.EXPORT_DATASET_RANKED for x in d["inputs"])][0], f"{ids.EXPORT_DATASET_RANKED}.n_clicks",
        no_focus)[0] == NO_UPDATE  # nothing ranked yet
    data = download(page, f"{ids.EXPORT_DATASET_RANKED}.n_clicks",
                    {**no_focus, f"{ids.DATASET_FOCUS}.data": {"layer": 1, "head": 2, "ranked": []},
                     f"{ids.DATASET_FILTERED}.data": everyone})
    ranked = rows(data["content"])
    assert [(r["group"], int(r["example"])) for r in ranked] == \
        [("highest", i) for i in (23, 21, 19, 17, 15)] + [("lowest", i) for i in (0, 2, 4, 6, 8)]
    assert float(ranked[0]["value"]) == 33.0 and ranked[0]["text"] == db.example(23).text


@pytest.mark.parametrize("values", [{f"{ids.DATASET_FILTERED}.data": [1, 99]},
                                    {f"{ids.DATASET_STAT}.value": "nope"},
                                    {f"{ids.DATASET_VIEW}.value": "pie"},
                                    {f"{ids.DATASET_FOCUS}.data": {"layer": 9, "head": 0}}])
def test_crafted_download_values_are_refused(page, values):
    dep = [d for d in page.deps if f"{ids.DOWNLOAD}.data" in d["output"]
           and any(x["id"] == ids.EXPORT_DATASET_VIEW for x in d["inputs"])][0]
    trigger = ids.EXPORT_DATASET_RANKED if ids.DATASET_FOCUS in next(iter(values)) else ids.EXPORT_DATASET_VIEW
    status, _ = page.post_to(dep, f"{trigger}.n_clicks", {f"{trigger}.n_clicks": 1, f"{ids.DATASET_STAT}.value": "m",
                                                          f"{ids.DATASET_FILTERED}.data": [1, 2], **values})
    assert status == NO_UPDATE
