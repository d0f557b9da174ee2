"""Validation and normalisation of records (the dicts users pickle and models return).

:func:`validate_record` checks a record once, at the door, and raises :class:`RecordError`
naming the example and the field, e.g.::

    example 7, field 'attention': expected shape (12, 12, 250, 250) from tokens/txt_len, got (12, 12, 249, 250)

Two layouts:

- **Text first** (no ``modality`` field, the original format): the first ``txt_len`` tokens are text,
  the rest image. The :class:`Record` is in the stored order: text tokens first (as given), then the
  image-side special tokens (coordinate ``None``), then the image patches sorted by ``(grid, y, x)``;
  the attention rows *and* columns and the hidden states are permuted to match.
- **Any order** (``modality``: ``"text"`` / ``"image"`` per token, as a decoder VLM puts image tokens
  between its system prompt and the question): tokens stay in sequence order, so that a causal
  model's attention keeps its triangle; ``txt_len`` may then be omitted (it is the number of text tokens).

``img_coords`` holds one entry per image token in sequence order: ``(x, y)`` for a patch of the first
grid, ``(x, y, g)`` for a patch of grid ``g`` of ``grids``, or ``None`` for an image-side token that is
no patch (a row-end newline, image start/end markers, ViLT's image ``[CLS]``). Several grids
(LLaVA-NeXT's base image and high-resolution grid, Idefics3 tiles and thumbnail, several images) are
given as ``grids``: ``[{"name": str, "rows": int, "cols": int, "box": [left, top, right, bottom]}]``,
each ``box`` the pixel region of the stored image its patches cover (right and bottom exclusive).
``generated`` counts the trailing tokens the model generated (text tokens); ``special`` (one bool
per token) says which tokens are special when names alone cannot (chat-template markers).
``patch_lens`` (a decoder's per-patch logit lens) holds, per hidden-state layer, one ``(word, probability)``
per image token in sequence order; it follows the image tokens into the stored order.

Token kinds: a text token is *special* when its string is one of ``special_tokens`` (or the
record's ``special`` says so).  An image token with coordinate ``None`` is special; in the text-first
layout it must also be named like a special token (ViLT's image ``[CLS]``), as a check that the
coordinates are not shifted; every other image token is a patch with a unique, non-negative integer ``(x, y)``.  The
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

__all__ = ["RecordError", "Record", "Grid", "PatchLens", "validate_record", "answers_match", "DEFAULT_SPECIAL_TOKENS",
           "REQUIRED_FIELDS", "OPTIONAL_FIELDS", "MAX_EX_ID", "MAX_GRID_SIDE", "MAX_IMAGE_SIDE",
           "MAX_IMAGE_PIXELS", "ROW_SUM_TOLERANCE"]

DEFAULT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")
REQUIRED_FIELDS = ("ex_id", "image", "tokens", "txt_len", "attention", "hidden_states")  # txt_len: unless modality
OPTIONAL_FIELDS = ("img_coords", "grid", "accuracy", "custom_metrics", "metric_descriptions", "prediction",
                   "text", "notes", "relevancy", "logit_lens", "patch_lens", "modality", "grids", "generated",
                   "special")
MODALITIES = ("text", "image")

MAX_EX_ID = 2**31 - 1            # the nearest-token index stores ids as int32
MAX_GRID_SIDE = 1024             # patches per side (a 16 384-pixel image of 16-pixel patches)
MAX_IMAGE_SIDE = 8192            # pixels per side of the stored image
MAX_IMAGE_PIXELS = 40_000_000    # pixels of the stored image (as the "Add example" upload limit)
ROW_SUM_TOLERANCE = 0.05         # |sum of a query's attention - 1| (float16 models round a little)
WEIGHT_TOLERANCE = 1e-3          # attention weights may lie this far outside [0, 1] (rounding)
MAX_TOKEN_CHARS = 1000
MAX_TEXT_CHARS = 100_000
MAX_NOTE_CHARS = 1000
MAX_GRIDS = 1024                 # grids per example (Idefics3 tiles, images of a prompt)
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


@dataclass(frozen=True)
class Grid:
    """One patch grid of an example: ``rows`` x ``cols`` patches over the pixel ``box``
    ``(left, top, right, bottom)`` of the stored image (right and bottom exclusive)."""

    name: str
    rows: int
    cols: int
    box: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def cell(self, x: int, y: int) -> tuple[float, float, float, float]:
        """Patch ``(x, y)``'s pixel rectangle ``(x0, y0, x1, y1)`` on the stored image."""
        left, top, right, bottom = self.box
        width, height = (right - left) / self.cols, (bottom - top) / self.rows
        return left + x * width, top + y * height, left + (x + 1) * width, top + (y + 1) * height

    def as_json(self) -> dict:
        return {"name": self.name, "rows": self.rows, "cols": self.cols, "box": list(self.box)}

    @classmethod
    def from_json(cls, value: dict) -> "Grid":
        return cls(value["name"], int(value["rows"]), int(value["cols"]), tuple(int(v) for v in value["box"]))


