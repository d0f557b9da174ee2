"""Figure functions on small hand-made arrays: assert on the numbers in the traces."""
import base64

import numpy as np
import pytest

from app import figures


def decode(spec):
    """A trace array as numpy: plotly's base64 typed-array spec or a plain list."""
    if isinstance(spec, dict) and "bdata" in spec:
        dt = {"f4": np.float32, "f8": np.float64, "i4": np.int32, "i1": np.int8, "u1": np.uint8,
              "i2": np.int16, "u2": np.uint16, "u4": np.uint32}[spec["dtype"]]
        a = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=dt)
        if "shape" in spec:
            a = a.reshape([int(s) for s in str(spec["shape"]).split(",")])
        return a
    return np.asarray(spec, dtype=float)


def trace_json(fig, i):
    return fig.to_plotly_json()["data"][i]


VALUES = np.array([[0.1, 0.5, np.nan], [0.3, 0.2, 0.9]], dtype=np.float32)


def test_head_summary_raw_values_and_mean_column():
    fig = figures.head_summary_figure(VALUES, "text → image")
    z = decode(trace_json(fig, 0)["z"])
    np.testing.assert_array_equal(z, VALUES)  # NaN in the same place
    mean = decode(trace_json(fig, 1)["z"]).ravel()
    expected = [np.mean([0.1, 0.5]), np.mean([0.3, 0.2, 0.9])]
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    assert list(fig.data[1].x) == [VALUES.shape[1] + 1]  # separated from the heads by an empty column
    assert list(fig.layout.xaxis.ticktext)[-1] == "mean"


def test_head_summary_nan_hover_is_na():
    fig = figures.head_summary_figure(VALUES, "stat")
    assert fig.data[0].text[0][2].endswith("n/a")
    assert "Layer 1, head 2" in fig.data[0].text[0][1]


def test_head_summary_zscore_over_all_heads():
    fig = figures.head_summary_figure(VALUES, "stat", z_scored=True)
    finite = VALUES[np.isfinite(VALUES)].astype(np.float64)
    expected = (VALUES - finite.mean()) / finite.std()
    z = decode(trace_json(fig, 0)["z"])
    np.testing.assert_allclose(z, expected, rtol=1e-5, equal_nan=True)
    mean = decode(trace_json(fig, 1)["z"]).ravel()
    np.testing.assert_allclose(mean, [np.nanmean(expected[0]), np.nanmean(expected[1])], rtol=1e-5)
    assert fig.layout.coloraxis.cmid == 0


def test_zscore_constant_and_all_nan():
    np.testing.assert_array_equal(figures.zscore(np.ones((2, 2))), np.zeros((2, 2)))
    assert np.isnan(figures.zscore(np.full((2, 2), np.nan))).all()


def test_head_selection_shape_marks_head_or_mean():
    fig = figures.head_summary_figure(VALUES, "stat", selected=(1, 2))
    s = fig.layout.shapes[0]
    assert (s.x0, s.x1, s.y0, s.y1) == (1.5, 2.5, 0.5, 1.5)
    mean = figures.head_selection_shape(0, None, 3)
    assert (mean["x0"], mean["x1"]) == (3.5, 4.5)  # the mean column at x = n_heads + 1


def test_overlay_grid_is_averaged_patch_attention_row_major():
    rows, cols, n_text = 3, 4, 5
    n = n_text + 1 + rows * cols  # text, an image [CLS], patches row-major
    rng = np.random.default_rng(1)
    attn = rng.random((n, n)).astype(np.float32)
    coords = [None] * (n_text + 1) + [(x, y) for y in range(rows) for x in range(cols)]
    queries = [n_text + 1, n_text + 4, n_text + 9]  # three patches, averaged
    att = attn[queries].mean(axis=0)
    z = figures.overlay_grid(att, coords, (rows, cols))
    expected = attn[queries][:, n_text + 1:].mean(axis=0).reshape(rows, cols)
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    assert z.dtype == np.float32


def test_overlay_grid_places_by_coordinate_and_leaves_gaps():
    coords = [None, (1, 0), (0, 1)]
    z = figures.overlay_grid(np.array([9, 2, 3], np.float32), coords, (2, 2))
    assert z[0, 1] == 2 and z[1, 0] == 3
    assert np.isnan(z[0, 0]) and np.isnan(z[1, 1])


def test_typed_array_round_trip():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    a[0, 0] = np.nan
    np.testing.assert_array_equal(decode(figures.typed_array(a)), a)


