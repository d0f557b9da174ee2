"""The per-patch logit lens (record field ``patch_lens``): validation, the stored order, storage and merge,
the words drawn on their patches, and the page's toggle and layer slider, each checked against what the
test itself knows of the record (its token names, the patch cells of records.Grid)."""
from __future__ import annotations

import numpy as np
import pytest

from app import figures, ids
from app.database.analyses import patch_lens as lens_storage
from app.database.checksum import CorruptValueError
from app.database.database import VliLmdb
from app.database.records import PatchLens, RecordError, validate_record
from app.panels import tokens as token_panel
from app.server import create_app
from helpers import fast_tsne, make_db, make_decoder_record, make_record  # noqa: F401 (fast_tsne: autouse)
from test_page_evidence import patched
from test_page_validation import NO_UPDATE, Page

N_LAYERS = 2  # make_record's and make_decoder_record's default


def image_tokens(record: dict) -> list[int]:
    """Input positions of the record's image tokens (sequence order)."""
    if "modality" in record:
        return [i for i, m in enumerate(record["modality"]) if m == "image"]
    return list(range(record["txt_len"], len(record["tokens"])))


def lens_of(record: dict, seed: int = 0) -> list:
    """A patch lens whose words name the input position (``L1@7``: layer 1, input token 7), so that
    every entry can be traced back to its token, with a probability per entry."""
    rng = np.random.default_rng(seed)
    return [[[f"L{layer}@{position}", float(rng.random())] for position in image_tokens(record)]
            for layer in range(N_LAYERS + 1)]


def with_lens(record: dict, seed: int = 0) -> dict:
    record["patch_lens"] = lens_of(record, seed)
    return record


# ----------------------------------------------------------------------------- validation

def _layers(n):
    return lambda r: r.update(patch_lens=r["patch_lens"][:n])


def _entry(layer, token, value):
    return lambda r: r["patch_lens"][layer].__setitem__(token, value)


INVALID = {
    "too few layers": (_layers(N_LAYERS), "expected one list of (word, probability) per hidden-state layer (3"),
    "not a list": (lambda r: r.update(patch_lens="red"), "per hidden-state layer"),
    "a token short": (lambda r: r["patch_lens"][1].pop(), "layer 1: expected one (word, probability) per image "
                                                           "token (6), got 5 entries"),
    "probability above 1": (_entry(2, 3, ["red", 1.5]), "layer 2, image token 3: expected (word, probability "
                                                        "in [0, 1])"),
    "negative probability": (_entry(0, 0, ["red", -0.1]), "layer 0, image token 0"),
    "NaN probability": (_entry(0, 1, ["red", float("nan")]), "layer 0, image token 1"),
    "bool probability": (_entry(0, 1, ["red", True]), "layer 0, image token 1"),
    "word not a str": (_entry(1, 2, [7, 0.5]), "layer 1, image token 2"),
    "not a pair": (_entry(1, 2, ["red"]), "layer 1, image token 2"),
    "word too long": (_entry(1, 2, ["x" * 5000, 0.5]), "5,000 characters"),
}


@pytest.mark.parametrize("case", INVALID)
def test_a_bad_patch_lens_names_the_example_and_the_field(case):
    change, fragment = INVALID[case]
    record = with_lens(make_record(7, grid=(2, 3)))
    change(record)
    with pytest.raises(RecordError) as error:
        validate_record(record)
    assert error.value.field == "patch_lens"
    assert str(error.value).startswith("example 7, field 'patch_lens': ") and fragment in str(error.value)


def test_a_record_without_image_tokens_has_no_patch_lens():
    record = make_record(3, grid=None, patch_lens=[[] for _ in range(N_LAYERS + 1)])
    with pytest.raises(RecordError, match="example 3, field 'patch_lens': given, but the record has no image"):
        validate_record(record)


