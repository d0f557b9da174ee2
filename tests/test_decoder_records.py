"""Records in any token order (a decoder VLM's prompt), with generated tokens and several patch grids:
validation, storage, statistics, nearest tokens and the views, each checked against a computation
that does not share the code under test."""
from __future__ import annotations

import numpy as np
import pytest

from app.database.records import RecordError, validate_record
from app.database.stats import STATISTICS, head_statistics
from app.panels import tokens as token_panel
from helpers import make_db, make_decoder_record, make_record
from test_layout import decode

N_PREFIX = 3  # <s> USER :


def test_tokens_keep_their_order_and_modality():
    raw = make_decoder_record(0)
    rec = validate_record(raw)
    assert rec.tokens == raw["tokens"]  # nothing reordered: the causal triangle stays a triangle
    np.testing.assert_array_equal(rec.order, np.arange(len(raw["tokens"])))
    np.testing.assert_array_equal(rec.is_text, [m == "text" for m in raw["modality"]])
    assert rec.txt_len == raw["modality"].count("text") and rec.generated == 2
    assert np.triu(rec.attention[0, 0], k=1).max() == 0
    assert rec.special[0] and not rec.special[N_PREFIX + 6] and rec.special[-1]  # <s>, "what", </s>
    assert rec.coords[N_PREFIX] == (0, 0) and rec.coords[N_PREFIX + 5] == (2, 1) and rec.coords[0] is None
    assert rec.grid == (2, 3) and rec.grids[0].box == (0, 0, 48, 32)


def test_several_grids_and_row_end_tokens():
    rec = validate_record(make_decoder_record(0, grids=((2, 2), (1, 3)), newline=True))
    image = [i for i in range(len(rec.tokens)) if not rec.is_text[i]]
    assert len(image) == 4 + 2 + 3 + 1  # patches and one newline per row
    assert [g.shape for g in rec.grids] == [(2, 2), (1, 3)]
    assert rec.grids[1].box == (24, 0, 48, 32)
    newlines = [i for i in image if rec.tokens[i] == "<image_newline>"]
    assert all(rec.coords[i] is None and rec.special[i] and rec.patch_grid[i] == -1 for i in newlines)
    second = [i for i in image if rec.patch_grid[i] == 1]
    assert [rec.coords[i] for i in second] == [(0, 0), (1, 0), (2, 0)]
    assert rec.grids[1].cell(2, 0) == (40.0, 0.0, 48.0, 32.0)


@pytest.mark.parametrize("change, field, fragment", [
    (lambda r: r.update(modality=r["modality"][:-1]), "modality", "one of"),
    (lambda r: r["modality"].__setitem__(0, "audio"), "modality", "token 0: expected 'text' or 'image'"),
    (lambda r: r.update(txt_len=3), "txt_len", "omit txt_len"),
    (lambda r: r.update(generated=len(r["tokens"]) - 5), "generated", "is an image token"),
    (lambda r: r.update(generated=-1), "generated", "expected an int"),
    (lambda r: r.update(special=[True]), "special", "one bool per token"),
    (lambda r: r["img_coords"].__setitem__(0, (0, 0, 1)), "img_coords", "grid 1 does not exist"),
    (lambda r: r["img_coords"].__setitem__(1, (0, 0)), "img_coords", "duplicate coordinate (0, 0)"),
    (lambda r: r["img_coords"].__setitem__(1, (3, 0)), "img_coords", "outside the grid of 2 rows x 3 columns"),
])
def test_bad_fields_name_the_example_and_the_field(change, field, fragment):
    raw = make_decoder_record(5)
    change(raw)
    with pytest.raises(RecordError) as error:
        validate_record(raw)
    assert error.value.field == field and str(error.value).startswith("example 5, field ")
    assert fragment in str(error.value)


@pytest.mark.parametrize("grids, field, fragment", [
    ([{"rows": 2, "cols": 2, "box": [0, 0, 60, 32]}, {"rows": 1, "cols": 3, "box": [0, 0, 48, 32]}],
     "grids", "reaches outside the 48 x 32 image"),
    ([{"rows": 2, "cols": 2, "box": [10, 0, 5, 32]}, {"rows": 1, "cols": 3, "box": [0, 0, 48, 32]}],
     "grids", "left < right"),
    ([{"rows": 2, "cols": 2}], "grids", "expected a dict with rows, cols, box"),
])
def test_bad_grids_are_refused(grids, field, fragment):
    raw = make_decoder_record(2, grids=((2, 2), (1, 3)))
    raw["grids"] = grids
    with pytest.raises(RecordError) as error:
        validate_record(raw)
    assert error.value.field == field and fragment in str(error.value)


