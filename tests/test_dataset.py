"""app.database.dataset: every aggregate over the database checked against an independent computation
(plain loops over db.head_statistics / db.example, numpy and scipy per head, Benjamini–Hochberg by
hand) on small hand-made databases."""
import numpy as np
import pytest
from scipy import stats as sps

from app.database import dataset as ds
from helpers import fast_tsne, make_db, make_record  # noqa: F401 - fast_tsne is an autouse fixture

N_LAYERS, N_HEADS = 3, 4


@pytest.fixture
def db(tmp_path):
    """16 examples: odd ids correct, even ids incorrect, except 5 (unknown); texts, answers and labels
    of their own; example 9 is text-only (its image statistics are NaN); a custom metric."""
    rng = np.random.default_rng(7)
    records = []
    for i in range(16):
        grid = None if i == 9 else (2, 3)
        r = make_record(i, n_text=5, grid=grid, n_layers=N_LAYERS, n_heads=N_HEADS, text=f"question {i} red" if i % 3
                        else f"question {i} BLUE", custom_metrics={"m": rng.normal(size=(N_LAYERS, N_HEADS))},
                        prediction={"answer": "yes" if i % 4 else "no", "score": i / 20,
                                    "label": None if i == 5 else ("yes" if i % 2 else "maybe")})
        r["accuracy"] = None if i == 5 else bool(i % 2)
        records.append(r)
    db, report = make_db(tmp_path / "db", records)
    assert not report.failed
    yield db
    db.close()


def stat_array(db, name):
    return np.stack([db.head_statistics(i)[name] for i in db.example_ids()])  # (N, L, H)


def test_index_holds_every_example_as_stored(db):
    index = ds.load_index(db)
    assert index.ex_ids.tolist() == db.example_ids() and index.stat_names == tuple(db.statistic_names())
    for name in db.statistic_names():
        np.testing.assert_array_equal(index.values[:, index.stat_names.index(name)], stat_array(db, name))
    for pos, ex_id in enumerate(db.example_ids()):
        info = db.example(ex_id)
        assert index.texts[pos] == info.text and index.n_tokens[pos] == info.n_tokens
        assert index.answers[pos] == info.prediction["answer"]
        assert index.labels[pos] == (info.prediction["label"] or "")
        assert index.correct[pos] == (-1 if info.accuracy is None else int(info.accuracy))
        assert index.scores[pos] == pytest.approx(info.prediction["score"])
    assert np.isnan(index.values[9, index.stat_names.index("txt2img")]).all()  # text-only example


def test_cache_reads_once_per_database_version(db, monkeypatch):
    cache = ds.DatasetCache(db)
    loads = []
    real = ds.load_index
    monkeypatch.setattr(ds, "load_index", lambda d: loads.append(1) or real(d))
    first = cache.get()
    assert cache.get() is first and len(loads) == 1
    db.add_record(make_record(40, n_text=5, n_layers=N_LAYERS, n_heads=N_HEADS,
                              custom_metrics={"m": np.zeros((N_LAYERS, N_HEADS))}))
    second = cache.get()
    assert len(loads) == 2 and 40 in second.ex_ids and second.version == db.version()
    assert ds.cache_for(db) is ds.cache_for(db)


def test_layer_mean_column_ignores_nan_heads(db):
    index = ds.load_index(db)
    values = stat_array(db, "txt2txt")
    values[3, 1, 2] = np.nan  # a NaN head inside one layer mean
    index.values[3, index.stat_names.index("txt2txt"), 1, 2] = np.nan
    expected = [np.mean([v for v in values[n, 1] if np.isfinite(v)]) for n in range(len(values))]
    np.testing.assert_allclose(index.column(ds.Column("txt2txt", 1, None)), expected, rtol=1e-6)
    np.testing.assert_array_equal(index.column(ds.Column("m", 2, 3)), stat_array(db, "m")[:, 2, 3])


def test_filters_match_a_loop_over_the_examples(db):
    index = ds.load_index(db)
    column = ds.Column("m", 0, 1)
    values = index.column(column)
    filt = ds.ExampleFilter(text="blue", answer="YES", correctness="correct", low=-0.5, high=2.0)
    expected = []
    for ex_id in db.example_ids():
        info = db.example(ex_id)
        value = db.head_statistics(ex_id)["m"][0, 1]
        answer_or_label = "yes" in info.prediction["answer"].lower() or "yes" in (info.prediction["label"] or "")
        expected.append("blue" in info.text.lower() and answer_or_label and info.accuracy is True
                        and -0.5 <= value <= 2.0)
    assert ds.filter_mask(index, values, filt).tolist() == expected
    assert ds.filter_mask(index, values, ds.ExampleFilter(correctness="unknown")).tolist() == \
        [i == 5 for i in range(16)]
    with pytest.raises(ValueError, match="correctness 'wrong'"):
        ds.filter_mask(index, values, ds.ExampleFilter(correctness="wrong"))