def test_the_words_follow_the_image_tokens_into_the_stored_order():
    """Text first: the image [CLS] and then the patches in row-major order are stored, whatever order the
    record gave them in; each word must stay with its token."""
    raw = with_lens(make_record(4, grid=(3, 2), shuffle_image=True, image_cls=True, seed=3))
    rec = validate_record(raw)
    stored_image = [i for i in range(rec.n_tokens) if not rec.is_text[i]]
    assert stored_image != [int(rec.order[i]) for i in stored_image]  # the test does reorder something
    given = {word: p for layer in raw["patch_lens"] for word, p in layer}
    for layer in range(N_LAYERS + 1):
        assert list(rec.patch_lens.words[layer]) == [f"L{layer}@{rec.order[i]}" for i in stored_image]
        np.testing.assert_array_equal(rec.patch_lens.probabilities[layer],
                                      np.float32([given[w] for w in rec.patch_lens.words[layer]]))


def test_a_decoder_keeps_its_sequence_order():
    raw = with_lens(make_decoder_record(0, grids=((2, 2), (1, 3)), newline=True))
    rec = validate_record(raw)
    assert list(rec.patch_lens.words[1]) == [f"L1@{i}" for i in image_tokens(raw)]
    assert rec.patch_lens.probabilities.shape == (N_LAYERS + 1, len(image_tokens(raw)))


# ----------------------------------------------------------------------------- storage

@pytest.fixture
def lens_db(tmp_path):
    """Example 0: a decoder with two grids and row-end tokens; 1: text first, shuffled; 2: no lens."""
    records = [with_lens(make_decoder_record(0, grids=((2, 2), (1, 3)), newline=True), seed=1),
               with_lens(make_record(1, grid=(2, 3), shuffle_image=True, image_cls=True), seed=2),
               make_record(2, grid=(2, 3))]
    db, report = make_db(tmp_path / "db", records, special_tokens=("[CLS]", "[SEP]", "<s>", "</s>"))
    assert not report.failed, report.failed
    yield db, records
    db.close()


def expected_layer(db, record: dict, ex_id: int, layer: int):
    """What patch_lens(ex_id, layer) must return, from the record: the stored image tokens, each with
    the word and probability the record gave its input token."""
    info = db.example(ex_id)
    stored = validate_record(record, special_tokens=db.special_tokens)
    tokens = np.flatnonzero(~info.is_text)
    given = dict(tuple(pair) for pair in record["patch_lens"][layer])
    words = [f"L{layer}@{stored.order[t]}" for t in tokens]
    return tokens, words, np.float32([given[w] for w in words])


def test_the_lens_round_trips_through_the_database(lens_db):
    db, records = lens_db
    for ex_id in (0, 1):
        assert db.example(ex_id).has_patch_lens
        for layer in range(N_LAYERS + 1):
            got = db.patch_lens(ex_id, layer)
            tokens, words, probabilities = expected_layer(db, records[ex_id], ex_id, layer)
            np.testing.assert_array_equal(got.tokens, tokens)
            assert got.words == words
            # stored as float16: the nearest float16 to each probability
            np.testing.assert_array_equal(got.probabilities, probabilities.astype(np.float16).astype(np.float32))
    assert not db.example(2).has_patch_lens and db.patch_lens(2, 1) is None
    with pytest.raises(IndexError, match=r"hidden-state layer \(0 = before layer 1\) 3 out of range 0..2"):
        db.patch_lens(0, N_LAYERS + 1)


def test_it_is_stored_under_its_own_key_as_indices_into_the_words():
    """A vocabulary of the distinct words, then 2-byte indices and 2-byte probabilities per entry; a
    per-example vocabulary of more than 65 536 words takes 4-byte indices."""
    words = (("a", "b", "a", "a"), ("b", "b", "c", "a"))
    probabilities = np.float32([[0.5, 0.25, 1.0, 0.0], [0.125, 0.75, 0.5, 1.0]])
    blob = lens_storage.encode(PatchLens(words, probabilities))
    header = len('{"words": ["a", "b", "c"], "index": "<u2", "shape": [2, 4]}')
    assert len(blob) == 4 + header + 2 * 8 + 2 * 8
    for layer in range(2):
        got_words, got_p = lens_storage.decode_layer(blob, layer)
        assert got_words == list(words[layer])
        np.testing.assert_array_equal(got_p, probabilities[layer])
    many = tuple(f"w{i}" for i in range(70_000))
    blob = lens_storage.encode(PatchLens((many,), np.zeros((1, len(many)), np.float32)))
    assert lens_storage.decode_layer(blob, 0)[0] == list(many)


