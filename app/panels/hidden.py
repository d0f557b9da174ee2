"""Hidden states, the attention matrix and the attention distance, as tabs (only the visible tab is
computed).

t-SNE tab: the map of one layer's hidden states (slider: before layer 1 … after layer L), the
selected token marked, and the closest token of the other modality across the whole database, with
a button that opens it. Matrix tab: the selected head's attention matrix (text→text, image→image, full).
Distance tab: the mean attention distance of every head against its layer (stored head statistic).
"""
from __future__ import annotations

import base64
from functools import lru_cache

import numpy as np
from dash import Input, Output, Patch, State, ctx as dctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import export, figures, ids
from app.database.stats import STATISTICS
from app.panels.common import (as_index, clear_drawn_selection, example_info, first_point, head_label,
                               head_selection, image_downloads, initial_figure, panel, selected_tokens)

NEIGHBOR_HINT = "Select a token to find its closest token of the other modality."
MATRIX_KINDS = [{"label": "text → text", "value": "tt"}, {"label": "image → image", "value": "ii"},
                {"label": "full", "value": "full"}]
MATRIX_NAMES = {k["value"]: k["label"] for k in MATRIX_KINDS}
TABS = ("tsne", "matrix", "distance", "lens")  # the views' tab values, the first one open
EMB = "emb"  # the layer slider's name for hidden-state layer 0 (before layer 1)
MATRIX_TOOLS_REMOVED = ["select2d", "lasso2d", "autoScale2d", "zoomIn2d", "zoomOut2d"]  # a short tool bar
LENS_HELP = ("A logit lens: the model's own output head applied to a hidden state after every layer, when the "
             "answer forms. Classifiers (ViLT): final norm, pooler and answer head on the pooled token. Decoder "
             "VLMs (-m hf): final norm and LM head where the answer starts (the prompt's last token). At the last "
             "layer it is the model's own output.")
NO_LENS = ("This example has no logit lens: its record did not bring one (the ViLT adapter stores it for VQA "
           "heads, the -m hf adapters for decoder VLMs).")
DISTANCE_HELP = ("Each dot is a head of this example. Mean attention distance: " + STATISTICS["distance"][1]
                 + ". Small = local heads, large = heads that look across the image.")


def layer_marks(n_layers: int) -> dict:
    """A hidden-state layer slider's marks: "emb" (before layer 1), then the layers (every other one
    beyond 12); the t-SNE slider's and the patch words' are the same."""
    marks = {0: EMB}
    marks.update({l: str(l) for l in range(1, n_layers + 1) if n_layers <= 12 or l % 2 == 0 or l == n_layers})
    return marks


