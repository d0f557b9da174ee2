"""The "Interventions" panel: the live model re-run on the current example, changed on the way, to test
what the other views suggest (app.interventions does the runs; this is layout and callbacks).

- Head ablation: the heads chosen (the head summary's selection, a whole layer when it is a layer
  mean, and / or heads picked here) are zeroed; the top answers before and after. The sweep zeroes
  every head alone and draws the answer's score change per layer and head; a click selects that head.
- Patch deletion: the original answer's score as the patches are removed, most relevant first by the
  attention panel's method (a deletion curve); or the attention panel's selected patches removed.
- Activation patching: the current example is the clean run, the one picked here the corrupted run;
  each layer's output at each text token (and at all patches, and everywhere) is patched from the clean
  run into the corrupted one, and so is each head's output; the recovered logit of the clean answer is
  drawn per layer × position and per layer × head (a click on a head selects it).
- Save as notes: the results shown, one line each, stored with the example (``db.add_notes``); the
  example itself never changes. The browser keeps only which runs are shown (the IV_*_RUN stores); the
  server re-reads their results from its cache (or re-runs them) and writes the lines itself.

Present only when the loaded model re-runs stored examples (``supports_interventions``). The model
runs only on a button press, in the server process, one run at a time (the model's lock); results
are cached per example and settings. ``dcc.Loading`` shows that a single re-run is running; the sweep
and patching (a forward pass per layer, or more) run in the background (``Interventions.request``)
while IV_POLL polls their progress into a progress bar, so that the page stays responsive.
"""
from __future__ import annotations

import re
from typing import Optional
from datetime import datetime, timezone

from dash import Input, Output, State, ctx as dctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import figures, ids
from app.database.records import RecordError
from app.interventions import (HeadSweep, InterventionError, Interventions, Patching, ablation_note, deletion_note,
                               masking_note, patching_note, sweep_note)
from app.panels.common import as_index, example_info, first_point, head_selection, panel, selected_tokens
from app.panels.heads import selected_head
from app.panels.example import prediction_children
from app.panels.tokens import attention_method

USE_SELECTED = "selected"  # IV_USE_SELECTED's value: ablate the head summary's selection
HEAD_VALUE = re.compile(r"(\d{1,4})-(\d{1,4}|all)")  # IV_HEADS values: "layer-head" or "layer-all", 0-based
HIDDEN = {"display": "none"}
SHOWN = {}
POLL_MS = 400  # how often the page asks how far a background run is
RUN_NAMES = {"sweep": "Ablating each head", "patching": "Patching each layer's positions and heads"}


def available(ctx) -> bool:
    """Whether the page has this panel: a live model that re-runs stored examples."""
    return ctx.model is not None and bool(getattr(ctx.model, "supports_interventions", False))


def head_options(n_layers: int, n_heads: int) -> list[dict]:
    """IV_HEADS' options: per layer, the whole layer, then each of its heads (1-based labels)."""
    options = []
    for layer in range(n_layers):
        options.append({"label": f"layer {layer + 1}: all heads", "value": f"{layer}-all"})
        options += [{"label": f"layer {layer + 1}, head {head + 1}", "value": f"{layer}-{head}"}
                    for head in range(n_heads)]
    return options


def corrupted_options(db) -> list[dict]:
    """IV_CORRUPTED's options: every example, with its token counts (patching needs equal ones)."""
    options = []
    for ex_id in db.example_ids():
        info = db.example(ex_id)
        options.append({"label": f"Example {ex_id} ({info.txt_len} text + {info.n_tokens - info.txt_len} image "
                                 "tokens)", "value": ex_id})
    return options


