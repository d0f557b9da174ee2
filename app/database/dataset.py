"""The whole database at a glance: every example's head statistics in one array, and the filters,
table rows, per-head aggregates, contrasts and rankings computed from it.

Reading one example's statistics is an LMDB read; a view over 2 000 examples would cost 2 000 reads
per click. So :class:`DatasetCache` reads every example once per database version
(``VliLmdb.version()`` changes with every write) into a :class:`DatasetIndex`, whose ``values`` is a
``(N, S, L, H)`` float32 array (2 000 x 10 x 12 x 12 is 11 MB): filters and views then cost numpy.

No Dash here: the panel (app/panels/dataset.py) calls these pure functions and draws their results.
"""
from __future__ import annotations

import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as sps

from app.database.checksum import CorruptValueError

__all__ = ["Column", "DatasetIndex", "DatasetCache", "cache_for", "load_index", "ExampleFilter",
           "FilterQueryError", "Condition", "parse_filter_query", "filter_mask", "sort_positions",
           "table_rows", "HeadSpread", "head_spread", "HeadContrast", "head_contrast", "ranked_examples",
           "TABLE_COLUMNS", "CORRECTNESS"]

#: The table's columns: (id, title). "value" is the chosen statistic of the chosen head or layer mean.
TABLE_COLUMNS = (("id", "id"), ("text", "text"), ("answer", "prediction"), ("label", "label"),
                 ("correct", "correct"), ("score", "score"), ("n_tokens", "tokens"), ("value", "value"))
NUMERIC_COLUMNS = ("id", "score", "n_tokens", "value")
#: What the correctness code of an example (DatasetIndex.correct) is called in the table and filters.
CORRECTNESS = {1: "correct", 0: "incorrect", -1: "unknown"}


@dataclass(frozen=True)
class Column:
    """One number per example: statistic ``stat`` of ``layer`` (0-based) and ``head`` (0-based, or
    None for the mean over the layer's heads)."""

    stat: str
    layer: int
    head: Optional[int] = None


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (it holds arrays)
class DatasetIndex:
    """Everything the dataset views read, for one database version, in example-id order."""

    version: int
    ex_ids: np.ndarray            # (N,) int64, sorted
    stat_names: tuple[str, ...]   # the S statistics of ``values``, in db.statistic_names() order
    values: np.ndarray            # (N, S, L, H) float32, NaN where undefined
    texts: tuple[str, ...]        # the input text (or the non-special text tokens joined)
    answers: tuple[str, ...]      # the prediction's answer, "" without one
    labels: tuple[str, ...]       # the prediction's label, "" without one
    scores: np.ndarray            # (N,) float64, NaN without a score
    correct: np.ndarray           # (N,) int8: 1 correct, 0 incorrect, -1 unknown
    n_tokens: np.ndarray          # (N,) int32
    damaged: tuple[tuple[int, str], ...] = ()  # (ex_id, message) of examples left out: a damaged value

    def __len__(self) -> int:
        return len(self.ex_ids)

    def positions(self, ex_ids: Sequence[int]) -> np.ndarray:
        """The rows of these example ids (ValueError naming the first id that is not stored)."""
        ids = np.asarray(list(ex_ids), dtype=np.int64)
        pos = np.searchsorted(self.ex_ids, ids)
        bad = (pos >= len(self.ex_ids)) | (self.ex_ids[np.minimum(pos, len(self.ex_ids) - 1)] != ids) \
            if len(self.ex_ids) else np.ones(len(ids), bool)
        if bad.any():
            raise ValueError(f"example {int(ids[np.argmax(bad)])}: not in the database")
        return pos

    def column(self, column: Column) -> np.ndarray:
        """(N,) float32: the column's value for every example (a layer mean ignores NaN heads)."""
        s = self.stat_names.index(column.stat)
        if column.head is not None:
            return self.values[:, s, column.layer, column.head]
        return _layer_means(self.values[:, s, column.layer:column.layer + 1, :])[:, 0]


