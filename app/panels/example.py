"""Example selector (dropdown + previous/next) and the model's prediction for the example."""
from __future__ import annotations

from dash import Input, Output, State, ctx as dctx, html, dcc
from dash.exceptions import PreventUpdate

from app import ids
from app.panels.common import error_style, example_info


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

    @app.callback(Output(ids.PREDICTION, "children"), Output(ids.PAGE_ERROR, "children"),
                  Output(ids.PAGE_ERROR, "style"), Input(ids.EXAMPLE_SELECT, "value"), prevent_initial_call=True)
    def show_prediction(ex_id):
        """The prediction bar; also clears what the error banner said of the previous example (a
        damaged example raises here, and the app's error handler fills the banner instead)."""
        return prediction_children(example_info(db, ex_id)), "", error_style("")