@dataclass(frozen=True)
class PatchLens:
    """The per-patch logit lens of one example: for every hidden-state layer (0 = embeddings) and every
    image token in stored order, the top word of the model's final norm and LM head applied to that
    token's hidden state, and its probability."""

    words: tuple[tuple[str, ...], ...]  # [layer][image token]
    probabilities: np.ndarray           # (n_layers + 1, n_image_tokens) float32

    @property
    def n_layers(self) -> int:
        return len(self.words)

    @property
    def n_tokens(self) -> int:
        return self.probabilities.shape[1]


@dataclass
class Record:
    """A validated record in stored order (see the module docstring)."""

    ex_id: int
    tokens: list[str]
    txt_len: int
    special: np.ndarray            # (n,) bool
    coords: list[Optional[tuple[int, int]]]  # per token; None for text and special tokens
    grid: Optional[tuple[int, int]]  # (rows, cols) of the first grid, or None for a text-only example
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
    patch_lens: Optional[PatchLens] = None  # per hidden-state layer, the top word of every image token
    order: np.ndarray = None       # stored position i holds input token order[i]
    is_text: np.ndarray = None     # (n,) bool: the token's modality
    grids: tuple[Grid, ...] = ()   # every patch grid; patch_grid[i] indexes it
    patch_grid: np.ndarray = None  # (n,) int16: grid of each patch, -1 for tokens without one
    generated: int = 0             # the last `generated` tokens were generated by the model

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
    missing = [name for name in REQUIRED_FIELDS
               if name not in record and not (name == "txt_len" and record.get("modality") is not None)]
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
    is_text = _modality(ex_id, record, n)
    txt_len = int(is_text.sum())
    any_order = record.get("modality") is not None
    n_image = n - txt_len
    image_positions = np.flatnonzero(~is_text)

    # img_coords, grid, grids
    coords = record.get("img_coords")
    if coords is None or (hasattr(coords, "__len__") and len(coords) == 0):
        coords = []
    if isinstance(coords, np.ndarray):
        coords = coords.tolist()
    if not isinstance(coords, (list, tuple)):
        raise RecordError(ex_id, "img_coords", f"expected a list of (x, y) or None, got {type(coords).__name__}")
    if len(coords) != n_image:
        counted = "image entries of modality" if any_order else f"len(tokens) - txt_len = {n} - {txt_len}"
        raise RecordError(ex_id, "img_coords", f"expected {n_image} coordinates (one per image token: "
                          f"{counted}), got {len(coords)}")
    if n == 0:
        raise RecordError(ex_id, "tokens", "the record has neither text nor image tokens")
    given_grid = _grid_field(ex_id, record.get("grid"))
    given_grids = _grids_field(ex_id, record.get("grids"), given_grid)
    limits = [g.shape for g in given_grids] if given_grids else [given_grid] if given_grid else None
    patch_of = {}  # input position -> (g, x, y)
    seen = {}
    for position, coord in zip(image_positions.tolist(), coords):
        if coord is None:
            if not any_order and tokens[position] not in specials:
                raise RecordError(ex_id, "img_coords", f"image token {position} ({tokens[position]!r}) has "
                                  f"coordinate None but is not a special token ({', '.join(sorted(specials))})")
            continue
        g, x, y = _patch_coordinate(ex_id, position, coord, limits)
        if (g, x, y) in seen:
            on = f" of grid {g}" if given_grids else ""
            raise RecordError(ex_id, "img_coords", f"duplicate coordinate ({x}, {y}){on} for image tokens "
                              f"{seen[(g, x, y)]} and {position}")
        seen[(g, x, y)] = position
        patch_of[position] = (g, x, y)
    if (given_grid is not None or given_grids) and not patch_of:
        raise RecordError(ex_id, "grids" if given_grids else "grid", "given, but the record has no image patches")
    if any_order:
        order = np.arange(n, dtype=np.int64)
    else:
        image_specials = [p for p in image_positions.tolist() if p not in patch_of]
        patches = sorted(patch_of, key=lambda p: (patch_of[p][0], patch_of[p][2], patch_of[p][1]))  # row-major
        order = np.array(list(range(txt_len)) + image_specials + patches, dtype=np.int64)
    special_given = _special_field(ex_id, record.get("special"), n)
    generated = _generated_field(ex_id, record.get("generated"), is_text)
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
    patch_lens = _patch_lens(ex_id, record.get("patch_lens"), n_layers + 1, n_image)

    attention = attention.astype(np.float32, copy=False)
    hidden = hidden.astype(np.float32, copy=False)
    if not np.array_equal(order, np.arange(n)):
        attention = attention[:, :, order[:, None], order[None, :]]  # rows and columns, one gather
        hidden = hidden[:, order]
        if relevancy is not None:
            relevancy = relevancy[order[:, None], order[None, :]]
        if patch_lens is not None:
            patch_lens = _reordered_patch_lens(patch_lens, order, is_text)
    stored_tokens = [tokens[i] for i in order]
    stored_text = is_text[order]
    name_special = np.array([tokens[i] in specials for i in order], dtype=bool)
    given_special = name_special if special_given is None else special_given[order]
    no_patch = np.array([i not in patch_of for i in order], dtype=bool)
    special = np.where(stored_text, given_special, no_patch)
    stored_coords = [patch_of[i][1:] if i in patch_of else None for i in order]
    patch_grid = np.array([patch_of[i][0] if i in patch_of else -1 for i in order], dtype=np.int16)
    grids = given_grids or _implied_grids(given_grid, patch_of, image.shape[:2])
    _check_boxes(ex_id, grids, image.shape[:2], bool(given_grids))
    return Record(ex_id=ex_id, tokens=stored_tokens, txt_len=txt_len, special=special,
                  coords=stored_coords, grid=grids[0].shape if grids else None, image=image,
                  attention=np.ascontiguousarray(attention),
                  hidden_states=np.ascontiguousarray(hidden), accuracy=accuracy, custom_metrics=metrics,
                  metric_descriptions=dict(descriptions), prediction=prediction, text=text, notes=notes,
                  relevancy=relevancy, logit_lens=logit_lens, patch_lens=patch_lens, order=order,
                  is_text=stored_text, grids=grids, patch_grid=patch_grid, generated=generated)