def layout(ctx, ex_id):
    """The tabs, the t-SNE map of ``ex_id``'s last layer shown (None: an empty database)."""
    n_layers = ctx.db.n_layers or 0  # 0: no examples yet
    figure, ready = tsne_view(ctx.db, ex_id, n_layers) if ex_id is not None else (None, None)
    tsne_tab = dcc.Tab(label="Hidden states (t-SNE)", value=TABS[0], children=[
        html.P("Each dot is a token of this example; text and image tokens in two colours, special "
               "tokens grey. Hover an image dot to see its patch; click a dot to select that token.",
               className="help"),
        html.Div([html.Span("Layer", className="label"),
                  # No number box: it would show 0 where the marks say "emb"; the tooltip names the
                  # layer the way the marks do (window.dccFunctions.vliLayerLabel, app/assets/vli.js).
                  html.Div(dcc.Slider(id=ids.TSNE_LAYER, min=0, max=n_layers, step=1, value=n_layers,
                                      marks=layer_marks(n_layers), allow_direct_input=False,
                                      tooltip={"transform": "vliLayerLabel", "placement": "top"}),
                           className="layer-slider")], className="controls"),
        html.Div(image_downloads(ids.TSNE_GRAPH), className="controls"),
        dcc.Graph(id=ids.TSNE_GRAPH, clear_on_unhover=True, className="tsne-graph",
                  config={"displayModeBar": False}, **initial_figure(figure)),
        dcc.Tooltip(id=ids.TSNE_TOOLTIP, direction="left"),
        html.Div(id=ids.NEIGHBOR_INFO, className="neighbor-info",
                 children=NEIGHBOR_HINT),
        html.Button("Open it", id=ids.NEIGHBOR_OPEN, className="btn", style={"display": "none"}),
        dcc.Store(id=ids.TSNE_READY, data=ready), dcc.Store(id=ids.NEIGHBOR_STORE),
    ])
    matrix_tab = dcc.Tab(label="Attention matrix", value=TABS[1], children=[
        html.P("The selected head's attention: rows are queries, columns the keys they attend to.",
               className="help"),
        html.Div([dcc.RadioItems(id=ids.MATRIX_KIND, options=MATRIX_KINDS, value="tt", inline=True,
                                 className="matrix-kind"),
                  html.Button(".npy", id=ids.EXPORT_MATRIX, className="export-btn",
                              title="download the selected head's whole attention matrix (numpy .npy)"),
                  image_downloads(ids.MATRIX_GRAPH)], className="controls"),
        dcc.Graph(id=ids.MATRIX_GRAPH, className="matrix-graph",
                  config={"displaylogo": False, "modeBarButtonsToRemove": MATRIX_TOOLS_REMOVED}),
    ])
    distance_tab = dcc.Tab(label="Attention distance", value=TABS[2], children=[
        html.P(DISTANCE_HELP, className="help"),
        html.Div(image_downloads(ids.DISTANCE_GRAPH), className="controls"),
        dcc.Graph(id=ids.DISTANCE_GRAPH, className="distance-graph", config={"displayModeBar": False}),
    ])
    lens_tab = dcc.Tab(label="Logit lens", value=TABS[3], children=[
        html.P(LENS_HELP, className="help"),
        html.Div(id=ids.LENS_NOTE, className="help"),
        html.Div(image_downloads(ids.LENS_GRAPH), className="controls"),
        dcc.Graph(id=ids.LENS_GRAPH, className="lens-graph", config={"displayModeBar": False}),
    ])
    return panel("Hidden states and attention matrix", "Pick a view; only the visible one is computed.",
                 dcc.Tabs(id=ids.VIEW_TABS, value=TABS[0], children=[tsne_tab, matrix_tab, distance_tab, lens_tab],
                          className="view-tabs"),
                 class_name="panel-hidden")


def tsne_view(db, ex_id: int, layer: int) -> tuple:
    """The t-SNE map of one layer of an example (nothing marked) and its TSNE_READY value."""
    info = db.example(ex_id)
    fig = figures.tsne_figure(db.tsne(ex_id, layer), info.tokens, info.is_text, info.special, info.coords,
                              figures.tsne_title(layer, db.n_layers))
    return fig, {"ex": ex_id, "layer": layer}


