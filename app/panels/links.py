"""Links that reopen a view: the page state lives in the URL's query string, so that a copied link
opens the same view in another browser and the browser's back and forward buttons step through views.

``?ex=12&layer=3&head=2&tokens=5,7&side=image&stat=txt2img&z=1&method=rollout&tsne=4&tab=matrix&q=red``
names the example, the selected head (layer and head count from 1, as the page names them; no head:
the layer's mean of heads), the selected tokens (positions in the example), the query side, the head
summary's statistic and z-score, the attention method, the t-SNE layer (0: before layer 1), the open
tab, and the dataset panel's filters (``q``, ``answer``, ``correct``, ``min``, ``max``) and value
column (``vstat``, ``vlayer``, ``vhead``). A part equal to the page's opening view is left out;
``ex`` is always there. Every part read from a URL is checked against the database: one that names
nothing here (an unknown example, a head out of range, a bad token) is ignored, never an error.

Two callbacks: the view's components write the URL (one history entry per view), and a URL the page
does not show (a link opened, back, forward) is restored into the components. A clientside gate
between the URL and the restore keeps a page opened without a query free of any request.
"""
from __future__ import annotations

import math
from typing import Optional
from urllib.parse import parse_qsl, quote

from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import ids
from app.database.records import MAX_EX_ID
from app.panels import dataset, heads, tokens
from app.panels.common import as_index, example_info, head_selection, selected_tokens, token_indices
from app.panels.hidden import TABS

# The components that hold the view, in the order of the restore's outputs: the example first, so
# that tokens.select_tokens, fired by the example and the side together, sees the example's trigger
# and keeps the restored selection (as it does for the nearest-token link).
VIEW = ((ids.EXAMPLE_SELECT, "value"), (ids.SEL_STORE, "data"), (ids.SIDE, "value"), (ids.HEAD_STORE, "data"),
        (ids.HEAD_STAT, "value"), (ids.HEAD_ZSCORE, "value"), (ids.ATT_METHOD, "value"), (ids.TSNE_LAYER, "value"),
        (ids.VIEW_TABS, "value"), (ids.DATASET_TEXT, "value"), (ids.DATASET_ANSWER, "value"),
        (ids.DATASET_CORRECT, "value"), (ids.DATASET_LOW, "value"), (ids.DATASET_HIGH, "value"),
        (ids.DATASET_STAT, "value"), (ids.DATASET_LAYER, "value"), (ids.DATASET_HEAD, "value"))
ZSCORE_ON = ["z"]  # heads.py's z-score checklist, ticked
# A gate in the browser: restore only a search the page does not show already. The Location reports
# the address once the page is open ("" without a query: nothing to restore, no request) and on
# back / forward; the search the app writes itself is the one shown, and is not reported again.
GATE_JS = """function (search, shown) {
    search = search || "";
    return search === (shown || "") ? window.dash_clientside.no_update : search;
}"""
COPY_JS = "function (n_clicks) { return window.location.href; }"
_REFUSED = object()  # a value read from a link or a component that no check accepts


def layout(ctx) -> html.Div:
    """The "copy link" button and the URL's components (no figures: nothing to draw)."""
    return html.Div([
        dcc.Clipboard(id=ids.COPY_LINK, children="Copy link", copied_children="Copied", className="btn",
                      title="copy a link to this view (the example, head, selected tokens, tab and filters)"),
        dcc.Location(id=ids.URL, refresh=False),
        dcc.Store(id=ids.LINK_SHOWN, data=""), dcc.Store(id=ids.LINK_REQUEST),
    ], className="link-bar")


# ----------------------------------------------------------------------------- the state

def default_state(db) -> dict:
    """The view the page opens on (see the panels' layouts), the state of an empty query."""
    ex_ids, stats = db.example_ids(), db.statistic_names()
    stat = stats[0] if stats else None
    column = dataset.default_column(db, stat)
    return {"ex": ex_ids[0] if ex_ids else None, "tokens": [], "side": tokens.SIDES[0],
            "head": heads.default_head(db), "stat": stat, "z": False, "method": tokens.DEFAULT_METHOD,
            "tsne": db.n_layers or 0, "tab": TABS[0], "text": "", "answer": "", "correct": "", "low": None,
            "high": None, "value_stat": stat,
            "value_head": None if column is None else {"layer": column.layer, "head": column.head}}