def test_the_description_read_on_every_click_does_not_carry_the_words(lens_db):
    db, _ = lens_db
    with db._read() as txn:
        info = bytes(txn.get(b"%010d" % 0, db=db._dbs["info"]))
    assert b"L1@" not in info


def test_a_damaged_lens_is_reported_for_its_example(lens_db):
    db, _ = lens_db
    with db._write() as txn:
        key = b"%010d" % 1
        value = bytearray(txn.get(key, db=db._dbs["patch_lens"]))
        value[10] ^= 0xFF
        txn.put(key, bytes(value), db=db._dbs["patch_lens"])
    with pytest.raises(CorruptValueError, match="example 1, per-patch logit lens"):
        db.patch_lens(1, 0)


def test_merging_copies_the_lens(lens_db, tmp_path):
    db, records = lens_db
    with VliLmdb(tmp_path / "merged", read_only=False) as merged:
        merged.import_example(db, 1, 5)
        merged.import_example(db, 2, 6)
        assert merged.example(5).has_patch_lens and merged.patch_lens(6, 0) is None
        for layer in range(N_LAYERS + 1):
            got, want = merged.patch_lens(5, layer), db.patch_lens(1, layer)
            assert got.words == want.words
            np.testing.assert_array_equal(got.probabilities, want.probabilities)


# ----------------------------------------------------------------------------- the figure

def test_each_word_is_drawn_at_the_centre_of_its_patch_of_the_grid(lens_db):
    db, _ = lens_db
    info = db.example(0)
    for g in range(2):
        lens = db.patch_lens(0, 1)
        grid = info.grids[g]
        trace = figures.patch_words_trace(lens.tokens, lens.words, lens.probabilities, info.on_grid(g), grid.shape,
                                          info.image_size, grid.box)
        on_grid = [k for k, t in enumerate(lens.tokens) if info.patch_grid[t] == g]
        assert trace["customdata"] == [int(lens.tokens[k]) for k in on_grid]  # row-end tokens have no patch
        for x, y, k in zip(trace["x"], trace["y"], on_grid):
            x0, y0, x1, y1 = grid.cell(*info.coords[lens.tokens[k]])  # records.Grid's cell, not the figure's
            assert (x, y) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2))
        assert trace["text"] == [lens.words[k] for k in on_grid]
        for hover, k in zip(trace["hovertext"], on_grid):
            assert repr(lens.words[k]) in hover and f"p = {lens.probabilities[k]:.3f}" in hover
        order = np.argsort([lens.probabilities[k] for k in on_grid])
        assert np.all(np.diff(np.array(trace["textfont"]["size"])[order]) >= 0)  # more probable, larger


def test_long_and_blank_words_are_shortened_for_the_patch_but_not_for_the_hover():
    trace = figures.patch_words_trace([0, 1], [" hippopotamus", " "], [0.5, 0.5], [(0, 0), (1, 0)], (1, 2), (10, 20))
    assert trace["text"] == ["hippopo…", "' '"]
    assert "' hippopotamus'" in trace["hovertext"][0]


def test_the_image_figure_carries_the_words_as_its_last_trace():
    coords = [(x, y) for y in range(2) for x in range(3)]
    words = figures.patch_words_trace(range(6), list("abcdef"), [0.5] * 6, coords, (2, 3), (20, 30))
    fig = figures.image_figure("data:image/png;base64,AAAA", (20, 30), coords, (2, 3), patch_words=words)
    assert len(fig.data) == 4 and fig.data[3].name == "patch words" and list(fig.data[3].text) == list("abcdef")
    assert len(figures.image_figure("data:image/png;base64,AAAA", (20, 30), coords, (2, 3)).data) == 3


# ----------------------------------------------------------------------------- the page

