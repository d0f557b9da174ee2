"""Pure figure functions: arrays in, ``plotly.graph_objects.Figure`` (or small dicts) out.

Nothing here knows about Dash callbacks or the database; the panels read the slices they need
and hand plain arrays to these functions, which the tests call directly.

Conventions: attention vectors are ``(n_tokens,)`` float arrays over the example's tokens in stored
order (text, image special tokens, patches); patch coordinates are ``(x, y)`` grid cells with
``(0, 0)`` the top-left patch and ``grid = (rows, cols)``.
"""
from __future__ import annotations

import base64
import io
import textwrap
from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go

TEMPLATE = {"layout": {}}  # no plotly.py template: plotly.js defaults, tiny payloads
FONT = dict(family="Inter, system-ui, -apple-system, 'Segoe UI', sans-serif", size=12, color="#222")
# Attention has one colour scale everywhere: the image heatmap, the attention matrix and the text
# tint (app/assets/vli.js gets these stops from the page), each from 0 (dark purple) to the highest
# value it shows (yellow). Plotly.js's own "Viridis" stops, written out so that the three agree.
ATTENTION_SCALE = [[0.0, "#440154"], [16 / 255, "#48186a"], [32 / 255, "#472d7b"], [48 / 255, "#424086"],
                   [64 / 255, "#3b528b"], [80 / 255, "#33638d"], [96 / 255, "#2c728e"], [112 / 255, "#26828e"],
                   [128 / 255, "#21918c"], [144 / 255, "#1fa088"], [160 / 255, "#28ae80"],
                   [176 / 255, "#3fbc73"], [192 / 255, "#5ec962"], [208 / 255, "#84d44b"],
                   [224 / 255, "#addc30"], [240 / 255, "#d8e219"], [1.0, "#fde725"]]
# Width reserved right of the image for the overlay's colour bar, shown or not: the image does not
# move when the bar appears.
COLORBAR_MARGIN = 64
MODEBAR_STRIP = 30  # height of the top strip of a graph that plotly's tool bar covers
# Explicit scales: plotly.js's named "Blues"/"RdBu" differ from plotly.py's.
STAT_SCALE = [[0.0, "#f7fbff"], [0.25, "#c6dbef"], [0.5, "#6baed6"], [0.75, "#2171b5"], [1.0, "#08306b"]]
DIVERGING_SCALE = [[0.0, "#2166ac"], [0.25, "#92c5de"], [0.5, "#f7f7f7"], [0.75, "#f4a582"], [1.0, "#b2182b"]]
TEXT_COLOR = "#1f77b4"
IMAGE_COLOR = "#e8710a"
SPECIAL_COLOR = "#a0a0a0"
SELECT_COLOR = "#d62728"
NEIGHBOR_COLOR = "#111111"