def chosen_heads(db, use_selected, values, head_sel) -> list[tuple[int, int]]:
    """The (layer, head) pairs to zero, 0-based, from the browser's values: the head summary's
    selection (all heads of its layer for a layer mean) when ticked, and the heads picked here."""
    if not isinstance(use_selected, list) or not (values is None or isinstance(values, list)):
        raise PreventUpdate
    n_layers, n_heads = db.n_layers, db.n_heads
    if len(values or []) > n_layers * (n_heads + 1):
        raise PreventUpdate
    heads = set()
    if USE_SELECTED in use_selected:
        sel = head_selection(db, head_sel)
        heads |= {(sel["layer"], h) for h in ([sel["head"]] if sel["head"] is not None else range(n_heads))}
    for value in values or []:
        match = HEAD_VALUE.fullmatch(value) if isinstance(value, str) else None
        if match is None or int(match[1]) >= n_layers or (match[2] != "all" and int(match[2]) >= n_heads):
            raise PreventUpdate
        layer = int(match[1])
        heads |= {(layer, h) for h in (range(n_heads) if match[2] == "all" else [int(match[2])])}
    return sorted(heads)


def heads_text(heads: list[tuple[int, int]], n_heads: int) -> str:
    """"layer 2 (all heads), layer 3 head 1": what was zeroed, 1-based."""
    parts = []
    for layer in sorted({layer for layer, _ in heads}):
        zeroed = [h for l, h in heads if l == layer]
        parts.append(f"layer {layer + 1} (all heads)" if len(zeroed) == n_heads else
                     f"layer {layer + 1} head{'s' if len(zeroed) > 1 else ''} {', '.join(str(h + 1) for h in zeroed)}")
    return ", ".join(parts)


def comparison(before: dict, after: dict, after_title: str) -> html.Table:
    """The top answers of the unchanged re-run and of the changed one, side by side."""
    rows = []
    for i in range(max(len(before["top"]), len(after["top"]))):
        cells = []
        for prediction in (before, after):
            answer, score = prediction["top"][i] if i < len(prediction["top"]) else ("", None)
            cells += [html.Td(answer, className="iv-answer" + (" iv-changed" if i == 0 and after["answer"]
                                                                != before["answer"] else "")),
                      html.Td("" if score is None else f"{score:.3f}", className="iv-score")]
        rows.append(html.Tr(cells))
    header = html.Tr([html.Th("re-run", colSpan=2), html.Th(after_title, colSpan=2)])
    return html.Table([html.Thead(header), html.Tbody(rows)], className="iv-table")


def _error(error: InterventionError):
    return html.Div(str(error), className="iv-error", role="alert")


