"""Validation and normalisation of records (the dicts users pickle and models return).

:func:`validate_record` checks a record once, at the door, and raises :class:`RecordError`
naming the example and the field, e.g.::

    example 7, field 'attention': expected shape (12, 12, 250, 250) from tokens/txt_len, got (12, 12, 249, 250)

It returns a :class:`Record` in the stored order: text tokens first (as given), then the image-side
special tokens (coordinate ``None``), then the image patches sorted row-major by ``(y, x)``; the
attention rows *and* columns and the hidden states are permuted to match.

Token kinds: a text token is *special* when its string is one of ``special_tokens``.  An image
token with coordinate ``None`` must be named like a special token (ViLT's image ``[CLS]``) and is
special; every other image token is a patch with a unique, non-negative integer ``(x, y)``.  The
grid of an example is the record's ``grid`` field ``(rows, cols)`` when given (every patch must lie
inside it); without it, ``(max y + 1, max x + 1)`` over its patches, which is wrong when a model keeps no
patch of the last row or column, so adapters always give ``grid``.

Bounds, so that nothing the viewer stores or draws can overflow or mislead (each refused with a message):
``ex_id`` below 2**31 (ids are stored as 32-bit integers in the nearest-token index); patch coordinates
and ``grid`` at most :data:`MAX_GRID_SIDE` a side; images at most :data:`MAX_IMAGE_SIDE` pixels a side and
:data:`MAX_IMAGE_PIXELS` pixels; attention weights in [0, 1] and every query row summing to 1 within
:data:`ROW_SUM_TOLERANCE`; floating-point values within float32's range (hidden states are then stored as
float16, clipped to +-65 504); strings of bounded length.

Accuracy: when the prediction has both an answer and a label, ``accuracy`` is whether they match (case
and repeated whitespace ignored); a record whose own ``accuracy`` contradicts that gets a note saying so.
"""
from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["RecordError", "Record", "validate_record", "answers_match", "DEFAULT_SPECIAL_TOKENS",
           "REQUIRED_FIELDS", "OPTIONAL_FIELDS", "MAX_EX_ID", "MAX_GRID_SIDE", "MAX_IMAGE_SIDE",
           "MAX_IMAGE_PIXELS", "ROW_SUM_TOLERANCE"]

DEFAULT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")
REQUIRED_FIELDS = ("ex_id", "image", "tokens", "txt_len", "attention", "hidden_states")
OPTIONAL_FIELDS = ("img_coords", "grid", "accuracy", "custom_metrics", "metric_descriptions", "prediction",
                   "text", "notes", "relevancy", "logit_lens")

MAX_EX_ID = 2**31 - 1            # the nearest-token index stores ids as int32
MAX_GRID_SIDE = 1024             # patches per side (a 16 384-pixel image of 16-pixel patches)
MAX_IMAGE_SIDE = 8192            # pixels per side of the stored image
MAX_IMAGE_PIXELS = 40_000_000    # pixels of the stored image (as the "Add example" upload limit)
ROW_SUM_TOLERANCE = 0.05         # |sum of a query's attention - 1| (float16 models round a little)
WEIGHT_TOLERANCE = 1e-3          # attention weights may lie this far outside [0, 1] (rounding)
MAX_TOKEN_CHARS = 1000
MAX_TEXT_CHARS = 100_000
MAX_NOTE_CHARS = 1000
FLOAT32_MAX = float(np.finfo(np.float32).max)

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist = 3, 60, 60, 6


