"""The shapes VQA task: generator, processor, training script, held-out set and the bundled model.

The last test is the "truth" test: the generator knows where it drew every shape, so we can check
that the trained model's attention from a shape word lands on that shape's patches.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViltForQuestionAnswering, ViltProcessor

from shapes_vqa import make_heldout, scenes
from shapes_vqa import train as shapes_train

MODEL_DIR = shapes_train.DEFAULT_OUT
HELDOUT = make_heldout.DEFAULT_OUT


# --------------------------------------------------------------------------- generator


def test_masks_and_answers_agree_with_the_drawing():
    for ex in scenes.generate(250, seed=7):
        objs = ex.scene.objects
        assert 1 <= len(objs) <= scenes.MAX_OBJECTS
        assert ex.scene.image.shape == (scenes.SCENE_SIZE, scenes.SCENE_SIZE, 3)
        assert ex.scene.image.dtype == np.uint8
        union = np.zeros(ex.scene.image.shape[:2], dtype=int)
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert o.mask.sum() > 0.4 * (x1 - x0) * (y1 - y0)
            outside = o.mask.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), "mask leaks out of its bounding box"
            union += o.mask
            # the pixels under the mask are the object's colour (up to jitter and noise)
            mean = ex.scene.image[o.mask].astype(float).mean(0)
            assert np.abs(mean - scenes.COLORS[o.color]).max() < 25, (o, mean)
        assert union.max() == 1, "shapes overlap"
        # the answer, recomputed from the drawn objects alone
        assert scenes.true_answer(ex.scene, ex.question) == ex.answer, ex.question
        words = scenes.question_words(ex.question)
        for w, i in ex.refs.items():
            assert objs[i].shape == words[w]


def test_each_shape_lies_inside_one_patch_cell():
    cell = scenes.CELL
    assert cell == shapes_train.PATCH_SIZE
    for ex in scenes.generate(100, seed=8):
        cells = []
        for o in ex.scene.objects:
            ys, xs = np.nonzero(o.mask)
            assert xs.min() // cell == xs.max() // cell and ys.min() // cell == ys.max() // cell
            cells.append((xs.min() // cell, ys.min() // cell))
        assert len(set(cells)) == len(cells)


def test_counts_are_counts_of_drawn_shapes():
    exs = [e for e in scenes.generate(300, seed=11) if e.qtype == "count"]
    assert len(exs) == 60
    for ex in exs:
        plural = scenes.question_words(ex.question)[2]
        shape = {v: k for k, v in scenes.PLURALS.items()}[plural]
        assert int(ex.answer) == sum(o.shape == shape for o in ex.scene.objects)
    assert {e.answer for e in exs} == set(scenes.COUNT_ANSWERS)


def test_position_questions_name_shapes_that_occur_once():
    exs = [e for e in scenes.generate(200, seed=12) if e.qtype == "position"]
    for ex in exs:
        words = scenes.question_words(ex.question)
        shapes = [o.shape for o in ex.scene.objects]
        assert shapes.count(words[2]) == 1 and shapes.count(words[5]) == 1, ex.question
        assert ex.refs == {2: shapes.index(words[2]), 5: shapes.index(words[5])}
        assert ex.answer in (words[2], words[5])
    assert {" ".join(scenes.question_words(e.question)[6:-1]) for e in exs} == set(scenes.DIRECTIONS)


def test_position_answers_follow_the_centres():
    """An independent reading of "further left / right, higher, lower" from the drawn boxes."""
    for ex in [e for e in scenes.generate(150, seed=14) if e.qtype == "position"]:
        words = scenes.question_words(ex.question)
        a, b = (next(o for o in ex.scene.objects if o.shape == w) for w in (words[2], words[5]))
        (ax, ay), (bx, by) = a.center, b.center
        direction = " ".join(words[6:-1])
        a_wins = {"further left": ax < bx, "further right": ax > bx, "higher": ay < by, "lower": ay > by}[direction]
        assert ex.answer == (a.shape if a_wins else b.shape), ex.question
        gap = abs(ax - bx) if "further" in direction else abs(ay - by)
        assert gap >= scenes.REL_MARGIN


def test_position_questions_ask_only_the_requested_directions():
    exs = scenes.generate(60, seed=15, qtypes=("position",), directions=("further left", "higher"))
    assert {e.qtype for e in exs} == {"position"}
    assert {" ".join(scenes.question_words(e.question)[6:-1]) for e in exs} == {"further left", "higher"}
    assert all(scenes.true_answer(e.scene, e.question) == e.answer for e in exs)
    with pytest.raises(ValueError, match="unknown directions"):
        scenes.generate(1, seed=0, directions=("up",))


def test_generation_is_deterministic():
    a, b, c = scenes.generate(15, seed=3), scenes.generate(15, seed=3), scenes.generate(15, seed=4)
    for x, y in zip(a, b):
        assert x.question == y.question and x.answer == y.answer
        assert np.array_equal(x.scene.image, y.scene.image)
        assert [o.bbox for o in x.scene.objects] == [o.bbox for o in y.scene.objects]
    assert any(not np.array_equal(x.scene.image, z.scene.image) for x, z in zip(a, c))


def test_types_and_answers_are_balanced():
    exs = scenes.generate(2000, seed=5)
    assert Counter(e.qtype for e in exs) == {q: 400 for q in scenes.QUESTION_TYPES}
    for qtype in scenes.QUESTION_TYPES:
        counts = Counter(e.answer for e in exs if e.qtype == qtype)
        expected = 400 / len(counts)
        assert all(abs(c - expected) < 0.4 * expected for c in counts.values()), (qtype, counts)


# --------------------------------------------------------------------------- processor / training


@pytest.fixture(scope="module")
def processor():
    return shapes_train.build_processor()


def test_tokenizer_has_one_token_per_word(processor):
    for ex in scenes.generate(100, seed=9):
        ids = processor.tokenizer(ex.question)["input_ids"]
        tokens = processor.tokenizer.convert_ids_to_tokens(ids)
        assert tokens == ["[CLS]"] + scenes.question_words(ex.question) + ["[SEP]"]
        assert len(ids) <= shapes_train.TRAIN_TEXT_LEN


def test_processor_keeps_the_scene_size(processor):
    exs = scenes.generate(4, seed=1)
    images = np.stack([e.scene.image for e in exs])
    enc = processor(images=list(images), text=[e.question for e in exs], padding=True,
                    return_tensors="pt")
    size = scenes.SCENE_SIZE
    assert enc["pixel_values"].shape == (4, 3, size, size)
    assert bool(enc["pixel_mask"].all())
    # exactly what the training loop feeds the model
    mine = shapes_train.pixel_values(torch.from_numpy(images))
    assert torch.allclose(enc["pixel_values"].float(), mine, atol=1e-5)


def test_training_forward_is_the_stock_forward(processor):
    """The training loop's image embeddings (no per-image loops, patches in order) give the same
    logits as ViLT's own pixel path, which shuffles the patches."""
    model = shapes_train.build_model(processor, hidden=32, layers=2).eval()
    exs = scenes.generate(6, seed=2)
    data = shapes_train.encode(exs, processor)
    with torch.no_grad():
        mine = shapes_train.forward(model, data, torch.arange(len(exs))).logits
        stock = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                      pixel_values=shapes_train.pixel_values(data["images"])).logits
    assert torch.allclose(mine, stock, atol=1e-5)