def layout(ctx):
    db = ctx.db
    loading = dict(type="dot", color=figures.IMAGE_COLOR, delay_show=150)
    graph = dict(config={"displayModeBar": False}, style=HIDDEN)
    return html.Div(panel(
        "Interventions", "Re-run the model on this example, changed: see what the other views' heads and patches "
        "do for the answer. The model runs when you press a button (a few seconds on a CPU for a large model).",
        html.H3("Head ablation", className="iv-section"),
        html.P("A zeroed head's output (its context, at the input of the attention output projection) is 0 in every "
               "position; the rest of the model is unchanged. Ablate each head does this for every head alone: each "
               "cell is the re-run answer's score without that head minus its score with every head (blue: the "
               "answer needs the head). Evidence that a head is needed, not of what it does.", className="help"),
        html.Div([
            dcc.Checklist(id=ids.IV_USE_SELECTED, options=[{"label": " the head summary's selection",
                                                            "value": USE_SELECTED}],
                          value=[USE_SELECTED], className="iv-check"),
            dcc.Dropdown(id=ids.IV_HEADS, options=head_options(db.n_layers, db.n_heads), multi=True,
                         placeholder="and heads / layers…", className="iv-heads"),
            html.Button("Zero them", id=ids.IV_ABLATE, className="btn"),
            html.Button("Ablate each head", id=ids.IV_SWEEP, className="btn",
                        title="zero every head alone, one after another: the answer's score without each head "
                              "(click a cell to select that head)"),
        ], className="controls"),
        dcc.Loading(html.Div(id=ids.IV_ABLATION, className="iv-result"), **loading),
        dcc.Graph(id=ids.IV_SWEEP_GRAPH, className="iv-graph", **graph),
        html.Div(id=ids.IV_SWEEP_TEXT, className="iv-result"),
        html.H3("Patch deletion", className="iv-section"),
        html.P("A removed patch is masked out of the attention of every layer: no token reads it. The deletion curve "
               "removes 0 %, 10 %, … 90 % of the patches, most relevant first by the attention panel's method; a "
               "faithful map makes the answer's score fall at once (a small area under the curve).", className="help"),
        html.Div([
            html.Button("Deletion curve", id=ids.IV_DELETION, className="btn",
                        title="the answer's score as patches are removed, most relevant first by the attention "
                              "panel's method (attention: last layer, mean of heads; all from the query that gives the "
                              "answer: [CLS] for ViLT, the prompt's last token for a decoder)"),
            html.Button("Remove the selected patches", id=ids.IV_MASK, className="btn",
                        title="the patches selected in the attention panel"),
        ], className="controls"),
        dcc.Loading([dcc.Graph(id=ids.IV_DELETION_GRAPH, className="iv-graph", **graph),
                     html.Div(id=ids.IV_MASKING, className="iv-result")], **loading),
        html.H3("Activation patching", className="iv-section"),
        html.P("This example is the clean run, the one picked the corrupted run (same token layout). Per layer and "
               "position: that layer's output at those positions is taken from the clean run; per layer and head: "
               "that head's output, at every position. Each cell is the clean answer's logit then minus its logit "
               "in the corrupted run (hover: the share of the clean run's margin recovered): where the difference "
               "between the two inputs is carried.", className="help"),
        html.Div([
            dcc.Dropdown(id=ids.IV_CORRUPTED, options=corrupted_options(db), clearable=False,
                         placeholder="corrupted example…", className="iv-corrupted"),
            html.Button("Patch", id=ids.IV_PATCH, className="btn",
                        title="this example is the clean run; the one picked the corrupted run"),
        ], className="controls"),
        dcc.Graph(id=ids.IV_PATCH_GRAPH, className="iv-graph", **graph),
        dcc.Graph(id=ids.IV_PATCH_HEADS_GRAPH, className="iv-graph", **graph),
        html.Div(id=ids.IV_PATCHING, className="iv-result"),
        html.Div(id=ids.IV_RUN_STATUS, className="iv-result", role="status"),
        dcc.Interval(id=ids.IV_POLL, interval=POLL_MS, disabled=True),
        dcc.Store(id=ids.IV_JOB),
        html.Div([
            html.Button("Save as notes", id=ids.IV_SAVE_NOTE, className="btn",
                        title="store the results shown above with this example, one note each (shown with the "
                              "example and in its report); the example's data stay as they are"),
            html.Span(id=ids.IV_SAVE_STATUS, className="muted", role="status"),
        ], className="controls iv-save"),
        *[dcc.Store(id=store) for store in (ids.IV_ABLATION_RUN, ids.IV_CURVE_RUN, ids.IV_MASK_RUN,
                                            ids.IV_PATCHING_RUN, ids.IV_SWEEP_RUN)],
        class_name="interventions",
    ), id=ids.IV_PANEL)


