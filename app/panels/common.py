"""Small helpers shared by the panels (no callbacks here)."""
from __future__ import annotations

from dash import html


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


def initial_figure(figure) -> dict:
    """dcc.Graph keyword for a figure drawn into the layout; none (Dash's empty default) when there
    is nothing to draw yet, e.g. a database with no examples."""
    return {"figure": figure} if figure is not None else {}