def _layer_means(x: np.ndarray) -> np.ndarray:
    """(N, L, H) -> (N, L): mean over heads, ignoring NaN; NaN when a layer has no finite head."""
    finite = np.isfinite(x)
    counts = finite.sum(axis=-1)
    sums = np.where(finite, x, 0.0).sum(axis=-1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


def load_index(db) -> DatasetIndex:
    """Read every example's description and head statistics (one pass over the database). An example
    with a damaged stored value is left out and listed in ``damaged`` (the rest stays usable)."""
    version = db.version()  # read first: a write during the pass leaves the index stale, not wrong
    names = tuple(db.statistic_names())
    n_layers, n_heads = db.n_layers or 0, db.n_heads or 0
    ex_ids, damaged, values = [], [], []
    texts, answers, labels, scores, correct, n_tokens = [], [], [], [], [], []
    for ex_id in db.example_ids():  # one example at a time: its description is dropped once read
        try:
            info, statistics = db.example(ex_id), db.head_statistics(ex_id)
        except CorruptValueError as error:
            damaged.append((ex_id, str(error)))
            continue
        ex_ids.append(ex_id)
        values.append(np.stack([statistics[name] for name in names]).astype(np.float32) if names else
                      np.empty((0, n_layers, n_heads), np.float32))
        words = [t for t, text, sp in zip(info.tokens, info.is_text, info.special) if text and not sp]
        texts.append(info.text if info.text else " ".join(words))
        prediction = info.prediction or {}
        answers.append("" if prediction.get("answer") is None else str(prediction["answer"]))
        labels.append("" if prediction.get("label") is None else str(prediction["label"]))
        scores.append(np.nan if prediction.get("score") is None else float(prediction["score"]))
        correct.append(-1 if info.accuracy is None else int(bool(info.accuracy)))
        n_tokens.append(info.n_tokens)
    stacked = np.stack(values) if values else np.empty((0, len(names), n_layers, n_heads), np.float32)
    return DatasetIndex(version=version, ex_ids=np.asarray(ex_ids, np.int64), stat_names=names, values=stacked,
                        texts=tuple(texts), answers=tuple(answers), labels=tuple(labels),
                        scores=np.asarray(scores, np.float64), correct=np.asarray(correct, np.int8),
                        n_tokens=np.asarray(n_tokens, np.int32), damaged=tuple(damaged))


class DatasetCache:
    """The DatasetIndex of a database, rebuilt only when ``db.version()`` has changed (thread-safe:
    one build at a time; readers of the previous index keep using it meanwhile)."""

    def __init__(self, db):
        self._db = db
        self._index: Optional[DatasetIndex] = None
        self._lock = threading.Lock()

    def get(self) -> DatasetIndex:
        index = self._index
        if index is not None and index.version == self._db.version():
            return index
        with self._lock:
            if self._index is None or self._index.version != self._db.version():
                self._index = load_index(self._db)
            return self._index


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def cache_for(db) -> DatasetCache:
    """The one DatasetCache of an open database (shared by the page layout and its callbacks)."""
    with _CACHES_LOCK:
        if db not in _CACHES:
            _CACHES[db] = DatasetCache(db)
        return _CACHES[db]


# ----------------------------------------------------------------------------- filters

@dataclass(frozen=True)
class ExampleFilter:
    """The panel's filters; an empty field does not filter.

    text: a substring of the text (case-insensitive). answer: a substring of the prediction's answer
    or of its label (case-insensitive). correctness: "correct", "incorrect", "unknown" or "" (all).
    low, high: the range (inclusive) of the table's value column; an example whose value is NaN is
    left out as soon as a bound is set.
    """

    text: str = ""
    answer: str = ""
    correctness: str = ""
    low: Optional[float] = None
    high: Optional[float] = None


def filter_mask(index: DatasetIndex, column_values: np.ndarray, filt: ExampleFilter) -> np.ndarray:
    """(N,) bool: the examples that pass every filter of ``filt``."""
    mask = np.ones(len(index), bool)
    if filt.text:
        needle = filt.text.casefold()
        mask &= np.fromiter((needle in t.casefold() for t in index.texts), bool, len(index))
    if filt.answer:
        needle = filt.answer.casefold()
        mask &= np.fromiter((needle in a.casefold() or needle in b.casefold()
                             for a, b in zip(index.answers, index.labels)), bool, len(index))
    if filt.correctness:
        codes = {v: k for k, v in CORRECTNESS.items()}
        if filt.correctness not in codes:
            raise ValueError(f"correctness {filt.correctness!r}: expected one of {', '.join(codes)}")
        mask &= index.correct == codes[filt.correctness]
    with np.errstate(invalid="ignore"):
        if filt.low is not None:
            mask &= column_values >= filt.low
        if filt.high is not None:
            mask &= column_values <= filt.high
    return mask


class FilterQueryError(ValueError):
    """A part of the table's filter row that is not understood (the message quotes it)."""


@dataclass(frozen=True)
class Condition:
    """One part of a DataTable filter query: ``{column} operator value``."""

    column: str
    operator: str  # "contains", "=", "!=", "<", "<=", ">", ">="
    value: str
    case_sensitive: bool = False


_OPERATORS = {"contains": "contains", "=": "=", "eq": "=", "!=": "!=", "ne": "!=", "<": "<", "lt": "<",
              "<=": "<=", "le": "<=", ">": ">", "gt": ">", ">=": ">=", "ge": ">="}
_CONDITION = re.compile(r"^\{(?P<column>[^{}]+)\}\s+(?P<case>[is]?)(?P<op>contains|eq|ne|lt|le|gt|ge|<=|>=|!=|=|<|>)"
                        r"\s+(?P<value>.+)$", re.S)


def parse_filter_query(query: str) -> list[Condition]:
    """The conditions of the table's ``filter_query`` ("{text} icontains red && {score} > 0.5", as the
    filter row writes it; the parts are joined by "&&"). FilterQueryError for anything else."""
    if not isinstance(query, str):
        raise FilterQueryError("the filter query is not text")
    columns = dict(TABLE_COLUMNS)
    out = []
    for part in query.split("&&"):
        part = part.strip()
        if not part:
            continue
        match = _CONDITION.match(part)
        if match is None or match["column"] not in columns:
            raise FilterQueryError(f"filter {part!r}: not understood (use e.g. “red”, “> 0.5”, “!= yes”)")
        value = match["value"].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
            value = value[1:-1]
        out.append(Condition(match["column"], _OPERATORS[match["op"]], value, match["case"] == "s"))
    return out


def _column_array(index: DatasetIndex, column_values: np.ndarray, name: str) -> np.ndarray:
    """The table column ``name`` as an array (strings as an object array)."""
    if name == "id":
        return index.ex_ids.astype(np.float64)
    if name == "score":
        return index.scores
    if name == "n_tokens":
        return index.n_tokens.astype(np.float64)
    if name == "value":
        return column_values.astype(np.float64)
    if name == "correct":
        return np.array([CORRECTNESS[int(c)] for c in index.correct], dtype=object)
    return np.array({"text": index.texts, "answer": index.answers, "label": index.labels}[name], dtype=object)


def condition_mask(index: DatasetIndex, column_values: np.ndarray, conditions: Sequence[Condition]) -> np.ndarray:
    """(N,) bool: the examples that meet every condition. On a number column "contains" and the
    comparisons read the value as a number (FilterQueryError when it is not one); on a text column the
    comparisons are between strings, case-insensitive unless the condition says otherwise."""
    mask = np.ones(len(index), bool)
    for cond in conditions:
        data = _column_array(index, column_values, cond.column)
        if cond.column in NUMERIC_COLUMNS:
            try:
                number = float(cond.value)
            except ValueError:
                raise FilterQueryError(f"filter of column {cond.column!r}: {cond.value!r} is not a number") from None
            op = "=" if cond.operator == "contains" else cond.operator
            with np.errstate(invalid="ignore"):
                mask &= {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
                         ">": np.greater, ">=": np.greater_equal}[op](data, number)
            continue
        fold = (lambda s: s) if cond.case_sensitive else str.casefold
        needle = fold(cond.value)
        test = {"contains": lambda s: needle in s, "=": lambda s: s == needle, "!=": lambda s: s != needle,
                "<": lambda s: s < needle, "<=": lambda s: s <= needle, ">": lambda s: s > needle,
                ">=": lambda s: s >= needle}[cond.operator]
        mask &= np.fromiter((test(fold(s)) for s in data), bool, len(index))
    return mask


def sort_positions(index: DatasetIndex, column_values: np.ndarray, positions: np.ndarray,
                   sort_by: Sequence[dict]) -> np.ndarray:
    """``positions`` ordered by the table's ``sort_by`` ([{"column_id", "direction": "asc"|"desc"}],
    first key first); ties keep id order, and NaN or empty values go last in either direction."""
    order = np.asarray(positions, np.int64)
    for key in reversed(list(sort_by)):  # a stable sort per key, last key first
        data = _column_array(index, column_values, key["column_id"])[order]
        descending = key["direction"] == "desc"
        if data.dtype == object:
            missing = np.array([s == "" for s in data], bool)
            ranks = np.unique(data.astype(str), return_inverse=True)[1].astype(np.float64)
        else:
            missing = ~np.isfinite(data)
            ranks = np.where(missing, 0.0, data)
        ranks = -ranks if descending else ranks
        order = order[np.lexsort((ranks, missing))]
    return order


def _cell(value):
    """A table cell: None for NaN (the table shows it empty), floats rounded for display."""
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else round(float(value), 4)
    return value


def table_rows(index: DatasetIndex, column_values: np.ndarray, positions: np.ndarray,
               rounded: bool = True) -> list[dict]:
    """The table's rows ({"id": ex_id, column: value, ...}) of these examples, in this order; numbers as
    the table shows them, or in full (``rounded`` False: for a download)."""
    cell = _cell if rounded else float
    return [{"id": int(index.ex_ids[p]), "text": index.texts[p], "answer": index.answers[p],
             "label": index.labels[p], "correct": CORRECTNESS[int(index.correct[p])],
             "score": cell(index.scores[p]), "n_tokens": int(index.n_tokens[p]),
             "value": cell(column_values[p])} for p in positions]


# ----------------------------------------------------------------------------- per-head aggregates

@dataclass(frozen=True, eq=False)
class HeadSpread:
    """A statistic over a set of examples, per layer and head; column H is the layer mean (each
    example's mean over its heads, then aggregated like a head). All (L, H + 1); NaN where n < 1
    (std: n < 2). std is the sample standard deviation (ddof=1)."""

    mean: np.ndarray
    std: np.ndarray
    q1: np.ndarray
    median: np.ndarray
    q3: np.ndarray
    n: np.ndarray  # int: the examples with a finite value


def _with_layer_means(x: np.ndarray) -> np.ndarray:
    """(n, L, H) -> (n, L, H + 1): each example's layer mean appended as a last head."""
    return np.concatenate([x, _layer_means(x)[..., None]], axis=-1)


def head_spread(index: DatasetIndex, stat: str, positions: np.ndarray) -> HeadSpread:
    """Mean, spread and count of statistic ``stat`` over the examples at ``positions``."""
    x = _with_layer_means(index.values[np.asarray(positions, np.int64), index.stat_names.index(stat)])
    x = x.astype(np.float64)
    n = np.isfinite(x).sum(axis=0)
    shape = x.shape[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: NaN is the answer
        mean = np.nanmean(x, axis=0) if len(x) else np.full(shape, np.nan)
        std = np.where(n >= 2, np.nanstd(x, axis=0, ddof=1), np.nan) if len(x) else np.full(shape, np.nan)
        quartiles = np.nanpercentile(x, [25, 50, 75], axis=0) if len(x) else np.full((3,) + shape, np.nan)
    return HeadSpread(mean=mean, std=std, q1=quartiles[0], median=quartiles[1], q3=quartiles[2], n=n)


@dataclass(frozen=True, eq=False)
class HeadContrast:
    """Group A against group B, per head (all (L, H)): difference of means (A - B), the two-sided
    Mann–Whitney U p-value of each head, its Benjamini–Hochberg q-value over all tested heads, and
    whether q <= alpha. A head with no finite value in a group is not tested (p, q NaN)."""

    diff: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    n_a: np.ndarray
    n_b: np.ndarray
    p: np.ndarray
    q: np.ndarray
    significant: np.ndarray
    alpha: float


def head_contrast(index: DatasetIndex, stat: str, positions_a: np.ndarray, positions_b: np.ndarray,
                  alpha: float = 0.05) -> HeadContrast:
    """Contrast of statistic ``stat`` between the examples at ``positions_a`` and ``positions_b``."""
    s = index.stat_names.index(stat)
    a = index.values[np.asarray(positions_a, np.int64), s].astype(np.float64)
    b = index.values[np.asarray(positions_b, np.int64), s].astype(np.float64)
    shape = index.values.shape[2:]
    fa, fb = np.isfinite(a), np.isfinite(b)
    n_a, n_b = fa.sum(axis=0), fb.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = np.where(n_a > 0, np.where(fa, a, 0).sum(axis=0) / np.maximum(n_a, 1), np.nan)
        mean_b = np.where(n_b > 0, np.where(fb, b, 0).sum(axis=0) / np.maximum(n_b, 1), np.nan)
    p = np.full(shape, np.nan)
    testable = (n_a > 0) & (n_b > 0)
    if fa.all() and fb.all() and testable.all():  # no NaN anywhere: one vectorised test for every head
        p = sps.mannwhitneyu(a.reshape(len(a), -1), b.reshape(len(b), -1), axis=0,
                             alternative="two-sided").pvalue.reshape(shape)
    else:
        for layer, head in zip(*np.nonzero(testable)):
            col_a, col_b = a[:, layer, head], b[:, layer, head]
            p[layer, head] = sps.mannwhitneyu(col_a[fa[:, layer, head]], col_b[fb[:, layer, head]],
                                              alternative="two-sided").pvalue
    q = np.full(shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        q[tested] = sps.false_discovery_control(p[tested], method="bh")
    with np.errstate(invalid="ignore"):
        significant = q <= alpha
    return HeadContrast(diff=mean_a - mean_b, mean_a=mean_a, mean_b=mean_b, n_a=n_a, n_b=n_b, p=p, q=q,
                        significant=significant, alpha=alpha)


def ranked_examples(index: DatasetIndex, column_values: np.ndarray, positions: np.ndarray,
                    k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``k`` examples (of ``positions``) with the highest and the ``k`` with the lowest finite
    value of the column, as (ex_id, value), highest first and lowest first; ties by id."""
    pos = np.asarray(positions, np.int64)
    pos = pos[np.isfinite(column_values[pos])]
    vals = column_values[pos].astype(np.float64)
    ids = index.ex_ids[pos]
    high = np.lexsort((ids, -vals))[:k]
    low = np.lexsort((ids, vals))[:k]
    return ([(int(ids[i]), float(vals[i])) for i in high], [(int(ids[i]), float(vals[i])) for i in low])
