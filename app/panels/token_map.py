"""The database-wide token map: tokens of many examples in one t-SNE map of a layer's hidden states
(app.database.token_map fits it, in the background, on first use; the page polls its progress).
Colour by modality, word, correctness or example; the shown example's tokens are ringed; a click
opens the token's example with that token selected."""
from __future__ import annotations

from dash import Input, Output, Patch, State, ctx as dctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import figures, ids
from app.database import token_map as tm
from app.panels.common import as_index, example_info, first_point, panel

POLL_MS = 700
COLOUR_OPTIONS = [{"label": f" {name}", "value": name} for name in figures.TOKEN_MAP_COLOURINGS]
HIDDEN, SHOWN = {"display": "none"}, {}
HELP = ("Tokens of many examples in one t-SNE map of a layer's hidden states (openTSNE, after PCA to 50 "
        "dimensions), sampled uniformly from all the tokens of the database: near means similar. Hover a dot for "
        "its token and example; click it to open that example with the token selected; click a legend entry to "
        "hide it.")


def layer_options(n_layers: int) -> list[dict]:
    return [{"label": "embeddings" if layer == 0 else f"after layer {layer}", "value": layer}
            for layer in range(n_layers + 1)]


def status_text(status: dict, maps: tm.TokenMaps) -> str:
    """The line under the controls: what is being done, what went wrong, or nothing to say."""
    if status["state"] == "fitting":
        return f"Fitting the map of up to {maps.max_tokens:,} tokens: {status['phase']}…"
    if status["state"] == "error":
        return f"The map could not be fitted: {status['message']}"
    return maps.not_kept or ""


def map_view(token_map: tm.TokenMap, colour_by: str, shown_example, n_layers: int):
    """The figure, its title line and what the page remembers of it (to read clicks and ring examples)."""
    where = "embeddings" if token_map.layer == 0 else f"after layer {token_map.layer} of {n_layers}"
    n_examples = len(set(token_map.ex_ids.tolist()))
    title = f"{len(token_map):,} tokens of {n_examples:,} examples — {where}"
    fig = figures.token_map_figure(token_map.points, token_map.ex_ids, token_map.tokens, token_map.words,
                                   token_map.modality, token_map.cells, token_map.correct, colour_by, title,
                                   shown_example)
    drawn = {"layer": token_map.layer, "key": token_map.examples_key, "ring": len(fig.data) - 1}
    return fig, drawn