def test_patch_positions_start_as_row_and_column_codes(processor):
    """Sine-cosine start: the first half of each patch's code depends on its row only, the second
    half on its column only, and no two patches share a code."""
    model = shapes_train.build_model(processor, hidden=32, layers=1)
    grid = scenes.SCENE_SIZE // shapes_train.PATCH_SIZE
    codes = model.vilt.embeddings.position_embeddings[0, 1:].detach().reshape(grid, grid, -1).numpy()
    half = codes.shape[-1] // 2
    assert np.allclose(codes[:, :1, :half], codes[:, :, :half])  # same along a row
    assert np.allclose(codes[:1, :, half:], codes[:, :, half:])  # same along a column
    flat = codes.reshape(grid * grid, -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(grid * grid)
    assert dist.min() > 0.1
    # where a patch is varies more across the grid than what an empty or drawn patch shows
    exs = scenes.generate(16, seed=4)
    with torch.no_grad():
        content = model.vilt.embeddings.patch_embeddings(
            shapes_train.pixel_values(shapes_train.encode(exs, processor)["images"])).flatten(2)
    assert flat.std(axis=0).mean() > 2 * content.std(dim=2).mean().item()


def test_curriculum_starts_with_one_direction_and_ends_with_everything():
    stages = shapes_train.CURRICULUM
    assert stages[0].qtypes == ("position",) and len(stages[0].directions) == 1
    assert [len(st.directions) for st in stages] == sorted(len(st.directions) for st in stages)
    assert set(stages[-1].qtypes) == set(scenes.QUESTION_TYPES)
    assert set(stages[-1].directions) == set(scenes.DIRECTIONS)


def test_quick_training_run_saves_a_loadable_model(tmp_path):
    report = shapes_train.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "model.safetensors").exists()
    assert set(report["accuracy"]) == {"all", *scenes.QUESTION_TYPES}
    assert [st["stage"] for st in report["curriculum"]] == [st.name for st in shapes_train.CURRICULUM]
    assert report["steps"] == sum(st["steps"] for st in report["curriculum"])
    model = ViltForQuestionAnswering.from_pretrained(tmp_path)
    ViltProcessor.from_pretrained(tmp_path)
    saved_tokenizer = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved_tokenizer["padding"] is None and saved_tokenizer["truncation"] is None  # not training's
    assert model.config.id2label[0] == scenes.ANSWERS[0]
    assert model.config.num_labels == len(scenes.ANSWERS)


