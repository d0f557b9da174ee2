"""Text tokens and the image: pick the query tokens (text tokens, image patches or the image's special
tokens) and see what they draw on, tinted on every text token and as a heatmap over the image: the
selected head's attention, or the attention rollout through the layers up to the selected one
(``ATT_METHOD``). Also the play button that steps through the text tokens.

State: ``SEL_STORE`` = {"ex": id, "tokens": [...]} (the queries), ``HEAD_STORE`` (heads panel).
The image figure is built once per example (layout image); afterwards only its overlay is patched.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from dash import ALL, ClientsideFunction, Input, Output, Patch, State, ctx as dctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import export, figures, ids
from app.panels.common import (as_index, clear_drawn_selection, example_info, first_point, head_label,
                               head_selection, image_downloads, initial_figure, panel, selected_tokens)
from app.panels.hidden import point_token

PLAY_MS = 900
DEFAULT_OPACITY = 0.6
HINT = "Click a text token or an image patch to see its attention"
PAD = "[PAD]"
SIDES = ("text", "image")
LEGEND_STYLE = {"background": figures.css_gradient(figures.ATTENTION_SCALE)}
# What the panel shows for the selection: value -> (switch label, definition shown under the switch).
METHODS = {
    "attention": ("attention", "The selected head's weights (or its layer's mean of heads) "
                               "from the selected tokens to every token."),
    "rollout": ("rollout", "Â = 0.5·mean of heads + 0.5·I per layer, rows renormalised, multiplied "
                           "from the first layer up (Abnar & Zuidema 2020): what the token draws on from every "
                           "input token."),
    "relevancy": ("relevancy", "R = I, then R ← R + mean of heads((∇A ⊙ A)⁺)·R layer by layer, with the "
                               "gradients of the model's prediction (Chefer et al. 2021): what the prediction "
                               "uses, through these tokens. All layers and heads."),
}
NO_RELEVANCY = ("This example has no gradient relevancy: its record did not bring one (the ViLT adapter "
                "computes it for VQA and retrieval heads).")
DEFAULT_METHOD = "attention"


def play_label(playing: bool) -> list:
    """The Play button's icon and word. The icons are CSS shapes: "⏸" has no glyph in the fonts of
    a plain Debian Chromium (it showed as an empty box)."""
    return [html.Span(className="icon icon-pause" if playing else "icon icon-play"),
            "Pause" if playing else "Play"]


def layout(ctx, ex_id):
    """The panel showing example ``ex_id`` with nothing selected (None: an empty database)."""
    segments, chips, figure, ready = example_view(ctx.db, ex_id, DEFAULT_OPACITY, []) if ex_id is not None \
        else (None, None, None, None)
    return panel(
        "Attention", "Pick the query side, then click tokens (text) or click / box-select / lasso patches "
        "(image): their attention to every token is shown, for the head selected in the head summary. "
        "Several patches are averaged.",
        html.Div([
            html.Span("Select:", className="label"),
            dcc.RadioItems(id=ids.SIDE, options=[{"label": " text", "value": "text"},
                                                 {"label": " image", "value": "image"}],
                           value="text", inline=True, className="side-switch"),
            html.Button(play_label(False), id=ids.PLAY, className="btn play-btn",
                        title="step through the text tokens"),
            html.Button("Clear", id=ids.CLEAR_SELECTION, className="btn", title="clear the selection"),
            html.Button("CSV", id=ids.EXPORT_ATTENTION, className="export-btn",
                        title="download the weights shown (every token) as CSV"),
            image_downloads(ids.IMAGE_GRAPH),
            dcc.RadioItems(id=ids.ATT_METHOD, options=[{"label": f" {label}", "value": value}
                                                       for value, (label, _) in METHODS.items()],
                           value=DEFAULT_METHOD, inline=True, className="side-switch method-switch"),
        ], className="controls"),
        html.P(METHODS[DEFAULT_METHOD][1], id=ids.ATT_METHOD_HELP, className="help method-help"),
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
        dcc.Store(id=ids.ATT_SCALE, data=figures.ATTENTION_SCALE),
        class_name="panel-attention")


def _span(text: str, index: int, cls: str, title: str = None) -> dict:
    """A clickable token span in Dash's component JSON: building 250 ``html.Span`` objects costs
    ~30 ms per example, this dict form ~1 ms, and the browser receives the same thing."""
    props = {"children": text, "id": {"type": ids.TOKEN, "index": index}, "className": cls, "n_clicks": 0}
    if title:
        props["title"] = title
    return {"type": "Span", "namespace": "dash_html_components", "props": props}


def trailing_pads(info) -> int:
    """How many ``[PAD]`` tokens end the text (padding up to the model's length, never drawn)."""
    n = 0
    while n < info.txt_len and info.tokens[info.txt_len - 1 - n] == PAD:
        n += 1
    return n


def token_elements(info) -> tuple[list, list]:
    """Text segments (split after each [SEP]) of clickable token spans, and the image-side special
    token chips. Special tokens get the class ``special`` (greyed) but stay clickable. Trailing
    ``[PAD]`` tokens are one small "+N [PAD]" note at the end instead of N tokens."""
    segments, current = [], []
    pads = trailing_pads(info)
    for i in range(info.txt_len - pads):
        tok = info.tokens[i]
        current.append(_span(tok, i, "tok special" if info.special[i] else "tok"))
        if tok == "[SEP]":
            segments.append(html.Div(current, className="segment"))
            current = []
    if pads:
        note = {"type": "Span", "namespace": "dash_html_components",
                "props": {"children": f"+{pads} {PAD}", "className": "pad-note",
                          "title": f"{pads} padding tokens end the text (not shown)"}}
        (current if current or not segments else segments[-1].children).append(note)
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


def attention_method(value) -> str:
    """An ATT_METHOD value sent by the browser: one of METHODS' keys, else the update is refused."""
    if not isinstance(value, str) or value not in METHODS:
        raise PreventUpdate
    return value


def method_label(method: str, head_sel: dict) -> str:
    """What the title says is shown: "layer 3, head 2" (attention) or "rollout through layers 1–3
    (all heads, with the residual)"."""
    if method == "attention":
        return head_label(head_sel)
    if method == "relevancy":
        return "gradient relevancy for the prediction (all layers and heads)"
    layers = "layer 1" if head_sel["layer"] == 0 else f"layers 1–{head_sel['layer'] + 1}"
    return f"rollout through {layers} (all heads, with the residual)"


def selection_weights(db, ex_id: int, method: str, head_sel: dict, tokens: list) -> Optional[np.ndarray]:
    """float32 (n_tokens,): the method's weights from the selected tokens (their rows averaged); None
    for relevancy when the example has none."""
    if method == "rollout":
        weights = db.rollout(ex_id, head_sel["layer"], tokens)
    elif method == "relevancy":
        weights = db.relevancy(ex_id, tokens)
        if weights is None:
            return None
    else:
        weights = db.attention(ex_id, head_sel["layer"], head_sel["head"], tokens)
    return np.asarray(weights, dtype=np.float32)


def register_callbacks(app, ctx):
    db = ctx.db

    @app.callback(Output(ids.TEXT_TOKENS, "children"), Output(ids.IMAGE_SPECIALS, "children"),
                  Output(ids.IMAGE_GRAPH, "figure"), Output(ids.EXAMPLE_READY, "data"),
                  Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.OPACITY, "value"), State(ids.SMOOTH, "value"), prevent_initial_call=True)
    def show_example(ex_id, opacity, smooth):
        example_info(db, ex_id)
        shown = _opacity(opacity)
        return example_view(db, ex_id, DEFAULT_OPACITY if shown is None else shown, smooth)

    app.clientside_callback(ClientsideFunction("vli", "tokenClick"), Output(ids.TOKEN_CLICK, "data"),
                            Input({"type": ids.TOKEN, "index": ALL}, "n_clicks"), prevent_initial_call=True)

    @app.callback(Output(ids.SEL_STORE, "data"), Output(ids.SIDE, "value"),
                  Output(ids.PLAY_INTERVAL, "disabled"), Output(ids.PLAY, "children"),
                  Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.IMAGE_GRAPH, "selectedData"),
                  Input(ids.EXAMPLE_SELECT, "value"), Input(ids.TOKEN_CLICK, "data"),
                  Input(ids.IMAGE_GRAPH, "clickData"), Input(ids.IMAGE_GRAPH, "selectedData"),
                  Input(ids.TSNE_GRAPH, "clickData"), Input(ids.SIDE, "value"),
                  Input(ids.CLEAR_SELECTION, "n_clicks"),
                  Input(ids.PLAY, "n_clicks"), Input(ids.PLAY_INTERVAL, "n_intervals"),
                  State(ids.SEL_STORE, "data"), State(ids.PLAY_INTERVAL, "disabled"), prevent_initial_call=True)
    def select_tokens(ex_id, token_click, img_click, img_selected, tsne_click, side, _clear, _play, _tick,
                      sel, stopped):
        """Every way of choosing the query tokens, in one place (branching on the trigger). Any
        choice but a box/lasso selection also removes the box/lasso drawn on the image (and its
        selectedData, which says whether one is drawn)."""
        info = example_info(db, ex_id)
        trig = dctx.triggered_id
        nu = no_update

        def answer(tokens=None, new_side=nu, playing=False, clear=True):
            """The outputs: the selection (None: unchanged), the side, Play's state (None: unchanged)."""
            drawn = clear and bool(img_selected) and bool(info.grid)
            play = (nu, nu) if playing is None else (not playing, play_label(playing))
            return (nu if tokens is None else {"ex": ex_id, "tokens": tokens}, new_side, *play,
                    clear_drawn_selection(info) if drawn else nu, None if drawn else nu)

        if trig == ids.EXAMPLE_SELECT:
            if isinstance(sel, dict) and sel.get("ex") == ex_id:  # e.g. opened from the nearest-token link
                raise PreventUpdate
            # A new, bare image figure comes: only the previous one's selectedData goes.
            return *answer([], clear=False)[:5], None if img_selected else nu
        cur = selected_tokens(sel, ex_id, info.n_tokens)
        if trig == ids.TOKEN_CLICK:
            if not isinstance(token_click, dict):
                raise PreventUpdate
            i = as_index(token_click.get("index"), info.n_tokens)
            return answer([i], "text" if i < info.txt_len else "image")
        if trig == ids.IMAGE_GRAPH and f"{ids.IMAGE_GRAPH}.clickData" in dctx.triggered_prop_ids:
            tok = _token_from_point(first_point(img_click), info.n_tokens)
            if tok is None:
                raise PreventUpdate
            return answer([tok], "image")
        if trig == ids.IMAGE_GRAPH:  # box / lasso selection: all the selected patches, drawn as selected
            points = img_selected.get("points") if isinstance(img_selected, dict) else None
            if not isinstance(points, list) or len(points) > info.n_tokens:
                raise PreventUpdate
            toks = sorted({t for t in (_token_from_point(p, info.n_tokens) for p in points) if t is not None})
            if not toks:
                raise PreventUpdate
            return answer(toks, "image", clear=False)
        if trig == ids.TSNE_GRAPH:
            tok = point_token(first_point(tsne_click), info)
            if tok is None:
                raise PreventUpdate
            return answer([tok], "text" if tok < info.txt_len else "image")
        if trig == ids.SIDE or trig == ids.CLEAR_SELECTION:
            if side not in SIDES:
                raise PreventUpdate
            return answer([])
        n_text = info.txt_len - trailing_pads(info)  # Play steps through the tokens shown
        if trig == ids.PLAY:
            if not stopped:
                return answer()  # pause
            if n_text == 0:
                raise PreventUpdate
            start = 0 if not cur or cur[0] >= n_text - 1 or side != "text" else cur[0]
            return answer([start], "text", playing=True)
        if trig == ids.PLAY_INTERVAL:  # (a box/lasso drawn meanwhile stopped the play: none to clear)
            if stopped:
                raise PreventUpdate
            nxt = cur[0] + 1 if len(cur) == 1 and cur[0] < n_text else 0
            if nxt >= n_text:
                return answer(clear=False)
            return answer([nxt], "text", playing=False if nxt == n_text - 1 else None, clear=False)
        raise PreventUpdate

    @app.callback(Output(ids.ATT_METHOD_HELP, "children"), Input(ids.ATT_METHOD, "value"),
                  prevent_initial_call=True)
    def show_method_help(method):
        return METHODS[attention_method(method)][1]

    @app.callback(Output(ids.ATT_STORE, "data"), Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.ATT_TITLE, "children"),
                  Input(ids.SEL_STORE, "data"), Input(ids.HEAD_STORE, "data"), Input(ids.EXAMPLE_READY, "data"),
                  Input(ids.ATT_METHOD, "value"), State(ids.ATT_TITLE, "children"), prevent_initial_call=True)
    def show_attention(sel, head_sel, ready, method, shown_title):
        """The selected queries' attention, or rollout (one read of just those rows), to every token."""
        if ready is None or not head_sel:
            raise PreventUpdate
        info = example_info(db, ready)
        head_sel = head_selection(db, head_sel)
        method = attention_method(method)
        patch = Patch()
        tokens = selected_tokens(sel, ready, info.n_tokens)
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
        att = selection_weights(db, ready, method, head_sel, tokens)
        if att is None:  # nothing to show for this method: clear what was shown, and say why
            if info.grid:
                for key, value in figures.overlay_state(None, info.grid).items():
                    patch["data"][0][key] = value
            return None, patch, NO_RELEVANCY
        image_max = None
        if info.grid:
            grid = figures.overlay_grid(att, info.coords, info.grid)
            state = figures.overlay_state(grid, info.grid, method)
            image_max = state["zmax"]
            for key, value in state.items():
                patch["data"][0][key] = value
            patch["layout"]["shapes"] = figures.patch_shapes(tokens, info.coords, info.grid, info.image_size)
        # Text tokens and image-side special tokens are tinted in the browser (vli.tint), on the
        # same colour scale as the image, from 0 to the highest attention of a (non-special) token.
        n_chips = next((i for i in range(info.txt_len, len(info.tokens)) if info.coords[i] is not None),
                       len(info.tokens))
        shown = att[:n_chips]
        plain = ~np.asarray(info.special[:n_chips], dtype=bool)
        scale = figures.scale_max(shown[plain] if plain.any() else shown)
        store = {"w": np.round(shown.astype(np.float64), 4).tolist(), "max": scale, "sel": tokens, "name": method}
        labels = figures.token_labels(info.tokens, info.coords)
        what = f"‘{labels[tokens[0]]}’" if len(tokens) == 1 else f"{len(tokens)} tokens (averaged)"
        ranges = f"text 0 – {scale:.3g}" + (f", image 0 – {image_max:.3g}" if image_max is not None else "")
        title = [f"Attention from {what} — " if method == "attention" else f"From {what} — ",
                 html.B(method_label(method, head_sel)),
                 html.Span([" · colour ", html.Span(className="tint-legend", style=LEGEND_STYLE),
                            f" low → high: {ranges} (hover for values)"], className="muted")]
        return store, patch, title

    @app.callback(Output(ids.DOWNLOAD, "data", allow_duplicate=True), Input(ids.EXPORT_ATTENTION, "n_clicks"),
                  State(ids.SEL_STORE, "data"), State(ids.HEAD_STORE, "data"), State(ids.EXAMPLE_READY, "data"),
                  State(ids.ATT_METHOD, "value"), prevent_initial_call=True)
    def download_attention(n_clicks, sel, head_sel, ready, method):
        """The weights the panel shows for the selection, every token, as CSV."""
        if not n_clicks or ready is None:
            raise PreventUpdate
        info = example_info(db, ready)
        head_sel, method = head_selection(db, head_sel), attention_method(method)
        tokens = selected_tokens(sel, ready, info.n_tokens)
        weights = selection_weights(db, ready, method, head_sel, tokens) if tokens else None
        if weights is None:
            raise PreventUpdate
        labels = figures.token_labels(info.tokens, info.coords)
        what = (f"example {ready}: {method} from {', '.join(labels[t] for t in tokens)} "
                f"({method_label(method, head_sel)}; several tokens: their rows averaged)")
        return dcc.send_string(export.attention_csv(info, weights, method, what),
                               f"vl-interpret-example-{ready}-{method}.csv")

    app.clientside_callback(ClientsideFunction("vli", "tint"),
                            Output({"type": ids.TOKEN, "index": ALL}, "style"),
                            Output({"type": ids.TOKEN, "index": ALL}, "title"),
                            Input(ids.ATT_STORE, "data"), State({"type": ids.TOKEN, "index": ALL}, "id"),
                            State(ids.ATT_SCALE, "data"), prevent_initial_call=True)

    @app.callback(Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.OPACITY, "value"), Input(ids.SMOOTH, "value"), State(ids.EXAMPLE_READY, "data"),
                  prevent_initial_call=True)
    def style_overlay(opacity, smooth, ready):
        if ready is None or not example_info(db, ready).grid:
            raise PreventUpdate
        if _opacity(opacity) is None:
            raise PreventUpdate
        patch = Patch()
        patch["data"][0]["opacity"] = _opacity(opacity)
        patch["data"][0]["zsmooth"] = "best" if smooth else False
        return patch


def _opacity(value):
    """The overlay opacity slider's value as a float in 0..1; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        return None
    return float(value)


def _token_from_point(pt, n_tokens: int):
    """Token index of a clicked/selected point of the image figure (heatmap cell or patch marker),
    None where the point names no token (an empty cell's -1, or anything out of range)."""
    cd = pt.get("customdata") if isinstance(pt, dict) else None
    if isinstance(cd, list):
        cd = cd[0] if cd else None
    if isinstance(cd, float) and cd.is_integer():
        cd = int(cd)
    return cd if isinstance(cd, int) and not isinstance(cd, bool) and 0 <= cd < n_tokens else None