def register_callbacks(app, ctx):
    db = ctx.db
    runs = Interventions(db, ctx.model)

    @app.callback(Output(ids.IV_ABLATION, "children"), Output(ids.IV_ABLATION_RUN, "data"),
                  Input(ids.IV_ABLATE, "n_clicks"), Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.IV_USE_SELECTED, "value"), State(ids.IV_HEADS, "value"), State(ids.HEAD_STORE, "data"),
                  prevent_initial_call=True)
    def ablate(_clicks, ex_id, use_selected, values, head_sel):
        if dctx.triggered_id != ids.IV_ABLATE:
            return None, None  # another example: the last result is not about it
        example_info(db, ex_id)
        heads = chosen_heads(db, use_selected, values, head_sel)
        if not heads:
            return html.Div("Tick the head summary's selection or pick heads to zero.", className="iv-error"), None
        try:
            before, after = runs.original(ex_id), runs.ablation(ex_id, heads)
        except InterventionError as error:
            return _error(error), None
        return ([html.Div(f"Zeroed: {heads_text(heads, db.n_heads)}", className="muted"),
                 comparison(before, after, "heads zeroed")], {"ex": ex_id, "heads": [f"{l}-{h}" for l, h in heads]})

    @app.callback(Output(ids.IV_DELETION_GRAPH, "figure"), Output(ids.IV_DELETION_GRAPH, "style"),
                  Output(ids.IV_MASKING, "children"), Output(ids.IV_CURVE_RUN, "data"), Output(ids.IV_MASK_RUN, "data"),
                  Input(ids.IV_DELETION, "n_clicks"), Input(ids.IV_MASK, "n_clicks"), Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.ATT_METHOD, "value"), State(ids.SEL_STORE, "data"), prevent_initial_call=True)
    def delete_patches(_curve, _mask, ex_id, method, sel):
        trigger = dctx.triggered_id
        if trigger not in (ids.IV_DELETION, ids.IV_MASK):
            return no_update, HIDDEN, None, None, None
        info = example_info(db, ex_id)
        try:
            if trigger == ids.IV_DELETION:
                curve = runs.deletion_curve(ex_id, attention_method(method))
                answer = curve.original["answer"]
                fig = figures.deletion_curve_figure(curve.fractions, curve.scores, curve.answers, answer, method)
                return fig, SHOWN, html.Div(
                    f"Re-run answer '{answer}' ({curve.scores[0]:.3f}); with {100 * curve.fractions[-1]:.0f} % of the "
                    f"patches removed ({curve.removed[-1]}): '{curve.answers[-1]}', '{answer}' "
                    f"{curve.scores[-1]:.3f}.", className="muted"), {"ex": ex_id, "method": method}, None
            tokens = selected_tokens(sel, ex_id, info.n_tokens)
            patches = [t for t in tokens if info.coords[t] is not None]
            if not patches:
                return no_update, no_update, html.Div("Select image patches in the attention panel first (Select: "
                                                      "image, then click, box or lasso).", className="iv-error"), \
                    no_update, None
            before, after = runs.original(ex_id), runs.masked(ex_id, patches)
        except InterventionError as error:
            return no_update, no_update, _error(error), no_update, None
        return no_update, no_update, [html.Div(f"Removed {len(patches)} patch{'es' if len(patches) > 1 else ''}.",
                                               className="muted"), comparison(before, after, "patches removed")], \
            no_update, {"ex": ex_id, "tokens": patches}

    @app.callback(Output(ids.IV_JOB, "data"), Output(ids.IV_RUN_STATUS, "children"),
                  Input(ids.IV_SWEEP, "n_clicks"), Input(ids.IV_PATCH, "n_clicks"), Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.IV_CORRUPTED, "value"), prevent_initial_call=True)
    def start_run(_sweep, _patch, ex_id, corrupted):
        """A button names the background run to poll (IV_JOB); another example forgets it."""
        trigger = dctx.triggered_id
        if trigger not in (ids.IV_SWEEP, ids.IV_PATCH):
            return None, None
        example_info(db, ex_id)
        if trigger == ids.IV_SWEEP:
            return {"kind": "sweep", "ex": ex_id}, no_update
        if corrupted is None:
            return no_update, html.Div("Pick the corrupted example first.", className="iv-error")
        example_info(db, corrupted)
        if corrupted == ex_id:
            return no_update, html.Div("Pick another example than this one as the corrupted run.",
                                       className="iv-error")
        return {"kind": "patching", "ex": ex_id, "corrupted": corrupted}, no_update

    @app.callback(Output(ids.IV_RUN_STATUS, "children", allow_duplicate=True), Output(ids.IV_POLL, "disabled"),
                  Output(ids.IV_SWEEP_GRAPH, "figure"), Output(ids.IV_SWEEP_GRAPH, "style"),
                  Output(ids.IV_SWEEP_TEXT, "children"), Output(ids.IV_SWEEP_RUN, "data"),
                  Output(ids.IV_PATCH_GRAPH, "figure"), Output(ids.IV_PATCH_GRAPH, "style"),
                  Output(ids.IV_PATCH_HEADS_GRAPH, "figure"), Output(ids.IV_PATCH_HEADS_GRAPH, "style"),
                  Output(ids.IV_PATCHING, "children"), Output(ids.IV_PATCHING_RUN, "data"),
                  Input(ids.IV_JOB, "data"), Input(ids.IV_POLL, "n_intervals"), prevent_initial_call=True)
    def poll_run(job, _n):
        """The polled run's progress while it runs; its figures once done (the other run's stay)."""
        sweep_out, patch_out = [no_update] * 4, [no_update] * 6
        if job is None:  # another example: nothing shown is about it
            return (None, True, no_update, HIDDEN, None, None, no_update, HIDDEN, no_update, HIDDEN, None, None)
        kind, args = background_run(db, job)
        status = runs.request(kind, *args)
        if status["state"] == "running":
            fraction = status["fraction"]
            return ([html.Progress(value=fraction, max=1, className="iv-progress"),
                     html.Span(f" {RUN_NAMES[kind]}… {100 * fraction:.0f} %", className="muted")],
                    False, *sweep_out, *patch_out)
        if status["state"] == "error":
            return _error(InterventionError(status["message"])), True, *sweep_out, *patch_out
        if kind == "sweep":
            return (None, True, *sweep_view(runs.head_sweep(*args)), {"ex": args[0]}, *patch_out)
        return (None, True, *sweep_out, *patching_view(runs.patching(*args), runs.head_patching(*args)),
                {"ex": args[0], "corrupted": args[1]})

    @app.callback(Output(ids.HEAD_STORE, "data", allow_duplicate=True),
                  Output(ids.HEAD_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.IV_SWEEP_GRAPH, "clickData"), Input(ids.IV_PATCH_HEADS_GRAPH, "clickData"),
                  prevent_initial_call=True)
    def open_head(sweep_click, patch_click):
        """A click on a head of the sweep or of head patching selects it, as a click on the head summary does."""
        pt = first_point(sweep_click if dctx.triggered_id == ids.IV_SWEEP_GRAPH else patch_click)
        return selected_head(db, as_index(pt.get("y"), db.n_layers), as_index(pt.get("x"), db.n_heads))

    @app.callback(Output(ids.IV_CORRUPTED, "options"), Input(ids.EXAMPLE_SELECT, "options"),
                  prevent_initial_call=True)
    def refresh_examples(_options):
        return corrupted_options(db)  # from the database, not from what the browser sent

    @app.callback(Output(ids.IV_SAVE_STATUS, "children"), Output(ids.PREDICTION, "children", allow_duplicate=True),
                  Input(ids.IV_SAVE_NOTE, "n_clicks"), Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.IV_ABLATION_RUN, "data"), State(ids.IV_CURVE_RUN, "data"), State(ids.IV_MASK_RUN, "data"),
                  State(ids.IV_PATCHING_RUN, "data"), State(ids.IV_SWEEP_RUN, "data"), prevent_initial_call=True)
    def save_notes(_clicks, ex_id, ablation, curve, mask, patching, sweep):
        if dctx.triggered_id != ids.IV_SAVE_NOTE:
            return None, no_update
        info = example_info(db, ex_id)
        try:
            shown = result_notes(db, runs, ex_id, ablation, curve, mask, patching, sweep)
        except InterventionError as error:
            return _error(error), no_update
        if not shown:
            return "Run an intervention first: there is nothing to save for this example.", no_update
        notes = [note for note in shown if not any(saved.endswith(note) for saved in info.notes)]
        if not notes:
            return "The results shown are saved already.", no_update
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        try:
            info = db.add_notes(ex_id, [f"{stamp} · {note}" for note in notes])
        except RecordError as error:
            return _error(error), no_update
        return (f"Saved {len(notes)} note{'s' if len(notes) > 1 else ''} with example {ex_id}.",
                prediction_children(info))


