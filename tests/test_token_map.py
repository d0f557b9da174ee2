"""The database-wide token map: the token sample, the fit (labels read back independently, two planted
clusters kept apart), the maps kept on disk and refitted when the examples change, the background fit
and its marker for other server processes, the figure, the panel's callbacks and the command line."""
import json
import os
import time

import numpy as np
import pytest
from sklearn.manifold import trustworthiness

from app import figures, ids
from app.database import token_map as tm
from app.server import create_app
from helpers import fast_tsne, make_db, make_record  # noqa: F401 - fast_tsne is an autouse fixture
from test_page_validation import Page

N_LAYERS = 2
GRID = (3, 4)  # 12 patches, 4 text tokens: 16 tokens an example


def clustered_record(ex_id: int) -> dict:
    """Text tokens' hidden states near +5 on the first axis, image tokens near -5 (every layer)."""
    r = make_record(ex_id, n_text=4, grid=GRID, n_layers=N_LAYERS, hidden=16, seed=3,
                    text_tokens=["[CLS]", "red" if ex_id % 2 else "blue", "circle", "[SEP]"],
                    prediction={"answer": "yes", "label": "yes" if ex_id % 3 else "no"})
    r["accuracy"] = bool(ex_id % 3)
    hidden = np.random.default_rng(ex_id).normal(scale=0.5, size=r["hidden_states"].shape).astype(np.float32)
    hidden[:, :4, 0] += 5.0
    hidden[:, 4:, 0] -= 5.0
    r["hidden_states"] = hidden
    return r


@pytest.fixture
def db(tmp_path):
    db, _ = make_db(tmp_path / "db", [clustered_record(i) for i in range(12)])
    yield db
    db.close()


def test_sample_is_uniform_without_replacement_and_every_token_when_few():
    positions, tokens = tm.sample_tokens([3, 5, 2], max_tokens=100)
    assert positions.tolist() == [0] * 3 + [1] * 5 + [2] * 2
    assert tokens.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    counts = np.array([50, 10, 40])
    positions, tokens = tm.sample_tokens(counts, max_tokens=30, seed=1)
    flat = np.concatenate([[0], np.cumsum(counts)])[positions] + tokens
    assert len(set(flat.tolist())) == 30 and (tokens < counts[positions]).all()
    assert (np.diff(flat) > 0).all()  # sorted by example, then token
    again = tm.sample_tokens(counts, max_tokens=30, seed=1)
    assert np.array_equal(again[0], positions) and np.array_equal(again[1], tokens)
    # uniform over tokens: each example's share follows its share of the tokens
    shares = np.zeros(3)
    for seed in range(200):
        shares += np.bincount(tm.sample_tokens(counts, 30, seed)[0], minlength=3)
    np.testing.assert_allclose(shares / shares.sum(), counts / counts.sum(), atol=0.02)
    with pytest.raises(ValueError, match="max_tokens"):
        tm.sample_tokens(counts, 0)