def _short(value: Any) -> str:
    """A repr fit for a one-line message, whatever the value (huge, deeply nested, odd)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real message
        return f"<{type(value).__name__}>"


class RecordError(ValueError):
    """A record is not valid; ``str()`` names the example and the field."""

    def __init__(self, ex_id: Any, field: str, message: str):
        if not isinstance(ex_id, (int, str, type(None))):  # e.g. a nested list given as ex_id
            ex_id = _short(ex_id)
        self.ex_id = ex_id
        self.field = field
        self.message = message
        super().__init__(f"example {ex_id}, field '{field}': {message}")


@dataclass
class Record:
    """A validated record in stored order (see the module docstring)."""

    ex_id: int
    tokens: list[str]
    txt_len: int
    special: np.ndarray            # (n,) bool
    coords: list[Optional[tuple[int, int]]]  # per token; None for text and special tokens
    grid: Optional[tuple[int, int]]  # (rows, cols) or None for a text-only example
    image: np.ndarray              # (H, W, 3) uint8
    attention: np.ndarray          # (L, H, n, n) float32
    hidden_states: np.ndarray      # (L + 1, n, d) float32
    accuracy: Optional[bool] = None
    custom_metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (L, H) float32
    metric_descriptions: dict[str, str] = field(default_factory=dict)  # custom metric name -> definition
    prediction: Optional[dict] = None
    text: Optional[str] = None
    notes: list[str] = field(default_factory=list)  # shown with the example (e.g. "the text was cut")
    relevancy: Optional[np.ndarray] = None  # (n, n) float32: gradient relevancy, rows = queries
    logit_lens: Optional[list] = None  # per hidden-state layer, the top answers [[answer, probability], ...]
    order: np.ndarray = None       # stored position i holds input token order[i]

    @property
    def n_layers(self) -> int:
        return self.attention.shape[0]

    @property
    def n_heads(self) -> int:
        return self.attention.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.hidden_states.shape[2]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor from a live model
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _numeric_array(ex_id, name: str, value: Any, ndim: Optional[int] = None) -> np.ndarray:
    try:
        array = _as_array(value)
    except Exception as error:  # ragged lists and the like
        raise RecordError(ex_id, name, f"not convertible to an array ({error})") from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise RecordError(ex_id, name, f"expected a numeric array, got dtype {array.dtype}"
                          f" ({type(value).__name__})")
    if ndim is not None and array.ndim != ndim:
        raise RecordError(ex_id, name, f"expected {ndim} dimensions, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise RecordError(ex_id, name, f"contains {bad} NaN or infinite value(s)")
        if array.size and array.dtype.itemsize > 4 and np.abs(array).max() > FLOAT32_MAX:
            raise RecordError(ex_id, name, f"holds values beyond float32's range (largest magnitude "
                              f"{float(np.abs(array).max()):.3g})")
    elif array.size and np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize > 2 \
            and max(abs(int(array.max())), abs(int(array.min()))) > FLOAT32_MAX:
        raise RecordError(ex_id, name, "holds integers beyond float32's range")
    return array


def answers_match(answer: Any, label: Any) -> bool:
    """``answer == label``, ignoring case and surrounding / repeated whitespace."""
    return " ".join(str(answer).split()).lower() == " ".join(str(label).split()).lower()


def _bounded_str(ex_id, name: str, value: Any, limit: int, what: str = "str") -> str:
    if not isinstance(value, str):
        raise RecordError(ex_id, name, f"expected {what}, got {type(value).__name__}")
    if len(value) > limit:
        raise RecordError(ex_id, name, f"is {len(value):,} characters long; at most {limit:,} are stored")
    return value


def _grid_field(ex_id, value: Any) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value)
            or not all(1 <= v <= MAX_GRID_SIDE for v in value)):
        raise RecordError(ex_id, "grid", f"expected (rows, cols), two ints in 1..{MAX_GRID_SIDE}, "
                          f"got {_short(value)}")
    return int(value[0]), int(value[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def validate_record(record: Any, *, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                    expected: Optional[tuple[int, int, int]] = None,
                    ex_id: Any = None) -> Record:
    """Check ``record`` and return it normalised (see the module docstring).

    special_tokens: token strings treated as special.
    expected: (n_layers, n_heads, hidden_size) of the rest of the database, or None for the first.
    ex_id: what to call the example in messages when the record has no usable ``ex_id`` (its key).
    Raises :class:`RecordError` naming the example and the field.
    """
    if not isinstance(record, dict):
        raise RecordError(ex_id, "record", f"expected a dict, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if "ex_id" in record and _is_int(record["ex_id"]) and 0 <= record["ex_id"] <= MAX_EX_ID:
        ex_id = int(record["ex_id"])
    if missing:
        raise RecordError(ex_id, missing[0], "missing required field"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise RecordError(ex_id, unknown[0], f"unknown field (known: "
                          f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    if not _is_int(record["ex_id"]) or not 0 <= record["ex_id"] <= MAX_EX_ID:
        raise RecordError(ex_id, "ex_id", f"expected a non-negative int below 2**31, got "
                          f"{_short(record['ex_id'])}")
    specials = set(special_tokens)

    # tokens and txt_len
    tokens = record["tokens"]
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise RecordError(ex_id, "tokens", "expected a list of str")
    long = next((i for i, t in enumerate(tokens) if len(t) > MAX_TOKEN_CHARS), None)
    if long is not None:
        raise RecordError(ex_id, "tokens", f"token {long} is {len(tokens[long]):,} characters long; "
                          f"at most {MAX_TOKEN_CHARS} are stored")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    txt_len = record["txt_len"]
    if not _is_int(txt_len) or not 0 <= txt_len <= n:
        raise RecordError(ex_id, "txt_len", f"expected an int in 0..{n} (len(tokens)), got {_short(txt_len)}")
    txt_len = int(txt_len)
    n_image = n - txt_len

    # img_coords
    coords = record.get("img_coords")
    if coords is None or (hasattr(coords, "__len__") and len(coords) == 0):
        coords = []
    if isinstance(coords, np.ndarray):
        coords = coords.tolist()
    if not isinstance(coords, (list, tuple)):
        raise RecordError(ex_id, "img_coords", f"expected a list of (x, y) or None, got {type(coords).__name__}")
    given_grid = _grid_field(ex_id, record.get("grid"))
    if len(coords) != n_image:
        raise RecordError(ex_id, "img_coords", f"expected {n_image} coordinates (one per image token: "
                          f"len(tokens) - txt_len = {n} - {txt_len}), got {len(coords)}")
    if n == 0:
        raise RecordError(ex_id, "tokens", "the record has neither text nor image tokens")
    image_specials, patches, seen = [], [], {}
    for i, coord in enumerate(coords):
        position = txt_len + i
        if coord is None:
            if tokens[position] not in specials:
                raise RecordError(ex_id, "img_coords", f"image token {position} ({tokens[position]!r}) has "
                                  f"coordinate None but is not a special token ({', '.join(sorted(specials))})")
            image_specials.append(position)
            continue
        if (not isinstance(coord, (list, tuple, np.ndarray)) or len(coord) != 2
                or not all(_is_int(c) or (isinstance(c, numbers.Real) and not isinstance(c, (bool, np.bool_))
                                          and float(c).is_integer()) for c in coord)):
            raise RecordError(ex_id, "img_coords", f"image token {position}: expected (x, y) ints or None, "
                              f"got {_short(coord)}")
        if any(abs(float(c)) > MAX_GRID_SIDE for c in coord):
            raise RecordError(ex_id, "img_coords", f"image token {position}: coordinate {_short(tuple(coord))} "
                              f"lies outside any grid of at most {MAX_GRID_SIDE} patches a side")
        x, y = int(coord[0]), int(coord[1])
        if x < 0 or y < 0:
            raise RecordError(ex_id, "img_coords", f"image token {position}: negative coordinate ({x}, {y})")
        if x >= MAX_GRID_SIDE or y >= MAX_GRID_SIDE or (given_grid and (y >= given_grid[0] or x >= given_grid[1])):
            rows, cols = given_grid or (MAX_GRID_SIDE, MAX_GRID_SIDE)
            raise RecordError(ex_id, "img_coords", f"image token {position}: coordinate ({x}, {y}) lies outside "
                              f"the grid of {rows} rows x {cols} columns" + (" (the record's grid)" if given_grid else ""))
        if (x, y) in seen:
            raise RecordError(ex_id, "img_coords", f"duplicate coordinate ({x}, {y}) for image tokens "
                              f"{seen[(x, y)]} and {position}")
        seen[(x, y)] = position
        patches.append((y, x, position))
    patches.sort()
    order = np.array(list(range(txt_len)) + image_specials + [p for _, _, p in patches], dtype=np.int64)
    if given_grid is not None and not patches:
        raise RecordError(ex_id, "grid", "given, but the record has no image patches")
    grid = given_grid or ((max(y for y, _, _ in patches) + 1, max(x for _, x, _ in patches) + 1) if patches else None)

    # attention and hidden states
    attention = _numeric_array(ex_id, "attention", record["attention"], ndim=4)
    n_layers, n_heads = attention.shape[:2]
    if attention.shape[2:] != (n, n) or n_layers == 0 or n_heads == 0:
        raise RecordError(ex_id, "attention", f"expected shape ({n_layers}, {n_heads}, {n}, {n}) from "
                          f"tokens/txt_len, got {attention.shape}")
    hidden = _numeric_array(ex_id, "hidden_states", record["hidden_states"], ndim=3)
    if hidden.shape[:2] != (n_layers + 1, n) or hidden.shape[2] == 0:
        raise RecordError(ex_id, "hidden_states", f"expected shape ({n_layers + 1}, {n}, hidden) from "
                          f"attention layers + 1 and tokens, got {hidden.shape}")
    _check_attention_rows(ex_id, attention)
    if expected is not None:
        for name, got, want, field_name in (("layers", n_layers, expected[0], "attention"),
                                            ("heads", n_heads, expected[1], "attention"),
                                            ("hidden size", hidden.shape[2], expected[2], "hidden_states")):
            if got != want:
                raise RecordError(ex_id, field_name, f"{got} {name}, but the database has {want} {name}")

    # image
    image = _numeric_array(ex_id, "image", record["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise RecordError(ex_id, "image", f"expected an (H, W, 3) RGB array, got shape {image.shape}")
    height, width = image.shape[:2]
    if max(height, width) > MAX_IMAGE_SIDE or height * width > MAX_IMAGE_PIXELS:
        raise RecordError(ex_id, "image", f"is {width} x {height} pixels; at most {MAX_IMAGE_SIDE} a side and "
                          f"{MAX_IMAGE_PIXELS:,} in all are stored (resize it to what the model saw)")
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        raise RecordError(ex_id, "image", f"values must lie in 0-255, got {low}..{high}")
    image = np.rint(image).astype(np.uint8) if image.dtype != np.uint8 else image

    # optional fields
    accuracy = record.get("accuracy")
    if accuracy is not None:
        if not isinstance(accuracy, (bool, np.bool_)):
            raise RecordError(ex_id, "accuracy", f"expected True, False or None, got {_short(accuracy)}")
        accuracy = bool(accuracy)
    custom = record.get("custom_metrics") or {}
    if not isinstance(custom, dict):
        raise RecordError(ex_id, "custom_metrics", f"expected a dict name -> (layers, heads) array, "
                          f"got {type(custom).__name__}")
    from app.database.stats import STATISTICS  # noqa: PLC0415 (avoid an import cycle at load)
    metrics = {}
    for name, value in custom.items():
        if not isinstance(name, str) or not name or len(name) > MAX_TOKEN_CHARS:
            raise RecordError(ex_id, "custom_metrics", f"metric names must be non-empty str of at most "
                              f"{MAX_TOKEN_CHARS} characters, got {_short(name)}")
        if name in STATISTICS:
            raise RecordError(ex_id, "custom_metrics", f"metric {name!r} clashes with a built-in statistic")
        array = _numeric_array(ex_id, f"custom_metrics[{name!r}]", value)
        if array.shape != (n_layers, n_heads):
            raise RecordError(ex_id, f"custom_metrics[{name!r}]", f"expected shape ({n_layers}, {n_heads}) "
                              f"(layers, heads), got {array.shape}")
        metrics[name] = array.astype(np.float32)
    descriptions = record.get("metric_descriptions") or {}
    if not isinstance(descriptions, dict):
        raise RecordError(ex_id, "metric_descriptions", f"expected a dict name -> str, got "
                          f"{type(descriptions).__name__}")
    for name, text in descriptions.items():
        if name not in metrics:
            raise RecordError(ex_id, "metric_descriptions", f"describes {_short(name)}, which is not one of "
                              f"the record's custom_metrics")
        _bounded_str(ex_id, f"metric_descriptions[{name!r}]", text, MAX_NOTE_CHARS)
    prediction = record.get("prediction")
    if prediction is not None:
        if not isinstance(prediction, dict) or not isinstance(prediction.get("answer"), str):
            raise RecordError(ex_id, "prediction", "expected a dict with 'answer' (str), 'score' (float), "
                              "'label' (str or None)")
        score = prediction.get("score")
        if score is not None and (not isinstance(score, numbers.Real) or isinstance(score, (bool, np.bool_))
                                  or not math.isfinite(float(score))):
            raise RecordError(ex_id, "prediction", f"'score' must be a finite number, got {_short(score)}")
        label = prediction.get("label")
        if label is not None and not isinstance(label, str):
            raise RecordError(ex_id, "prediction", f"'label' must be str or None, got {_short(label)}")
        for key, value in (("answer", prediction["answer"]), ("label", label)):
            if value is not None:
                _bounded_str(ex_id, f"prediction['{key}']", value, MAX_TOKEN_CHARS)
        prediction = {"answer": prediction["answer"],
                      "score": None if score is None else float(score), "label": label}
    text = record.get("text")
    if text is not None:
        text = _bounded_str(ex_id, "text", text, MAX_TEXT_CHARS, "str or None")
    notes = record.get("notes") or []
    if not isinstance(notes, (list, tuple)):
        raise RecordError(ex_id, "notes", f"expected a list of str, got {type(notes).__name__}")
    notes = [_bounded_str(ex_id, "notes", note, MAX_NOTE_CHARS) for note in notes]
    if prediction is not None and prediction["label"] is not None:
        derived = answers_match(prediction["answer"], prediction["label"])
        if accuracy is not None and accuracy != derived:
            notes.append(f"the record said accuracy={accuracy}, but its prediction {prediction['answer']!r} "
                         f"{'matches' if derived else 'differs from'} its label {prediction['label']!r}: "
                         f"shown as {'correct' if derived else 'incorrect'}")
        accuracy = derived

    relevancy = record.get("relevancy")
    if relevancy is not None:
        relevancy = _numeric_array(ex_id, "relevancy", relevancy, ndim=2)
        if relevancy.shape != (n, n):
            raise RecordError(ex_id, "relevancy", f"expected shape ({n}, {n}) (query, key) from tokens, got "
                              f"{relevancy.shape}")
        if relevancy.size and float(relevancy.min()) < -WEIGHT_TOLERANCE:
            raise RecordError(ex_id, "relevancy", f"must be non-negative (Chefer et al.'s relevancy is a sum of "
                              f"positive parts), got {float(relevancy.min()):.3g}")
        relevancy = relevancy.astype(np.float32)

    logit_lens = _logit_lens(ex_id, record.get("logit_lens"), n_layers + 1)

    attention = attention.astype(np.float32, copy=False)
    hidden = hidden.astype(np.float32, copy=False)
    if not np.array_equal(order, np.arange(n)):
        attention = attention[:, :, order[:, None], order[None, :]]  # rows and columns, one gather
        hidden = hidden[:, order]
        if relevancy is not None:
            relevancy = relevancy[order[:, None], order[None, :]]
    stored_tokens = [tokens[i] for i in order]
    special = np.array([tokens[i] in specials if i < txt_len else coords[i - txt_len] is None
                        for i in order], dtype=bool)
    stored_coords = [None if i < txt_len or coords[i - txt_len] is None
                     else (int(coords[i - txt_len][0]), int(coords[i - txt_len][1])) for i in order]
    return Record(ex_id=ex_id, tokens=stored_tokens, txt_len=txt_len, special=special,
                  coords=stored_coords, grid=grid, image=image, attention=np.ascontiguousarray(attention),
                  hidden_states=np.ascontiguousarray(hidden), accuracy=accuracy, custom_metrics=metrics,
                  metric_descriptions=dict(descriptions), prediction=prediction, text=text, notes=notes,
                  relevancy=relevancy, logit_lens=logit_lens, order=order)


MAX_LENS_ANSWERS = 10


def _logit_lens(ex_id, value: Any, n_hidden_layers: int) -> Optional[list]:
    """The logit lens as stored: for each hidden-state layer (0 = embeddings), up to
    MAX_LENS_ANSWERS (answer, probability) pairs, most probable first."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n_hidden_layers:
        raise RecordError(ex_id, "logit_lens", f"expected one list of (answer, probability) per hidden-state layer "
                          f"({n_hidden_layers}), got {_short(value)}")
    layers = []
    for layer, pairs in enumerate(value):
        if not isinstance(pairs, (list, tuple)) or not 1 <= len(pairs) <= MAX_LENS_ANSWERS:
            raise RecordError(ex_id, "logit_lens", f"layer {layer}: expected 1..{MAX_LENS_ANSWERS} (answer, "
                              f"probability) pairs, got {_short(pairs)}")
        row = []
        for pair in pairs:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[1], numbers.Real)
                    or isinstance(pair[1], (bool, np.bool_)) or not 0 <= float(pair[1]) <= 1 + WEIGHT_TOLERANCE):
                raise RecordError(ex_id, "logit_lens", f"layer {layer}: expected (answer, probability in [0, 1]), "
                                  f"got {_short(pair)}")
            row.append([_bounded_str(ex_id, "logit_lens", pair[0], MAX_TOKEN_CHARS), float(pair[1])])
        layers.append(row)
    return layers


def _check_attention_rows(ex_id, attention: np.ndarray) -> None:
    """Weights in [0, 1] and every query row summing to 1: attention as a softmax gives it. (One huge
    weight would otherwise set the float16 storage scale and turn every other weight into 0.)"""
    if attention.size == 0:
        return
    low, high = float(attention.min()), float(attention.max())
    if low < -WEIGHT_TOLERANCE or high > 1 + WEIGHT_TOLERANCE:
        raise RecordError(ex_id, "attention", f"weights must lie in [0, 1] (softmax outputs), got "
                          f"{low:.3g}..{high:.3g}")
    sums = attention.sum(axis=-1, dtype=np.float64)
    worst = np.unravel_index(int(np.abs(sums - 1).argmax()), sums.shape)
    if abs(sums[worst] - 1) > ROW_SUM_TOLERANCE:
        layer, head, query = (int(i) for i in worst)
        raise RecordError(ex_id, "attention", f"every query's weights must sum to 1 (within "
                          f"{ROW_SUM_TOLERANCE}); layer {layer}, head {head}, query {query} sums to "
                          f"{float(sums[worst]):.4g}")