def _text_first(raw: dict) -> dict:
    """The same example in the original layout: text tokens first (an independent route to the
    statistics, through the text-first code path)."""
    text = [i for i, m in enumerate(raw["modality"]) if m == "text"]
    image = [i for i, m in enumerate(raw["modality"]) if m == "image"]
    perm = np.array(text + image)
    out = {k: v for k, v in raw.items() if k not in ("modality", "generated", "special")}
    out.update(tokens=[raw["tokens"][i] for i in perm], txt_len=len(text),
               attention=raw["attention"][:, :, perm][:, :, :, perm], hidden_states=raw["hidden_states"][:, perm],
               img_coords=[raw["img_coords"][k] for k in range(len(image))])
    return out


def test_statistics_follow_each_tokens_modality_not_its_position():
    raw = make_decoder_record(0)
    rec = validate_record(raw)
    specials = ("<s>", "</s>")
    reference = validate_record(_text_first(raw), special_tokens=specials)
    got = head_statistics(rec.attention, rec.is_text, rec.special, rec.coords, rec.image.shape[:2], rec.grids,
                          rec.patch_grid)
    want = head_statistics(reference.attention, reference.is_text, reference.special, reference.coords,
                           reference.image.shape[:2], reference.grids, reference.patch_grid)
    for key in STATISTICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    # and by hand: text queries' mass on image patches, over every non-special text query
    text = rec.is_text & ~rec.special
    image = ~rec.is_text & ~rec.special
    by_hand = rec.attention[:, :, text][:, :, :, image].sum(-1).mean(-1)
    np.testing.assert_allclose(got["txt2img"], by_hand, rtol=1e-5)


def test_distance_across_grids_is_measured_on_the_image():
    raw = make_decoder_record(0, grids=((1, 1), (1, 1)), answer=("a",), n_layers=1, n_heads=1)
    n = len(raw["tokens"])
    first, second = N_PREFIX, N_PREFIX + 1  # the two patches: centres (12, 16) and (36, 16)
    attention = np.zeros((1, 1, n, n), np.float32)
    attention[0, 0, np.arange(n), np.arange(n)] = 1
    attention[0, 0, second] = 0
    attention[0, 0, second, first] = 1  # the second grid's patch reads only the first's
    raw["attention"] = attention
    rec = validate_record(raw)
    stats = head_statistics(rec.attention, rec.is_text, rec.special, rec.coords, rec.image.shape[:2], rec.grids,
                            rec.patch_grid)
    assert stats["distance"][0, 0] == pytest.approx((0 + 24) / 2)


def test_store_round_trip_and_nearest_token_by_modality(tmp_path):
    records = [make_decoder_record(i, grids=((2, 2), (1, 3)), newline=True) for i in range(3)]
    db, report = make_db(tmp_path / "db", records, special_tokens=("<s>", "</s>"))
    assert not report.failed, report.failed
    info = db.example(1)
    rec = validate_record(records[1])
    assert info.tokens == tuple(records[1]["tokens"]) and info.generated == 2
    np.testing.assert_array_equal(info.is_text, rec.is_text)
    np.testing.assert_array_equal(info.patch_grid, rec.patch_grid)
    assert info.grids == rec.grids and info.on_grid(1)[N_PREFIX + 6] == (0, 0)
    matrix = db.attention_matrix(1, 0, 0)
    assert np.triu(matrix, k=1).max() == 0  # the stored matrix keeps the causal triangle
    query = len(info.tokens) - 3  # "red", generated, after the image
    neighbor = db.nearest_other_modality(1, 2, query)
    assert neighbor is not None and not db.example(neighbor.ex_id).is_text[neighbor.token]
    hidden = {i: db.hidden_states(i, 2).astype(np.float64) for i in range(3)}
    q = hidden[1][query]
    best = max(((e, t) for e in range(3) for t in range(len(info.tokens))
                if not db.example(e).is_text[t] and not db.example(e).special[t]),
               key=lambda et: hidden[et[0]][et[1]] @ q / np.linalg.norm(hidden[et[0]][et[1]]) / np.linalg.norm(q))
    assert (neighbor.ex_id, neighbor.token) == best