def layout(ctx):
    n_layers = ctx.db.n_layers or 0
    controls = html.Div([
        html.Button("Show the token map", id=ids.TOKEN_MAP_OPEN, className="btn",
                    title="fit (first time only, about a minute for 20 000 tokens) and draw the map"),
        html.Span("layer", className="muted"),
        dcc.Dropdown(id=ids.TOKEN_MAP_LAYER, options=layer_options(n_layers), value=n_layers, clearable=False,
                     searchable=False, className="dataset-layer"),
        html.Span("colour by", className="muted"),
        dcc.RadioItems(id=ids.TOKEN_MAP_COLOUR, options=COLOUR_OPTIONS, value="modality", inline=True),
    ], className="controls")
    progress = html.Div([html.Progress(id=ids.TOKEN_MAP_PROGRESS, max=1, value=0),
                         html.Span(id=ids.TOKEN_MAP_STATUS, className="muted")], className="controls")
    return panel("Token map (whole database)", HELP, controls, progress,
                 dcc.Graph(id=ids.TOKEN_MAP_GRAPH, className="token-map-graph", style=HIDDEN,
                           config={"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}),
                 dcc.Interval(id=ids.TOKEN_MAP_POLL, interval=POLL_MS, disabled=True),
                 dcc.Store(id=ids.TOKEN_MAP_DRAWN, data=None), class_name="panel-token-map")


def register_callbacks(app, ctx):
    db = ctx.db
    maps = tm.maps_for(db, ctx.map_tokens)

    @app.callback(Output(ids.TOKEN_MAP_GRAPH, "figure"), Output(ids.TOKEN_MAP_GRAPH, "style"),
                  Output(ids.TOKEN_MAP_DRAWN, "data"), Output(ids.TOKEN_MAP_STATUS, "children"),
                  Output(ids.TOKEN_MAP_PROGRESS, "value"), Output(ids.TOKEN_MAP_PROGRESS, "style"),
                  Output(ids.TOKEN_MAP_POLL, "disabled"), Output(ids.TOKEN_MAP_OPEN, "style"),
                  Input(ids.TOKEN_MAP_OPEN, "n_clicks"), Input(ids.TOKEN_MAP_LAYER, "value"),
                  Input(ids.TOKEN_MAP_COLOUR, "value"), Input(ids.TOKEN_MAP_POLL, "n_intervals"),
                  State(ids.EXAMPLE_SELECT, "value"), State(ids.TOKEN_MAP_DRAWN, "data"), prevent_initial_call=True)
    def draw_map(opened, layer, colour_by, _poll, shown_example, drawn):
        """After the first click on "Show": the chosen layer's map, fitted in the background first if
        needed (the poll runs while it fits and draws the map once it is ready)."""
        if not opened:
            raise PreventUpdate
        layer = as_index(layer, (db.n_layers or 0) + 1)
        if colour_by not in figures.TOKEN_MAP_COLOURINGS:
            raise PreventUpdate
        status = maps.request(layer)
        if status["state"] != "ready":
            fitting = status["state"] == "fitting"
            return (no_update, no_update, no_update, status_text(status, maps), status["fraction"],
                    SHOWN if fitting else HIDDEN, not fitting, HIDDEN)
        polled = dctx.triggered_id == ids.TOKEN_MAP_POLL
        token_map = maps.get(layer)
        if polled and drawn and drawn.get("layer") == layer and drawn.get("key") == token_map.examples_key:
            return (no_update,) * 4 + (1, HIDDEN, True, HIDDEN)  # a poll answered after the map was drawn
        fig, drawn = map_view(token_map, colour_by, shown_example, db.n_layers)
        return fig, SHOWN, drawn, status_text(status, maps), 1, HIDDEN, True, HIDDEN

    @app.callback(Output(ids.TOKEN_MAP_GRAPH, "figure", allow_duplicate=True),
                  Input(ids.EXAMPLE_SELECT, "value"), State(ids.TOKEN_MAP_DRAWN, "data"), prevent_initial_call=True)
    def ring_example(ex_id, drawn):
        """Ring the tokens of the example now shown (a Patch of the last trace)."""
        token_map = _drawn_map(drawn)
        sel = (token_map.ex_ids == ex_id).nonzero()[0]
        patch = Patch()
        ring = patch["data"][drawn["ring"]]
        ring["x"] = token_map.points[sel, 0].astype(float).tolist()
        ring["y"] = token_map.points[sel, 1].astype(float).tolist()
        ring["customdata"] = sel.tolist()
        ring["text"] = [f"example {ex_id}, token {int(t)}" for t in token_map.tokens[sel]]
        ring["name"], ring["showlegend"] = f"example {ex_id}", bool(len(sel))
        return patch

    def _drawn_map(drawn) -> tm.TokenMap:
        """The map the page shows (PreventUpdate when none is, or the database has changed since)."""
        if not isinstance(drawn, dict) or not isinstance(drawn.get("ring"), int):
            raise PreventUpdate
        token_map = maps.get(as_index(drawn.get("layer"), (db.n_layers or 0) + 1))
        if token_map is None or token_map.examples_key != drawn.get("key"):
            raise PreventUpdate
        return token_map

    @app.callback(Output(ids.EXAMPLE_SELECT, "value", allow_duplicate=True),
                  Output(ids.SEL_STORE, "data", allow_duplicate=True),
                  Output(ids.SIDE, "value", allow_duplicate=True),
                  Input(ids.TOKEN_MAP_GRAPH, "clickData"), State(ids.TOKEN_MAP_DRAWN, "data"),
                  prevent_initial_call=True)
    def open_token(click, drawn):
        """A click on a dot opens its example with that token selected."""
        token_map = _drawn_map(drawn)
        k = as_index(first_point(click).get("customdata"), len(token_map))
        info = example_info(db, int(token_map.ex_ids[k]))
        token = as_index(int(token_map.tokens[k]), info.n_tokens)
        return info.ex_id, {"ex": info.ex_id, "tokens": [token]}, info.modality(token)
