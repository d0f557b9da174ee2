"""validate_record: every refusal names the example and the field; normalisation to stored order."""
import numpy as np
import pytest

from app.database.records import RecordError, validate_record
from helpers import make_record


def _set(**fields):
    return lambda r: r.update(fields)


def _attention_short(r):
    r["attention"] = r["attention"][:, :, :-1]


def _nan(name):
    def mutate(r):
        r[name] = r[name].astype(np.float32)
        r[name][(0,) * r[name].ndim] = np.nan
    return mutate


def _coords(fn):
    def mutate(r):
        r["img_coords"] = fn(list(r["img_coords"]))
    return mutate


INVALID = {
    "missing field": (lambda r: r.pop("attention"), "attention", "missing required field"),
    "not a dict": (None, "record", "expected a dict"),
    "unknown field": (_set(atention=1), "atention", "unknown field"),
    "ex_id type": (_set(ex_id="7"), "ex_id", "non-negative int"),
    "tokens not str": (lambda r: r["tokens"].__setitem__(1, 5), "tokens", "list of str"),
    "txt_len range": (_set(txt_len=99), "txt_len", "expected an int in 0..10"),
    "txt_len type": (_set(txt_len=2.0), "txt_len", "expected an int"),
    "attention shape": (_attention_short, "attention", "expected shape (2, 2, 10, 10) from tokens/txt_len, "
                                                       "got (2, 2, 9, 10)"),
    "attention dims": (_set(attention=np.zeros((2, 10, 10))), "attention", "expected 4 dimensions"),
    "attention dtype": (_set(attention=np.full((2, 2, 10, 10), "x")), "attention", "numeric array"),
    "attention NaN": (_nan("attention"), "attention", "NaN or infinite"),
    "hidden shape": (lambda r: r.update(hidden_states=r["hidden_states"][:-1]), "hidden_states",
                     "expected shape (3, 10, hidden)"),
    "hidden inf": (lambda r: r["hidden_states"].__setitem__((0, 0, 0), np.inf), "hidden_states", "infinite"),
    "coords count": (_coords(lambda c: c[:-1]), "img_coords", "expected 6 coordinates"),
    "coords missing": (_set(img_coords=None), "img_coords", "expected 6 coordinates"),
    "duplicate coords": (_coords(lambda c: c[:-1] + [c[0]]), "img_coords", "duplicate coordinate (0, 0)"),
    "negative coords": (_coords(lambda c: [(-1, 0)] + c[1:]), "img_coords", "negative coordinate"),
    "bad coord": (_coords(lambda c: [(0.5, 0)] + c[1:]), "img_coords", "expected (x, y) or (x, y, grid) ints"),
    "None coord on a patch": (_coords(lambda c: [None] + c[1:]), "img_coords", "not a special token"),
    "image shape": (_set(image=np.zeros((4, 4))), "image", "(H, W, 3)"),
    "image range": (_set(image=np.full((4, 4, 3), 300.0)), "image", "0-255"),
    "image NaN": (_set(image=np.full((4, 4, 3), np.nan)), "image", "NaN"),
    "accuracy": (_set(accuracy="yes"), "accuracy", "True, False or None"),
    "custom shape": (_set(custom_metrics={"m": np.zeros((2, 3))}), "custom_metrics['m']", "expected shape (2, 2)"),
    "custom NaN": (_set(custom_metrics={"m": np.full((2, 2), np.nan)}), "custom_metrics['m']", "NaN"),
    "custom clash": (_set(custom_metrics={"txt2img": np.zeros((2, 2))}), "custom_metrics", "built-in"),
    "custom not dict": (_set(custom_metrics=[1]), "custom_metrics", "expected a dict"),
    "prediction": (_set(prediction={"score": 1.0}), "prediction", "'answer'"),
    "text": (_set(text=3), "text", "str or None"),
    "ex_id too large": (_set(ex_id=2**31), "ex_id", "below 2**31"),
    "grid shape": (_set(grid=(2,)), "grid", "(rows, cols)"),
    "grid too large": (_set(grid=(2, 5000)), "grid", "1..1024"),
    "coord outside grid": (_set(grid=(2, 2)), "img_coords", "outside the grid of 2 rows x 2 columns"),
    "coord huge": (_coords(lambda c: [(10**7, 0)] + c[1:]), "img_coords", "outside any grid"),
    "coord 1e300": (_coords(lambda c: [(1e300, 0.0)] + c[1:]), "img_coords", "outside any grid"),
    "grid without patches": (_set(img_coords=[], tokens=["[CLS]", "w1", "w2", "[SEP]"], grid=(2, 3),
                                  attention=np.full((2, 2, 4, 4), 0.25), hidden_states=np.zeros((3, 4, 8))),
                             "grid", "no image patches"),
    "image too large": (_set(image=np.broadcast_to(np.uint8(0), (12000, 12000, 3))), "image", "12000 x 12000"),
    "attention weight 1e30": (lambda r: r["attention"].__setitem__((0, 0, 0, 0), 1e30), "attention",
                              "must lie in [0, 1]"),
    "attention negative": (lambda r: r["attention"].__setitem__((0, 0, 0, 0), -0.5), "attention", "[0, 1]"),
    "attention rows": (lambda r: r.update(attention=r["attention"] * 0.5), "attention",
                       "sums to 0.5"),
    "hidden beyond float32": (lambda r: r.update(hidden_states=r["hidden_states"].astype(np.float64) * 1e300),
                              "hidden_states", "float32's range"),
    "token too long": (lambda r: r["tokens"].__setitem__(1, "x" * 5000), "tokens", "5,000 characters"),
    "notes": (_set(notes="cut"), "notes", "list of str"),
    "relevancy shape": (_set(relevancy=np.zeros((3, 3))), "relevancy", "expected shape (10, 10)"),
    "relevancy negative": (_set(relevancy=-np.ones((10, 10))), "relevancy", "non-negative"),
    "description of no metric": (_set(metric_descriptions={"x": "what x is"}), "metric_descriptions",
                                 "not one of the record's custom_metrics"),
    "neither text nor image": (_set(tokens=[], txt_len=0, img_coords=[], attention=np.zeros((2, 2, 0, 0)),
                                    hidden_states=np.zeros((3, 0, 8))), "tokens", "neither text nor image"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_records_name_example_and_field(case):
    mutate, field, fragment = INVALID[case]
    record = make_record(7, n_text=4, grid=(2, 3))
    if mutate is None:
        record = [record]
    else:
        mutate(record)
    with pytest.raises(RecordError) as info:
        validate_record(record, ex_id=7)
    assert info.value.field == field
    assert str(info.value).startswith(f"example 7, field '{field}': ")
    assert fragment in str(info.value)


def test_database_dimensions_are_enforced():
    record = make_record(7, n_layers=2, n_heads=2, hidden=8)
    validate_record(record, expected=(2, 2, 8))
    for expected, field, fragment in (((3, 2, 8), "attention", "2 layers, but the database has 3 layers"),
                                      ((2, 4, 8), "attention", "2 heads, but the database has 4 heads"),
                                      ((2, 2, 16), "hidden_states", "hidden size, but the database has 16")):
        with pytest.raises(RecordError) as info:
            validate_record(record, expected=expected)
        assert info.value.field == field and fragment in str(info.value)


def test_text_only_and_image_only_are_valid():
    text_only = validate_record(make_record(1, grid=None, img_coords=None))
    assert text_only.grid is None and text_only.txt_len == text_only.n_tokens
    image_only = validate_record(make_record(2, text_tokens=[], grid=(2, 2), text=""))
    assert image_only.txt_len == 0 and image_only.grid == (2, 2)


def test_normalisation_sorts_patches_row_major_and_permutes_everything():
    raw = make_record(4, text_tokens=["[CLS]", "a", "[SEP]"], grid=(3, 2), shuffle_image=True, image_cls=True,
                      seed=3)
    raw["relevancy"] = np.random.default_rng(0).random((10, 10))
    rec = validate_record(raw)
    assert rec.tokens[:3] == ["[CLS]", "a", "[SEP]"] and rec.tokens[3] == "[CLS]"
    patches = rec.coords[4:]
    assert patches == sorted(patches, key=lambda c: (c[1], c[0]))
    assert rec.grid == (3, 2)
    assert rec.special.tolist() == [True, False, True, True] + [False] * 6
    # every stored position maps back to the input token with the same coordinate
    index = {tok: i for i, tok in enumerate(raw["tokens"]) if tok != "[CLS]"}
    for i, tok in enumerate(rec.tokens):
        src = rec.order[i]
        assert raw["tokens"][src] == tok
        if tok in index:
            assert index[tok] == src
    np.testing.assert_array_equal(rec.attention, raw["attention"][:, :, rec.order][:, :, :, rec.order])
    np.testing.assert_array_equal(rec.hidden_states, raw["hidden_states"][:, rec.order])
    np.testing.assert_array_equal(rec.relevancy, raw["relevancy"][rec.order][:, rec.order].astype(np.float32))
    assert np.allclose(rec.attention.sum(-1), 1, atol=1e-5)  # rows still sum to 1 after the permutation
    for i in range(4, 10):
        x, y = rec.coords[i]
        assert rec.tokens[i] == f"p{x}_{y}"


def test_image_and_optional_fields_are_normalised():
    raw = make_record(5, image=np.full((4, 6, 3), 254.6), accuracy=np.bool_(True),
                      custom_metrics={"mine": np.ones((2, 2), np.float64)},
                      prediction={"answer": "red", "score": np.float32(0.5), "label": None})
    rec = validate_record(raw)
    assert rec.image.dtype == np.uint8 and rec.image.max() == 255
    assert rec.accuracy is True and rec.custom_metrics["mine"].dtype == np.float32
    assert rec.prediction == {"answer": "red", "score": 0.5, "label": None}


def test_grid_field_places_patches_when_the_last_row_is_missing():
    """A model that keeps no patch of the last row (ViLT sampling patches) gives its grid."""
    raw = make_record(2, grid=(3, 3))
    keep = [i for i, c in enumerate(raw["img_coords"]) if c[1] < 2]  # no patch of row 2
    n_text = raw["txt_len"]
    order = list(range(n_text)) + [n_text + i for i in keep]
    raw.update(tokens=[raw["tokens"][i] for i in order], img_coords=[raw["img_coords"][i] for i in keep],
               attention=_renormalised(raw["attention"][:, :, order][:, :, :, order]),
               hidden_states=raw["hidden_states"][:, order])
    assert validate_record(raw).grid == (2, 3)  # guessed from the largest coordinate: wrong
    assert validate_record(dict(raw, grid=(3, 3))).grid == (3, 3)


def _renormalised(attention):
    return attention / attention.sum(-1, keepdims=True)


def test_accuracy_comes_from_prediction_and_label():
    agree = validate_record(make_record(1, prediction={"answer": "Red ", "score": 0.9, "label": "red"}))
    assert agree.accuracy is True and agree.notes == []  # make_record(1) says accuracy=True
    contradicts = validate_record(make_record(0, prediction={"answer": "red", "score": 0.9, "label": "red"}))
    assert contradicts.accuracy is True  # the record said False
    assert "said accuracy=False" in contradicts.notes[0] and "shown as correct" in contradicts.notes[0]
    no_label = validate_record(make_record(0, prediction={"answer": "red", "score": 0.9, "label": None}))
    assert no_label.accuracy is False and no_label.notes == []  # nothing to derive it from
    noted = validate_record(make_record(3, notes=["the text was cut"]))
    assert noted.notes == ["the text was cut"]
