"""The page: the header, the three columns of panels and, under them, the full-width dataset and
token map panels, built from the panels' layouts."""
from __future__ import annotations

from dash import html

from app import ids
from app.context import AppContext
from app.database.database import CorruptValueError
from app.panels import dataset, example, heads, hidden, interventions, links, token_map, tokens
from app.panels.common import error_banner

TITLE = "VL-InterpreT"


def page_layout(ctx: AppContext, add_panel, drawn: bool = True) -> html.Div:
    """The page, with the first example already drawn in it: the browser draws each figure once,
    as soon as plotly.js is loaded, instead of waiting for a wave of callbacks to fill them (the
    callbacks that would draw an example do not fire on page load). ``drawn=False``: the same
    components with no example in them."""
    db = ctx.db
    ex_ids = db.example_ids()
    first = ex_ids[0] if ex_ids and drawn else None
    try:
        return _page(ctx, add_panel, ex_ids, first, drawn)
    except CorruptValueError as error:  # a damaged first example: the page opens on none, and says so
        return _page(ctx, add_panel, ex_ids, None, drawn, damaged=str(error))


def _page(ctx: AppContext, add_panel, ex_ids: list, first, drawn: bool, damaged: str = "") -> html.Div:
    db = ctx.db
    header = html.Header([
        html.Div([html.H1(TITLE), html.Span(example_count_text(db, len(ex_ids)), id=ids.EXAMPLE_COUNT,
                                            className="muted")], className="brand"),
        example.layout(ctx, first),
        links.layout(ctx),
    ], className="topbar")
    left = [heads.layout(ctx, first)] + ([add_panel.layout(ctx)] if add_panel is not None else []) \
        + ([interventions.layout(ctx)] if interventions.available(ctx) else [])
    grid = html.Main([html.Div(left, className="col col-left"),
                      html.Div(tokens.layout(ctx, first), className="col col-mid"),
                      html.Div(hidden.layout(ctx, first), className="col col-right")], className="grid")
    # The dataset panel leaves out damaged examples itself, so it is drawn even when the first one is.
    return html.Div([header, error_banner(damaged), grid, dataset.layout(ctx, drawn), token_map.layout(ctx)],
                    className="app")


def example_count_text(db, n_examples: int) -> str:
    """The header's "30 examples · 4 layers × 4 heads" (also refreshed after an example is added)."""
    return f"{n_examples} examples · {db.n_layers} layers × {db.n_heads} heads"