def run_of(value, ex_id: int, fields: tuple) -> Optional[dict]:
    """An IV_*_RUN store's value when it is for example ``ex_id`` (None when empty or for another
    example); anything but a dict with exactly ``fields`` besides "ex" is refused."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"ex", *fields}:
        raise PreventUpdate
    return value if value["ex"] == ex_id else None


def background_run(db, job) -> tuple[str, tuple]:
    """The ``Interventions.request`` arguments of an IV_JOB value, checked against the database."""
    if not isinstance(job, dict) or job.get("kind") not in RUN_NAMES:
        raise PreventUpdate
    fields = {"sweep": {"kind", "ex"}, "patching": {"kind", "ex", "corrupted"}}[job["kind"]]
    if set(job) != fields:
        raise PreventUpdate
    ex_id = example_info(db, job["ex"]).ex_id
    if job["kind"] == "sweep":
        return "sweep", (ex_id,)
    corrupted = example_info(db, job["corrupted"]).ex_id
    if corrupted == ex_id:
        raise PreventUpdate
    return "patching", (ex_id, corrupted)


def sweep_view(sweep: HeadSweep) -> tuple:
    """The sweep's figure, its style and its line."""
    original = sweep.original
    fig = figures.head_ablation_sweep_figure(sweep.scores, sweep.answers, original["answer"], original["score"])
    flipped = sum(answer != original["answer"] for row in sweep.answers for answer in row)
    return fig, SHOWN, html.Div(
        f"Re-run answer '{original['answer']}' ({original['score']:.3f}); {flipped} of {sweep.scores.size} heads "
        "change it when zeroed alone. Click a head to select it.", className="muted")