def register_callbacks(app, ctx):
    db = ctx.db

    @lru_cache(maxsize=8)
    def small_image(ex_id: int):
        return db.image(ex_id)

    @app.callback(Output(ids.TSNE_GRAPH, "figure"), Output(ids.TSNE_READY, "data"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.TSNE_LAYER, "value"),
                  Input(ids.VIEW_TABS, "value"), prevent_initial_call=True)
    def draw_tsne(ex_id, layer, tab):
        if tab != "tsne":
            raise PreventUpdate
        example_info(db, ex_id)
        return tsne_view(db, ex_id, as_index(layer, db.n_layers + 1))

    @app.callback(Output(ids.TSNE_GRAPH, "figure", allow_duplicate=True), Output(ids.NEIGHBOR_INFO, "children"),
                  Output(ids.NEIGHBOR_STORE, "data"), Output(ids.NEIGHBOR_OPEN, "style"),
                  Output(ids.NEIGHBOR_OPEN, "children"),
                  Input(ids.SEL_STORE, "data"), Input(ids.TSNE_READY, "data"),
                  State(ids.NEIGHBOR_INFO, "children"), prevent_initial_call=True)
    def mark_tsne(sel, ready, shown_info):
        """Mark the selected token and its nearest other-modality token on the map (a Patch)."""
        if not ready:
            raise PreventUpdate
        ex_id, layer, info = _tsne_ready(db, ready)
        patch = Patch()
        hidden = {"display": "none"}
        tokens = selected_tokens(sel, ex_id, info.n_tokens)
        if not tokens:
            if shown_info == NEIGHBOR_HINT:
                # Nothing is marked (a fresh map, or already cleared): sending an empty Patch would
                # still make the browser redraw the map, ~100 ms of a page load.
                raise PreventUpdate
            if f"{ids.TSNE_READY}.data" in dctx.triggered_prop_ids:  # the map was just drawn bare
                return no_update, NEIGHBOR_HINT, None, hidden, no_update
            for k in (3, 4):
                patch["data"][k]["x"], patch["data"][k]["y"] = [], []
            return patch, NEIGHBOR_HINT, None, hidden, no_update
        pts = db.tsne(ex_id, layer)
        patch["data"][3]["x"] = pts[tokens, 0].astype(float).tolist()
        patch["data"][3]["y"] = pts[tokens, 1].astype(float).tolist()
        labels = figures.token_labels(info.tokens, info.coords)
        tok = tokens[0]
        if info.special[tok]:
            patch["data"][4]["x"], patch["data"][4]["y"] = [], []
            return patch, f"‘{labels[tok]}’ is a special token: select a text token or an image patch to " \
                "find its closest token of the other modality.", None, hidden, no_update
        nb = db.nearest_other_modality(ex_id, layer, tok)
        if nb is None:
            patch["data"][4]["x"], patch["data"][4]["y"] = [], []
            return patch, f"No token of the other modality to compare ‘{labels[tok]}’ with.", None, hidden, \
                no_update
        nb_info = db.example(nb.ex_id)
        nb_label = figures.token_labels(nb_info.tokens, nb_info.coords)[nb.token]
        other = "image" if info.is_text[tok] else "text"
        if nb.ex_id == ex_id:
            patch["data"][4]["x"] = [float(pts[nb.token, 0])]
            patch["data"][4]["y"] = [float(pts[nb.token, 1])]
            where = "in this example (◇ on the map)"
        else:
            patch["data"][4]["x"], patch["data"][4]["y"] = [], []
            where = f"in example {nb.ex_id}"
        which = f"‘{labels[tok]}’" + (" (the first selected token)" if len(tokens) > 1 else "")
        text = [f"Closest {other} token to {which} across the database: ", html.B(f"‘{nb_label}’"),
                f" {where}, cosine similarity {nb.similarity:.3f}."]
        button = f"Select ‘{nb_label}’" if nb.ex_id == ex_id else f"Open example {nb.ex_id} with ‘{nb_label}’ selected"
        return patch, text, {"ex": nb.ex_id, "token": int(nb.token)}, {}, button

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Output(ids.SEL_STORE, "data", allow_duplicate=True),
                  Output(ids.SIDE, "value", allow_duplicate=True),
                  Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.IMAGE_GRAPH, "selectedData", allow_duplicate=True),
                  Input(ids.NEIGHBOR_OPEN, "n_clicks"), State(ids.NEIGHBOR_STORE, "data"),
                  State(ids.EXAMPLE_READY, "data"), State(ids.IMAGE_GRAPH, "selectedData"),
                  prevent_initial_call=True)
    def open_neighbor(n, nb, shown_ex, img_selected):
        """Select the nearest token (opening its example); a box/lasso drawn on this example's
        image no longer shows the selection, so it goes."""
        if not n or not isinstance(nb, dict):
            raise PreventUpdate
        info = example_info(db, nb.get("ex"))
        token = as_index(nb.get("token"), info.n_tokens)
        side = info.modality(token)
        if img_selected and info.ex_id == shown_ex and info.grid:
            return info.ex_id, {"ex": info.ex_id, "tokens": [token]}, side, clear_drawn_selection(info), None
        return info.ex_id, {"ex": info.ex_id, "tokens": [token]}, side, no_update, no_update

    @app.callback(Output(ids.TSNE_TOOLTIP, "show"), Output(ids.TSNE_TOOLTIP, "bbox"),
                  Output(ids.TSNE_TOOLTIP, "children"),
                  Input(ids.TSNE_GRAPH, "hoverData"), State(ids.TSNE_READY, "data"), prevent_initial_call=True)
    def patch_tooltip(hover, ready):
        """Image tokens hover with a thumbnail of the image, the patch outlined."""
        if not hover or not ready:
            return False, no_update, no_update
        pt = first_point(hover)
        if pt.get("curveNumber") != 1:
            return False, no_update, no_update
        ex_id, _, info = _tsne_ready(db, ready)
        tok = point_token(pt, info)
        bbox = pt.get("bbox")
        if tok is None or not isinstance(bbox, dict):
            return False, no_update, no_update
        jpeg = figures.thumbnail_jpeg(small_image(ex_id), info.patch_cell(tok))
        label = figures.token_labels(info.tokens, info.coords)[tok]
        children = [html.Img(src="data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
                             className="thumb"), html.Div(label, className="thumb-label")]
        return True, bbox, children

    @app.callback(Output(ids.MATRIX_GRAPH, "figure"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.HEAD_STORE, "data"),
                  Input(ids.MATRIX_KIND, "value"), Input(ids.VIEW_TABS, "value"), prevent_initial_call=True)
    def draw_matrix(ex_id, head_sel, kind, tab):
        if tab != "matrix" or not head_sel or not isinstance(kind, str) or kind not in MATRIX_NAMES:
            raise PreventUpdate
        info = example_info(db, ex_id)
        head_sel = head_selection(db, head_sel)
        m = np.asarray(db.attention_matrix(ex_id, head_sel["layer"], head_sel["head"]), dtype=np.float32)
        labels = figures.token_labels(info.tokens, info.coords)
        if kind == "tt":
            shown = np.flatnonzero(info.is_text)
        elif kind == "ii":
            shown = np.flatnonzero(~info.is_text)
        else:
            shown = np.arange(info.n_tokens)
        title = f"Attention matrix ({MATRIX_NAMES[kind]}) — {head_label(head_sel)}"
        return figures.attention_matrix_figure(m[np.ix_(shown, shown)], [labels[i] for i in shown],
                                               [labels[i] for i in shown], title, shown, shown)


    @app.callback(Output(ids.DISTANCE_GRAPH, "figure"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.VIEW_TABS, "value"), prevent_initial_call=True)
    def draw_distance(ex_id, tab):
        if tab != "distance":
            raise PreventUpdate
        example_info(db, ex_id)
        return figures.attention_distance_figure(db.head_statistics(ex_id)["distance"])

    register_lens(app, db)

    @app.callback(Output(ids.DOWNLOAD, "data", allow_duplicate=True), Input(ids.EXPORT_MATRIX, "n_clicks"),
                  State(ids.EXAMPLE_SELECT, "value"), State(ids.HEAD_STORE, "data"), prevent_initial_call=True)
    def download_matrix(n_clicks, ex_id, head_sel):
        """The selected head's (or layer mean's) whole attention matrix, rows = queries, stored order."""
        if not n_clicks:
            raise PreventUpdate
        example_info(db, ex_id)
        head_sel = head_selection(db, head_sel)
        name = f"layer{head_sel['layer'] + 1}-" + ("mean" if head_sel["head"] is None else f"head{head_sel['head'] + 1}")
        matrix = db.attention_matrix(ex_id, head_sel["layer"], head_sel["head"])
        return dcc.send_bytes(export.matrix_npy(matrix), f"vl-interpret-example-{ex_id}-attention-{name}.npy")


