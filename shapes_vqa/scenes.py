"""Synthetic shapes scenes and template questions (the shapes VQA task).

A scene is a small square image (``SCENE_SIZE`` px, dark noisy background) with 1–4 coloured,
non-overlapping shapes, each drawn at a random size and offset inside its own cell of the
``CELL``-px grid, which is the model's patch grid: one shape, one image token. Every shape keeps its pixel mask and bounding box, so tests know exactly
where it was drawn. Each example pairs a scene with one template question whose answer is
computed from the drawn objects; the generator builds the scene *for* a chosen answer, so answers
are balanced within each question type and question types are balanced overall.

Everything is driven by a ``numpy.random.Generator``: the same seed gives the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 96  # px
CELL = 16  # shapes are drawn inside cells of this grid: the model's 16-px patches (6 x 6 grid)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (220, 50, 50),
    "green": (50, 190, 60),
    "blue": (60, 100, 235),
    "yellow": (230, 210, 50),
}
# position questions: direction -> (axis of the box coordinates, sign: +1 = towards larger values)
DIRECTIONS = {"further left": (0, -1), "further right": (0, 1), "higher": (1, -1), "lower": (1, 1)}
MAX_OBJECTS = 4
MIN_SIDE, MAX_SIDE = 9, 14  # shape bounding-box side, px (fits inside one cell with a margin)
REL_MARGIN = 6  # centres must differ by this many px along the relation's axis

QUESTION_TYPES = ("color", "shape", "exist", "count", "position")
COUNT_ANSWERS = tuple(str(k) for k in range(MAX_OBJECTS + 1))
ANSWERS = tuple(COLORS) + SHAPES + ("yes", "no") + COUNT_ANSWERS
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels


@dataclass
class SceneObject:
    """One drawn shape: its attributes, bounding box and boolean pixel mask (H, W)."""

    shape: str
    color: str
    bbox: Box
    mask: np.ndarray = field(repr=False)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    """An RGB uint8 image (H, W, 3) and the objects drawn on it."""

    image: np.ndarray = field(repr=False)
    objects: list[SceneObject]


@dataclass
class Example:
    """A scene, one question about it, its answer and question type.

    ``refs`` maps each shape word of the question (by its position among the question's words,
    lower-case, no punctuation) to the index in ``scene.objects`` of the object it names, when the
    question names one specific object ("what color is the circle?" -> {4: i}).
    """

    scene: Scene
    question: str
    answer: str
    qtype: str
    refs: dict[int, int] = field(default_factory=dict)


def vocabulary() -> list[str]:
    """Every word any template can produce, after the special tokens (the tokenizer's vocab.txt)."""
    words = {"what", "color", "shape", "is", "the", "object", "there", "a", "how", "many", "are",
             "or", "further", "left", "right", "higher", "lower", "?"}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLORS)
    words |= {"yes", "no"}  # not produced by templates, but keep answers tokenisable
    return list(SPECIAL_TOKENS) + sorted(words)


def question_words(question: str) -> list[str]:
    """The question split the way the word-level tokenizer splits it ("?" is its own word)."""
    return question.replace("?", " ?").split()


# --------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, bbox: Box, size: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 127


def _place(rng: np.random.Generator, n: int, size: int) -> list[Box]:
    """n random square boxes, each inside its own CELL x CELL grid cell (so no two overlap and
    each shape lies within one model patch), random side and random offset inside the cell."""
    grid = size // CELL
    cells = rng.choice(grid * grid, size=n, replace=False)
    boxes: list[Box] = []
    for cell in cells:
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        x0 = int(cell % grid) * CELL + int(rng.integers(1, CELL - side))
        y0 = int(cell // grid) * CELL + int(rng.integers(1, CELL - side))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def render(rng: np.random.Generator, attrs: list[tuple[str, str]], size: int = SCENE_SIZE,
           boxes: list[Box] | None = None) -> Scene:
    """Draw shapes ``attrs`` = [(shape, color), ...] at random (or given) non-overlapping boxes."""
    if boxes is None:
        boxes = _place(rng, len(attrs), size)
    base = rng.integers(25, 60)
    image = np.full((size, size, 3), base, dtype=np.float32)
    objects = []
    for (shape, color), box in zip(attrs, boxes):
        mask = _shape_mask(shape, box, size)
        rgb = np.array(COLORS[color], dtype=np.float32) + rng.integers(-15, 16, size=3)
        image[mask] = rgb
        objects.append(SceneObject(shape, color, box, mask))
    image += rng.normal(0.0, 8.0, size=image.shape)
    # a few random specks of background clutter, never on a shape
    speck = (rng.random((size, size)) < 0.01) & ~np.any([o.mask for o in objects], axis=0)
    image[speck] += rng.integers(-40, 41, size=(int(speck.sum()), 3))
    return Scene(np.clip(image, 0, 255).astype(np.uint8), objects)


# --------------------------------------------------------------------------- questions


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _others(rng, n, allowed) -> list[tuple[str, str]]:
    """n random (shape, color) pairs accepted by ``allowed``."""
    out = []
    while len(out) < n:
        pair = (_pick(rng, SHAPES), _pick(rng, COLORS))
        if allowed(pair):
            out.append(pair)
    return out


def _shuffled(rng, attrs, keep: int) -> tuple[list[tuple[str, str]], int]:
    """Shuffle attrs; return them and the new index of element ``keep``."""
    order = rng.permutation(len(attrs))
    return [attrs[i] for i in order], int(np.where(order == keep)[0][0])


def _q_color(rng, size):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    attrs, i = _shuffled(rng, [(shape, color)] + _others(rng, n - 1, lambda p: p[0] != shape), 0)
    return render(rng, attrs, size), f"what color is the {shape}?", color, {4: i}


