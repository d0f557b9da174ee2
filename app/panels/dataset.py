"""The whole database at a glance: a table of examples to search, sort and page through (server-side,
so that thousands of rows stay fast), and per-head views of a statistic over the filtered examples
(mean with its spread, or a contrast of two groups with a test per head); a click on a head ranks the
examples by it. Every number comes from app.database.dataset's in-memory index (one read of the
database per version)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from dash import ALL, Input, Output, Patch, State, ctx as dctx, dash_table, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import export, figures, ids
from app.database import dataset as ds
from app.panels.common import as_index, example_info, first_point, head_label, head_selection, panel
from app.panels.heads import statistic_label, statistic_options

PAGE_SIZE = 10
RANKED = 5  # examples listed at each end of the drill-down
ALPHA = 0.05  # the false discovery rate at which contrast heads are marked
TEXT_CHARS = 80  # a ranked example's text is cut to this in the drill-down list
CORRECT_OPTIONS = [{"label": "all", "value": ""}] + [{"label": v, "value": v} for v in ds.CORRECTNESS.values()]
VIEW_OPTIONS = [{"label": " mean over the filtered examples", "value": "mean"},
                {"label": " contrast", "value": "contrast"}]
CONTRAST_OPTIONS = [{"label": "correct − incorrect (of the filtered)", "value": "correct"},
                    {"label": "filtered − the other examples", "value": "rest"}]
MEAN = "mean"  # the head picker's value for the layer mean


@dataclass(frozen=True)
class TableState:
    """What the table shows: the filters, the value column, the filter row, the sorting and the page."""

    filt: ds.ExampleFilter
    column: ds.Column
    query: str = ""
    sort_by: tuple = ()
    page: int = 0


# ----------------------------------------------------------------------------- views (no Dash state)

def table_view(index: ds.DatasetIndex, state: TableState) -> dict:
    """The table's rows of the current page, the page count and page shown, the filtered ids (in the
    table's order) and the status line. FilterQueryError/ValueError when a filter is not understood."""
    values = index.column(state.column)
    mask = ds.filter_mask(index, values, state.filt) & \
        ds.condition_mask(index, values, ds.parse_filter_query(state.query))
    order = ds.sort_positions(index, values, np.nonzero(mask)[0], state.sort_by)
    pages = max(1, math.ceil(len(order) / PAGE_SIZE))
    page = min(state.page, pages - 1)
    shown = order[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    status = f"{len(order)} of {len(index)} examples"
    if index.damaged:
        status += "; left out, damaged: " + "; ".join(message for _, message in index.damaged)
    return {"rows": ds.table_rows(index, values, shown), "pages": pages, "page": page,
            "filtered": [int(i) for i in index.ex_ids[order]], "status": status}


def table_columns(column: ds.Column) -> list[dict]:
    """The DataTable's columns; the value column is titled with what it holds."""
    titles = dict(ds.TABLE_COLUMNS)
    titles["value"] = f"{statistic_label(column.stat)}, {head_label({'layer': column.layer, 'head': column.head})}"
    return [{"name": titles[c], "id": c, "type": "numeric" if c in ds.NUMERIC_COLUMNS else "text"}
            for c, _ in ds.TABLE_COLUMNS]


def view_numbers(index: ds.DatasetIndex, filtered: list, stat: str, view: str, contrast: str) -> tuple:
    """What the dataset heatmap shows, computed once for the figure and for its CSV: ("mean", the
    HeadSpread, the number of examples) or ("contrast", the HeadContrast, positions A, positions B,
    label A, label B)."""
    positions = index.positions(filtered)
    if view == "mean":
        return "mean", ds.head_spread(index, stat, positions), len(positions)
    pos_a, pos_b, label_a, label_b = contrast_groups(index, positions, contrast)
    return "contrast", ds.head_contrast(index, stat, pos_a, pos_b, alpha=ALPHA), pos_a, pos_b, label_a, label_b


def view_csv(index: ds.DatasetIndex, filtered: list, stat: str, view: str, contrast: str, n_heads: int) -> str:
    """The dataset heatmap's numbers, one row per layer and head (and layer mean, for the mean view)."""
    kind, result, *rest = view_numbers(index, filtered, stat, view, contrast)
    name = statistic_label(stat)
    if kind == "mean":
        return export.head_grid_csv(f"{name} over {rest[0]} filtered examples: mean, sample std, quartiles, n",
                                    {"mean": result.mean, "std": result.std, "q1": result.q1,
                                     "median": result.median, "q3": result.q3, "n": result.n}, n_heads)
    pos_a, pos_b, label_a, label_b = rest
    return export.head_grid_csv(
        f"{name}: {label_a} ({len(pos_a)} examples) - {label_b} ({len(pos_b)}); two-sided Mann-Whitney U p, "
        f"Benjamini-Hochberg q, significant at q <= {result.alpha}",
        {f"mean {label_a}": result.mean_a, f"mean {label_b}": result.mean_b, "difference": result.diff,
         f"n {label_a}": result.n_a, f"n {label_b}": result.n_b, "p": result.p, "q": result.q,
         "significant": result.significant}, n_heads)


def dataset_view(index: ds.DatasetIndex, filtered: list, stat: str, view: str, contrast: str,
                 focus: Optional[dict]) -> tuple:
    """The heatmap (mean over the filtered examples, or the contrast) and its help line."""
    name = statistic_label(stat)
    kind, result, *rest = view_numbers(index, filtered, stat, view, contrast)
    if kind == "mean":
        spread = result
        selected = (focus["layer"], focus["head"]) if focus else None
        fig = figures.dataset_heads_figure(spread.mean, spread.std, spread.q1, spread.median, spread.q3, spread.n,
                                           name, selected=selected)
        return fig, (f"Mean of {name} over the {rest[0]} filtered examples (hover: std, quartiles, n); "
                     f"click a head or a layer mean to rank the examples by it.")
    pos_a, pos_b, label_a, label_b = rest
    selected = (focus["layer"], focus["head"]) if focus and focus["head"] is not None else None
    fig = figures.contrast_figure(result.diff, result.mean_a, result.mean_b, result.n_a, result.n_b, result.p,
                                  result.q, result.significant, name, label_a, label_b, selected=selected)
    n_heads = result.diff.size
    help_text = (f"{name}: mean of {label_a} ({len(pos_a)} examples) − mean of {label_b} ({len(pos_b)}), per "
                 f"head; ★ {int(result.significant.sum())} of {n_heads} heads differ (Mann–Whitney U, two-sided, "
                 f"Benjamini–Hochberg q ≤ {ALPHA} over the {int(np.isfinite(result.p).sum())} heads tested).")
    if not len(pos_a) or not len(pos_b):
        help_text = f"No contrast: there are no {label_a if not len(pos_a) else label_b} examples. " + help_text
    return fig, help_text


def contrast_groups(index: ds.DatasetIndex, positions: np.ndarray, contrast: str) -> tuple:
    """(positions A, positions B, label A, label B) of a contrast of the filtered examples."""
    if contrast == "correct":
        return (positions[index.correct[positions] == 1], positions[index.correct[positions] == 0],
                "correct", "incorrect")
    rest = np.setdiff1d(np.arange(len(index)), positions)
    return positions, rest, "filtered", "others"


def ranked_groups(index: ds.DatasetIndex, filtered: list, column: ds.Column) -> list:
    """[("highest", [(ex_id, value, text), ...]), ("lowest", ...)]: the drill-down's examples."""
    high, low = ds.ranked_examples(index, index.column(column), index.positions(filtered), RANKED)
    return [(title, [(ex_id, value, index.texts[int(index.positions([ex_id])[0])]) for ex_id, value in items])
            for title, items in (("highest", high), ("lowest", low))]


def ranked_csv(index: ds.DatasetIndex, filtered: list, column: ds.Column) -> str:
    return export.ranked_csv(f"the filtered examples ranked by {statistic_label(column.stat)}, "
                             f"{head_label(_head(column))}", ranked_groups(index, filtered, column))


def examples_csv(index: ds.DatasetIndex, filtered: list, column: ds.Column) -> str:
    """The filtered examples in the table's order, every column, numbers in full."""
    rows = ds.table_rows(index, index.column(column), index.positions(filtered), rounded=False)
    return export.examples_csv(f"{len(rows)} of {len(index)} examples, filtered and sorted as in the table",
                               [(c["id"], c["name"]) for c in table_columns(column)], rows)


def ranked_children(index: ds.DatasetIndex, filtered: list, column: ds.Column) -> tuple[list, list]:
    """The drill-down list (the highest and lowest examples of the head, each a button) and the ids of
    its buttons in order (a button's index is its position in that list)."""
    ranked, groups = [], []
    for title, items in ranked_groups(index, filtered, column):
        buttons = []
        for ex_id, value, text in items:
            short = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"
            buttons.append(html.Button([html.B(f"{value:.4g}"), f" · example {ex_id} · ", html.Span(short)],
                                       id={"type": ids.DATASET_OPEN, "index": len(ranked)}, className="ranked-item",
                                       title=f"open example {ex_id} with {head_label(_head(column))} selected"))
            ranked.append(ex_id)
        groups.append(html.Div([html.H3(title), *buttons] if buttons else
                               [html.H3(title), html.P("no finite value", className="help")], className="ranked-group"))
    header = html.P(["Examples ranked by ", html.B(f"{statistic_label(column.stat)}, {head_label(_head(column))}"),
                     " (click one to open it with that head selected):"], className="help")
    return [header, html.Div(groups, className="ranked-groups")], ranked


def _head(column: ds.Column) -> dict:
    return {"layer": column.layer, "head": column.head}


def step_within(filtered: list, current, step: int):
    """The example ``step`` (±1) away from ``current`` among the filtered ids, wrapping round; from an
    example outside them, the first (next) or the last (previous) filtered one."""
    if current in filtered:
        return filtered[(filtered.index(current) + step) % len(filtered)]
    return filtered[0] if step > 0 else filtered[-1]


# ----------------------------------------------------------------------------- layout

def default_column(db, stat: Optional[str]) -> Optional[ds.Column]:
    """The first statistic of the last layer's mean of heads (the head summary's default)."""
    return ds.Column(stat, db.n_layers - 1, None) if stat and db.n_layers else None


def layout(ctx, drawn: bool = True):
    """The panel; with ``drawn`` (and examples in the database) the first page and the heatmap are
    computed here, so that no callback runs on page load."""
    db = ctx.db
    stats = statistic_options(db)
    first_stat = stats[0]["value"] if stats else None
    column = default_column(db, first_stat)
    n_layers, n_heads = db.n_layers or 0, db.n_heads or 0
    table = {"rows": [], "pages": 1, "page": 0, "filtered": [], "status": "No examples in this database"}
    fig, help_text = None, ""
    if drawn and column is not None and db.example_ids():
        index = ds.cache_for(db).get()
        table = table_view(index, TableState(ds.ExampleFilter(), column))
        fig, help_text = dataset_view(index, table["filtered"], first_stat, "mean", "correct", None)
    filters = html.Div([
        dcc.Input(id=ids.DATASET_TEXT, type="search", placeholder="text contains…", debounce=True,
                  className="dataset-input"),
        dcc.Input(id=ids.DATASET_ANSWER, type="search", placeholder="answer or label contains…", debounce=True,
                  className="dataset-input"),
        dcc.Dropdown(id=ids.DATASET_CORRECT, options=CORRECT_OPTIONS, value="", clearable=False, searchable=False,
                     className="dataset-correct"),
        html.Span("value from", className="muted"),
        dcc.Input(id=ids.DATASET_LOW, type="number", placeholder="min", debounce=True, className="dataset-bound"),
        html.Span("to", className="muted"),
        dcc.Input(id=ids.DATASET_HIGH, type="number", placeholder="max", debounce=True, className="dataset-bound"),
    ], className="controls")
    picker = html.Div([
        html.Span("value:", className="muted"),
        dcc.Dropdown(id=ids.DATASET_STAT, options=stats, value=first_stat, clearable=False, searchable=False,
                     className="stat-dropdown"),
        dcc.Dropdown(id=ids.DATASET_LAYER, options=[{"label": f"layer {i + 1}", "value": i} for i in range(n_layers)],
                     value=column.layer if column else None, clearable=False, searchable=False,
                     className="dataset-layer"),
        dcc.Dropdown(id=ids.DATASET_HEAD, options=[{"label": "mean of heads", "value": MEAN}] +
                     [{"label": f"head {h + 1}", "value": h} for h in range(n_heads)],
                     value=MEAN, clearable=False, searchable=False, className="dataset-head"),
    ], className="controls")
    stepper = html.Div([
        html.Button("◀", id=ids.DATASET_PREV, title="previous of the filtered examples", className="nav-btn"),
        html.Button("▶", id=ids.DATASET_NEXT, title="next of the filtered examples", className="nav-btn"),
        html.Span("step within the filtered examples ·", className="muted"),
        html.Span(table["status"], id=ids.DATASET_STATUS, className="dataset-status"),
        html.Button("CSV", id=ids.EXPORT_DATASET_TABLE, className="export-btn",
                    title="download the filtered examples, every column, in the table's order, as CSV"),
    ], className="controls")
    grid = dash_table.DataTable(
        id=ids.DATASET_TABLE, columns=table_columns(column) if column else [], data=table["rows"],
        page_action="custom", page_current=table["page"], page_size=PAGE_SIZE, page_count=table["pages"],
        filter_action="custom", filter_query="", sort_action="custom", sort_mode="multi", sort_by=[],
        cell_selectable=True, style_as_list_view=True,
        style_table={"overflowX": "auto"},
        style_cell={"fontFamily": "inherit", "fontSize": "12px", "padding": "3px 6px", "textAlign": "left",
                    "maxWidth": "360px", "overflow": "hidden", "textOverflow": "ellipsis"},
        style_header={"fontWeight": "600", "backgroundColor": "#f4f5f7", "whiteSpace": "normal"},
        style_cell_conditional=[{"if": {"column_id": "text"}, "width": "260px", "maxWidth": "260px"}],
        style_data_conditional=[{"if": {"filter_query": '{correct} = "incorrect"', "column_id": "correct"},
                                 "color": "#b91c1c"},
                                {"if": {"filter_query": '{correct} = "correct"', "column_id": "correct"},
                                 "color": "#15803d"}],
        tooltip_delay=300, tooltip_duration=None)
    left = html.Div([filters, picker, stepper, grid], className="dataset-left")
    right = html.Div([
        html.Div([dcc.RadioItems(id=ids.DATASET_VIEW, options=VIEW_OPTIONS, value="mean", inline=True),
                  dcc.Dropdown(id=ids.DATASET_CONTRAST, options=CONTRAST_OPTIONS, value="correct", clearable=False,
                               searchable=False, className="dataset-contrast"),
                  html.Button("CSV", id=ids.EXPORT_DATASET_VIEW, className="export-btn",
                              title="download the heatmap's numbers, every layer and head, as CSV"),
                  html.Button("CSV of the ranked", id=ids.EXPORT_DATASET_RANKED, className="export-btn",
                              title="download the examples ranked by the clicked head, as CSV")],
                 className="controls"),
        html.P(help_text, id=ids.DATASET_GRAPH_HELP, className="help"),
        dcc.Graph(id=ids.DATASET_GRAPH, config={"displayModeBar": False}, className="dataset-graph",
                  style={"height": f"min(calc({max(n_layers, 1)} * var(--head-row) + 48px), 420px)"},
                  **({"figure": fig} if fig is not None else {})),
        html.Div(html.P("Click a head of the heatmap to rank the examples by it.", className="help"),
                 id=ids.DATASET_RANKED, className="dataset-ranked"),
    ], className="dataset-right")
    return panel("Dataset", "Every example at a glance: search, sort and filter the table (the filter row takes "
                 "“red”, “> 0.5”, “!= yes”), click a row to open that example; the heatmap summarises the "
                 "filtered examples.",
                 html.Div([left, right], className="dataset-body"),
                 dcc.Store(id=ids.DATASET_FILTERED, data=table["filtered"]),
                 dcc.Store(id=ids.DATASET_FOCUS, data=None),
                 class_name="panel-dataset")


# ----------------------------------------------------------------------------- browser values

def _text(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PreventUpdate
    return value.strip()


def _bound(value) -> Optional[float]:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreventUpdate
    return float(value)


def _stat(db, value) -> str:
    if not isinstance(value, str) or value not in db.statistic_names():
        raise PreventUpdate
    return value


def _column(db, stat, layer, head) -> ds.Column:
    layer = as_index(layer, db.n_layers)
    return ds.Column(_stat(db, stat), layer, None if head == MEAN else as_index(head, db.n_heads))


def _sort_by(value) -> tuple:
    if value is None:
        return ()
    columns = dict(ds.TABLE_COLUMNS)
    if not isinstance(value, list) or len(value) > len(columns) or not all(
            isinstance(k, dict) and k.get("column_id") in columns and k.get("direction") in ("asc", "desc")
            for k in value):
        raise PreventUpdate
    return tuple({"column_id": k["column_id"], "direction": k["direction"]} for k in value)


def _filtered(index: ds.DatasetIndex, value) -> list:
    """A DATASET_FILTERED value: distinct stored example ids."""
    if not isinstance(value, list) or len(value) > len(index) or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or len(set(value)) != len(value):
        raise PreventUpdate
    try:
        index.positions(value)
    except ValueError:
        raise PreventUpdate from None
    return value


def _one_of(value, options: list) -> str:
    if value not in [o["value"] for o in options] or not isinstance(value, str):
        raise PreventUpdate
    return value


# ----------------------------------------------------------------------------- callbacks

def register_callbacks(app, ctx):
    db = ctx.db
    cache = ds.cache_for(db)

    @app.callback(Output(ids.DATASET_TABLE, "data"), Output(ids.DATASET_TABLE, "page_count"),
                  Output(ids.DATASET_TABLE, "page_current"), Output(ids.DATASET_TABLE, "columns"),
                  Output(ids.DATASET_FILTERED, "data"), Output(ids.DATASET_STATUS, "children"),
                  Input(ids.DATASET_TEXT, "value"), Input(ids.DATASET_ANSWER, "value"),
                  Input(ids.DATASET_CORRECT, "value"), Input(ids.DATASET_LOW, "value"),
                  Input(ids.DATASET_HIGH, "value"), Input(ids.DATASET_STAT, "value"),
                  Input(ids.DATASET_LAYER, "value"), Input(ids.DATASET_HEAD, "value"),
                  Input(ids.DATASET_TABLE, "filter_query"), Input(ids.DATASET_TABLE, "sort_by"),
                  Input(ids.DATASET_TABLE, "page_current"), prevent_initial_call=True)
    def update_table(text, answer, correctness, low, high, stat, layer, head, query, sort_by, page):
        """Any change of a filter, of the value column, of the sorting or of the page; a new filter goes
        back to the first page. A filter that is not understood is said in the status line."""
        column = _column(db, stat, layer, head)
        if correctness not in [o["value"] for o in CORRECT_OPTIONS]:
            raise PreventUpdate
        if page is None:
            page = 0
        page = 0 if dctx.triggered_id != ids.DATASET_TABLE or \
            any(t["prop_id"].endswith(".filter_query") for t in dctx.triggered) else as_index(page, 2 ** 31)
        if query is not None and not isinstance(query, str):
            raise PreventUpdate
        state = TableState(ds.ExampleFilter(_text(text), _text(answer), correctness, _bound(low), _bound(high)),
                           column, query or "", _sort_by(sort_by), page)
        try:
            view = table_view(cache.get(), state)
        except ValueError as error:  # FilterQueryError included: the message quotes the filter
            return no_update, no_update, no_update, no_update, no_update, str(error)
        return view["rows"], view["pages"], view["page"], table_columns(column), view["filtered"], view["status"]

    @app.callback(Output(ids.DATASET_GRAPH, "figure"), Output(ids.DATASET_GRAPH_HELP, "children"),
                  Input(ids.DATASET_FILTERED, "data"), Input(ids.DATASET_STAT, "value"),
                  Input(ids.DATASET_VIEW, "value"), Input(ids.DATASET_CONTRAST, "value"),
                  State(ids.DATASET_FOCUS, "data"), prevent_initial_call=True)
    def draw_dataset(filtered, stat, view, contrast, focus):
        index = cache.get()
        return dataset_view(index, _filtered(index, filtered), _stat(db, stat), _one_of(view, VIEW_OPTIONS),
                            _one_of(contrast, CONTRAST_OPTIONS), _focus(focus))

    def _focus(value) -> Optional[dict]:
        return None if value is None else head_selection(db, value)

    @app.callback(Output(ids.DOWNLOAD, "data", allow_duplicate=True),
                  Input(ids.EXPORT_DATASET_TABLE, "n_clicks"), Input(ids.EXPORT_DATASET_VIEW, "n_clicks"),
                  Input(ids.EXPORT_DATASET_RANKED, "n_clicks"), State(ids.DATASET_FILTERED, "data"),
                  State(ids.DATASET_STAT, "value"), State(ids.DATASET_LAYER, "value"), State(ids.DATASET_HEAD, "value"),
                  State(ids.DATASET_VIEW, "value"), State(ids.DATASET_CONTRAST, "value"),
                  State(ids.DATASET_FOCUS, "data"), prevent_initial_call=True)
    def download(_table, _view, _ranked, filtered, stat, layer, head, view, contrast, focus):
        """The data behind the table, the heatmap or the drill-down, as the page shows them now."""
        trigger = dctx.triggered_id
        if not dctx.triggered or not dctx.triggered[0].get("value"):
            raise PreventUpdate
        index = cache.get()
        filtered = _filtered(index, filtered)
        if trigger == ids.EXPORT_DATASET_TABLE:
            return dcc.send_string(examples_csv(index, filtered, _column(db, stat, layer, head)),
                                   "vl-interpret-examples.csv")
        if trigger == ids.EXPORT_DATASET_VIEW:
            view = _one_of(view, VIEW_OPTIONS)
            return dcc.send_string(view_csv(index, filtered, _stat(db, stat), view, _one_of(contrast, CONTRAST_OPTIONS),
                                            db.n_heads), f"vl-interpret-dataset-{view}.csv")
        if focus is None:
            raise PreventUpdate  # no head clicked yet: nothing is ranked
        focus = head_selection(db, focus)
        return dcc.send_string(ranked_csv(index, filtered, ds.Column(_stat(db, stat), focus["layer"], focus["head"])),
                               "vl-interpret-ranked-examples.csv")

    @app.callback(Output(ids.DATASET_RANKED, "children"), Output(ids.DATASET_FOCUS, "data"),
                  Output(ids.DATASET_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.DATASET_GRAPH, "clickData"), Input(ids.DATASET_FILTERED, "data"),
                  Input(ids.DATASET_STAT, "value"), State(ids.DATASET_VIEW, "value"),
                  State(ids.DATASET_FOCUS, "data"), prevent_initial_call=True)
    def drill_down(click, filtered, stat, view, focus):
        """A click on a head (or on a layer mean of the mean view) ranks the filtered examples by it;
        new filters or another statistic rank them again by the head already clicked."""
        index = cache.get()
        filtered = _filtered(index, filtered)
        stat = _stat(db, stat)
        figure = no_update
        if dctx.triggered_id == ids.DATASET_GRAPH:
            pt = first_point(click)
            curve = pt.get("curveNumber")
            view = _one_of(view, VIEW_OPTIONS)
            if isinstance(curve, bool) or curve not in ((0, 1) if view == "mean" else (0,)):
                raise PreventUpdate
            head = None if curve == 1 else as_index(pt.get("x"), db.n_heads)
            focus = {"layer": as_index(pt.get("y"), db.n_layers), "head": head}
            figure = Patch()
            figure["layout"]["shapes"] = [figures.head_selection_shape(focus["layer"], head, db.n_heads)]
        elif focus is None:
            raise PreventUpdate
        focus = head_selection(db, focus)
        children, ranked = ranked_children(index, filtered, ds.Column(stat, focus["layer"], focus["head"]))
        return children, {**focus, "ranked": ranked}, figure

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Output(ids.HEAD_STORE, "data", allow_duplicate=True),
                  Input({"type": ids.DATASET_OPEN, "index": ALL}, "n_clicks"), State(ids.DATASET_FOCUS, "data"),
                  prevent_initial_call=True)
    def open_ranked(_clicks, focus):
        """A ranked example opens with the ranked head selected."""
        trigger = dctx.triggered_id
        if not isinstance(trigger, dict) or not dctx.triggered or not dctx.triggered[0].get("value") \
                or not isinstance(focus, dict) or not isinstance(focus.get("ranked"), list):
            raise PreventUpdate  # a button appearing (n_clicks None) is not a click
        ranked = focus["ranked"]
        ex_id = ranked[as_index(trigger.get("index"), len(ranked))]
        example_info(db, ex_id)
        return ex_id, head_selection(db, focus)

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Input(ids.DATASET_TABLE, "active_cell"), prevent_initial_call=True)
    def open_row(cell):
        """A click on a row's cell opens its example (the row id is the example id)."""
        if not isinstance(cell, dict):
            raise PreventUpdate
        return example_info(db, cell.get("row_id")).ex_id

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Input(ids.DATASET_PREV, "n_clicks"), Input(ids.DATASET_NEXT, "n_clicks"),
                  State(ids.DATASET_FILTERED, "data"), State(ids.EXAMPLE_SELECT, "value"), prevent_initial_call=True)
    def step_filtered(_prev, _next, filtered, current):
        filtered = _filtered(cache.get(), filtered)
        if not filtered:
            raise PreventUpdate
        return step_within(filtered, current, -1 if dctx.triggered_id == ids.DATASET_PREV else 1)