def _layout(**kw) -> dict:
    base = dict(template=TEMPLATE, font=FONT, margin=dict(l=40, r=10, t=36, b=30),
                paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
    base.update(kw)
    return base


def figure(data: list, layout: dict) -> go.Figure:
    """A Figure from plain dicts, without plotly.py's validation (which costs 50-100 ms a figure).
    Arrays must already be typed-array specs or lists (see :func:`typed_array`)."""
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def typed_array(arr: np.ndarray, dtype=np.float32) -> dict:
    """Plotly's typed-array spec (base64, float32 by default): smaller and faster than lists, for
    figures and ``dash.Patch`` values. NaN survives (it shows as a gap). Not for ``customdata`` that
    callbacks read: dcc.Graph leaves typed-array customdata out of click/hover/selection data."""
    a = np.ascontiguousarray(arr, dtype=dtype)
    code = {np.dtype(np.float32): "f4", np.dtype(np.int32): "i4"}[a.dtype]
    spec = {"dtype": code, "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
    if a.ndim > 1:
        spec["shape"] = ", ".join(str(s) for s in a.shape)
    return spec


def token_labels(tokens: Sequence[str], coords: Sequence) -> list[str]:
    """Display label per token: the token itself, or ``patch (x, y)`` for an image patch."""
    return [tok if c is None else f"patch ({c[0]}, {c[1]})" for tok, c in zip(tokens, coords)]


# ----------------------------------------------------------------------------- head summary

def zscore(values: np.ndarray) -> np.ndarray:
    """Z-score over every finite entry (all heads of all layers of one example); NaN stays NaN.
    A constant matrix gives zeros."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return v.astype(np.float32)
    mu = v[finite].mean()
    sd = v[finite].std()
    out = (v - mu) / sd if sd > 0 else np.where(finite, 0.0, np.nan)
    return out.astype(np.float32)


def layer_means(values: np.ndarray) -> np.ndarray:
    """Mean over the heads of each layer, ignoring NaN; all-NaN layers give NaN. ``(L, H) -> (L,)``."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    counts = finite.sum(axis=1)
    sums = np.where(finite, v, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


def _hover_grid(values: np.ndarray, heads: Sequence[str], name: str) -> list[list[str]]:
    out = []
    for layer, row in enumerate(values):
        out.append([f"Layer {layer + 1}, {h}<br>{name}: " + ("n/a" if not np.isfinite(v) else f"{v:.4g}")
                    for h, v in zip(heads, row)])
    return out


def head_selection_shape(layer: int, head: Optional[int], n_heads: int) -> dict:
    """Rectangle marking the selected cell: a head ``(layer, head)`` or the layer mean (``head=None``)."""
    x = n_heads + 1 if head is None else head  # the mean column sits one empty column right of the heads
    return dict(type="rect", xref="x", yref="y", x0=x - 0.5, x1=x + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                line=dict(color=SELECT_COLOR, width=3), fillcolor="rgba(0,0,0,0)")


def head_summary_figure(values: np.ndarray, name: str, z_scored: bool = False,
                        selected: Optional[tuple[int, Optional[int]]] = None) -> go.Figure:
    """Layers x heads heatmap of one statistic plus a separated "mean" column (the layer mean).

    ``values`` is ``(n_layers, n_heads)``; with ``z_scored`` it is z-scored over all heads of the
    example first (the mean column is then the mean of the z-scores). Trace 0 is the head grid
    (x = head index 0..H-1, y = layer index), trace 1 the mean column at x = H + 1. NaN cells are
    blank with an "n/a" hover. ``selected`` = (layer, head or None) draws the selection rectangle.
    """
    raw = np.asarray(values, dtype=np.float32)
    z = zscore(raw) if z_scored else raw
    n_layers, n_heads = z.shape
    means = layer_means(z)[:, None]
    label = f"{name} (z-score)" if z_scored else name
    heads = [f"head {h + 1}" for h in range(n_heads)]
    layers = typed_array(np.arange(n_layers))
    common = dict(type="heatmap", coloraxis="coloraxis", hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1)
    data = [
        dict(z=typed_array(z), x=typed_array(np.arange(n_heads)), y=layers,
             text=_hover_grid(z, heads, label), name="heads", **common),
        dict(z=typed_array(means), x=[n_heads + 1], y=layers,
             text=_hover_grid(means, ["mean of heads"], label), name="mean", **common),
    ]
    tickvals = list(range(n_heads)) + [n_heads + 1]
    ticktext = [str(h + 1) for h in range(n_heads)] + ["mean"]
    coloraxis = dict(colorscale=DIVERGING_SCALE if z_scored else STAT_SCALE,
                     colorbar=dict(thickness=10, len=0.9, title=dict(text="z" if z_scored else "")))
    if z_scored:
        coloraxis["cmid"] = 0
    layout = _layout(
        coloraxis=coloraxis,
        xaxis=dict(tickvals=tickvals, ticktext=ticktext, title=dict(text="head", standoff=4),
                   showgrid=False, zeroline=False, range=[-0.5, n_heads + 1.5], fixedrange=True),
        yaxis=dict(tickvals=list(range(n_layers)), ticktext=[str(i + 1) for i in range(n_layers)],
                   title=dict(text="layer", standoff=4), autorange="reversed", showgrid=False,
                   zeroline=False, fixedrange=True),
        margin=dict(l=48, r=10, t=8, b=40), clickmode="event", hovermode="closest",
        shapes=[head_selection_shape(selected[0], selected[1], n_heads)] if selected else [],
    )
    return figure(data, layout)


# ----------------------------------------------------------------------------- image + overlay

def scale_max(values: np.ndarray) -> float:
    """The top of an attention colour scale: the highest finite value, or 1 when there is none
    above 0 (an all-zero selection still gets a valid 0..1 range)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def css_gradient(scale: Sequence) -> str:
    """A left-to-right CSS gradient of a plotly colour scale ([[position, colour], ...]): the legend
    of the text tint, drawn from the same stops as the figures."""
    return "linear-gradient(to right, " + ", ".join(f"{c} {100 * p:.1f}%" for p, c in scale) + ")"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_grid(att: np.ndarray, coords: Sequence, grid: tuple[int, int]) -> np.ndarray:
    """Attention to each patch placed on the patch grid: ``z[y, x] = att[token]`` for every token
    with a coordinate; cells with no patch are NaN. Returns float32 ``(rows, cols)``."""
    rows, cols = grid
    z = np.full((rows, cols), np.nan, dtype=np.float32)
    for tok, c in enumerate(coords):
        if c is not None:
            z[c[1], c[0]] = att[tok]
    return z


TRANSPARENT_SCALE = [[0.0, "rgba(0,0,0,0)"], [1.0, "rgba(0,0,0,0)"]]


def overlay_colorbar(name: str = "attention") -> dict:
    """The overlay's colour bar, titled with what it shows (``"attention"`` or ``"rollout"``)."""
    return dict(thickness=10, len=0.9, x=1, xanchor="left", xpad=8,
                title=dict(text="attn" if name == "attention" else name))


def overlay_state(z: Optional[np.ndarray], grid: tuple[int, int], name: str = "attention") -> dict:
    """The overlay trace's properties for grid ``z`` (``(rows, cols)``) of the weights called
    ``name`` (hover and colour bar: "attention", "rollout" or "relevancy"), or for the empty state (``z=None``:
    an invisible zero grid that still receives clicks; NaN cells would not)."""
    if z is None:
        return dict(z=typed_array(np.zeros(grid, np.float32)), colorscale=TRANSPARENT_SCALE, showscale=False,
                    zmin=0.0, zmax=1.0, hovertemplate="%{text}: click to select<extra></extra>",
                    colorbar=overlay_colorbar())
    return dict(z=typed_array(z), colorscale=ATTENTION_SCALE, showscale=True, zmin=0.0, zmax=scale_max(z),
                hovertemplate="%{text}<br>" + name + " %{z:.4f}<extra></extra>", colorbar=overlay_colorbar(name))


def patch_tokens_grid(coords: Sequence, grid: tuple[int, int]) -> np.ndarray:
    """Token index of every grid cell (-1 where no patch), used as the overlay's customdata."""
    rows, cols = grid
    idx = np.full((rows, cols), -1, dtype=np.int32)
    for tok, c in enumerate(coords):
        if c is not None:
            idx[c[1], c[0]] = tok
    return idx


def _grid_box(image_size: tuple[int, int], box: Optional[Sequence[float]]) -> tuple[float, float, float, float]:
    """``box`` (left, top, right, bottom) of a grid on the image, or the whole image when None."""
    h, w = image_size
    return (0.0, 0.0, float(w), float(h)) if box is None else tuple(float(v) for v in box)


def patch_shapes(selected: Sequence[int], coords: Sequence, grid: tuple[int, int],
                 image_size: tuple[int, int], box: Optional[Sequence[float]] = None) -> list[dict]:
    """Outline rectangles (image pixel coordinates) around the selected patches of the grid
    covering ``box`` of the image (None: the whole image)."""
    left, top, right, bottom = _grid_box(image_size, box)
    rows, cols = grid
    cw, ch = (right - left) / cols, (bottom - top) / rows
    shapes = []
    for tok in selected:
        c = coords[tok] if 0 <= tok < len(coords) else None
        if c is None:
            continue
        shapes.append(dict(type="rect", xref="x", yref="y", x0=left + c[0] * cw, x1=left + (c[0] + 1) * cw,
                           y0=top + c[1] * ch, y1=top + (c[1] + 1) * ch,
                           line=dict(color=SELECT_COLOR, width=2), fillcolor="rgba(0,0,0,0)"))
    return shapes


PATCH_WORD_CHARS = 8  # characters of a word drawn on its patch (hover shows it whole)


def patch_words_trace(tokens: Sequence[int], words: Sequence[str], probabilities: Sequence[float],
                      coords: Sequence, grid: tuple[int, int], image_size: tuple[int, int],
                      box: Optional[Sequence[float]] = None) -> dict:
    """Words drawn on their patches (the per-patch logit lens of one layer): ``words[i]`` at the centre of
    the patch of token ``tokens[i]`` on the grid covering ``box`` (tokens whose ``coords`` entry is None,
    e.g. on another grid, are left out), larger and more opaque the higher ``probabilities[i]``; hover
    gives the word and its probability. ``customdata`` is the token, so that a click on a word selects
    its patch as a click on the patch does."""
    left, top, right, bottom = _grid_box(image_size, box)
    rows, cols = grid
    cw, ch = (right - left) / cols, (bottom - top) / rows
    shown = [(int(t), w, float(p)) for t, w, p in zip(tokens, words, probabilities) if coords[t] is not None]
    full = max(7.0, min(16.0, min(cw, ch) / 3))  # the font size of a word of probability 1
    return dict(
        type="scatter", name="patch words", mode="text", showlegend=False,
        x=[left + (coords[t][0] + 0.5) * cw for t, _, _ in shown],
        y=[top + (coords[t][1] + 0.5) * ch for t, _, _ in shown],
        text=[_short_word(w) for _, w, _ in shown], customdata=[t for t, _, _ in shown],
        hovertext=[f"patch ({coords[t][0]}, {coords[t][1]}): {w!r}, p = {p:.3f}" for t, w, p in shown],
        hovertemplate="%{hovertext}<extra></extra>",
        textfont=dict(size=[full * (0.5 + 0.5 * p) for _, _, p in shown],
                      color=[f"rgba(255,255,255,{0.35 + 0.65 * p:.3f})" for _, _, p in shown],
                      shadow="0px 0px 3px #000"))


def _short_word(word: str) -> str:
    """A decoded token as drawn on a patch: without surrounding whitespace, cut to PATCH_WORD_CHARS."""
    text = word.strip() or repr(word)
    return text if len(text) <= PATCH_WORD_CHARS else text[:PATCH_WORD_CHARS - 1] + "…"


def image_figure(image_uri: str, image_size: tuple[int, int], coords: Sequence,
                 grid: Optional[tuple[int, int]], box: Optional[Sequence[float]] = None,
                 patch_words: Optional[dict] = None) -> go.Figure:
    """The image (a layout image: sent once per example) with a patch grid over ``box`` (left, top,
    right, bottom pixels; None: the whole image), outlined when it covers part of the image only.

    Trace 0: the attention overlay heatmap on the grid (empty until a token is selected; update its
    ``z`` with a Patch); trace 1: invisible markers at the patch centres carrying the token index, so
    that box/lasso selection works; trace 2: the grid lines; trace 3, given ``patch_words`` (a
    :func:`patch_words_trace`, replaced with a Patch when the layer changes): words on the patches.
    Axes are image pixels, y pointing down.
    """
    h, w = image_size
    data = []
    if grid:
        rows, cols = grid
        left, top, right, bottom = _grid_box(image_size, box)
        cw, ch = (right - left) / cols, (bottom - top) / rows
        overlay = dict(
            type="heatmap", name="overlay", x0=left + cw / 2, dx=cw, y0=top + ch / 2, dy=ch,
            customdata=patch_tokens_grid(coords, grid).tolist(), opacity=0.6, zsmooth=False,
            hoverongaps=True, zauto=False,
            text=[[f"patch ({x}, {y})" for x in range(cols)] for y in range(rows)])
        overlay.update(overlay_state(None, grid))
        data.append(overlay)
        cells = [(tok, c) for tok, c in enumerate(coords) if c is not None]
        data.append(dict(
            type="scatter", name="patches", mode="markers", showlegend=False, hoverinfo="skip",
            x=typed_array([left + (c[0] + 0.5) * cw for _, c in cells]),
            y=typed_array([top + (c[1] + 0.5) * ch for _, c in cells]),
            customdata=[t for t, _ in cells],
            marker=dict(size=max(4.0, min(cw, ch) / 3), color="rgba(255,255,255,0.01)"),
            selected=dict(marker=dict(color="rgba(214,39,40,0.5)")), unselected=dict(marker=dict(opacity=1))))
        # The patch grid as one line trace (None-separated segments), so layout.shapes only holds
        # the selection outlines.
        gx, gy = [], []
        for i in range(0 if left > 0 else 1, cols + (right < w)):
            gx += [left + i * cw, left + i * cw, None]
            gy += [top, bottom, None]
        for j in range(0 if top > 0 else 1, rows + (bottom < h)):
            gx += [left, right, None]
            gy += [top + j * ch, top + j * ch, None]
        data.append(dict(type="scatter", name="grid", x=gx, y=gy, mode="lines", hoverinfo="skip",
                         showlegend=False, line=dict(color="rgba(255,255,255,0.35)", width=1)))
        if patch_words is not None:
            data.append(patch_words)
    layout = _layout(
        images=[dict(source=image_uri, xref="x", yref="y", x=0, y=0, sizex=w, sizey=h,
                     sizing="stretch", layer="below")],
        xaxis=dict(range=[0, w], showgrid=False, zeroline=False, visible=False, constrain="domain"),
        yaxis=dict(range=[h, 0], showgrid=False, zeroline=False, visible=False,
                   scaleanchor="x", constrain="domain"),
        margin=dict(l=0, r=COLORBAR_MARGIN, t=26, b=0, autoexpand=False), dragmode="select", clickmode="event",
        hovermode="closest", uirevision="image", newselection=dict(line=dict(color=SELECT_COLOR)),
        modebar=dict(orientation="h", bgcolor="rgba(255,255,255,0.8)"), shapes=[])
    return figure(data, layout)


# ----------------------------------------------------------------------------- t-SNE

def tsne_figure(points: np.ndarray, tokens: Sequence[str], is_text: Sequence[bool], special: Sequence[bool],
                coords: Sequence, title: str) -> go.Figure:
    """Scatter of a layer's t-SNE map: trace 0 text tokens, 1 image patches, 2 special tokens,
    3 the selected token (empty), 4 the nearest token of the other modality (empty).

    ``customdata`` holds the token index. Text and special tokens hover with their label; image
    patches use the app's tooltip (hoverinfo none) so that a thumbnail can be shown.
    """
    pts = np.asarray(points, dtype=np.float32)
    labels = token_labels(tokens, coords)
    special = np.asarray(special, dtype=bool)
    n = len(tokens)
    idx = np.arange(n)
    is_text = np.asarray(is_text, dtype=bool)
    is_img = ~is_text & ~special
    is_text = is_text & ~special
    data = []
    for name, mask, color, size, hover in (("text", is_text, TEXT_COLOR, 7, True),
                                           ("image", is_img, IMAGE_COLOR, 6, False),
                                           ("special", special, SPECIAL_COLOR, 6, True)):
        sel = idx[mask]
        trace = dict(type="scatter", mode="markers", name=name, x=typed_array(pts[sel, 0]),
                     y=typed_array(pts[sel, 1]), customdata=sel.tolist(),
                     marker=dict(color=color, size=size, opacity=0.6 if name == "special" else 0.85))
        if hover:
            trace.update(text=[labels[i] for i in sel], hovertemplate="%{text}<extra>" + name + "</extra>")
        else:
            trace.update(hoverinfo="none")  # the app shows a thumbnail tooltip instead
        data.append(trace)
    data.append(dict(type="scatter", mode="markers", name="selected", x=[], y=[], hoverinfo="skip",
                     marker=dict(symbol="circle-open", size=16, color=SELECT_COLOR, line=dict(width=3))))
    data.append(dict(type="scatter", mode="markers", name="nearest other modality", x=[], y=[],
                     hoverinfo="skip",
                     marker=dict(symbol="diamond-open", size=16, color=NEIGHBOR_COLOR, line=dict(width=2))))
    layout = _layout(
        title=dict(text=title, x=0.01, y=0.98, font=dict(size=13)),
        xaxis=dict(visible=False), yaxis=dict(visible=False),
        legend=dict(orientation="h", y=-0.02, x=0, font=dict(size=11)),
        margin=dict(l=4, r=4, t=30, b=4), clickmode="event", hovermode="closest", uirevision="tsne")
    return figure(data, layout)


def tsne_title(layer: int, n_layers: int) -> str:
    where = "before layer 1 (embeddings)" if layer == 0 else f"after layer {layer} of {n_layers}"
    return f"Hidden states {where} — t-SNE"


# ----------------------------------------------------------------------------- attention matrix

def attention_matrix_figure(matrix: np.ndarray, q_labels: Sequence[str], k_labels: Sequence[str],
                            title: str, q_positions: Optional[Sequence[int]] = None,
                            k_positions: Optional[Sequence[int]] = None) -> go.Figure:
    """Heatmap of an attention (sub)matrix: rows = queries, columns = keys, labelled
    ``"<token index> <label>"`` (categorical, so repeated words stay distinct); the positions are the
    rows' and columns' token indices (default 0, 1, ...)."""
    m = np.asarray(matrix, dtype=np.float32)
    ys = [f"{i} {lab}" for i, lab in zip(range(len(q_labels)) if q_positions is None else q_positions, q_labels)]
    xs = [f"{i} {lab}" for i, lab in zip(range(len(k_labels)) if k_positions is None else k_positions, k_labels)]
    data = [dict(type="heatmap", z=typed_array(m), x=xs, y=ys, colorscale=ATTENTION_SCALE,
                 zauto=False, zmin=0.0, zmax=scale_max(m), colorbar=dict(thickness=10, title=dict(text="attn")),
                 hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>")]
    layout = _layout(
        # Just above the plot area, below the top strip that plotly's tool bar covers.
        title=dict(text=title, x=0.01, xref="container", xanchor="left", y=1, yref="paper", yanchor="bottom",
                   pad=dict(b=6), font=dict(size=13)),
        xaxis=dict(type="category", tickangle=-90, tickfont=dict(size=9), showgrid=False,
                   title=dict(text="key (attended to)")),
        yaxis=dict(type="category", tickfont=dict(size=9), autorange="reversed", showgrid=False,
                   title=dict(text="query")),
        margin=dict(l=90, r=10, t=MODEBAR_STRIP + 30, b=90), hovermode="closest")
    return figure(data, layout)


# ----------------------------------------------------------------------------- attention distance

DISTANCE_EMPTY = ("No mean attention distance for this example: it is measured between image patches "
                  "attending to image patches, and this example has none (e.g. a text-only example).")


def attention_distance_figure(distance: np.ndarray) -> go.Figure:
    """The mean attention distance of every head against its layer, as in probing-ViTs (Dosovitskiy
    et al. 2021, Fig. 7): one dot per head, x = layer 1..L, y = distance in pixels.

    ``distance`` is ``(n_layers, n_heads)``; NaN entries (no image query attending to image keys) are
    left out, and when every entry is NaN the figure is an empty plot that says why.
    """
    d = np.asarray(distance, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"distance: expected a (n_layers, n_heads) array, got shape {d.shape}")
    n_layers = d.shape[0]
    layers, heads = np.nonzero(np.isfinite(d))  # row-major: layer by layer, heads in order
    values = d[layers, heads]
    data = [dict(type="scatter", mode="markers", name="heads", x=typed_array(layers + 1), y=typed_array(values),
                 text=[f"layer {l + 1}, head {h + 1}: {v:.1f} px" for l, h, v in zip(layers, heads, values)],
                 hovertemplate="%{text}<extra></extra>",
                 marker=dict(color=IMAGE_COLOR, size=8, opacity=0.75, line=dict(color="#fff", width=0.5)))]
    # plotly does not wrap annotations: the message is broken into lines that fit a narrow column
    annotations = [] if values.size else [dict(text="<br>".join(textwrap.wrap(DISTANCE_EMPTY, 48)), xref="paper",
                                               yref="paper", x=0.5, y=0.5, showarrow=False,
                                               font=dict(size=12, color="#6b7280"))]
    top = float(values.max()) if values.size else 1.0
    layout = _layout(
        title=dict(text="Mean attention distance of every head", x=0.01, y=0.98, font=dict(size=13)),
        xaxis=dict(title=dict(text="layer"), tickvals=list(range(1, n_layers + 1)), range=[0.5, n_layers + 0.5],
                   showgrid=False, zeroline=False, visible=bool(values.size)),
        yaxis=dict(title=dict(text="distance (pixels)"), range=[0, top * 1.08], rangemode="tozero",
                   zeroline=False, visible=bool(values.size)),
        margin=dict(l=56, r=10, t=36, b=44), hovermode="closest", showlegend=False, annotations=annotations)
    return figure(data, layout)


def logit_lens_figure(lens: Sequence[Sequence], n_layers: int) -> go.Figure:
    """The logit lens: for every hidden-state layer (emb, 1..L), the answers (a classifier's, from the
    pooled token) or next tokens (a decoder's, where the answer starts) the model's own head would give
    from that layer, most probable first.

    ``lens``: per hidden-state layer, ``[[answer, probability], ...]`` (records.py). A heatmap: rows
    are layers (emb at the top), columns the rank, colour the probability, each cell labelled with its
    answer and probability.
    """
    if len(lens) != n_layers + 1:
        raise ValueError(f"logit lens: expected {n_layers + 1} layers (emb and 1..{n_layers}), got {len(lens)}")
    ranks = max(len(row) for row in lens)
    probs = np.full((len(lens), ranks), np.nan, np.float32)
    labels = [["" for _ in range(ranks)] for _ in lens]
    for layer, row in enumerate(lens):
        for rank, (answer, probability) in enumerate(row):
            probs[layer, rank] = probability
            labels[layer][rank] = f"{answer}<br>{probability:.2f}"
    names = ["emb"] + [str(layer) for layer in range(1, n_layers + 1)]
    data = [dict(type="heatmap", z=typed_array(probs), x=[f"#{r + 1}" for r in range(ranks)], y=names,
                 text=labels, texttemplate="%{text}", colorscale=ATTENTION_SCALE, zmin=0.0, zmax=1.0,
                 colorbar=dict(thickness=10, title=dict(text="p")), xgap=1, ygap=1,
                 hovertemplate="layer %{y}, rank %{x}: %{text}<extra></extra>")]
    layout = _layout(
        title=dict(text="Logit lens: what each layer would answer", x=0.01, y=0.98, font=dict(size=13)),
        xaxis=dict(title=dict(text="rank"), side="top", showgrid=False, fixedrange=True),
        yaxis=dict(title=dict(text="layer"), type="category", autorange="reversed", showgrid=False, fixedrange=True),
        margin=dict(l=56, r=10, t=64, b=10), hovermode="closest")
    return figure(data, layout)


# ----------------------------------------------------------------------------- thumbnails

def thumbnail_jpeg(image: np.ndarray, cell: Optional[Sequence[float]], max_side: int = 128) -> bytes:
    """A small JPEG of the image with one patch outlined, ``cell`` = its (x0, y0, x1, y1) in image
    pixels (for the t-SNE hover tooltip; JPEG because it encodes several times faster than PNG and a
    hover must answer at once)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    width = img.width
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    if cell is not None:
        f = img.width / width
        x0, y0, x1, y1 = (v * f for v in cell)
        draw = ImageDraw.Draw(img)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(214, 39, 40), width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ----------------------------------------------------------------------------- dataset views

def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.4g}"


def _head_axes(n_layers: int, n_heads: int, with_mean: bool) -> dict:
    """The x and y axes of a layers x heads grid (with the "mean" column at x = H + 1 or without)."""
    tickvals = list(range(n_heads)) + ([n_heads + 1] if with_mean else [])
    ticktext = [str(h + 1) for h in range(n_heads)] + (["mean"] if with_mean else [])
    return dict(
        xaxis=dict(tickvals=tickvals, ticktext=ticktext, title=dict(text="head", standoff=4), showgrid=False,
                   zeroline=False, range=[-0.5, n_heads + (1.5 if with_mean else -0.5)], fixedrange=True),
        yaxis=dict(tickvals=list(range(n_layers)), ticktext=[str(i + 1) for i in range(n_layers)],
                   title=dict(text="layer", standoff=4), autorange="reversed", showgrid=False,
                   zeroline=False, fixedrange=True))


def dataset_heads_figure(mean: np.ndarray, std: np.ndarray, q1: np.ndarray, median: np.ndarray,
                         q3: np.ndarray, n: np.ndarray, name: str,
                         selected: Optional[tuple[int, Optional[int]]] = None) -> go.Figure:
    """Layers x heads heatmap of a statistic's mean over a set of examples, the spread on hover.

    Every array is ``(n_layers, n_heads + 1)``, the last column being the layer mean (drawn one empty
    column right of the heads, as in :func:`head_summary_figure`): trace 0 is the head grid (x = head),
    trace 1 the mean column (x = H + 1). ``selected`` = (layer, head or None) draws the selection.
    """
    mean = np.asarray(mean, dtype=np.float64)
    n_layers, n_heads = mean.shape[0], mean.shape[1] - 1
    heads = [f"head {h + 1}" for h in range(n_heads)] + ["mean of heads"]
    text = [[f"Layer {layer + 1}, {heads[h]}<br>{name}: mean {_fmt(mean[layer, h])} ± {_fmt(std[layer, h])} (std)"
             f"<br>quartiles {_fmt(q1[layer, h])} / {_fmt(median[layer, h])} / {_fmt(q3[layer, h])}"
             f"<br>n = {int(n[layer, h])} examples" for h in range(n_heads + 1)] for layer in range(n_layers)]
    layers = typed_array(np.arange(n_layers))
    common = dict(type="heatmap", coloraxis="coloraxis", hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1)
    data = [dict(z=typed_array(mean[:, :n_heads]), x=typed_array(np.arange(n_heads)), y=layers,
                 text=[row[:n_heads] for row in text], name="heads", **common),
            dict(z=typed_array(mean[:, n_heads:]), x=[n_heads + 1], y=layers,
                 text=[row[n_heads:] for row in text], name="mean", **common)]
    layout = _layout(coloraxis=dict(colorscale=STAT_SCALE, colorbar=dict(thickness=10, len=0.9)),
                     **_head_axes(n_layers, n_heads, with_mean=True),
                     margin=dict(l=48, r=10, t=8, b=40), clickmode="event", hovermode="closest",
                     shapes=[head_selection_shape(selected[0], selected[1], n_heads)] if selected else [])
    return figure(data, layout)


def contrast_figure(diff: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray, n_a: np.ndarray,
                    n_b: np.ndarray, p: np.ndarray, q: np.ndarray, significant: np.ndarray, name: str,
                    label_a: str, label_b: str, selected: Optional[tuple[int, int]] = None) -> go.Figure:
    """Layers x heads heatmap of the difference of means between two groups of examples (A - B, on a
    diverging scale centred on 0), with each head's Mann–Whitney p and Benjamini–Hochberg q on
    hover. Trace 0 is the grid (x = head, y = layer); trace 1 marks the significant heads with a star
    at the same coordinates (clicking it is clicking the head)."""
    diff = np.asarray(diff, dtype=np.float64)
    n_layers, n_heads = diff.shape
    text = [[f"Layer {layer + 1}, head {h + 1}<br>{name}: {label_a} − {label_b} = {_fmt(diff[layer, h])}"
             f"<br>{label_a}: mean {_fmt(mean_a[layer, h])} (n = {int(n_a[layer, h])})"
             f"<br>{label_b}: mean {_fmt(mean_b[layer, h])} (n = {int(n_b[layer, h])})"
             f"<br>Mann–Whitney p = {_fmt(p[layer, h])}, BH q = {_fmt(q[layer, h])}"
             + (" (significant)" if significant[layer, h] else "") for h in range(n_heads)]
            for layer in range(n_layers)]
    finite = np.abs(diff[np.isfinite(diff)])
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    marked_layers, marked_heads = np.nonzero(np.asarray(significant, bool))
    data = [dict(type="heatmap", z=typed_array(diff), x=typed_array(np.arange(n_heads)),
                 y=typed_array(np.arange(n_layers)), text=text, hovertemplate="%{text}<extra></extra>",
                 colorscale=DIVERGING_SCALE, zmin=-top, zmax=top, xgap=1, ygap=1, name="difference",
                 colorbar=dict(thickness=10, len=0.9, title=dict(text="A − B"))),
            dict(type="scatter", mode="text", x=marked_heads.tolist(), y=marked_layers.tolist(),
                 text=["★"] * len(marked_heads), textfont=dict(size=14, color=NEIGHBOR_COLOR),
                 hoverinfo="skip", name="significant", showlegend=False)]
    layout = _layout(**_head_axes(n_layers, n_heads, with_mean=False), margin=dict(l=48, r=10, t=8, b=40),
                     clickmode="event", hovermode="closest",
                     shapes=[head_selection_shape(selected[0], selected[1], n_heads)] if selected else [])
    return figure(data, layout)


# ----------------------------------------------------------------------------- interventions

def deletion_curve_figure(fractions: Sequence[float], scores: Sequence[float], answers: Sequence[str],
                          answer: str, method: str) -> go.Figure:
    """The deletion curve of one example (Chefer et al. 2021's positive perturbation test): the score
    of the model's original ``answer`` against the fraction of image patches removed, most relevant by
    ``method`` first; a faithful map makes it fall fast. The top answer at each step is on hover."""
    x = np.asarray(fractions, dtype=np.float64) * 100
    y = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(answers) != len(x):
        raise ValueError(f"fractions, scores, answers: expected one value each per step, got {x.shape}, "
                         f"{y.shape} and {len(answers)}")
    text = [f"{f:.0f} % removed: '{answer}' {s:.3f}, top answer '{a}'" for f, s, a in zip(x, y, answers)]
    data = [dict(type="scatter", mode="lines+markers", x=x.tolist(), y=y.tolist(), text=text,
                 hovertemplate="%{text}<extra></extra>", line=dict(color=IMAGE_COLOR, width=2),
                 marker=dict(size=6, color=[SELECT_COLOR if a != answer else IMAGE_COLOR for a in answers]))]
    probabilities = bool(y.size) and bool(((y >= 0) & (y <= 1)).all())  # else a raw score (retrieval's logit)
    layout = _layout(
        title=dict(text=f"Score of '{answer}' as patches go, most relevant first ({method})", x=0.01, y=0.97,
                   font=dict(size=12)),
        xaxis=dict(title=dict(text="patches removed (%)"), range=[-3, 93], zeroline=False),
        yaxis=dict(title=dict(text="score"), range=[0, 1.05] if probabilities else None, zeroline=False),
        margin=dict(l=48, r=10, t=32, b=40), hovermode="closest", showlegend=False)
    return figure(data, layout)


def activation_patching_figure(difference: np.ndarray, columns: Sequence[str],
                               recovered: Optional[np.ndarray], answer: str) -> go.Figure:
    """Activation patching as a heatmap, layers (rows, 1 at the top) × patched positions (columns):
    the clean answer's logit when that layer's output at those positions comes from the clean run,
    minus its logit in the corrupted run (0: nothing recovered), on a scale centred on 0; the
    fraction of the clean run's margin recovered is on hover."""
    d = np.asarray(difference, dtype=np.float32)
    if d.ndim != 2 or d.shape[1] != len(columns):
        raise ValueError(f"difference: expected (n_layers, {len(columns)}), got shape {d.shape}")
    if recovered is not None and np.shape(recovered) != d.shape:
        raise ValueError(f"recovered: expected shape {d.shape}, got {np.shape(recovered)}")
    layers = [f"layer {l + 1}" for l in range(d.shape[0])]
    share = np.full(d.shape, np.nan) if recovered is None else np.asarray(recovered, dtype=np.float64)
    text = [[f"{layers[l]}, {columns[c]}: {d[l, c]:+.3f}" + ("" if np.isnan(share[l, c]) else
                                                             f" ({100 * share[l, c]:.0f} % recovered)")
             for c in range(d.shape[1])] for l in range(d.shape[0])]
    bound = float(np.abs(d).max()) if d.size and np.isfinite(d).all() and np.abs(d).max() > 0 else 1.0
    data = [dict(type="heatmap", z=typed_array(d), x=list(columns), y=layers, text=text,
                 hovertemplate="%{text}<extra></extra>", colorscale=DIVERGING_SCALE, zmin=-bound, zmax=bound,
                 colorbar=dict(thickness=10, title=dict(text="Δ logit")))]
    layout = _layout(
        title=dict(text=f"Logit of '{answer}' recovered by patching in the clean run", x=0.01, y=0.97,
                   font=dict(size=12)),
        xaxis=dict(type="category", tickangle=-60, tickfont=dict(size=9), showgrid=False),
        yaxis=dict(type="category", autorange="reversed", showgrid=False),
        margin=dict(l=60, r=10, t=32, b=90), hovermode="closest")
    return figure(data, layout)


def _head_grid(z: np.ndarray, text: list, title: str, colourbar: str) -> go.Figure:
    """A layers × heads heatmap laid out as the head summary (layer 1 at the top, 1-based ticks, x = head and
    y = layer as 0-based numbers, so that a click reads like one on the head summary), on a scale centred
    on 0."""
    n_layers, n_heads = z.shape
    bound = float(np.abs(z).max()) if z.size and np.isfinite(z).all() and np.abs(z).max() > 0 else 1.0
    data = [dict(type="heatmap", z=typed_array(z), x=typed_array(np.arange(n_heads)),
                 y=typed_array(np.arange(n_layers)), text=text, hovertemplate="%{text}<extra></extra>",
                 colorscale=DIVERGING_SCALE, zmin=-bound, zmax=bound, xgap=1, ygap=1,
                 colorbar=dict(thickness=10, title=dict(text=colourbar)))]
    layout = _layout(
        title=dict(text=title, x=0.01, y=0.97, font=dict(size=12)),
        xaxis=dict(tickvals=list(range(n_heads)), ticktext=[str(h + 1) for h in range(n_heads)],
                   title=dict(text="head", standoff=4), showgrid=False, zeroline=False, fixedrange=True),
        yaxis=dict(tickvals=list(range(n_layers)), ticktext=[str(l + 1) for l in range(n_layers)],
                   title=dict(text="layer", standoff=4), autorange="reversed", showgrid=False, zeroline=False,
                   fixedrange=True),
        margin=dict(l=50, r=10, t=32, b=40), hovermode="closest")
    return figure(data, layout)


def head_ablation_sweep_figure(scores: np.ndarray, answers: Sequence[Sequence[str]], answer: str,
                               score: float) -> go.Figure:
    """The head ablation sweep: per layer and head, the change of the original answer's score when that
    head alone is zeroed (blue: the answer needs the head); hover gives the score and the answer then."""
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 2 or len(answers) != s.shape[0] or any(len(row) != s.shape[1] for row in answers):
        raise ValueError(f"scores and answers: expected (n_layers, n_heads) of both, got {s.shape} and "
                         f"{[len(row) for row in answers]}")
    change = s - np.float32(score)
    text = [[f"layer {l + 1}, head {h + 1} zeroed: '{answer}' {score:.3f} → {s[l, h]:.3f} ({change[l, h]:+.3g})"
             + ("" if answers[l][h] == answer else f"; the answer becomes '{answers[l][h]}'")
             for h in range(s.shape[1])] for l in range(s.shape[0])]
    return _head_grid(change, text, f"Score of '{answer}' with one head zeroed, minus the re-run's", "Δ score")


def head_patching_figure(difference: np.ndarray, recovered: Optional[np.ndarray], answer: str) -> go.Figure:
    """Activation patching per head: the clean answer's logit when that head's output comes from the clean
    run, minus its logit in the corrupted run; the fraction of the clean margin recovered on hover."""
    d = np.asarray(difference, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"difference: expected (n_layers, n_heads), got shape {d.shape}")
    if recovered is not None and np.shape(recovered) != d.shape:
        raise ValueError(f"recovered: expected shape {d.shape}, got {np.shape(recovered)}")
    share = np.full(d.shape, np.nan) if recovered is None else np.asarray(recovered, dtype=np.float64)
    text = [[f"layer {l + 1}, head {h + 1}: {d[l, h]:+.3f}" + ("" if np.isnan(share[l, h]) else
                                                              f" ({100 * share[l, h]:.0f} % recovered)")
             for h in range(d.shape[1])] for l in range(d.shape[0])]
    return _head_grid(d, text, f"Logit of '{answer}' recovered by patching in one head's output", "Δ logit")


# ----------------------------------------------------------------------------- database-wide token map

TOKEN_MAP_COLOURINGS = ("modality", "word", "correctness", "example")
TOKEN_MAP_WORDS = 10  # colour by word: the most frequent text words get a colour each, the others one
WORD_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728",
                "#393b79", "#637939")
CORRECTNESS_COLOURS = (("correct", 1, "#15803d"), ("incorrect", 0, "#b91c1c"), ("unknown", -1, SPECIAL_COLOR))


def token_map_groups(words: np.ndarray, modality: np.ndarray, correct: np.ndarray, colour_by: str) -> list:
    """The legend groups of a token map: ``(name, point mask, colour)``, empty groups left out
    (``modality``: 0 text, 1 image, 2 special, as in app.database.token_map.MODALITIES)."""
    text, image, special = (modality == 0), (modality == 1), (modality == 2)
    if colour_by == "modality":
        groups = [("text", text, TEXT_COLOR), ("image", image, IMAGE_COLOR), ("special", special, SPECIAL_COLOR)]
    elif colour_by == "word":
        counts: dict = {}
        for w in words[text].tolist():
            counts[w] = counts.get(w, 0) + 1
        top = sorted(counts, key=lambda w: (-counts[w], w))[:TOKEN_MAP_WORDS]
        groups = [(f"‘{w}’", text & (words == w), colour) for w, colour in zip(top, WORD_PALETTE)]
        groups += [("other words", text & ~np.isin(words, top), "#9ecae1"), ("image", image, "#fdd0a2"),
                   ("special", special, SPECIAL_COLOR)]
    elif colour_by == "correctness":
        groups = [(f"{name} answer", correct == value, colour) for name, value, colour in CORRECTNESS_COLOURS]
    else:
        raise ValueError(f"colour_by: one of {TOKEN_MAP_COLOURINGS}, got {colour_by!r}")
    return [g for g in groups if g[1].any()]


def token_map_figure(points: np.ndarray, ex_ids: np.ndarray, tokens: np.ndarray, words: np.ndarray,
                     modality: np.ndarray, cells: np.ndarray, correct: np.ndarray, colour_by: str, title: str,
                     shown_example: Optional[int] = None) -> go.Figure:
    """WebGL scatter of a database-wide token map (Scattergl: 20 000 points stay smooth). One trace per
    legend group (a legend click hides it), or one coloured by example id; the tokens of
    ``shown_example`` ringed in a last trace. ``customdata`` is the point's index in the map (a click
    opens that token's example); hover names the token and its example."""
    pts = np.asarray(points, dtype=np.float32)
    labels = np.asarray(token_labels(words.tolist(), [None if c[0] < 0 else tuple(c) for c in cells.tolist()]))
    data = []

    def trace(name, sel, marker, legend=True):
        return dict(type="scattergl", mode="markers", name=name, x=typed_array(pts[sel, 0]), y=typed_array(pts[sel, 1]),
                    customdata=sel.tolist(), text=[f"{labels[k]} · example {ex_ids[k]}, token {tokens[k]}"
                                                   for k in sel.tolist()],
                    hovertemplate="%{text}<extra></extra>", marker=marker, showlegend=legend)

    if colour_by == "example":
        sel = np.arange(len(pts))
        data.append(trace("tokens", sel, dict(size=4, opacity=0.8, color=typed_array(ex_ids, np.float32),
                                              colorscale="Viridis", showscale=True,
                                              colorbar=dict(title=dict(text="example", side="right"), thickness=10)),
                          legend=False))
    else:
        for name, mask, colour in token_map_groups(words, modality, correct, colour_by):
            data.append(trace(name, np.flatnonzero(mask), dict(size=4, opacity=0.75, color=colour)))
    shown = np.flatnonzero(ex_ids == shown_example) if shown_example is not None else np.zeros(0, int)
    data.append(trace(f"example {shown_example}" if shown_example is not None else "shown example", shown,
                      dict(symbol="circle-open", size=9, color=SELECT_COLOR, line=dict(width=1.5)),
                      legend=bool(len(shown))))
    layout = _layout(
        title=dict(text=title, x=0.01, y=0.98, font=dict(size=13)),
        xaxis=dict(visible=False), yaxis=dict(visible=False),
        legend=dict(orientation="v", x=1.0, y=1.0, font=dict(size=11), itemsizing="constant"),
        margin=dict(l=4, r=4, t=30, b=4), clickmode="event", hovermode="closest", uirevision="token-map")
    return figure(data, layout)
