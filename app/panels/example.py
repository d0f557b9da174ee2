"""Example selector (dropdown + previous/next) and the model's prediction for the example."""
from __future__ import annotations

from dash import ALL, ClientsideFunction, Input, Output, State, ctx as dctx, dcc, html
from dash.exceptions import PreventUpdate

from app import export, figures, ids
from app.panels.common import error_style, example_info, head_selection, selected_tokens


def example_options(db) -> list[dict]:
    """The example dropdown's options (also used by the "Add example" panel after adding one)."""
    return [{"label": f"Example {i}", "value": i} for i in db.example_ids()]


def layout(ctx, ex_id):
    """The selector showing ``ex_id`` (the page opens on it; see app.page)."""
    return html.Div([
        html.Button("◀", id=ids.EXAMPLE_PREV, title="previous example", className="nav-btn"),
        dcc.Dropdown(id=ids.EXAMPLE_SELECT, options=example_options(ctx.db),
                     value=ex_id, clearable=False, searchable=True,
                     placeholder="No examples in this database", className="example-dropdown"),
        html.Button("▶", id=ids.EXAMPLE_NEXT, title="next example", className="nav-btn"),
        html.Div(id=ids.PREDICTION, className="prediction",
                 children=None if ex_id is None else prediction_children(ctx.db.example(ex_id))),
        html.Button("Report", id=ids.EXPORT_REPORT, className="btn",
                    title="download this example and the current view as one HTML file, to share"),
        dcc.Download(id=ids.DOWNLOAD), dcc.Store(id=ids.IMAGE_EXPORT_DONE),
    ], className="example-bar")


def prediction_children(info) -> list:
    """Badge saying correct / incorrect / unknown, the prediction (answer, score, label), the
    example's notes (``info.notes``, e.g. "the text was cut to the model's 40 tokens"), the text."""
    acc = info.accuracy
    kind, word = ("unknown", "accuracy unknown") if acc is None else \
        (("correct", "correct") if acc else ("incorrect", "incorrect"))
    out = [html.Span(word, className=f"badge {kind}", title="was the model's answer right (from the record)")]
    pred = info.prediction
    if pred:
        parts = [html.Span("Prediction: "), html.B(str(pred.get("answer", "?")))]
        if pred.get("score") is not None:
            parts.append(html.Span(f" (score {float(pred['score']):.3f})"))
        if pred.get("label") not in (None, ""):
            parts.append(html.Span([" · label: ", html.B(str(pred["label"]))]))
        out.append(html.Span(parts, className="pred-text"))
    for note in getattr(info, "notes", None) or ():  # what the record's maker noted (e.g. a cut text)
        out.append(html.Span([html.Span("note", className="note-tag"), str(note)], className="note",
                             title=str(note)))
    if info.text:
        out.append(html.Span(f"“{info.text}”", className="raw-text", title="the input text"))
    return out


def report(db, ex_id, stat, zscore: bool, head_sel, sel, method) -> str:
    """The one-file HTML report of what the page shows (browser values checked like any other)."""
    from app.panels import heads, tokens  # noqa: PLC0415 - the panels whose views the report repeats

    info = example_info(db, ex_id)
    head_sel = head_selection(db, head_sel)
    if stat not in db.statistic_names():
        raise PreventUpdate
    method = tokens.attention_method(method)
    head_figure = heads.summary_view(db, ex_id, stat, zscore, head_sel)[0]
    chosen = selected_tokens(sel, ex_id, info.n_tokens)
    weights = tokens.selection_weights(db, ex_id, method, head_sel, chosen) if chosen else None
    image_figure = tokens.image_view(db, info, 0, tokens.DEFAULT_OPACITY, [], weights, chosen, method)
    labels = figures.token_labels(info.tokens, info.coords)
    what = ("nothing selected" if weights is None else
            f"{method} from {', '.join(labels[t] for t in chosen[:5])}{' …' if len(chosen) > 5 else ''} — "
            f"{tokens.method_label(method, head_sel)}")
    return export.report_html(info, db.image_png(ex_id), head_figure, image_figure,
                              None if weights is None else weights.tolist(), what)


def register_callbacks(app, ctx):
    db = ctx.db

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Input(ids.EXAMPLE_PREV, "n_clicks"), Input(ids.EXAMPLE_NEXT, "n_clicks"),
                  State(ids.EXAMPLE_SELECT, "value"), prevent_initial_call=True)
    def step_example(_prev, _next, current):
        ex_ids = db.example_ids()
        if not ex_ids:
            raise PreventUpdate
        step = -1 if dctx.triggered_id == ids.EXAMPLE_PREV else 1
        try:
            pos = ex_ids.index(current)
        except ValueError:
            return ex_ids[0]
        return ex_ids[(pos + step) % len(ex_ids)]

    app.clientside_callback(ClientsideFunction("vli", "downloadImage"), Output(ids.IMAGE_EXPORT_DONE, "data"),
                            Input({"type": ids.IMAGE_EXPORT, "graph": ALL, "format": ALL}, "n_clicks"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.DOWNLOAD, "data"), Input(ids.EXPORT_REPORT, "n_clicks"),
                  State(ids.EXAMPLE_SELECT, "value"), State(ids.HEAD_STAT, "value"), State(ids.HEAD_ZSCORE, "value"),
                  State(ids.HEAD_STORE, "data"), State(ids.SEL_STORE, "data"), State(ids.ATT_METHOD, "value"),
                  prevent_initial_call=True)
    def download_report(n_clicks, ex_id, stat, zscore, head_sel, sel, method):
        if not n_clicks:
            raise PreventUpdate
        return dcc.send_string(report(db, ex_id, stat, bool(zscore), head_sel, sel, method),
                               f"vl-interpret-example-{ex_id}.html")

    @app.callback(Output(ids.PREDICTION, "children"), Output(ids.PAGE_ERROR, "children"),
                  Output(ids.PAGE_ERROR, "style"), Input(ids.EXAMPLE_SELECT, "value"), prevent_initial_call=True)
    def show_prediction(ex_id):
        """The prediction bar; also clears what the error banner said of the previous example (a
        damaged example raises here, and the app's error handler fills the banner instead)."""
        return prediction_children(example_info(db, ex_id)), "", error_style("")
