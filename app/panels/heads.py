"""Head summary: one statistic for every layer and head (plus the layer mean); click to select."""
from __future__ import annotations

from typing import Optional

import numpy as np
from dash import Input, Output, State, Patch, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import export, figures, ids
from app.database.stats import STATISTICS
from app.panels.common import (as_index, example_info, first_point, head_label, head_selection,
                               image_downloads, initial_figure, panel)

CUSTOM_HELP = "a custom per-head metric supplied with the records"
HEAD_AXES_PX = 48  # the head summary's top and bottom margins (figures.head_summary_figure)


def statistic_options(db) -> list[dict]:
    return [{"label": STATISTICS[k][0] if k in STATISTICS else f"{k} (custom)", "value": k}
            for k in db.statistic_names()]


def statistic_help(db, name: str) -> str:
    """The definition shown under the menu: the built-in one, or the one given with the records."""
    if name in STATISTICS:
        return STATISTICS[name][1]
    return db.metric_description(name) or CUSTOM_HELP


def statistic_label(name: str) -> str:
    return STATISTICS[name][0] if name in STATISTICS else name


def default_head(db):
    """The last layer's mean of heads (None for a database with no examples yet)."""
    return {"layer": db.n_layers - 1, "head": None} if db.n_layers else None


def layout(ctx, ex_id):
    opts = statistic_options(ctx.db)
    first = opts[0]["value"] if opts else None
    head = default_head(ctx.db)
    figure, help_text = summary_view(ctx.db, ex_id, first, False, head) if ex_id is not None and first \
        else (None, statistic_help(ctx.db, first) if first else "")
    return panel(
        "Head summary", "One number per layer and head for this example; click a cell to show that "
        "head's attention (or a layer's “mean” cell for the mean over its heads).",
        html.Div([
            dcc.Dropdown(id=ids.HEAD_STAT, options=opts, value=first, clearable=False, searchable=False,
                         className="stat-dropdown"),
            dcc.Checklist(id=ids.HEAD_ZSCORE, options=[{"label": " z-score", "value": "z"}], value=[],
                          className="zscore-toggle", inputClassName="zscore-input"),
            html.Button("CSV", id=ids.EXPORT_STATISTICS, className="export-btn",
                        title="download every statistic of every head of this example as CSV"),
            image_downloads(ids.HEAD_GRAPH),
        ], className="controls"),
        html.P(help_text, id=ids.HEAD_STAT_HELP, className="help stat-help"),
        dcc.Graph(id=ids.HEAD_GRAPH, config={"displayModeBar": False}, className="head-graph",
                  style={"height": head_graph_height(ctx.db.n_layers or 1)}, **initial_figure(figure)),
        html.Div(head_title(head) if head else None, id=ids.HEAD_TITLE, className="selected-head"),
        dcc.Store(id=ids.HEAD_STORE, data=head),
        class_name="panel-heads")


def head_graph_height(n_layers: int) -> str:
    """CSS height of the head summary: one row per layer (``--head-row``, style.css) plus the axes,
    at most ``--head-graph-max``, so that a small model leaves room for the panels under it."""
    return f"min(calc({n_layers} * var(--head-row) + {HEAD_AXES_PX}px), var(--head-graph-max))"


def summary_view(db, ex_id: int, stat: str, z: bool, head_sel) -> tuple:
    """The head summary figure of one statistic of an example, and the statistic's help line."""
    values = db.head_statistics(ex_id).get(stat)
    note = ""
    if values is None:
        values = np.full((db.n_layers, db.n_heads), np.nan, dtype=np.float32)
        note = " (not recorded for this example)"
    fig = figures.head_summary_figure(values, statistic_label(stat), z_scored=z,
                                      selected=(head_sel["layer"], head_sel["head"]) if head_sel else None)
    help_text = statistic_help(db, stat) + note
    if z:
        help_text += "; z-scored over all heads of this example"
    return fig, help_text


def head_title(head_sel) -> list:
    return ["Selected: ", html.B(head_label(head_sel))]


def selected_head(db, layer: int, head: Optional[int]) -> tuple[dict, Patch]:
    """HEAD_STORE's value and the head summary's outline for a head chosen in any view (0-based, checked;
    ``head`` None: the layer mean)."""
    patch = Patch()
    patch["layout"]["shapes"] = [figures.head_selection_shape(layer, head, db.n_heads)]
    return {"layer": layer, "head": head}, patch


def register_callbacks(app, ctx):
    db = ctx.db

    @app.callback(Output(ids.DOWNLOAD, "data", allow_duplicate=True), Input(ids.EXPORT_STATISTICS, "n_clicks"),
                  State(ids.EXAMPLE_SELECT, "value"), prevent_initial_call=True)
    def download_statistics(n_clicks, ex_id):
        if not n_clicks:
            raise PreventUpdate
        example_info(db, ex_id)
        descriptions = {name: statistic_help(db, name) for name in db.statistic_names()}
        return dcc.send_string(export.statistics_csv(db.head_statistics(ex_id), descriptions),
                               f"vl-interpret-example-{ex_id}-head-statistics.csv")

    @app.callback(Output(ids.HEAD_GRAPH, "figure"), Output(ids.HEAD_STAT_HELP, "children"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.HEAD_STAT, "value"),
                  Input(ids.HEAD_ZSCORE, "value"), State(ids.HEAD_STORE, "data"), prevent_initial_call=True)
    def draw_heads(ex_id, stat, zs, head_sel):
        example_info(db, ex_id)
        if not isinstance(stat, str) or stat not in db.statistic_names():
            raise PreventUpdate
        return summary_view(db, ex_id, stat, bool(zs), None if head_sel is None else head_selection(db, head_sel))

    @app.callback(Output(ids.HEAD_STORE, "data"), Output(ids.HEAD_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.HEAD_GRAPH, "clickData"), prevent_initial_call=True)
    def select_head(click):
        """A click on a cell: trace 0 is the head grid (x = head), trace 1 the layer means."""
        pt = first_point(click)
        layer = as_index(pt.get("y"), db.n_layers)
        curve = pt.get("curveNumber")
        if curve not in (0, 1) or isinstance(curve, bool):
            raise PreventUpdate
        return selected_head(db, layer, None if curve == 1 else as_index(pt.get("x"), db.n_heads))

    @app.callback(Output(ids.HEAD_TITLE, "children"), Input(ids.HEAD_STORE, "data"), prevent_initial_call=True)
    def show_head(head_sel):
        if not head_sel:
            return no_update
        return head_title(head_selection(db, head_sel))