def patching_view(positions: Patching, heads: Patching) -> tuple:
    """The two patching figures, their styles and the line under them."""
    clean, bad = positions.clean_prediction, positions.corrupted_prediction
    answer = clean["answer"]
    margin = float(clean["logits"][clean["index"]] - bad["logits"][clean["index"]])
    return (figures.activation_patching_figure(positions.difference, positions.columns, positions.recovered,
                                               answer), SHOWN,
            figures.head_patching_figure(heads.difference, heads.recovered, answer), SHOWN,
            html.Div(f"Clean (example {positions.clean}): '{answer}'; corrupted (example {positions.corrupted}): "
                     f"'{bad['answer']}'. The logit of '{answer}' is {margin:+.3f} higher in the clean run. Click a "
                     "head to select it.", className="muted"))


def result_notes(db, runs: Interventions, ex_id: int, ablation, curve, mask, patching, sweep=None) -> list[str]:
    """The note of each run shown for example ``ex_id``, read back from ``runs`` (cached: no model run
    unless it was evicted), the browser's values checked as the buttons check them."""
    info = db.example(ex_id)
    notes = []
    if (ablation := run_of(ablation, ex_id, ("heads",))) is not None:
        heads = chosen_heads(db, [], ablation["heads"], None)
        if not heads:
            raise PreventUpdate
        notes.append(ablation_note(heads_text(heads, db.n_heads), runs.original(ex_id), runs.ablation(ex_id, heads)))
    if (curve := run_of(curve, ex_id, ("method",))) is not None:
        notes.append(deletion_note(runs.deletion_curve(ex_id, attention_method(curve["method"]))))
    if (mask := run_of(mask, ex_id, ("tokens",))) is not None:
        patches = [t for t in selected_tokens(mask, ex_id, info.n_tokens) if info.coords[t] is not None]
        if not patches:
            raise PreventUpdate
        notes.append(masking_note(info, patches, runs.original(ex_id), runs.masked(ex_id, patches)))
    if (patching := run_of(patching, ex_id, ("corrupted",))) is not None:
        corrupted = example_info(db, patching["corrupted"]).ex_id
        if corrupted == ex_id:
            raise PreventUpdate
        notes.append(patching_note(runs.patching(ex_id, corrupted)))
        notes.append(patching_note(runs.head_patching(ex_id, corrupted)))
    if run_of(sweep, ex_id, ()) is not None:
        notes.append(sweep_note(runs.head_sweep(ex_id)))
    return notes
