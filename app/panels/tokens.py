"""Text tokens and the image: pick the query tokens (text tokens, image patches or the image's special
tokens) and see what they draw on, tinted on every text token and as a heatmap over the image: the
selected head's attention, or the attention rollout through the layers up to the selected one
(``ATT_METHOD``). Also the play button that steps through the text tokens, and, for an example with a
per-patch logit lens, the words its image tokens say at a chosen layer, drawn on their patches.

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
from app.panels.hidden import layer_marks, point_token

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
PATCH_WORDS_ON = "on"
PATCH_WORDS_HELP = ("Patch words: the model's final norm and LM head applied to each image token's hidden state "
                    "at the chosen layer (a logit lens per patch, emb = before layer 1): the top word of each "
                    "patch, larger and brighter the more probable (hover for the word and its probability).")


def play_label(playing: bool) -> list:
    """The Play button's icon and word. The icons are CSS shapes: "⏸" has no glyph in the fonts of
    a plain Debian Chromium (it showed as an empty box)."""
    return [html.Span(className="icon icon-pause" if playing else "icon icon-play"),
            "Pause" if playing else "Play"]


def layout(ctx, ex_id):
    """The panel showing example ``ex_id`` with nothing selected (None: an empty database)."""
    n_layers = ctx.db.n_layers or 0  # 0: no examples yet
    segments, chips, figure, ready, grid_options, grid_value, grid_style, words_style = \
        example_view(ctx.db, ex_id, DEFAULT_OPACITY, [], None) if ex_id is not None \
        else (None, None, None, None, [], 0, {"display": "none"}, {"display": "none"})
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
            html.Div([html.Span("Grid:", className="label"),
                      dcc.RadioItems(id=ids.GRID_SWITCH, options=grid_options, value=grid_value, inline=True,
                                     className="side-switch")],
                     id=ids.GRID_SWITCH_WRAP, className="controls grid-switch", style=grid_style,
                     title="the model saw the image through several patch grids: show one at a time"),
            html.Div([
                html.Div([dcc.Checklist(id=ids.PATCH_WORDS, value=[], className="smooth-toggle",
                                        options=[{"label": " patch words", "value": PATCH_WORDS_ON}]),
                          html.Span("at layer", className="label"),
                          html.Div(dcc.Slider(id=ids.PATCH_WORDS_LAYER, min=0, max=n_layers, step=1, value=n_layers,
                                              marks=layer_marks(n_layers), allow_direct_input=False,
                                              tooltip={"transform": "vliLayerLabel", "placement": "top"}),
                                   className="patch-words-slider", style={"flex": 1})], className="controls"),
                html.P(PATCH_WORDS_HELP, className="help"),
            ], id=ids.PATCH_WORDS_WRAP, className="patch-words", style=words_style),
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


def _note(text: str, cls: str, title: str) -> dict:
    return {"type": "Span", "namespace": "dash_html_components",
            "props": {"children": text, "className": cls, "title": title}}


def shown_text_tokens(info) -> list[int]:
    """The text tokens drawn, in sequence order: all but the ``[PAD]`` tokens that end the prompt
    (padding up to the model's length, never drawn)."""
    prompt = [int(i) for i in np.flatnonzero(info.is_text[:info.n_tokens - info.generated])]
    answer = list(range(info.n_tokens - info.generated, info.n_tokens))
    while prompt and info.tokens[prompt[-1]] == PAD:
        prompt.pop()
    return prompt + answer


def token_elements(info) -> tuple[list, list]:
    """Text segments of clickable token spans, and the image-side special token chips.

    The text is split after each [SEP]; where the image's tokens lie between text tokens (a decoder's
    prompt) a marker stands in their place, and the generated answer is a segment of its own.
    Special tokens get the class ``special`` (greyed) but stay clickable. The ``[PAD]`` tokens that end
    the prompt are one small "+N [PAD]" note instead of N tokens."""
    segments, current = [], []

    def close():
        nonlocal current
        if current:
            segments.append(html.Div(current, className="segment"))
        current = []

    shown = set(shown_text_tokens(info))
    first_generated = info.n_tokens - info.generated
    pads = sum(1 for i in np.flatnonzero(info.is_text[:first_generated]) if i not in shown)
    n, i = info.n_tokens, 0
    while i < n:
        if info.generated and i == first_generated:
            close()
            current.append(_note("answer:", "label generated-label", f"the {info.generated} tokens the model "
                                                                        f"generated: click one for its attention"))
        if not info.is_text[i]:
            end = i
            while end < n and not info.is_text[end]:
                end += 1
            if 0 < end < n or (i == 0 and end < n):  # the image lies within or before the text
                patches = sum(1 for k in range(i, end) if info.coords[k] is not None)
                current.append(_note(f"[image · {patches} patches]", "image-slot",
                                     f"tokens {i}–{end - 1}: the image's place in the sequence"))
            i = end
            continue
        if i in shown:
            tok = info.tokens[i]
            cls = "tok special" if info.special[i] else "tok"
            current.append(_span(tok, i, cls + " generated" if i >= first_generated else cls))
            if tok == "[SEP]":
                close()
        i += 1
    if pads:
        note = _note(f"+{pads} {PAD}", "pad-note", f"{pads} padding tokens end the text (not shown)")
        (current if current or not segments else segments[-1].children).append(note)
    close()
    chips = [_span(info.tokens[i], i, "tok special chip", "image-side special token: click to select it")
             for i in range(n) if not info.is_text[i] and info.coords[i] is None]
    if chips:
        chips.insert(0, html.Span("Image tokens:", className="label"))
    return segments, chips


def example_view(db, ex_id: int, opacity: float, smooth: list, lens_layer: Optional[int]) -> tuple:
    """Text token segments, image-side special tokens, the image figure (first grid, no overlay yet; the
    patch words of ``lens_layer`` when not None), the example id for EXAMPLE_READY, the grid switch
    (options, value, style) and the patch words' style."""
    info = db.example(ex_id)
    segments, chips = token_elements(info)
    return (segments, chips, image_view(db, info, 0, opacity, smooth, lens_layer=lens_layer), ex_id,
            *grid_switch(info), {} if shows_patch_words(info) else {"display": "none"})


def shows_patch_words(info) -> bool:
    """Whether the example has words to draw on its patches (a per-patch logit lens and a patch grid)."""
    return info.has_patch_lens and bool(info.grids)


def patch_words(db, info, g: int, lens_layer: Optional[int]) -> dict:
    """The image figure's patch-words trace on grid ``g``: the words of hidden-state layer ``lens_layer``,
    or none (an empty trace, kept for the toggle to fill) when it is None."""
    grid = info.grids[g]
    lens = db.patch_lens(info.ex_id, lens_layer) if lens_layer is not None else None
    tokens, words, probabilities = lens if lens is not None else ((), (), ())
    return figures.patch_words_trace(tokens, words, probabilities, info.on_grid(g), grid.shape, info.image_size,
                                     grid.box)


def patch_words_layer(db, toggle, layer) -> Optional[int]:
    """The layer whose patch words are drawn (None: the toggle is off), from the browser's values."""
    if not isinstance(toggle, list):
        raise PreventUpdate
    return as_index(layer, db.n_layers + 1) if PATCH_WORDS_ON in toggle else None


def grid_switch(info) -> tuple[list, int, dict]:
    """The grid switch's options, value and style: shown only for an example with several grids."""
    options = [{"label": f" {grid.name or f'grid {g + 1}'} ({grid.rows}×{grid.cols})", "value": g}
               for g, grid in enumerate(info.grids)]
    return options, 0, {} if len(options) > 1 else {"display": "none"}


def shown_grid(info, value) -> int:
    """The grid switch's value as a grid of the example (0 for anything else)."""
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(info.grids)
    return value if valid else 0


def grid_overlay(info, g: int, att: Optional[np.ndarray], tokens: list, method: str) -> tuple[dict, list]:
    """The overlay trace's properties and the selection outlines on grid ``g`` for the weights ``att``
    (None: the empty overlay)."""
    grid, coords = info.grids[g], info.on_grid(g)
    if att is None:
        return figures.overlay_state(None, grid.shape), []
    state = figures.overlay_state(figures.overlay_grid(att, coords, grid.shape), grid.shape, method)
    return state, figures.patch_shapes(tokens, coords, grid.shape, info.image_size, grid.box)


def image_view(db, info, g: int, opacity: float, smooth: list, att: Optional[np.ndarray] = None,
               tokens: list = (), method: str = DEFAULT_METHOD, lens_layer: Optional[int] = None):
    """The image figure with grid ``g`` (each grid over its own region of the image), given ``att`` its
    overlay, and for an example with a per-patch logit lens the words of ``lens_layer`` (None: none yet)."""
    grid = info.grids[g] if info.grids else None
    words = patch_words(db, info, g, lens_layer) if shows_patch_words(info) else None
    fig = figures.image_figure(figures.png_data_uri(db.image_png(info.ex_id)), info.image_size,
                               info.on_grid(g) if grid else info.coords, grid and grid.shape, grid and grid.box,
                               words)
    if grid:
        state, shapes = grid_overlay(info, g, att, list(tokens), method)
        fig.update(data=[dict(fig.data[0].to_plotly_json(), **state, opacity=opacity,
                              zsmooth="best" if smooth else False)] + list(fig.data[1:]))
        fig.layout.shapes = shapes
    return fig


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
                  Output(ids.GRID_SWITCH, "options"), Output(ids.GRID_SWITCH, "value"),
                  Output(ids.GRID_SWITCH_WRAP, "style"), Output(ids.PATCH_WORDS_WRAP, "style"),
                  Input(ids.EXAMPLE_SELECT, "value"),
                  State(ids.OPACITY, "value"), State(ids.SMOOTH, "value"), State(ids.GRID_SWITCH, "value"),
                  State(ids.PATCH_WORDS, "value"), State(ids.PATCH_WORDS_LAYER, "value"),
                  prevent_initial_call=True)
    def show_example(ex_id, opacity, smooth, grid_value, words_toggle, words_layer):
        example_info(db, ex_id)
        shown = _opacity(opacity)
        view = example_view(db, ex_id, DEFAULT_OPACITY if shown is None else shown, smooth,
                            patch_words_layer(db, words_toggle, words_layer))
        # The switch goes back to the first grid only when it showed another: setting its value fires
        # switch_grid, which would draw this example's image a second time.
        return *view[:5], view[5] if grid_value != view[5] else no_update, *view[6:]

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
            return answer([i], info.modality(i))
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
            return answer([tok], info.modality(tok))
        if trig == ids.SIDE or trig == ids.CLEAR_SELECTION:
            if side not in SIDES:
                raise PreventUpdate
            return answer([])
        steps = shown_text_tokens(info)  # Play steps through the text tokens shown
        step = steps.index(cur[0]) if len(cur) == 1 and cur[0] in steps else None
        if trig == ids.PLAY:
            if not stopped:
                return answer()  # pause
            if not steps:
                raise PreventUpdate
            start = 0 if step is None or step >= len(steps) - 1 or side != "text" else step
            return answer([steps[start]], "text", playing=True)
        if trig == ids.PLAY_INTERVAL:  # (a box/lasso drawn meanwhile stopped the play: none to clear)
            if stopped:
                raise PreventUpdate
            nxt = 0 if step is None else step + 1
            if nxt >= len(steps):
                return answer(clear=False)
            return answer([steps[nxt]], "text", playing=False if nxt == len(steps) - 1 else None, clear=False)
        raise PreventUpdate

    @app.callback(Output(ids.ATT_METHOD_HELP, "children"), Input(ids.ATT_METHOD, "value"),
                  prevent_initial_call=True)
    def show_method_help(method):
        return METHODS[attention_method(method)][1]

    @app.callback(Output(ids.ATT_STORE, "data"), Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.ATT_TITLE, "children"),
                  Input(ids.SEL_STORE, "data"), Input(ids.HEAD_STORE, "data"), Input(ids.EXAMPLE_READY, "data"),
                  Input(ids.ATT_METHOD, "value"), State(ids.ATT_TITLE, "children"), State(ids.GRID_SWITCH, "value"),
                  prevent_initial_call=True)
    def show_attention(sel, head_sel, ready, method, shown_title, grid_value):
        """The selected queries' attention, or rollout (one read of just those rows), to every token."""
        if ready is None or not head_sel:
            raise PreventUpdate
        info = example_info(db, ready)
        head_sel = head_selection(db, head_sel)
        method = attention_method(method)
        g = shown_grid(info, grid_value)
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
                for key, value in grid_overlay(info, g, None, [], method)[0].items():
                    patch["data"][0][key] = value
            patch["layout"]["shapes"] = []
            return None, patch, HINT
        att = selection_weights(db, ready, method, head_sel, tokens)
        if att is None:  # nothing to show for this method: clear what was shown, and say why
            if info.grid:
                for key, value in grid_overlay(info, g, None, [], method)[0].items():
                    patch["data"][0][key] = value
            return None, patch, NO_RELEVANCY
        image_max = None
        if info.grid:
            state, patch["layout"]["shapes"] = grid_overlay(info, g, att, tokens, method)
            image_max = state["zmax"]
            for key, value in state.items():
                patch["data"][0][key] = value
        # Text tokens and image-side special tokens are tinted in the browser (vli.tint), on the
        # same colour scale as the image, from 0 to the highest attention of a (non-special) token.
        spans = np.array([c is None for c in info.coords])  # the tokens drawn as text or chips
        last = int(np.flatnonzero(spans)[-1]) + 1 if spans.any() else 0
        plain = spans & ~np.asarray(info.special, dtype=bool)
        scale = figures.scale_max(att[plain] if plain.any() else att[spans])
        store = {"w": np.round(att[:last].astype(np.float64), 4).tolist(), "max": scale, "sel": tokens,
                 "name": method}
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

    @app.callback(Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Output(ids.IMAGE_GRAPH, "selectedData", allow_duplicate=True),
                  Input(ids.GRID_SWITCH, "value"), State(ids.EXAMPLE_READY, "data"), State(ids.SEL_STORE, "data"),
                  State(ids.HEAD_STORE, "data"), State(ids.ATT_METHOD, "value"), State(ids.OPACITY, "value"),
                  State(ids.SMOOTH, "value"), State(ids.PATCH_WORDS, "value"), State(ids.PATCH_WORDS_LAYER, "value"),
                  prevent_initial_call=True)
    def switch_grid(grid_value, ready, sel, head_sel, method, opacity, smooth, words_toggle, words_layer):
        """Another grid of the example: the image figure redrawn with that grid, the overlay of the
        current selection on it (one figure, so that no patch of the old one can land on it)."""
        if ready is None or not head_sel:
            raise PreventUpdate
        info = example_info(db, ready)
        method = attention_method(method)
        tokens = selected_tokens(sel, ready, info.n_tokens)
        att = selection_weights(db, ready, method, head_selection(db, head_sel), tokens) if tokens else None
        shown = _opacity(opacity)
        return image_view(db, info, shown_grid(info, grid_value), DEFAULT_OPACITY if shown is None else shown,
                          smooth, att, tokens, method, patch_words_layer(db, words_toggle, words_layer)), None

    @app.callback(Output(ids.IMAGE_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.PATCH_WORDS, "value"), Input(ids.PATCH_WORDS_LAYER, "value"),
                  State(ids.EXAMPLE_READY, "data"), State(ids.GRID_SWITCH, "value"), prevent_initial_call=True)
    def show_patch_words(words_toggle, words_layer, ready, grid_value):
        """The words of the chosen layer on the patches (or none), in place of the ones shown."""
        if ready is None:
            raise PreventUpdate
        info = example_info(db, ready)
        if not shows_patch_words(info):
            raise PreventUpdate
        patch = Patch()
        patch["data"][3] = patch_words(db, info, shown_grid(info, grid_value),
                                       patch_words_layer(db, words_toggle, words_layer))
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
