"""Text tokens and the image: pick the query tokens (text tokens, image patches or the image's special
tokens) and see their attention, for the selected head, tinted on every text token and as a heatmap
over the image. Also the play button that steps through the text tokens.

State: ``SEL_STORE`` = {"ex": id, "tokens": [...]} (the queries), ``HEAD_STORE`` (heads panel).
The image figure is built once per example (layout image); afterwards only its overlay is patched.
"""
from __future__ import annotations

import numpy as np
from dash import ALL, ClientsideFunction, Input, Output, Patch, State, ctx as dctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import figures, ids
from app.panels.common import head_label, initial_figure, panel
from app.panels.hidden import point_token

PLAY_MS = 900
DEFAULT_OPACITY = 0.6
HINT = "Click a text token or an image patch to see its attention"


def layout(ctx, ex_id):
    """The panel showing example ``ex_id`` with nothing selected (None: an empty database)."""
    segments, chips, figure, ready = example_view(ctx.db, ex_id, DEFAULT_OPACITY, []) if ex_id is not None \
        else (None, None, None, None)
    return panel(
        "Attention", "Pick the query side, then click tokens (text) or click / box-select / lasso patches "
        "(image): their attention to every token is shown, for the head selected in the head summary. "
        "Several patches are averaged.",
        html.Div([
            html.Span("Select from:", className="label"),
            dcc.RadioItems(id=ids.SIDE, options=[{"label": " text", "value": "text"},
                                                 {"label": " image", "value": "image"}],
                           value="text", inline=True, className="side-switch"),
            html.Button("▶ Play", id=ids.PLAY, className="btn", title="step through the text tokens"),
            html.Button("Clear", id=ids.CLEAR_SELECTION, className="btn", title="clear the selection"),
        ], className="controls"),
        html.Div(HINT, id=ids.ATT_TITLE, className="att-title"),
        html.Div(segments, id=ids.TEXT_TOKENS, className="text-tokens"),
        html.Div([
            dcc.Graph(id=ids.IMAGE_GRAPH, className="image-graph",
                      config={"displayModeBar": True, "displaylogo": False,
                              "modeBarButtonsToRemove": ["toImage", "autoScale2d", "zoomIn2d", "zoomOut2d"]},
                      **initial_figure(figure)),
            html.Div(chips, id=ids.IMAGE_SPECIALS, className="image-specials"),
        ], className="image-wrap"),
        html.Div([
            html.Span("Overlay opacity", className="label"),
            html.Div(dcc.Slider(id=ids.OPACITY, min=0, max=1, step=0.05, value=DEFAULT_OPACITY,
                                marks={0: "0", 0.5: "0.5", 1: "1"}), className="opacity-slider"),
            dcc.Checklist(id=ids.SMOOTH, options=[{"label": " smooth", "value": "smooth"}], value=[],
                          className="smooth-toggle"),
        ], className="controls"),
        dcc.Interval(id=ids.PLAY_INTERVAL, interval=PLAY_MS, disabled=True),
        dcc.Store(id=ids.TOKEN_CLICK), dcc.Store(id=ids.SEL_STORE, data=empty_selection(ex_id)),
        dcc.Store(id=ids.ATT_STORE), dcc.Store(id=ids.EXAMPLE_READY, data=ready),
        class_name="panel-attention")


def _span(text: str, index: int, cls: str, title: str = None) -> dict:
    """A clickable token span in Dash's component JSON: building 250 ``html.Span`` objects costs
    ~30 ms per example, this dict form ~1 ms, and the browser receives the same thing."""
    props = {"children": text, "id": {"type": ids.TOKEN, "index": index}, "className": cls, "n_clicks": 0}
    if title:
        props["title"] = title
    return {"type": "Span", "namespace": "dash_html_components", "props": props}


def token_elements(info) -> tuple[list, list]:
    """Text segments (split after each [SEP]) of clickable token spans, and the image-side special
    token chips. Special tokens get the class ``special`` (greyed) but stay clickable."""
    segments, current = [], []
    for i in range(info.txt_len):
        tok = info.tokens[i]
        current.append(_span(tok, i, "tok special" if info.special[i] else "tok"))
        if tok == "[SEP]":
            segments.append(html.Div(current, className="segment"))
            current = []
    if current:
        segments.append(html.Div(current, className="segment"))
    chips = [_span(info.tokens[i], i, "tok special chip", "image-side special token: click to select it")
             for i in range(info.txt_len, len(info.tokens)) if info.coords[i] is None]
    if chips:
        chips.insert(0, html.Span("Image tokens:", className="label"))
    return segments, chips