def _q_shape(rng, size):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    attrs, i = _shuffled(rng, [(shape, color)] + _others(rng, n - 1, lambda p: p[1] != color), 0)
    return render(rng, attrs, size), f"what shape is the {color} object?", shape, {}


def _q_exist(rng, size):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    if rng.random() < 0.5:
        answer = "yes"
        attrs = [(shape, color)] + _others(rng, n - 1, lambda p: True)
    else:
        answer = "no"
        # half the distractors share the colour or the shape, so neither word alone decides
        attrs = _others(rng, n, lambda p: p != (shape, color)
                        and (p[0] == shape or p[1] == color or rng.random() < 0.5))
    attrs, _ = _shuffled(rng, attrs, 0)
    return render(rng, attrs, size), f"is there a {color} {shape}?", answer, {}


def _q_count(rng, size):
    shape = _pick(rng, SHAPES)
    k = int(rng.integers(0, MAX_OBJECTS + 1))
    n = int(rng.integers(max(k, 1), MAX_OBJECTS + 1))
    attrs = _others(rng, k, lambda p: p[0] == shape) + _others(rng, n - k, lambda p: p[0] != shape)
    attrs, _ = _shuffled(rng, attrs, 0)
    return render(rng, attrs, size), f"how many {PLURALS[shape]} are there?", str(k), {}


def _q_position(rng, size, directions=tuple(DIRECTIONS)):
    """Which of two objects lies further in a direction ("is the circle or the square further
    left?" -> "circle"), the direction drawn from ``directions``. The two are named by shape
    alone: each named shape occurs once in the scene, any other object has the third shape,
    colours are random. Their centres differ by at least REL_MARGIN px along the direction's axis
    (so they lie in different patch columns/rows)."""
    a, b = rng.choice(SHAPES, size=2, replace=False).tolist()
    (third,) = set(SHAPES) - {a, b}
    direction = _pick(rng, directions)
    answer = a if rng.random() < 0.5 else b
    n = int(rng.integers(2, MAX_OBJECTS + 1))
    attrs = [(a, _pick(rng, COLORS)), (b, _pick(rng, COLORS))] + _others(rng, n - 2, lambda p: p[0] == third)
    while True:
        boxes = _place(rng, n, size)
        winner = _further(boxes[0], boxes[1], direction)
        if winner is not None and (a, b)[winner] == answer:
            break
    order = rng.permutation(n)
    attrs, boxes = [attrs[j] for j in order], [boxes[j] for j in order]
    ia, ib = int(np.where(order == 0)[0][0]), int(np.where(order == 1)[0][0])
    text = f"is the {a} or the {b} {direction}?"
    return render(rng, attrs, size, boxes), text, answer, {2: ia, 5: ib}


def _further(box_a: Box, box_b: Box, direction: str) -> int | None:
    """0 when box_a lies further in ``direction`` than box_b, 1 when box_b does, None when their
    centres are closer than REL_MARGIN along its axis."""
    axis, sign = DIRECTIONS[direction]
    d = sign * ((box_a[axis] + box_a[axis + 2]) - (box_b[axis] + box_b[axis + 2])) / 2
    return None if abs(d) < REL_MARGIN else (0 if d > 0 else 1)


_MAKERS = {"color": _q_color, "shape": _q_shape, "exist": _q_exist, "count": _q_count}  # position: its directions too


def make_example(rng: np.random.Generator, qtype: str | None = None, size: int = SCENE_SIZE,
                 directions: tuple[str, ...] = tuple(DIRECTIONS)) -> Example:
    """One example of question type ``qtype`` (uniformly random type when None); position
    questions ask about one of ``directions``."""
    qtype = qtype or _pick(rng, QUESTION_TYPES)
    if qtype == "position":
        scene, text, answer, refs = _q_position(rng, size, directions)
    else:
        scene, text, answer, refs = _MAKERS[qtype](rng, size)
    return Example(scene, text, answer, qtype, refs)


def generate(n: int, seed: int, size: int = SCENE_SIZE, qtypes: tuple[str, ...] = QUESTION_TYPES,
             directions: tuple[str, ...] = tuple(DIRECTIONS)) -> list[Example]:
    """n examples, question types cycling through ``qtypes`` (position questions about one of
    ``directions``), fully determined by ``seed``."""
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown directions {sorted(unknown)} (known: {list(DIRECTIONS)})")
    rng = np.random.default_rng(seed)
    return [make_example(rng, qtypes[i % len(qtypes)], size, directions) for i in range(n)]


def true_answer(scene: Scene, question: str) -> str:
    """Answer ``question`` from the scene's objects alone (an independent check of the generator)."""
    w = question_words(question)
    objs = scene.objects
    if w[:3] == ["what", "color", "is"]:
        (o,) = [o for o in objs if o.shape == w[4]]
        return o.color
    if w[:3] == ["what", "shape", "is"]:
        (o,) = [o for o in objs if o.color == w[4]]
        return o.shape
    if w[:2] == ["is", "there"]:
        return "yes" if any((o.color, o.shape) == (w[3], w[4]) for o in objs) else "no"
    if w[:2] == ["how", "many"]:
        shape = {v: k for k, v in PLURALS.items()}[w[2]]
        return str(sum(o.shape == shape for o in objs))
    if w[:2] == ["is", "the"]:
        (a,) = [o for o in objs if o.shape == w[2]]
        (b,) = [o for o in objs if o.shape == w[5]]
        winner = _further(a.bbox, b.bbox, " ".join(w[6:-1]))
        return None if winner is None else (a, b)[winner].shape
    raise ValueError(f"not a template question: {question!r}")