def test_a_nan_value_is_left_out_by_a_range(db):
    index = ds.load_index(db)
    values = index.column(ds.Column("txt2img", 0, 0))
    mask = ds.filter_mask(index, values, ds.ExampleFilter(low=-1.0))
    assert not mask[9] and mask.sum() == 15


def test_filter_row_query_is_parsed_and_applied(db):
    index = ds.load_index(db)
    values = index.column(ds.Column("m", 1, 1))
    conditions = ds.parse_filter_query('{text} icontains "Red" && {score} >= 0.2 && {answer} ne no '
                                       '&& {value} lt 0.3')
    assert conditions == [ds.Condition("text", "contains", "Red"), ds.Condition("score", ">=", "0.2"),
                          ds.Condition("answer", "!=", "no"), ds.Condition("value", "<", "0.3")]
    expected = [("red" in db.example(i).text.lower() and db.example(i).prediction["score"] >= 0.2
                 and db.example(i).prediction["answer"] != "no" and db.head_statistics(i)["m"][1, 1] < 0.3)
                for i in db.example_ids()]
    assert ds.condition_mask(index, values, conditions).tolist() == expected
    case = ds.condition_mask(index, values, ds.parse_filter_query("{text} scontains BLUE"))
    assert case.tolist() == ["BLUE" in db.example(i).text for i in db.example_ids()]
    assert ds.condition_mask(index, values, ds.parse_filter_query("{id} = 3")).tolist() == \
        [i == 3 for i in range(16)]


@pytest.mark.parametrize("query", ["{nope} contains x", "{text} like x", "text contains x", "{score} > high"])
def test_a_filter_row_query_that_is_not_understood_says_which(db, query):
    index = ds.load_index(db)
    with pytest.raises(ds.FilterQueryError, match="filter"):
        ds.condition_mask(index, index.column(ds.Column("m", 0, 0)), ds.parse_filter_query(query))


def test_sorting_by_several_keys_with_missing_values_last(db):
    index = ds.load_index(db)
    values = index.column(ds.Column("txt2img", 0, 0))  # NaN for example 9
    positions = np.arange(16)
    desc = ds.sort_positions(index, values, positions, [{"column_id": "value", "direction": "desc"}])
    finite = [i for i in range(16) if i != 9]
    assert desc.tolist() == sorted(finite, key=lambda i: -values[i]) + [9]
    asc = ds.sort_positions(index, values, positions, [{"column_id": "value", "direction": "asc"}])
    assert asc.tolist() == sorted(finite, key=lambda i: values[i]) + [9]
    two = ds.sort_positions(index, values, positions, [{"column_id": "answer", "direction": "asc"},
                                                       {"column_id": "score", "direction": "desc"}])
    assert two.tolist() == sorted(range(16), key=lambda i: (index.answers[i], -index.scores[i]))
    label = ds.sort_positions(index, values, positions, [{"column_id": "label", "direction": "desc"}])
    assert label[-1] == 5  # the one empty label goes last
    rows = ds.table_rows(index, values, desc[-2:])
    assert rows[1] == {"id": 9, "text": index.texts[9], "answer": "yes", "label": "yes", "correct": "correct",
                       "score": pytest.approx(0.45), "n_tokens": 5, "value": None}