def test_image_figure_sends_image_once_and_empty_overlay():
    coords = [None, None] + [(x, y) for y in range(2) for x in range(3)]
    fig = figures.image_figure("data:image/png;base64,AAAA", (20, 30), coords, (2, 3))
    assert fig.layout.images[0].source.startswith("data:image/png")
    assert (fig.layout.images[0].sizex, fig.layout.images[0].sizey) == (30, 20)
    z = decode(trace_json(fig, 0)["z"])
    assert z.shape == (2, 3) and not z.any()  # empty state: an invisible zero grid (clickable)
    assert fig.data[0].colorscale == tuple(tuple(c) for c in figures.TRANSPARENT_SCALE) or \
        list(map(list, fig.data[0].colorscale)) == figures.TRANSPARENT_SCALE
    assert (fig.data[0].x0, fig.data[0].dx, fig.data[0].y0, fig.data[0].dy) == (5, 10, 5, 10)
    np.testing.assert_array_equal(decode(trace_json(fig, 0)["customdata"]), [[2, 3, 4], [5, 6, 7]])
    np.testing.assert_array_equal(decode(trace_json(fig, 1)["customdata"]), [2, 3, 4, 5, 6, 7])


def test_patch_shapes_outline_selected_patches():
    coords = [None, (1, 0), (0, 1)]
    shapes = figures.patch_shapes([0, 1, 2], coords, (2, 2), (20, 40))
    assert len(shapes) == 2  # the text token has no patch
    assert (shapes[0]["x0"], shapes[0]["x1"], shapes[0]["y0"], shapes[0]["y1"]) == (20, 40, 0, 10)


def test_tsne_figure_groups_tokens_by_modality():
    tokens = ["[CLS]", "a", "[SEP]", "[CLS]", "p0", "p1"]
    special = [True, False, True, True, False, False]
    coords = [None, None, None, None, (0, 0), (1, 0)]
    pts = np.arange(12, dtype=np.float32).reshape(6, 2)
    fig = figures.tsne_figure(pts, tokens, np.arange(len(tokens)) < 3, special, coords, figures.tsne_title(2, 4))
    text, image, spec = (trace_json(fig, i) for i in range(3))
    np.testing.assert_array_equal(decode(text["customdata"]), [1])
    np.testing.assert_array_equal(decode(image["customdata"]), [4, 5])
    np.testing.assert_array_equal(decode(spec["customdata"]), [0, 2, 3])
    np.testing.assert_array_equal(decode(image["x"]), pts[[4, 5], 0])
    assert fig.layout.title.text == "Hidden states after layer 2 of 4 — t-SNE"
    assert figures.tsne_title(0, 4).startswith("Hidden states before layer 1")


def test_attention_matrix_figure_labels_and_values():
    m = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    fig = figures.attention_matrix_figure(m, ["a", "a"], ["x", "y"], "t", q_positions=[3, 4], k_positions=[5, 6])
    np.testing.assert_array_equal(decode(trace_json(fig, 0)["z"]), m)
    assert list(fig.data[0].y) == ["3 a", "4 a"] and list(fig.data[0].x) == ["5 x", "6 y"]


def test_thumbnail_is_small_jpeg_with_the_patch_outlined():
    img = np.zeros((300, 200, 3), np.uint8)
    jpeg = figures.thumbnail_jpeg(img, (100, 100, 200, 200))  # patch (1, 1) of a 3 x 2 grid
    assert jpeg[:3] == b"\xff\xd8\xff"
    from PIL import Image
    import io
    im = Image.open(io.BytesIO(jpeg))
    assert max(im.size) == 128
    r, g, b = im.getpixel((int(im.width * 0.75), int(im.height / 3) + 1))  # on the outline
    assert r > 150 and g < 100 and b < 100
    r, g, b = im.getpixel((int(im.width * 0.25), int(im.height / 6)))  # another patch: untouched
    assert r < 30


def test_token_labels():
    assert figures.token_labels(["a", "[CLS]", "p"], [None, None, (2, 3)]) == ["a", "[CLS]", "patch (2, 3)"]


def test_image_figure_reserves_the_colour_bar_space_from_the_start():
    """The overlay's colour bar appears with the first selection: it sits in a right margin that is
    there from the start (not grown by plotly when the bar shows), so the image does not move."""
    coords = [(x, y) for y in range(2) for x in range(3)]
    fig = figures.image_figure("data:image/png;base64,AAAA", (20, 30), coords, (2, 3))
    margin = fig.layout.margin
    assert margin.r == figures.COLORBAR_MARGIN > 0 and margin.autoexpand is False
    bar = fig.data[0].colorbar
    assert bar.x == 1 and bar.xanchor == "left"  # just right of the plot, inside the margin
    assert bar.xpad + bar.thickness + 40 <= figures.COLORBAR_MARGIN  # room for the tick labels