def test_text_panel_shows_the_image_place_and_the_answer(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_decoder_record(0, newline=True)], special_tokens=("<s>", "</s>"))
    info = db.example(0)
    segments, chips = token_panel.token_elements(info)
    items = [c["props"] for seg in segments for c in seg.children]
    texts = [p["children"] for p in items]
    assert texts[:4] == ["<s>", "USER", ":", "[image · 6 patches]"]
    assert texts[4:9] == ["what", "color", "?", "ASSISTANT", ":"]
    assert texts[9:] == ["answer:", "red", "</s>"]
    assert [p["className"] for p in items[-2:]] == ["tok generated", "tok special generated"]
    assert [c["props"]["children"] for c in chips[1:]] == ["<image_newline>"] * 2
    answer_start = len(info.tokens) - 2
    assert token_panel.shown_text_tokens(info)[-2:] == [answer_start, answer_start + 1]


def test_overlay_of_the_second_grid_lies_in_its_box(tmp_path):
    db, _ = make_db(tmp_path / "db", [make_decoder_record(0, grids=((2, 2), (1, 3)))], special_tokens=("<s>",))
    info = db.example(0)
    weights = np.arange(info.n_tokens, dtype=np.float32) / info.n_tokens
    fig = token_panel.image_view(db, info, 1, 0.6, [], weights, [N_PREFIX + 5], "attention")
    overlay = fig.data[0]
    assert (overlay.x0, overlay.dx, overlay.y0, overlay.dy) == (24 + 4, 8, 16, 32)
    np.testing.assert_allclose(decode(overlay.z), [weights[N_PREFIX + 4: N_PREFIX + 7]], rtol=1e-6)
    shape = fig.layout.shapes[0]
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (32, 40, 0, 32)  # token N_PREFIX + 5: grid 1, (1, 0)
    first = token_panel.image_view(db, info, 0, 0.6, [], weights, [], "attention").data[0]
    assert (first.x0, first.dx) == (6, 12)


def test_text_first_records_are_unchanged():
    old = validate_record(make_record(0, image_cls=True, shuffle_image=True))
    assert old.txt_len == 4 and list(old.is_text) == [True] * 4 + [False] * 7
    assert old.generated == 0 and len(old.grids) == 1 and old.grids[0].box == (0, 0, 48, 32)
    assert old.coords[5:] == [(x, y) for y in range(2) for x in range(3)]  # row-major, after the image [CLS]


def test_page_switches_grids_and_tints_the_answer(tmp_path):
    from app import ids
    from app.server import create_app
    from test_page_evidence import patched
    from test_page_validation import Page

    db, _ = make_db(tmp_path / "db", [make_decoder_record(0, grids=((2, 2), (1, 3)))], special_tokens=("<s>",))
    info = db.example(0)
    page = Page(create_app(db))
    assert page.props[ids.GRID_SWITCH]["options"][1]["value"] == 1
    assert page.props[ids.GRID_SWITCH_WRAP]["style"] == {}  # shown: the example has two grids
    query = info.n_tokens - 2  # the generated "red"
    selection = {f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [query]}, f"{ids.HEAD_STORE}.data": {"layer": 1, "head": 0}}
    status, resp = page.post(f"{ids.IMAGE_GRAPH}.figure", f"{ids.GRID_SWITCH}.value",
                             {f"{ids.GRID_SWITCH}.value": 1, **selection})
    assert status == 200
    overlay = resp[ids.IMAGE_GRAPH]["figure"]["data"][0]
    weights = db.attention(0, 1, 0, [query])
    np.testing.assert_allclose(decode(overlay["z"]), [weights[info.patch_grid == 1]], rtol=1e-6)
    assert overlay["x0"] == 28
    status, resp = page.post(f"{ids.ATT_STORE}.data", f"{ids.SEL_STORE}.data",
                             {**selection, f"{ids.GRID_SWITCH}.value": 1})
    assert status == 200
    store = resp[ids.ATT_STORE]["data"]
    assert len(store["w"]) == info.n_tokens  # text after the image is tinted too
    np.testing.assert_allclose(store["w"], weights, atol=5e-5)
    np.testing.assert_allclose(decode(patched(resp[ids.IMAGE_GRAPH]["figure"], "data", 0, "z")),
                               [weights[info.patch_grid == 1]], rtol=1e-6)