def checked_state(db, raw: dict, fallback: Optional[dict] = None) -> dict:
    """The state of ``raw`` (typed values, keyed as default_state), every value checked against the
    database with the checks the callbacks apply. Without ``fallback`` a refused value refuses the
    update (PreventUpdate); with it, a refused or missing value is replaced by the fallback's, and the
    tokens are kept only with the example they were given with."""
    def part(key, check):
        if key in raw:
            try:
                return check(raw[key])
            except PreventUpdate:
                if fallback is None:
                    raise
        if fallback is None:
            raise PreventUpdate
        return fallback[key]

    ex = part("ex", lambda v: _example(db, v))
    n_tokens = db.example(ex).n_tokens
    statistics = db.statistic_names()
    correctness = [o["value"] for o in dataset.CORRECT_OPTIONS]
    return {
        "ex": ex,
        "tokens": part("tokens", lambda v: token_indices(v, n_tokens)) if raw.get("ex") == ex else [],
        "side": part("side", lambda v: _among(v, tokens.SIDES)),
        "head": part("head", lambda v: head_selection(db, v)),
        "stat": part("stat", lambda v: _among(v, statistics)),
        "z": part("z", _flag),
        "method": part("method", tokens.attention_method),
        "tsne": part("tsne", lambda v: as_index(v, db.n_layers + 1)),
        "tab": part("tab", lambda v: _among(v, TABS)),
        "text": part("text", _text),
        "answer": part("answer", _text),
        "correct": part("correct", lambda v: _among(v, correctness)),
        "low": part("low", _bound),
        "high": part("high", _bound),
        "value_stat": part("value_stat", lambda v: _among(v, statistics)),
        "value_head": part("value_head", lambda v: head_selection(db, v)),
    }


def view_state(db, values) -> dict:
    """The state of the view shown, from the VIEW components' values (in VIEW's order); PreventUpdate
    for a value that no page holds."""
    ex, sel, side, head, stat, zscore, method, tsne, tab, text, answer, correct, low, high, \
        value_stat, value_layer, value_head = values
    ex = _example(db, ex)
    return checked_state(db, {
        "ex": ex, "tokens": selected_tokens(sel, ex, db.example(ex).n_tokens), "side": side, "head": head,
        "stat": stat, "z": _ticked(zscore), "method": method, "tsne": tsne, "tab": tab,
        "text": "" if text is None else text, "answer": "" if answer is None else answer, "correct": correct,
        "low": None if low == "" else low, "high": None if high == "" else high, "value_stat": value_stat,
        "value_head": {"layer": value_layer, "head": None if value_head == dataset.MEAN else value_head}})


def component_values(state: dict) -> list:
    """The VIEW components' values (in VIEW's order) that show ``state``; view_state's inverse. An
    empty text filter is None, as the dataset panel's boxes start."""
    column = state["value_head"]
    return [state["ex"], {"ex": state["ex"], "tokens": state["tokens"]}, state["side"], state["head"],
            state["stat"], ZSCORE_ON if state["z"] else [], state["method"], state["tsne"], state["tab"],
            state["text"] or None, state["answer"] or None, state["correct"], state["low"], state["high"],
            state["value_stat"], column["layer"], dataset.MEAN if column["head"] is None else column["head"]]


def changed_values(values: list, shown: list) -> list:
    """The restore's VIEW outputs: the example always (its views are redrawn, and the tokens panel then
    keeps the restored selection), any other value only where the page shows another (an unchanged
    filter would send the dataset table back to its first page)."""
    return [values[0]] + [no_update if value == current else value for value, current in zip(values[1:], shown[1:])]


# ----------------------------------------------------------------------------- the query string

def _integer(text: str):
    """A non-negative integer written in ASCII digits; _REFUSED for any other text."""
    return int(text) if text.isascii() and text.isdigit() else _REFUSED


def _from_one(text: str):
    """A 0-based index from its 1-based text (the page numbers layers and heads from 1)."""
    value = _integer(text)
    return _REFUSED if value is _REFUSED else value - 1


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return _REFUSED


def _number_text(value: float) -> str:
    """"0.5", "2" (not "2.0"), "1e+300": the shortest text that reads back as the same float."""
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _simple(key: str, name: str, text, parse) -> tuple:
    """A part written as one parameter: (key, its parameters, its value read from the parameters)."""
    return (key, lambda value: [(name, text(value))],
            lambda params: parse(params[name]) if name in params else _REFUSED)


MEAN_OF_HEADS = "mean"  # a head parameter's value for the layer's mean (as no head parameter)


def _head(key: str, layer_name: str, head_name: str) -> tuple:
    """A head selection written as its layer and head, from 1; no head: the layer's mean of heads."""
    def write(sel):
        return [(layer_name, str(sel["layer"] + 1))] + \
            ([] if sel["head"] is None else [(head_name, str(sel["head"] + 1))])

    def read(params):
        if layer_name not in params and head_name not in params:
            return _REFUSED
        head = params.get(head_name, MEAN_OF_HEADS)
        return {"layer": _from_one(params.get(layer_name, "")),
                "head": None if head == MEAN_OF_HEADS else _from_one(head)}
    return key, write, read