def test_fit_labels_each_point_from_the_database_and_keeps_the_clusters_apart(db):
    token_map = tm.fit_token_map(db, 1, max_tokens=150)
    assert len(token_map) == 150 and token_map.points.shape == (150, 2) and np.isfinite(token_map.points).all()
    for k in range(len(token_map)):
        ex_id, tok = int(token_map.ex_ids[k]), int(token_map.tokens[k])
        info = db.example(ex_id)
        assert token_map.words[k] == info.tokens[tok]
        expected = 2 if info.special[tok] else 0 if info.is_text[tok] else 1
        assert token_map.modality[k] == expected
        cell = info.coords[tok]
        assert token_map.cells[k].tolist() == ([-1, -1] if cell is None else list(cell[:2]))
        assert token_map.correct[k] == int(info.accuracy)
    # the planted split (text at +5, image at -5) is what the map shows: every point's nearest
    # neighbours in the map are of its own side, and the map keeps the neighbourhoods
    features = np.stack([db.hidden_states(int(e), 1)[int(t)] for e, t in zip(token_map.ex_ids, token_map.tokens)])
    side = features[:, 0] > 0
    assert np.array_equal(side, token_map.modality != 1)
    d = np.linalg.norm(token_map.points[:, None] - token_map.points[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :5]
    assert (side[nearest] == side[:, None]).mean() > 0.98
    assert trustworthiness(features, token_map.points, n_neighbors=5) > 0.85
    with pytest.raises(ValueError, match="layer 3"):
        tm.fit_token_map(db, 3)


def test_maps_are_kept_on_disk_and_refitted_when_the_examples_change(db, tmp_path):
    maps = tm.TokenMaps(db, max_tokens=60)
    assert maps.status(2)["state"] == "missing" and maps.get(2) is None
    fitted = maps.fit(2)
    path = tm.map_path(db.path, 2)
    assert os.path.isfile(path) and maps.not_kept is None
    again = tm.TokenMaps(db, max_tokens=60).get(2)  # another process: from disk
    for name in ("points", "ex_ids", "tokens", "words", "modality", "cells", "correct"):
        assert np.array_equal(getattr(again, name), getattr(fitted, name)), name
    assert tm.TokenMaps(db, max_tokens=61).get(2) is None  # another size
    db.add_record(clustered_record(40))
    assert maps.get(2) is None and maps.status(2)["state"] == "missing"  # new examples: fitted again
    with open(path, "wb") as f:
        f.write(b"not an npz")
    assert tm.load_map(db.path, 2, tm.examples_key(db.example_ids()), 60) is None


def test_a_folder_that_cannot_be_written_keeps_the_map_in_memory_and_says_so(db, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tm, "save_map", refuse)
    maps = tm.TokenMaps(db, max_tokens=40)
    maps.fit(0)
    assert maps.get(0) is not None and "not kept on disk" in maps.not_kept and "Permission denied" in maps.not_kept


def wait_ready(maps, layer, timeout=120):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        status = maps.status(layer)
        seen.append(status["state"])
        if status["state"] in ("ready", "error"):
            return status, seen
        time.sleep(0.05)
    raise AssertionError(f"no map after {timeout} s: {seen[-3:]}")


def test_background_fit_reports_progress_and_other_processes_see_it(db):
    maps = tm.TokenMaps(db, max_tokens=80)
    first = maps.request(1)
    assert first["state"] == "fitting"
    status, seen = wait_ready(maps, 1)
    assert status["state"] == "ready" and "fitting" in seen
    assert not os.path.exists(tm._fit_marker(db.path, 1))  # removed once done
    # a fit running in another process of this machine (its marker) is reported, not started again
    key = tm.examples_key(db.example_ids())
    tm._write_marker(db.path, 0, key, 80, "optimising", 0.4)
    marker = tm._fit_marker(db.path, 0)
    with open(marker, encoding="utf-8") as f:
        state = json.load(f)
    state["pid"] = os.getppid()
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(state, f)
    assert maps.request(0) == {"state": "fitting", "phase": "optimising", "fraction": 0.4, "message": ""}
    state["pid"] = 2 ** 22 + 12345  # a process that is gone: its marker is ignored
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(state, f)
    assert maps.status(0)["state"] == "missing"
    maps.shutdown()


def test_figure_groups_match_a_direct_count():
    words = np.array(["red", "red", "blue", "p", "[CLS]", "red", "cube"])
    modality = np.array([0, 0, 0, 1, 2, 0, 0], dtype=np.int8)
    correct = np.array([1, 1, 0, 0, -1, 1, 1], dtype=np.int8)
    by_word = figures.token_map_groups(words, modality, correct, "word")
    names = [g[0] for g in by_word]
    assert names == ["‘red’", "‘blue’", "‘cube’", "image", "special"]  # by count, then alphabetically
    assert by_word[0][1].nonzero()[0].tolist() == [0, 1, 5]
    by_correct = {g[0]: g[1].nonzero()[0].tolist() for g in figures.token_map_groups(words, modality, correct,
                                                                                     "correctness")}
    assert by_correct == {"correct answer": [0, 1, 5, 6], "incorrect answer": [2, 3], "unknown answer": [4]}
    points = np.arange(14, dtype=np.float32).reshape(7, 2)
    cells = np.full((7, 2), -1, dtype=np.int16)
    cells[3] = (2, 1)
    ex_ids, tokens = np.array([5, 5, 5, 5, 8, 8, 8]), np.arange(7, dtype=np.int32)
    fig = figures.token_map_figure(points, ex_ids, tokens, words, modality, cells, correct, "modality", "t", 8)
    traces = {t.name: t for t in fig.data}
    assert list(traces) == ["text", "image", "special", "example 8"]
    assert traces["text"].type == "scattergl" and list(traces["text"].customdata) == [0, 1, 2, 5, 6]
    assert traces["image"].text[0] == "patch (2, 1) · example 5, token 3"
    assert list(traces["example 8"].customdata) == [4, 5, 6]
    by_example = figures.token_map_figure(points, ex_ids, tokens, words, modality, cells, correct, "example", "t")
    assert by_example.data[0].marker.showscale and len(by_example.data[0].customdata) == 7
    with pytest.raises(ValueError, match="colour_by"):
        figures.token_map_groups(words, modality, correct, "colour")


GRAPH = f"{ids.TOKEN_MAP_GRAPH}.figure"


def test_panel_fits_draws_rings_and_opens_the_clicked_token(db):
    page = Page(create_app(db, map_tokens=100))
    assert page.props[ids.TOKEN_MAP_GRAPH]["style"] == {"display": "none"}  # nothing drawn before asked
    status, resp = page.post(GRAPH, f"{ids.TOKEN_MAP_OPEN}.n_clicks", {f"{ids.TOKEN_MAP_OPEN}.n_clicks": 1})
    assert status == 200 and resp[ids.TOKEN_MAP_POLL]["disabled"] is False  # fitting: the page polls
    assert "Fitting the map of up to 100 tokens" in resp[ids.TOKEN_MAP_STATUS]["children"]
    maps = tm.maps_for(db)
    wait_ready(maps, N_LAYERS)
    status, resp = page.post(GRAPH, f"{ids.TOKEN_MAP_POLL}.n_intervals", {
        f"{ids.TOKEN_MAP_OPEN}.n_clicks": 1, f"{ids.TOKEN_MAP_POLL}.n_intervals": 3,
        f"{ids.EXAMPLE_SELECT}.value": 4})
    assert status == 200 and resp[ids.TOKEN_MAP_POLL]["disabled"] is True
    fig, drawn = resp[ids.TOKEN_MAP_GRAPH]["figure"], resp[ids.TOKEN_MAP_DRAWN]["data"]
    token_map = maps.get(N_LAYERS)
    assert fig["layout"]["title"]["text"].startswith(f"100 tokens of 12 examples — after layer {N_LAYERS}")
    ring = fig["data"][drawn["ring"]]
    assert ring["customdata"] == np.flatnonzero(token_map.ex_ids == 4).tolist()
    # another example shown: its tokens are ringed instead (a Patch)
    status, resp = page.post(GRAPH, f"{ids.EXAMPLE_SELECT}.value", {f"{ids.EXAMPLE_SELECT}.value": 7,
                                                                   f"{ids.TOKEN_MAP_DRAWN}.data": drawn})
    assert status == 200
    ops = resp[ids.TOKEN_MAP_GRAPH]["figure"]["operations"]
    custom = [op["params"]["value"] for op in ops if op["location"][-1] == "customdata"]
    assert custom == [np.flatnonzero(token_map.ex_ids == 7).tolist()]
    # a click on a dot opens its example with that token selected, on its side
    k = int(np.flatnonzero(token_map.modality == 1)[5])
    status, resp = page.post(f"{ids.EXAMPLE_SELECT}.value", f"{ids.TOKEN_MAP_GRAPH}.clickData", {
        f"{ids.TOKEN_MAP_GRAPH}.clickData": {"points": [{"customdata": k, "curveNumber": 1}]},
        f"{ids.TOKEN_MAP_DRAWN}.data": drawn})
    assert status == 200
    ex_id, tok = int(token_map.ex_ids[k]), int(token_map.tokens[k])
    assert resp[ids.EXAMPLE_SELECT]["value"] == ex_id
    assert resp[ids.SEL_STORE]["data"] == {"ex": ex_id, "tokens": [tok]} and resp[ids.SIDE]["value"] == "image"
    # crafted values are refused without a 500
    for bad in ({"points": [{"customdata": 10 ** 6}]}, {"points": [{"customdata": "x"}]}, None):
        status, _ = page.post(f"{ids.EXAMPLE_SELECT}.value", f"{ids.TOKEN_MAP_GRAPH}.clickData", {
            f"{ids.TOKEN_MAP_GRAPH}.clickData": bad, f"{ids.TOKEN_MAP_DRAWN}.data": drawn})
        assert status == 204
    status, _ = page.post(GRAPH, f"{ids.TOKEN_MAP_LAYER}.value", {f"{ids.TOKEN_MAP_OPEN}.n_clicks": 1,
                                                                  f"{ids.TOKEN_MAP_LAYER}.value": 99})
    assert status == 204


def test_command_line_fits_the_layers_once(db, capsys):
    path = db.path
    db.close()
    assert tm.main([path, "--layers", "0", "2", "--max-tokens", "50"]) == 0
    err = capsys.readouterr().err
    assert "layer 0: 50 tokens mapped" in err and "layer 2: 50 tokens mapped" in err
    assert tm.main([path, "--layers", "2", "--max-tokens", "50"]) == 0
    assert "layer 2: already fitted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tm.main([path, "--layers", "9"])
