"""What the page downloads: the data behind a view (CSV, .npy) and a one-file report of an example.

Pure functions (data in, text or bytes out) that the panels' download callbacks call and tests check
against the database directly. CSV is written with the csv module (quoting tokens such as ``,`` or
``"``); arrays with numpy's own .npy format, which keeps dtype and shape.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from typing import Optional, Sequence

import numpy as np
import plotly.io

from app import figures

__all__ = ["attention_csv", "statistics_csv", "matrix_npy", "report_html", "head_grid_csv", "ranked_csv",
           "examples_csv"]


def _kind(info, token: int) -> str:
    if info.special[token]:
        return "special"
    return info.modality(token)


def attention_csv(info, weights: np.ndarray, method: str, what: str) -> str:
    """One row per token of the example: its index, label (``patch (x, y)`` for a patch), kind
    (text / image / special), patch coordinates and the weight shown in the page. ``what`` (e.g.
    "attention of 'circle', layer 2, head 3") heads the file as a comment line."""
    out = io.StringIO()
    out.write(f"# {what}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["token", "label", "kind", "x", "y", method])
    labels = figures.token_labels(info.tokens, info.coords)
    for i, weight in enumerate(np.asarray(weights, dtype=np.float64)):
        x, y = info.coords[i] if info.coords[i] is not None else ("", "")
        writer.writerow([i, labels[i], _kind(info, i), x, y, repr(float(weight))])
    return out.getvalue()


def statistics_csv(statistics: dict, descriptions: dict) -> str:
    """Every statistic of every head: one row per (statistic, layer, head), layers and heads 1-based
    as the page shows them, NaN as an empty cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["statistic", "layer", "head", "value", "definition"])
    for name, values in statistics.items():
        for (layer, head), value in np.ndenumerate(np.asarray(values, dtype=np.float64)):
            writer.writerow([name, layer + 1, head + 1, repr(float(value)) if np.isfinite(value) else "",
                             descriptions.get(name, "")])
    return out.getvalue()


def _value(value) -> str:
    """A CSV cell: floats in full (``repr``), NaN as an empty cell, booleans as yes / no."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if np.isfinite(value) else ""
    return "" if value is None else str(value)


def head_grid_csv(what: str, columns: dict, n_heads: int) -> str:
    """Per-head numbers of a dataset view, one row per layer and head: ``columns`` maps a column name to
    an (L, H) array, or an (L, H + 1) one whose last column is the layer mean (written as head "mean");
    layers and heads 1-based as the page shows them. ``what`` heads the file as a comment line."""
    out = io.StringIO()
    out.write(f"# {what}\n")
    writer = csv.writer(out, lineterminator="\n")
    arrays = [np.asarray(a) for a in columns.values()]
    writer.writerow(["layer", "head", *columns])
    n_layers, width = arrays[0].shape
    for layer in range(n_layers):
        for head in range(width):
            writer.writerow([layer + 1, head + 1 if head < n_heads else "mean",
                             *(_value(a[layer, head]) for a in arrays)])
    return out.getvalue()


def ranked_csv(what: str, groups: Sequence[tuple[str, Sequence[tuple[int, float, str]]]]) -> str:
    """The drill-down's ranked examples: ``groups`` is ``[("highest", [(ex_id, value, text), ...]),
    ("lowest", ...)]``; one row per example with its group and rank (1 = the most extreme)."""
    out = io.StringIO()
    out.write(f"# {what}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "rank", "example", "value", "text"])
    for group, items in groups:
        for rank, (ex_id, value, text) in enumerate(items, 1):
            writer.writerow([group, rank, ex_id, _value(value), text])
    return out.getvalue()


def examples_csv(what: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> str:
    """Table rows (dicts) under their titles: ``columns`` is ``[(key, title), ...]``."""
    out = io.StringIO()
    out.write(f"# {what}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([title for _, title in columns])
    for row in rows:
        writer.writerow([_value(row.get(key)) for key, _ in columns])
    return out.getvalue()


def matrix_npy(matrix: np.ndarray) -> bytes:
    """``matrix`` in numpy's .npy format (float32, its shape kept)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(matrix, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def report_html(info, image_png: bytes, head_figure, attention_figure, tinted: Optional[Sequence[float]],
                what: str) -> str:
    """One self-contained HTML file (plotly.js embedded, no network needed) with the example's image,
    text, prediction, notes, the head summary and the current attention view, for sharing with people
    who do not run the tool. ``tinted``: the weights shown (one per token; the text tokens are tinted), or None."""
    esc = html.escape
    pred = info.prediction or {}
    verdict = {True: "correct", False: "incorrect", None: "accuracy unknown"}[info.accuracy]
    tokens = []
    text = [int(i) for i in np.flatnonzero(info.is_text)]
    scale = max((tinted[i] for i in text if not info.special[i]), default=0.0) if tinted else 0.0
    for i in text:
        style = ""
        if tinted is not None and scale > 0:
            r, g, b = _viridis(min(1.0, float(tinted[i]) / scale))
            text = "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else "#fff"
            style = f' style="background: rgb({r},{g},{b}); color: {text}"'
        weight = f' title="{float(tinted[i]):.4f}"' if tinted is not None else ""
        tokens.append(f'<span class="tok"{style}{weight}>{esc(info.tokens[i])}</span>')
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>VL-InterpreT report: example {info.ex_id}</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328}"
        ".tok{padding:1px 5px;margin:1px;border-radius:4px;background:#f3f4f6;display:inline-block}"
        ".row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}</style></head><body>",
        f"<h1>Example {info.ex_id}</h1>",
        f"<p><b>{esc(verdict)}</b>" + (f" · prediction <b>{esc(str(pred.get('answer')))}</b>" if pred else "")
        + (f" (score {float(pred['score']):.3f})" if pred.get("score") is not None else "")
        + (f" · label <b>{esc(str(pred['label']))}</b>" if pred.get("label") else "") + "</p>",
        f"<p>“{esc(info.text)}”</p>" if info.text else "",
        "".join(f"<p><i>note: {esc(note)}</i></p>" for note in info.notes),
        f"<h2>{esc(what)}</h2><p>{''.join(tokens)}</p>",
        "<div class='row'>",
        f"<img alt='the image the model saw' src='data:image/png;base64,{base64.b64encode(image_png).decode()}'"
        " style='max-width:320px;image-rendering:pixelated'>",
        plotly.io.to_html(attention_figure, full_html=False, include_plotlyjs=True, default_width="520px",
                          default_height="420px"),
        "</div><h2>Head summary</h2>",
        plotly.io.to_html(head_figure, full_html=False, include_plotlyjs=False, default_width="520px",
                          default_height="420px"),
        "<p style='color:#6b7280'>Made with VL-InterpreT.</p></body></html>",
    ]
    return "\n".join(parts)


def _viridis(a: float) -> tuple[int, int, int]:
    """The colour of a in [0, 1] on the figures' attention scale (the page's text tint)."""
    import plotly.colors  # noqa: PLC0415

    color = plotly.colors.sample_colorscale(figures.ATTENTION_SCALE, [a], colortype="tuple")[0]
    return tuple(int(round(c * 255)) for c in color)