# --------------------------------------------------------------------------- held-out set


def _pairs():
    return [json.loads(line) for line in (HELDOUT / "pairs.jsonl").read_text().splitlines()]


def test_heldout_folder_matches_the_generator():
    pairs = _pairs()
    assert len(pairs) >= 24
    exs = make_heldout.examples(len(pairs))
    assert {e.qtype for e in exs} == set(scenes.QUESTION_TYPES)
    for pair, ex in zip(pairs, exs):
        assert set(pair) == {"image", "text", "label"}
        assert (pair["text"], pair["label"]) == (ex.question, ex.answer)
        png = np.asarray(Image.open(HELDOUT / pair["image"]).convert("RGB"))
        assert np.array_equal(png, ex.scene.image)


# --------------------------------------------------------------------------- bundled model


@pytest.fixture(scope="module")
def bundled():
    assert (MODEL_DIR / "model.safetensors").exists(), "run python -m shapes_vqa.train"
    return (ViltProcessor.from_pretrained(MODEL_DIR),
            ViltForQuestionAnswering.from_pretrained(MODEL_DIR).eval())


def test_bundled_model_is_small():
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 15e6


def test_bundled_model_answers_heldout_questions(bundled):
    processor, model = bundled
    pairs = _pairs()
    images = [Image.open(HELDOUT / p["image"]).convert("RGB") for p in pairs]
    enc = processor(images=images, text=[p["text"] for p in pairs], padding=True, truncation=True,
                    return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    right = np.array([model.config.id2label[i] == p["label"] for i, p in zip(pred, pairs)])
    wrong = [(p["text"], p["label"]) for p, r in zip(pairs, right) if not r]
    # 99.8 % on 1000 held-out questions, relative position 100 % (training_report.json)
    assert right.mean() >= 0.9, wrong
    types = np.array([e.qtype for e in make_heldout.examples(len(pairs))])
    assert right[types == "position"].mean() >= 0.8, wrong


def test_bundled_model_is_90_percent_right_on_unseen_scenes(bundled):
    """The issue's target, on 500 fresh scenes (a seed no training or evaluation run used), through
    the training script's own input path; every question type, relative position included."""
    processor, model = bundled
    exs = scenes.generate(500, seed=31337)
    acc = shapes_train.evaluate(model, shapes_train.encode(exs, processor), [e.qtype for e in exs])
    assert acc["all"] >= 0.9, acc
    assert min(acc[q] for q in scenes.QUESTION_TYPES) >= 0.85, acc


# --------------------------------------------------------------------------- the truth test

PATCH = shapes_train.PATCH_SIZE
MIN_COVER = 0.05  # a patch "covers" a shape when >= 5 % of its pixels are the shape's
TRUTH_HIT_RATE = 0.9  # the bundled model: 0.95 (colour and position questions alike)


def _covered_patches(mask: np.ndarray) -> set[tuple[int, int]]:
    """(x, y) patch coordinates whose patch holds at least MIN_COVER of the shape's pixels."""
    rows, cols = mask.shape[0] // PATCH, mask.shape[1] // PATCH
    frac = mask[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH).mean((1, 3))
    return {(x, y) for y in range(rows) for x in range(cols) if frac[y, x] >= MIN_COVER}


@pytest.fixture(scope="module")
def truth_records(tmp_path_factory):
    """Run the project's live ViLT adapter on scenes whose questions name one shape."""
    from app.database.models.vilt import Vilt

    model = Vilt(str(MODEL_DIR))
    folder = tmp_path_factory.mktemp("truth")
    exs = [e for e in scenes.generate(100, seed=123) if e.qtype in ("color", "position")]
    out = []
    for i, ex in enumerate(exs):
        path = folder / f"{i}.png"
        Image.fromarray(ex.scene.image).save(path)
        out.append((ex, model.data_setup(i, str(path), ex.question)))
    return out


def test_named_shape_word_attends_to_its_shape(truth_records):
    """For every shape word that names one object ("what color is the *circle*?", both shapes of a
    position question): the share of the word's image attention (over patches, image [CLS]
    excluded, per layer and head) on the patches covering that object, against a control: the
    same share on as many randomly chosen empty patches."""
    rng = np.random.default_rng(0)
    shares, controls = [], []  # (n_refs, L, H) each
    for ex, rec in truth_records:
        txt_len, tokens, coords = rec["txt_len"], rec["tokens"], rec["img_coords"]
        patch_cols = [txt_len + k for k, c in enumerate(coords) if c is not None]
        patch_xy = [c for c in coords if c is not None]
        assert len(patch_cols) == (scenes.SCENE_SIZE // PATCH) ** 2
        words = scenes.question_words(ex.question)
        assert tokens[1:1 + len(words)] == words
        occupied = set().union(*(_covered_patches(o.mask) for o in ex.scene.objects))
        empty = np.flatnonzero([xy not in occupied for xy in patch_xy])
        for w, obj in ex.refs.items():
            covered = _covered_patches(ex.scene.objects[obj].mask)
            on = np.array([xy in covered for xy in patch_xy])
            att = rec["attention"][:, :, 1 + w, patch_cols]  # (L, H, n_patches)
            att = att / att.sum(-1, keepdims=True)
            shares.append(att[..., on].sum(-1))
            control = rng.choice(empty, size=int(on.sum()), replace=False)
            controls.append(att[..., control].sum(-1))
    shares, controls = np.stack(shares), np.stack(controls)
    assert len(shares) >= 30
    hit = shares.max(axis=(1, 2)) > 0.5
    control_hit = controls.max(axis=(1, 2)) > 0.5
    # most named shapes get > 50 % of the word's image attention in at least one head ...
    assert hit.mean() >= TRUTH_HIT_RATE, (hit.mean(), np.round(shares.max(axis=(1, 2)), 2))
    # ... which empty patches of the same size (almost) never get
    assert control_hit.mean() <= 0.05, control_hit.mean()
    # and the best single head puts, on average, many times the uniform share on the shape
    uniform = 1 / len(patch_cols)
    assert shares.mean(0).max() > 5 * uniform, np.round(shares.mean(0), 2)