# The parts of the query string, in the order they are written. A text that does not parse reads
# as _REFUSED, which checked_state replaces by the opening view's value.
PARTS = (
    _simple("ex", "ex", str, _integer),
    _head("head", "layer", "head"),
    _simple("tokens", "tokens", lambda v: ",".join(str(t) for t in v), lambda s: [_integer(t) for t in s.split(",")]),
    _simple("side", "side", str, str),
    _simple("stat", "stat", str, str),
    _simple("z", "z", lambda v: "1" if v else "0", lambda s: {"1": True, "0": False}.get(s, _REFUSED)),
    _simple("method", "method", str, str),
    _simple("tsne", "tsne", str, _integer),
    _simple("tab", "tab", str, str),
    _simple("text", "q", str, str),
    _simple("answer", "answer", str, str),
    _simple("correct", "correct", str, str),
    _simple("low", "min", _number_text, _number),
    _simple("high", "max", _number_text, _number),
    _simple("value_stat", "vstat", str, str),
    _head("value_head", "vlayer", "vhead"),
)


def state_to_search(state: dict, db) -> str:
    """The query string of a checked state, "?ex=…&…": the example, then the parts that differ from
    the page's opening view."""
    default = default_state(db)
    params = [param for key, write, _ in PARTS if key == "ex" or state[key] != default[key]
              for param in write(state[key])]
    return "?" + "&".join(f"{name}={quote(text, safe=',')}" for name, text in params)


def search_to_state(search, db) -> dict:
    """The state a query string names, every part checked (see checked_state): a part that names
    nothing in this database is the opening view's, and so is all of a search that is no string.
    The first of repeated parameters counts."""
    default = default_state(db)
    if default["ex"] is None:  # an empty database: the one view there is
        return default
    params: dict[str, str] = {}
    text = search if isinstance(search, str) else ""
    for name, value in parse_qsl(text.removeprefix("?"), keep_blank_values=True):
        params.setdefault(name, value)
    return checked_state(db, {key: read(params) for key, _, read in PARTS}, default)


# ----------------------------------------------------------------------------- checks (PreventUpdate)

def _example(db, value) -> int:
    """A stored example's id (bounded first: a long number is no key the database can look up)."""
    return example_info(db, as_index(value, MAX_EX_ID + 1)).ex_id


def _ticked(value):
    """The z-score checklist's value as a flag; _REFUSED for a value the checklist never holds."""
    if value == ZSCORE_ON:
        return True
    return False if value == [] else _REFUSED


def _among(value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PreventUpdate
    return value


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise PreventUpdate
    return value


def _text(value) -> str:
    if not isinstance(value, str):
        raise PreventUpdate
    return value


def _bound(value) -> Optional[float]:
    """A filter bound: None (no bound) or a finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreventUpdate
    return float(value)


# ----------------------------------------------------------------------------- callbacks

def register_callbacks(app, ctx):
    db = ctx.db

    @app.callback(Output(ids.URL, "search"), Output(ids.LINK_SHOWN, "data"),
                  *[Input(cid, prop) for cid, prop in VIEW], Input(ids.PLAY_INTERVAL, "disabled"),
                  State(ids.URL, "search"), prevent_initial_call=True)
    def write_link(*args):
        """A new view: its search written to the URL, which adds a history entry. Nothing while Play
        steps through the tokens (one entry when it stops), nor for the view the URL names already
        (one just restored from it, or opened from a link written otherwise, e.g. in another order)."""
        *values, play_stopped, search = args
        if play_stopped is False:
            raise PreventUpdate
        state = view_state(db, values)
        if state == search_to_state(search, db):
            raise PreventUpdate
        written = state_to_search(state, db)
        return written, written

    app.clientside_callback(GATE_JS, Output(ids.LINK_REQUEST, "data"), Input(ids.URL, "search"),
                            State(ids.LINK_SHOWN, "data"), prevent_initial_call=True)

    @app.callback(*[Output(cid, prop, allow_duplicate=True) for cid, prop in VIEW],
                  Output(ids.PLAY_INTERVAL, "disabled", allow_duplicate=True),
                  Output(ids.PLAY, "children", allow_duplicate=True),
                  Output(ids.LINK_SHOWN, "data", allow_duplicate=True),
                  Input(ids.LINK_REQUEST, "data"), *[State(cid, prop) for cid, prop in VIEW],
                  State(ids.PLAY_INTERVAL, "disabled"), prevent_initial_call=True)
    def restore_link(search, *shown):
        """The view a search names, set in its components at once (the example with its tokens);
        Play stops, so that it does not step away from the restored view."""
        *shown_view, play_stopped = shown
        state = search_to_state(search, db)
        if state["ex"] is None:
            raise PreventUpdate
        stop = (True, tokens.play_label(False)) if play_stopped is False else (no_update, no_update)
        shown_search = search if isinstance(search, str) else ""
        return *changed_values(component_values(state), shown_view), *stop, shown_search

    app.clientside_callback(COPY_JS, Output(ids.COPY_LINK, "content"), Input(ids.COPY_LINK, "n_clicks"),
                            prevent_initial_call=True)