def test_the_page_offers_patch_words_only_for_an_example_that_has_them(lens_db):
    db, _ = lens_db
    page = Page(create_app(db))
    assert page.props[ids.PATCH_WORDS_WRAP]["style"] == {}  # example 0, the first, has them
    assert page.props[ids.PATCH_WORDS]["value"] == [] and page.props[ids.PATCH_WORDS_LAYER]["max"] == N_LAYERS
    for ex_id, shown in ((2, False), (1, True)):
        status, resp = page.post(f"{ids.TEXT_TOKENS}.children", f"{ids.EXAMPLE_SELECT}.value",
                                 {f"{ids.EXAMPLE_SELECT}.value": ex_id})
        assert status == 200
        assert resp[ids.PATCH_WORDS_WRAP]["style"] == ({} if shown else {"display": "none"})
        traces = resp[ids.IMAGE_GRAPH]["figure"]["data"]
        assert len(traces) == (4 if shown else 3)
        if shown:
            assert traces[3]["text"] == []  # the toggle is off: an empty trace for it to fill
    assert token_panel.PATCH_WORDS_HELP in str(page.props[ids.PATCH_WORDS_WRAP]["children"])  # says what it is


def test_the_toggle_and_the_slider_draw_that_layers_words(lens_db):
    db, _ = lens_db
    page = Page(create_app(db))
    info = db.example(0)
    for layer in (0, 2):
        status, resp = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.PATCH_WORDS_LAYER}.value",
                                 {f"{ids.PATCH_WORDS}.value": ["on"], f"{ids.PATCH_WORDS_LAYER}.value": layer,
                                  f"{ids.EXAMPLE_READY}.data": 0, f"{ids.GRID_SWITCH}.value": 1})
        assert status == 200
        trace = patched(resp[ids.IMAGE_GRAPH]["figure"], "data", 3)
        on_grid = [t for t in np.flatnonzero(~info.is_text) if info.patch_grid[t] == 1]
        assert trace["customdata"] == on_grid
        assert trace["text"] == [f"L{layer}@{t}" for t in on_grid]  # a decoder's positions are stored as given
    status, resp = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.PATCH_WORDS}.value",
                             {f"{ids.PATCH_WORDS}.value": [], f"{ids.EXAMPLE_READY}.data": 0})
    assert status == 200 and patched(resp[ids.IMAGE_GRAPH]["figure"], "data", 3)["text"] == []


def test_a_new_grid_or_example_keeps_the_words_shown(lens_db):
    db, _ = lens_db
    page = Page(create_app(db))
    on = {f"{ids.PATCH_WORDS}.value": ["on"], f"{ids.PATCH_WORDS_LAYER}.value": 1}
    status, resp = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.GRID_SWITCH}.value",
                             {f"{ids.GRID_SWITCH}.value": 1, f"{ids.EXAMPLE_READY}.data": 0, **on})
    assert status == 200
    words = resp[ids.IMAGE_GRAPH]["figure"]["data"][3]
    assert words["text"] and all(db.example(0).patch_grid[t] == 1 for t in words["customdata"])
    status, resp = page.post(f"{ids.TEXT_TOKENS}.children", f"{ids.EXAMPLE_SELECT}.value",
                             {f"{ids.EXAMPLE_SELECT}.value": 1, **on})
    assert status == 200
    stored = db.patch_lens(1, 1)
    patches = [k for k, t in enumerate(stored.tokens) if db.example(1).coords[t] is not None]
    assert resp[ids.IMAGE_GRAPH]["figure"]["data"][3]["text"] == [stored.words[k] for k in patches]


@pytest.mark.parametrize("toggle, layer", [("on", 1), (["on"], -1), (["on"], N_LAYERS + 1), (["on"], 1.5),
                                           (["on"], "1"), (None, 1)])
def test_crafted_toggle_and_layer_values_are_refused(lens_db, toggle, layer):
    db, _ = lens_db
    page = Page(create_app(db))
    status, _ = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.PATCH_WORDS_LAYER}.value",
                          {f"{ids.PATCH_WORDS}.value": toggle, f"{ids.PATCH_WORDS_LAYER}.value": layer,
                           f"{ids.EXAMPLE_READY}.data": 0})
    assert status == NO_UPDATE


def test_an_example_without_a_lens_gets_no_patch(lens_db):
    db, _ = lens_db
    page = Page(create_app(db))
    status, _ = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.PATCH_WORDS}.value",
                          {f"{ids.PATCH_WORDS}.value": ["on"], f"{ids.EXAMPLE_READY}.data": 2})
    assert status == NO_UPDATE
