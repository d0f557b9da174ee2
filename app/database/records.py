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
grid of an example is ``(rows, cols) = (max y + 1, max x + 1)`` over its patches.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["RecordError", "Record", "validate_record", "DEFAULT_SPECIAL_TOKENS", "REQUIRED_FIELDS"]

DEFAULT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")
REQUIRED_FIELDS = ("ex_id", "image", "tokens", "txt_len", "attention", "hidden_states")
OPTIONAL_FIELDS = ("img_coords", "accuracy", "custom_metrics", "prediction", "text")


class RecordError(ValueError):
    """A record is not valid; ``str()`` names the example and the field."""

    def __init__(self, ex_id: Any, field: str, message: str):
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
    prediction: Optional[dict] = None
    text: Optional[str] = None
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
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise RecordError(ex_id, name, f"contains {bad} NaN or infinite value(s)")
    return array


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
    if "ex_id" in record and _is_int(record["ex_id"]):
        ex_id = int(record["ex_id"])
    if missing:
        raise RecordError(ex_id, missing[0], "missing required field"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise RecordError(ex_id, unknown[0], f"unknown field (known: "
                          f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    if not _is_int(record["ex_id"]) or record["ex_id"] < 0:
        raise RecordError(ex_id, "ex_id", f"expected a non-negative int, got {record['ex_id']!r}")
    specials = set(special_tokens)

    # tokens and txt_len
    tokens = record["tokens"]
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise RecordError(ex_id, "tokens", "expected a list of str")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    txt_len = record["txt_len"]
    if not _is_int(txt_len) or not 0 <= txt_len <= n:
        raise RecordError(ex_id, "txt_len", f"expected an int in 0..{n} (len(tokens)), got {txt_len!r}")
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
                              f"got {coord!r}")
        x, y = int(coord[0]), int(coord[1])
        if x < 0 or y < 0:
            raise RecordError(ex_id, "img_coords", f"image token {position}: negative coordinate ({x}, {y})")
        if (x, y) in seen:
            raise RecordError(ex_id, "img_coords", f"duplicate coordinate ({x}, {y}) for image tokens "
                              f"{seen[(x, y)]} and {position}")
        seen[(x, y)] = position
        patches.append((y, x, position))
    patches.sort()
    order = np.array(list(range(txt_len)) + image_specials + [p for _, _, p in patches], dtype=np.int64)
    grid = (max(y for y, _, _ in patches) + 1, max(x for _, x, _ in patches) + 1) if patches else None

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
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        raise RecordError(ex_id, "image", f"values must lie in 0-255, got {low}..{high}")
    image = np.rint(image).astype(np.uint8) if image.dtype != np.uint8 else image

    # optional fields
    accuracy = record.get("accuracy")
    if accuracy is not None:
        if not isinstance(accuracy, (bool, np.bool_)):
            raise RecordError(ex_id, "accuracy", f"expected True, False or None, got {accuracy!r}")
        accuracy = bool(accuracy)
    custom = record.get("custom_metrics") or {}
    if not isinstance(custom, dict):
        raise RecordError(ex_id, "custom_metrics", f"expected a dict name -> (layers, heads) array, "
                          f"got {type(custom).__name__}")
    from app.database.stats import STATISTICS  # noqa: PLC0415 (avoid an import cycle at load)
    metrics = {}
    for name, value in custom.items():
        if not isinstance(name, str) or not name:
            raise RecordError(ex_id, "custom_metrics", f"metric names must be non-empty str, got {name!r}")
        if name in STATISTICS:
            raise RecordError(ex_id, "custom_metrics", f"metric {name!r} clashes with a built-in statistic")
        array = _numeric_array(ex_id, f"custom_metrics[{name!r}]", value)
        if array.shape != (n_layers, n_heads):
            raise RecordError(ex_id, f"custom_metrics[{name!r}]", f"expected shape ({n_layers}, {n_heads}) "
                              f"(layers, heads), got {array.shape}")
        metrics[name] = array.astype(np.float32)
    prediction = record.get("prediction")
    if prediction is not None:
        if not isinstance(prediction, dict) or not isinstance(prediction.get("answer"), str):
            raise RecordError(ex_id, "prediction", "expected a dict with 'answer' (str), 'score' (float), "
                              "'label' (str or None)")
        score = prediction.get("score")
        if score is not None and (not isinstance(score, numbers.Real) or not math.isfinite(float(score))):
            raise RecordError(ex_id, "prediction", f"'score' must be a finite number, got {score!r}")
        label = prediction.get("label")
        if label is not None and not isinstance(label, str):
            raise RecordError(ex_id, "prediction", f"'label' must be str or None, got {label!r}")
        prediction = {"answer": prediction["answer"],
                      "score": None if score is None else float(score), "label": label}
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise RecordError(ex_id, "text", f"expected str or None, got {type(text).__name__}")

    attention = attention.astype(np.float32, copy=False)
    hidden = hidden.astype(np.float32, copy=False)
    if not np.array_equal(order, np.arange(n)):
        attention = attention[:, :, order[:, None], order[None, :]]  # rows and columns, one gather
        hidden = hidden[:, order]
    stored_tokens = [tokens[i] for i in order]
    special = np.array([tokens[i] in specials if i < txt_len else coords[i - txt_len] is None
                        for i in order], dtype=bool)
    stored_coords = [None if i < txt_len or coords[i - txt_len] is None
                     else (int(coords[i - txt_len][0]), int(coords[i - txt_len][1])) for i in order]
    return Record(ex_id=ex_id, tokens=stored_tokens, txt_len=txt_len, special=special,
                  coords=stored_coords, grid=grid, image=image, attention=np.ascontiguousarray(attention),
                  hidden_states=np.ascontiguousarray(hidden), accuracy=accuracy, custom_metrics=metrics,
                  prediction=prediction, text=text, order=order)