def _modality(ex_id, record: dict, n: int) -> np.ndarray:
    """(n,) bool, True for text tokens: from ``modality``, else the first ``txt_len`` tokens."""
    modality = record.get("modality")
    txt_len = record.get("txt_len")
    if modality is None:
        if not _is_int(txt_len) or not 0 <= txt_len <= n:
            raise RecordError(ex_id, "txt_len", f"expected an int in 0..{n} (len(tokens)), got {_short(txt_len)}")
        return np.arange(n) < int(txt_len)
    if isinstance(modality, np.ndarray):
        modality = modality.tolist()
    if not isinstance(modality, (list, tuple)) or len(modality) != n:
        raise RecordError(ex_id, "modality", f"expected one of {MODALITIES} per token ({n}), got "
                          f"{_short(modality)}")
    wrong = next((i for i, m in enumerate(modality) if m not in MODALITIES), None)
    if wrong is not None:
        raise RecordError(ex_id, "modality", f"token {wrong}: expected 'text' or 'image', got "
                          f"{_short(modality[wrong])}")
    is_text = np.array([m == "text" for m in modality], dtype=bool)
    if txt_len is not None and (not _is_int(txt_len) or txt_len != int(is_text.sum())):
        raise RecordError(ex_id, "txt_len", f"is {_short(txt_len)}, but modality names {int(is_text.sum())} "
                          f"text tokens (omit txt_len when modality is given)")
    return is_text


