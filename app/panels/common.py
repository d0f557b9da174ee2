"""Small helpers shared by the panels (no callbacks here): layout pieces, and the checks every
callback applies to what the browser sends (a request can be crafted by hand, so a value is only
used once it is known to be in range: out of range or malformed refuses the update)."""
from __future__ import annotations

from dash import Patch, html, no_update
from dash.exceptions import PreventUpdate

from app import ids
from app.database.records import MAX_EX_ID


def panel(title, help_text, *children, class_name="", title_id=None):
    """A titled card with one line of help under the title."""
    header = html.H2(title, id=title_id) if title_id else html.H2(title)
    return html.Section([header, html.P(help_text, className="help"), *children],
                        className=f"panel {class_name}".strip())


def head_label(head_sel: dict) -> str:
    """"layer 3, head 5" or "layer 3, mean of heads" from a HEAD_STORE value (0-based inside)."""
    if not head_sel:
        return ""
    layer = head_sel["layer"] + 1
    return f"layer {layer}, mean of heads" if head_sel.get("head") is None else \
        f"layer {layer}, head {head_sel['head'] + 1}"


def image_downloads(graph_id: str) -> html.Span:
    """PNG (3x, for a paper) and SVG download buttons for the graph ``graph_id`` (app/assets/vli.js)."""
    return html.Span([html.Button(fmt.upper(), id={"type": ids.IMAGE_EXPORT, "graph": graph_id, "format": fmt},
                                  className="export-btn", title=f"download this figure as {fmt.upper()}")
                      for fmt in ("png", "svg")], className="image-exports")


def error_banner(message: str = "") -> html.Div:
    """Where a failure of the current view is said (e.g. a damaged example); hidden when empty."""
    return html.Div(message, id=ids.PAGE_ERROR, className="page-error", role="alert",
                    style=error_style(message))


def error_style(message: str) -> dict:
    return {} if message else {"display": "none"}


def initial_figure(figure) -> dict:
    """dcc.Graph keyword for a figure drawn into the layout; none (Dash's empty default) when there
    is nothing to draw yet, e.g. a database with no examples."""
    return {"figure": figure} if figure is not None else {}


def clear_drawn_selection(info):
    """A Patch of the image figure that removes a box/lasso selection drawn on it (the outline in
    ``layout.selections`` and the highlighted patch markers, trace 1 of figures.image_figure), for
    when the selection is replaced by other means; no_update for a text-only example (no traces)."""
    if not info.grid:
        return no_update
    patch = Patch()
    patch["layout"]["selections"] = []
    patch["data"][1]["selectedpoints"] = None
    return patch


# ----------------------------------------------------------------------------- browser values

def as_index(value, n: int) -> int:
    """``value`` as an index into ``n`` things: an int, or an integral float (plotly sends click
    coordinates as numbers), in 0..n-1. Anything else (a negative number, which numpy would wrap
    round to the end, a fraction, a string, a bool, None) refuses the update."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise PreventUpdate
    return value


def example_info(db, ex_id):
    """The ExampleInfo of an example id sent by the browser: an int naming a stored example
    (``db.example`` would turn 1.5 into 1 and "2" into 2) within the ids a database can hold."""
    if isinstance(ex_id, bool) or not isinstance(ex_id, int) or not 0 <= ex_id <= MAX_EX_ID:
        raise PreventUpdate
    try:
        return db.example(ex_id)
    except KeyError:
        raise PreventUpdate from None


def head_selection(db, value) -> dict:
    """A HEAD_STORE value checked against the database: {"layer": 0..L-1, "head": 0..H-1 or None}."""
    if not isinstance(value, dict):
        raise PreventUpdate
    head = value.get("head")
    return {"layer": as_index(value.get("layer"), db.n_layers),
            "head": None if head is None else as_index(head, db.n_heads)}


def token_indices(values, n_tokens: int) -> list[int]:
    """Distinct token indices (first occurrences, in order), each in 0..n_tokens-1. A list longer
    than the example's token count is refused before it is read: the app never selects more."""
    if not isinstance(values, list) or len(values) > n_tokens:
        raise PreventUpdate
    return list(dict.fromkeys(as_index(v, n_tokens) for v in values))


def selected_tokens(sel, ex_id: int, n_tokens: int) -> list[int]:
    """The query tokens of a SEL_STORE value ({"ex": id, "tokens": [...]}) when it is for example
    ``ex_id``; [] when nothing is selected or the selection belongs to another example."""
    if sel is None:
        return []
    if not isinstance(sel, dict):
        raise PreventUpdate
    if sel.get("ex") != ex_id or not sel.get("tokens"):
        return []
    return token_indices(sel["tokens"], n_tokens)


def first_point(event) -> dict:
    """The first point of a plotly click/hover event ({"points": [{...}, ...]})."""
    points = event.get("points") if isinstance(event, dict) else None
    if not isinstance(points, list) or not points or not isinstance(points[0], dict):
        raise PreventUpdate
    return points[0]