def register_lens(app, db) -> None:
    @app.callback(Output(ids.LENS_GRAPH, "figure"), Output(ids.LENS_NOTE, "children"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.VIEW_TABS, "value"), prevent_initial_call=True)
    def draw_lens(ex_id, tab):
        """The logit lens tab (drawn only when visible)."""
        if tab != "lens":
            raise PreventUpdate
        lens = example_info(db, ex_id).logit_lens
        if not lens:
            return {}, NO_LENS
        return figures.logit_lens_figure(lens, db.n_layers), ""


def _tsne_ready(db, ready) -> tuple:
    """(example id, layer, ExampleInfo) of a TSNE_READY value, checked."""
    if not isinstance(ready, dict):
        raise PreventUpdate
    info = example_info(db, ready.get("ex"))
    return info.ex_id, as_index(ready.get("layer"), db.n_layers + 1), info


def point_token(pt: dict, info):
    """Token index of a t-SNE point: its customdata, or else its position in its trace (the traces
    hold text, image and special tokens in stored order, see figures.tsne_figure); None when the
    point names no token of the example."""
    cd = pt.get("customdata")
    if cd is not None:
        if isinstance(cd, float) and cd.is_integer():
            cd = int(cd)
        valid = isinstance(cd, int) and not isinstance(cd, bool) and 0 <= cd < info.n_tokens
        return cd if valid else None
    curve, k = pt.get("curveNumber"), pt.get("pointNumber", pt.get("pointIndex"))
    if curve not in (0, 1, 2) or isinstance(k, bool) or not isinstance(k, int):
        return None
    special = info.special
    members = [i for i in range(len(info.tokens))
               if (curve == 2 and special[i]) or (not special[i] and info.is_text[i] == (curve == 0))]
    return members[k] if 0 <= k < len(members) else None