def _patch_coordinate(ex_id, position: int, coord: Any, limits) -> tuple[int, int, int]:
    """``(g, x, y)`` of an ``img_coords`` entry ``(x, y)`` or ``(x, y, g)``, checked against the grids."""
    integral = (lambda c: _is_int(c) or (isinstance(c, numbers.Real) and not isinstance(c, (bool, np.bool_))
                                         and float(c).is_integer()))
    if (not isinstance(coord, (list, tuple, np.ndarray)) or len(coord) not in (2, 3)
            or not all(integral(c) for c in coord)):
        raise RecordError(ex_id, "img_coords", f"image token {position}: expected (x, y) or (x, y, grid) ints or "
                          f"None, got {_short(coord)}")
    if any(abs(float(c)) > MAX_GRID_SIDE for c in coord[:2]):
        raise RecordError(ex_id, "img_coords", f"image token {position}: coordinate {_short(tuple(coord))} "
                          f"lies outside any grid of at most {MAX_GRID_SIDE} patches a side")
    x, y = int(coord[0]), int(coord[1])
    g = int(coord[2]) if len(coord) == 3 else 0
    if x < 0 or y < 0:
        raise RecordError(ex_id, "img_coords", f"image token {position}: negative coordinate ({x}, {y})")
    if g != 0 and (limits is None or not 0 <= g < len(limits) or len(limits) == 1):
        raise RecordError(ex_id, "img_coords", f"image token {position}: grid {g} does not exist (the record's "
                          f"grids field lists {0 if limits is None else len(limits)})")
    rows, cols = limits[g] if limits else (MAX_GRID_SIDE, MAX_GRID_SIDE)
    if x >= min(cols, MAX_GRID_SIDE) or y >= min(rows, MAX_GRID_SIDE):
        which = f"grid {g}" if limits and len(limits) > 1 else "the grid"
        raise RecordError(ex_id, "img_coords", f"image token {position}: coordinate ({x}, {y}) lies outside "
                          f"{which} of {rows} rows x {cols} columns" + (" (the record's grid)" if limits else ""))
    return g, x, y