def example_view(db, ex_id: int, opacity: float, smooth: list) -> tuple:
    """Text token segments, image-side special tokens, the image figure (no overlay yet), and the
    example id for EXAMPLE_READY."""
    info = db.example(ex_id)
    segments, chips = token_elements(info)
    fig = figures.image_figure(figures.png_data_uri(db.image_png(ex_id)), info.image_size,
                               info.coords, info.grid)
    if info.grid:
        fig.data[0].opacity = opacity
        fig.data[0].zsmooth = "best" if smooth else False
    return segments, chips, fig, ex_id


def empty_selection(ex_id) -> dict:
    return {"ex": ex_id, "tokens": []}


def register_callbacks(app, ctx):
    db = ctx.db

    @app.callback(Output(ids.TEXT_TOKENS, "children"), Output(ids.IMAGE_SPECIALS, "children"),
                  Output(ids.IMAGE_GRAPH, "figure"), Output(ids.EXAMPLE_READY, "data"),
                  Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.OPACITY, "value"), State(ids.SMOOTH, "value"), prevent_initial_call=True)
    def show_example(ex_id, opacity, smooth):
        if ex_id is None:
            raise PreventUpdate
        return example_view(db, ex_id, opacity, smooth)

    app.clientside_callback(ClientsideFunction("vli", "tokenClick"), Output(ids.TOKEN_CLICK, "data"),
                            Input({"type": ids.TOKEN, "index": ALL}, "n_clicks"), prevent_initial_call=True)

    @app.callback(Output(ids.SEL_STORE, "data"), Output(ids.SIDE, "value"),
                  Output(ids.PLAY_INTERVAL, "disabled"), Output(ids.PLAY, "children"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.TOKEN_CLICK, "data"),
                  Input(ids.IMAGE_GRAPH, "clickData"), Input(ids.IMAGE_GRAPH, "selectedData"),
                  Input(ids.TSNE_GRAPH, "clickData"), Input(ids.SIDE, "value"),
                  Input(ids.CLEAR_SELECTION, "n_clicks"),
                  Input(ids.PLAY, "n_clicks"), Input(ids.PLAY_INTERVAL, "n_intervals"),
                  State(ids.SEL_STORE, "data"), State(ids.PLAY_INTERVAL, "disabled"), prevent_initial_call=True)
    def select_tokens(ex_id, token_click, img_click, img_selected, tsne_click, side, _clear, _play, _tick,
                      sel, stopped):
        """Every way of choosing the query tokens, in one place (branching on the trigger)."""
        if ex_id is None:
            raise PreventUpdate
        trig = dctx.triggered_id
        cur = sel["tokens"] if sel and sel.get("ex") == ex_id else []
        nu = no_update
        stop = (True, "▶ Play")
        if trig == ids.EXAMPLE_SELECT:
            if sel and sel.get("ex") == ex_id:  # e.g. opened from the nearest-token link
                raise PreventUpdate
            return empty_selection(ex_id), nu, *stop
        info = db.example(ex_id)
        if trig == ids.TOKEN_CLICK:
            if not token_click:
                raise PreventUpdate
            i = int(token_click["index"])
            return {"ex": ex_id, "tokens": [i]}, "text" if i < info.txt_len else "image", *stop
        if trig == ids.IMAGE_GRAPH and f"{ids.IMAGE_GRAPH}.clickData" in dctx.triggered_prop_ids:
            tok = _token_from_point((img_click or {}).get("points", [{}])[0])
            if tok is None or tok < 0:
                raise PreventUpdate
            return {"ex": ex_id, "tokens": [tok]}, "image", *stop
        if trig == ids.IMAGE_GRAPH:  # box / lasso selection: all the selected patches
            toks = sorted({t for t in (_token_from_point(p) for p in (img_selected or {}).get("points", []))
                           if t is not None and t >= 0})
            if not toks:
                raise PreventUpdate
            return {"ex": ex_id, "tokens": toks}, "image", *stop
        if trig == ids.TSNE_GRAPH:
            pts = (tsne_click or {}).get("points") or [{}]
            tok = point_token(pts[0], info)
            if tok is None:
                raise PreventUpdate
            return {"ex": ex_id, "tokens": [tok]}, "text" if tok < info.txt_len else "image", *stop
        if trig == ids.SIDE or trig == ids.CLEAR_SELECTION:
            return empty_selection(ex_id), nu, *stop
        if trig == ids.PLAY:
            if not stopped:
                return nu, nu, *stop
            start = 0 if not cur or cur[0] >= info.txt_len - 1 or side != "text" else cur[0]
            return {"ex": ex_id, "tokens": [start]}, "text", False, "⏸ Pause"
        if trig == ids.PLAY_INTERVAL:
            if stopped:
                raise PreventUpdate
            nxt = cur[0] + 1 if cur and len(cur) == 1 and cur[0] < info.txt_len else 0
            if nxt >= info.txt_len:
                return nu, nu, *stop
            out_stop = (True, "▶ Play") if nxt == info.txt_len - 1 else (nu, nu)
            return {"ex": ex_id, "tokens": [nxt]}, "text", *out_stop
        raise PreventUpdate

    @app.callback(Output(ids.ATT_STORE, "data"), Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.ATT_TITLE, "children"),
                  Input(ids.SEL_STORE, "data"), Input(ids.HEAD_STORE, "data"), Input(ids.EXAMPLE_READY, "data"),
                  State(ids.ATT_TITLE, "children"), prevent_initial_call=True)
    def show_attention(sel, head_sel, ready, shown_title):
        """Attention of the selected queries (one read of just those rows) to every token."""
        if ready is None or not head_sel:
            raise PreventUpdate
        info = db.example(ready)
        patch = Patch()
        tokens = sel["tokens"] if sel and sel.get("ex") == ready else []
        if not tokens:
            if shown_title == HINT:
                # No overlay is shown (a fresh image figure, or already cleared): an empty Patch
                # would still make the browser redraw the image, ~100 ms of a page load.
                raise PreventUpdate
            if f"{ids.EXAMPLE_READY}.data" in dctx.triggered_prop_ids:  # the figure was just drawn bare
                return None, no_update, HINT
            if info.grid:
                for key, value in figures.overlay_state(None, info.grid).items():
                    patch["data"][0][key] = value
            patch["layout"]["shapes"] = []
            return None, patch, HINT
        att = db.attention(ready, head_sel["layer"], head_sel["head"], tokens)
        att = np.asarray(att, dtype=np.float32)
        if info.grid:
            state = figures.overlay_state(figures.overlay_grid(att, info.coords, info.grid), info.grid)
            for key, value in state.items():
                patch["data"][0][key] = value
            patch["layout"]["shapes"] = figures.patch_shapes(tokens, info.coords, info.grid, info.image_size)
        # Text tokens and image-side special tokens are tinted in the browser (vli.tint).
        n_chips = next((i for i in range(info.txt_len, len(info.tokens)) if info.coords[i] is not None),
                       len(info.tokens))
        shown = att[:n_chips]
        plain = ~np.asarray(info.special[:n_chips], dtype=bool)
        scale = float(shown[plain].max()) if plain.any() else float(shown.max()) if len(shown) else 0.0
        store = {"w": np.round(shown.astype(np.float64), 4).tolist(), "max": scale, "sel": tokens}
        labels = figures.token_labels(info.tokens, info.coords)
        what = f"‘{labels[tokens[0]]}’" if len(tokens) == 1 else f"{len(tokens)} tokens (averaged)"
        title = [f"Attention from {what} — ", html.B(head_label(head_sel)),
                 html.Span([" · text tint ", html.Span(className="tint-legend"), f" 0 – {scale:.3g}",
                            " (hover a token for its value); heatmap over the image"], className="muted")]
        return store, patch, title

    app.clientside_callback(ClientsideFunction("vli", "tint"),
                            Output({"type": ids.TOKEN, "index": ALL}, "style"),
                            Output({"type": ids.TOKEN, "index": ALL}, "title"),
                            Input(ids.ATT_STORE, "data"), State({"type": ids.TOKEN, "index": ALL}, "id"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.OPACITY, "value"), Input(ids.SMOOTH, "value"), State(ids.EXAMPLE_READY, "data"),
                  prevent_initial_call=True)
    def style_overlay(opacity, smooth, ready):
        if ready is None or not db.example(ready).grid:
            raise PreventUpdate
        patch = Patch()
        patch["data"][0]["opacity"] = opacity
        patch["data"][0]["zsmooth"] = "best" if smooth else False
        return patch


def _token_from_point(pt: dict):
    """Token index of a clicked/selected point of the image figure (heatmap cell or patch marker)."""
    cd = pt.get("customdata")
    if isinstance(cd, list):
        cd = cd[0] if cd else None
    return int(cd) if isinstance(cd, (int, float)) else None