def test_head_spread_matches_numpy(db):
    index = ds.load_index(db)
    positions = np.array([0, 2, 3, 9, 11, 14])
    spread = ds.head_spread(index, "txt2img", positions)
    x = stat_array(db, "txt2img")[positions].astype(np.float64)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS + 1):
            col = x[:, layer, head] if head < N_HEADS else \
                np.array([np.mean(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan for r in x[:, layer]])
            col = col[np.isfinite(col)]
            assert spread.n[layer, head] == len(col) == 5  # example 9 has none
            assert spread.mean[layer, head] == pytest.approx(col.mean(), rel=1e-6)
            assert spread.std[layer, head] == pytest.approx(np.std(col, ddof=1), rel=1e-5)
            assert [spread.q1[layer, head], spread.median[layer, head], spread.q3[layer, head]] == \
                pytest.approx(np.percentile(col, [25, 50, 75]).tolist(), rel=1e-6)


def test_head_spread_of_one_and_of_no_example(db):
    index = ds.load_index(db)
    one = ds.head_spread(index, "m", np.array([4]))
    np.testing.assert_allclose(one.mean[:, :N_HEADS], stat_array(db, "m")[4], rtol=1e-6)
    assert np.isnan(one.std).all() and (one.n == 1).all()
    none = ds.head_spread(index, "m", np.array([], np.int64))
    assert np.isnan(none.mean).all() and (none.n == 0).all()


def benjamini_hochberg(p):
    """q-values by hand: p * m / rank, made monotone from the largest p down, capped at 1."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1)
    return out


def test_contrast_matches_a_test_per_head_and_hand_made_bh(db):
    index = ds.load_index(db)
    ids = db.example_ids()
    correct = [i for i in ids if db.example(i).accuracy is True]
    incorrect = [i for i in ids if db.example(i).accuracy is False]
    result = ds.head_contrast(index, "txt2img", index.positions(correct), index.positions(incorrect))
    p = np.full((N_LAYERS, N_HEADS), np.nan)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            a = [db.head_statistics(i)["txt2img"][layer, head] for i in correct]
            b = [db.head_statistics(i)["txt2img"][layer, head] for i in incorrect]
            a = [float(v) for v in a if np.isfinite(v)]
            b = [float(v) for v in b if np.isfinite(v)]
            # correct: 1, 3, 7, 9, 11, 13, 15 less the text-only 9; incorrect: the 8 even ids
            assert result.n_a[layer, head] == len(a) == 6 and result.n_b[layer, head] == len(b) == 8
            assert result.diff[layer, head] == pytest.approx(np.mean(a) - np.mean(b), rel=1e-5, abs=1e-9)
            p[layer, head] = sps.mannwhitneyu(a, b, alternative="two-sided").pvalue
    np.testing.assert_allclose(result.p, p, rtol=1e-10)
    np.testing.assert_allclose(result.q, benjamini_hochberg(p.ravel()).reshape(p.shape), rtol=1e-10)
    assert (result.significant == (result.q <= 0.05)).all()


def test_a_planted_difference_is_marked_significant(tmp_path):
    """A custom metric that is 1 higher for correct examples in one head only: that head, and no
    other, survives the correction (20 examples a group)."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(40):
        metric = rng.normal(size=(2, 3))
        if i % 2:
            metric[1, 2] += 3.0
        records.append(make_record(i, n_layers=2, n_heads=3, custom_metrics={"m": metric}))
    db, _ = make_db(tmp_path / "db", records)
    index = ds.load_index(db)
    result = ds.head_contrast(index, "m", np.nonzero(index.correct == 1)[0], np.nonzero(index.correct == 0)[0])
    expected = np.zeros((2, 3), bool)
    expected[1, 2] = True
    assert (result.significant == expected).all()
    a = [float(db.head_statistics(i)["m"][1, 2]) for i in range(1, 40, 2)]
    b = [float(db.head_statistics(i)["m"][1, 2]) for i in range(0, 40, 2)]
    assert result.p[1, 2] == pytest.approx(sps.mannwhitneyu(a, b).pvalue, rel=1e-10)
    db.close()


def test_contrast_with_an_empty_group_tests_nothing(db):
    index = ds.load_index(db)
    result = ds.head_contrast(index, "m", np.arange(16), np.array([], np.int64))
    assert np.isnan(result.p).all() and np.isnan(result.q).all() and not result.significant.any()
    assert (result.n_b == 0).all()


def test_ranked_examples_highest_and_lowest(db):
    index = ds.load_index(db)
    column = ds.Column("img2img", 2, 1)
    values = index.column(column)
    positions = index.positions([0, 1, 2, 3, 4, 9, 10, 12])
    high, low = ds.ranked_examples(index, values, positions, 3)
    stored = {i: float(db.head_statistics(i)["img2img"][2, 1]) for i in [0, 1, 2, 3, 4, 10, 12]}  # 9: NaN
    by_value = sorted(stored, key=lambda i: stored[i])
    assert [i for i, _ in high] == by_value[::-1][:3] and [i for i, _ in low] == by_value[:3]
    assert high[0][1] == pytest.approx(stored[high[0][0]])


def test_positions_refuse_an_unknown_id(db):
    index = ds.load_index(db)
    assert index.positions([15, 0]).tolist() == [15, 0]
    with pytest.raises(ValueError, match="example 99"):
        index.positions([1, 99])


def test_a_damaged_example_is_left_out_and_named(db, monkeypatch):
    from app.database.database import CorruptValueError

    real = db.head_statistics

    def damaged(ex_id):
        if ex_id == 3:
            raise CorruptValueError("example 3: head statistics are damaged")
        return real(ex_id)

    monkeypatch.setattr(db, "head_statistics", damaged)
    index = ds.load_index(db)
    assert 3 not in index.ex_ids and len(index) == 15
    assert index.damaged == ((3, "example 3: head statistics are damaged"),)