def _grids_field(ex_id, value: Any, grid: Optional[tuple[int, int]]) -> tuple[Grid, ...]:
    """The record's ``grids`` (empty when absent); the first must agree with ``grid`` when both are given."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_GRIDS:
        raise RecordError(ex_id, "grids", f"expected a list of 1..{MAX_GRIDS} dicts with name, rows, cols, box; "
                          f"got {_short(value)}")
    grids = []
    for g, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"name", "rows", "cols", "box"} \
                or not {"rows", "cols", "box"} <= set(item):
            raise RecordError(ex_id, "grids", f"grid {g}: expected a dict with rows, cols, box (and name), got "
                              f"{_short(item)}")
        rows, cols = _grid_field(ex_id, (item["rows"], item["cols"]))
        box = item["box"]
        if isinstance(box, np.ndarray):
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_int(v) for v in box) \
                or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            raise RecordError(ex_id, "grids", f"grid {g}: box must be (left, top, right, bottom) ints with "
                              f"left < right and top < bottom, got {_short(box)}")
        name = _bounded_str(ex_id, "grids", item.get("name", f"grid {g}"), MAX_TOKEN_CHARS)
        grids.append(Grid(name, rows, cols, tuple(int(v) for v in box)))
    if grid is not None and grid != grids[0].shape:
        raise RecordError(ex_id, "grid", f"is {grid}, but the first of grids is {grids[0].shape}")
    return tuple(grids)


def _implied_grids(grid: Optional[tuple[int, int]], patch_of: dict, image_size) -> tuple[Grid, ...]:
    """The one grid of a record without ``grids``, over the whole image: the given ``grid`` or the
    smallest one holding every patch."""
    if not patch_of:
        return ()
    rows, cols = grid or (max(y for _, _, y in patch_of.values()) + 1, max(x for _, x, _ in patch_of.values()) + 1)
    height, width = image_size
    return (Grid("", rows, cols, (0, 0, int(width), int(height))),)


def _check_boxes(ex_id, grids: tuple[Grid, ...], image_size, given: bool) -> None:
    height, width = image_size
    for g, grid in enumerate(grids):
        if given and (grid.box[2] > width or grid.box[3] > height):
            raise RecordError(ex_id, "grids", f"grid {g} ({grid.name!r}): box {grid.box} reaches outside the "
                              f"{width} x {height} image")


def _special_field(ex_id, value: Any, n: int) -> Optional[np.ndarray]:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != n \
            or not all(isinstance(v, (bool, np.bool_)) for v in value):
        raise RecordError(ex_id, "special", f"expected one bool per token ({n}), got {_short(value)}")
    return np.array(value, dtype=bool)


def _generated_field(ex_id, value: Any, is_text: np.ndarray) -> int:
    """How many trailing tokens were generated: an int whose tokens are all text."""
    if value is None:
        return 0
    n = len(is_text)
    if not _is_int(value) or not 0 <= value <= n:
        raise RecordError(ex_id, "generated", f"expected an int in 0..{n} (trailing generated tokens), got "
                          f"{_short(value)}")
    value = int(value)
    if value and not is_text[n - value:].all():
        first = n - value + int(np.argmin(is_text[n - value:]))
        raise RecordError(ex_id, "generated", f"the last {value} tokens must be text (generated words), but "
                          f"token {first} is an image token")
    return value


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


def _patch_lens(ex_id, value: Any, n_hidden_layers: int, n_image: int) -> Optional[PatchLens]:
    """The per-patch logit lens as given: for each hidden-state layer, one (word, probability) per image
    token in sequence order (the order of ``tokens``)."""
    if value is None:
        return None
    if n_image == 0:
        raise RecordError(ex_id, "patch_lens", "given, but the record has no image tokens")
    if not isinstance(value, (list, tuple)) or len(value) != n_hidden_layers:
        raise RecordError(ex_id, "patch_lens", f"expected one list of (word, probability) per hidden-state layer "
                          f"({n_hidden_layers}: the embeddings, then after each layer), got {_short(value)}")
    words = []
    probabilities = np.empty((n_hidden_layers, n_image), np.float32)
    for layer, pairs in enumerate(value):
        if not isinstance(pairs, (list, tuple)) or len(pairs) != n_image:
            got = f"{len(pairs)} entries" if isinstance(pairs, (list, tuple)) else _short(pairs)
            raise RecordError(ex_id, "patch_lens", f"layer {layer}: expected one (word, probability) per image "
                              f"token ({n_image}), got {got}")
        row = []
        for token, pair in enumerate(pairs):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
                    or not isinstance(pair[1], numbers.Real) or isinstance(pair[1], (bool, np.bool_))
                    or not 0 <= float(pair[1]) <= 1 + WEIGHT_TOLERANCE):
                raise RecordError(ex_id, "patch_lens", f"layer {layer}, image token {token}: expected (word, "
                                  f"probability in [0, 1]), got {_short(pair)}")
            row.append(_bounded_str(ex_id, "patch_lens", pair[0], MAX_TOKEN_CHARS))
            probabilities[layer, token] = min(float(pair[1]), 1.0)
        words.append(tuple(row))
    return PatchLens(words=tuple(words), probabilities=probabilities)


def _reordered_patch_lens(lens: PatchLens, order: np.ndarray, is_text: np.ndarray) -> PatchLens:
    """``lens`` (image tokens in sequence order) with its image tokens in the stored order ``order``."""
    rank = np.cumsum(~is_text) - 1  # input position -> its place among the image tokens
    stored = rank[order[~is_text[order]]]
    return PatchLens(words=tuple(tuple(row[i] for i in stored) for row in lens.words),
                     probabilities=np.ascontiguousarray(lens.probabilities[:, stored]))


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