def test_scale_max_is_the_top_of_the_attention_scale():
    assert figures.scale_max(np.array([0.1, np.nan, 0.3])) == pytest.approx(0.3)
    assert figures.scale_max(np.zeros(3)) == 1.0  # nothing above 0: still a valid 0..1 range
    z = np.array([[0.25, 0.5]], dtype=np.float32)
    assert (figures.overlay_state(z, (1, 2))["zmin"], figures.overlay_state(z, (1, 2))["zmax"]) == (0.0, 0.5)


def test_attention_matrix_title_sits_below_the_tool_bar():
    """The tool bar covers the top MODEBAR_STRIP pixels of a graph: the title sits on the plot area,
    in a top margin that leaves that strip free."""
    fig = figures.attention_matrix_figure(np.eye(2, dtype=np.float32), ["a", "b"], ["a", "b"], "title")
    title = fig.layout.title
    assert (title.yref, title.y, title.yanchor) == ("paper", 1, "bottom")
    assert fig.layout.margin.t >= figures.MODEBAR_STRIP + title.font.size + title.pad.b


def test_attention_distance_figure_has_one_dot_per_head_at_its_layer():
    distance = np.array([[12.5, 30.25, 7.0], [40.0, 18.75, 22.5]], dtype=np.float32)
    fig = figures.attention_distance_figure(distance)
    trace = trace_json(fig, 0)
    np.testing.assert_array_equal(decode(trace["x"]), [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(decode(trace["y"]), distance.ravel())
    assert trace["text"][4] == "layer 2, head 2: 18.8 px" and trace["text"][0] == "layer 1, head 1: 12.5 px"
    assert trace["hovertemplate"] == "%{text}<extra></extra>"
    assert list(fig.layout.xaxis.tickvals) == [1, 2] and fig.layout.annotations == ()
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] >= 40


def test_attention_distance_figure_skips_nan_heads():
    distance = np.array([[np.nan, 5.0], [9.0, np.nan], [np.nan, np.nan]], dtype=np.float32)
    fig = figures.attention_distance_figure(distance)
    trace = trace_json(fig, 0)
    np.testing.assert_array_equal(decode(trace["x"]), [1, 2])
    np.testing.assert_array_equal(decode(trace["y"]), [5.0, 9.0])
    assert trace["text"] == ["layer 1, head 2: 5.0 px", "layer 2, head 1: 9.0 px"]
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 3]  # a layer with no defined head keeps its place


def test_attention_distance_figure_all_nan_says_why_it_is_empty():
    fig = figures.attention_distance_figure(np.full((3, 2), np.nan, dtype=np.float32))
    assert len(decode(trace_json(fig, 0)["y"])) == 0
    assert [a.text.replace("<br>", " ") for a in fig.layout.annotations] == [figures.DISTANCE_EMPTY]
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False


def test_attention_distance_figure_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match=r"distance: expected a \(n_layers, n_heads\) array, got shape \(4,\)"):
        figures.attention_distance_figure(np.zeros(4))


def test_overlay_names_what_it_shows():
    z = np.array([[0.25, 0.5]], dtype=np.float32)
    rollout = figures.overlay_state(z, (1, 2), "rollout")
    assert "rollout %{z:.4f}" in rollout["hovertemplate"] and rollout["colorbar"]["title"]["text"] == "rollout"
    attention = figures.overlay_state(z, (1, 2))
    assert "attention %{z:.4f}" in attention["hovertemplate"] and attention["colorbar"]["title"]["text"] == "attn"
    # the empty state puts the attention's colour bar back
    assert figures.overlay_state(None, (1, 2))["colorbar"] == attention["colorbar"]


def test_logit_lens_figure_lays_the_answers_out_by_layer_and_rank():
    lens = [[["a", 0.5]], [["b", 0.7], ["a", 0.2]]]
    fig = figures.logit_lens_figure(lens, n_layers=1)
    trace = fig.data[0]
    z = np.frombuffer(base64.b64decode(trace.z["bdata"]), np.float32).reshape(2, 2)
    np.testing.assert_allclose(z, [[0.5, np.nan], [0.7, 0.2]])
    assert list(trace.y) == ["emb", "1"] and trace.text[1][1] == "a<br>0.20"
    with pytest.raises(ValueError, match="expected 3 layers"):
        figures.logit_lens_figure(lens, n_layers=2)
