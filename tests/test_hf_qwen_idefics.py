"""Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM through ``-m hf``: tiny random models built offline.

Qwen2VLProcessor cannot be built without torchvision (its video processor), so the Qwen checkpoints
are read through :class:`QwenTestProcessor`, which does what the real processor does for one image
(the chat template, then one ``<|image_pad|>`` per merged block) around the real
``Qwen2VLImageProcessorPil``; ``AutoProcessor`` is replaced by it only while the model loads. The
Idefics3 and SmolVLM checkpoints carry a real ``Idefics3Processor`` (SmolVLMProcessor needs a video
processor too; its prompt layout is the same).

Which patch an image token shows is checked from the outside: the vision tower's attention and MLP
outputs are zeroed (its blocks pass their input on), so an LM input embedding depends only on the
pixels its own patches cover; changing the pixels under one token's cell on the stored image must
change that token's embedding (hidden state 0) and no other image token's.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_tiny import random_image, word_tokenizer
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    BatchFeature,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

import app.database.models.hf as hf
from app.database.database import VliLmdb
from app.database.extract import main as extract_main
from app.database.models import load_model
from app.database.models._hf_idefics import Idefics3Adapter, idefics3_image_layout
from app.database.models._hf_qwen import Qwen2VLAdapter, Qwen25VLAdapter, qwen_image_layout
from app.database.records import validate_record

QUESTION = "what color is the square"
WORDS = QUESTION.split() + ["red", "blue", "green", "user", "assistant", "system", "User:", "Assistant:"]
MAX_NEW_TOKENS = 3
N_LAYERS, N_HEADS, HIDDEN = 2, 2, 32

# Qwen: patches of 4 px merged 2x2, so one LM token per 8x8 px block; 48x64 is a fixed point of
# smart_resize (multiples of 8 within the pixel budget): a 6x8 token grid over the unchanged image.
QWEN_PATCH, QWEN_MERGE, QWEN_HW = 4, 2, (48, 64)
QWEN_WINDOW = 16  # Qwen2.5-VL attention windows of 16 px: 2x2 tokens, 3x4 windows over the image
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                "<|video_pad|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")

# Idefics3 / SmolVLM: tiles of 32 px, patches of 4 px, pixel shuffle 2: 4x4 tokens per tile (8 px cells).
# A 64x96 image is a fixed point of both resizes (longest edge 96, multiples of 32): 2x3 tiles + thumbnail.
TILE, IDEFICS_PATCH, SCALE, IDEFICS_HW = 32, 4, 2, (64, 96)
SIDE = TILE // IDEFICS_PATCH // SCALE
IDEFICS_SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {% for c in m['content'] %}"
                    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                    "<end_of_utterance> {% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")

VISION_OUTPUTS = ("attn.proj", "self_attn.out_proj", "mlp.fc2", "mlp.down_proj")  # last linear of each branch


class QwenTestProcessor:
    """Qwen2VLProcessor for one image, around the real PIL image processor: ``<|image_pad|>`` is
    repeated ``grid_t * grid_h * grid_w / merge**2`` times and ``mm_token_type_ids`` marks the pads."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, checkpoint):
        return cls(PreTrainedTokenizerFast.from_pretrained(checkpoint),
                   Qwen2VLImageProcessorPil.from_pretrained(checkpoint))

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def __call__(self, images, text, return_tensors="pt"):
        features = self.image_processor(images=images, return_tensors=return_tensors)
        n_pads = int(features["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        encoded = self.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n_pads),
                                 return_tensors=return_tensors, return_token_type_ids=False)
        pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return BatchFeature({**encoded, "mm_token_type_ids": (encoded["input_ids"] == pad_id).long(), **features})


def _silence_vision(vision_tower):
    """Zero the output projection of every attention and MLP of the vision tower: its blocks then pass
    their input on, so each LM image token depends on its own patches only."""
    with torch.no_grad():
        for name, module in vision_tower.named_modules():
            if name.endswith(VISION_OUTPUTS):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def _make_image_token_the_favourite(model, inputs, image_token_id):
    """Swap two rows of the LM head so that, without suppression, the first token greedy decoding
    picks is the image placeholder (the test of its suppression can then fail)."""
    with torch.no_grad():
        favourite = int(model(**inputs).logits[0, -1].argmax())
        weight = model.get_output_embeddings().weight
        weight[[favourite, image_token_id]] = weight[[image_token_id, favourite]]


def _build_qwen(directory, model_type):
    tokenizer = word_tokenizer(WORDS, added_special=QWEN_SPECIAL, template=QWEN_TEMPLATE)
    tokenizer.eos_token = "<|im_end|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=1, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0})
    common = dict(patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2, num_heads=2)
    if model_type == "qwen2_vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=16, hidden_size=HIDDEN, **common)
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=HIDDEN, window_size=QWEN_WINDOW,
                      fullatt_block_indexes=[1], **common)
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    _silence_vision(model.model.visual)
    image_processor = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2,
                                               min_pixels=8 * 8, max_pixels=QWEN_HW[0] * QWEN_HW[1])
    processor = QwenTestProcessor(tokenizer, image_processor)
    inputs = Qwen2VLAdapter().prompt_inputs(processor, Image.fromarray(random_image(*QWEN_HW)), QUESTION)
    _make_image_token_the_favourite(model, inputs, config.image_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)


def _build_idefics(directory, model_type):
    tokenizer = word_tokenizer(WORDS, added_special=IDEFICS_SPECIAL, template=IDEFICS_TEMPLATE)
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])  # the row ends the processor writes
    tokenizer.eos_token = "<end_of_utterance>"
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": max(IDEFICS_HW)},
                                                max_image_size={"longest_edge": TILE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=SIDE * SIDE,
                                  chat_template=IDEFICS_TEMPLATE)
    config_class, model_class = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration)}[model_type]
    config = config_class(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=1,
                         max_position_embeddings=512, tie_word_embeddings=False),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=IDEFICS_PATCH),
        scale_factor=SCALE, image_token_id=processor.image_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    _silence_vision(model.model.vision_model)
    inputs = Idefics3Adapter().prompt_inputs(processor, Image.fromarray(random_image(*IDEFICS_HW)), QUESTION)
    _make_image_token_the_favourite(model, inputs, config.image_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


FAMILIES = {"qwen2_vl": (_build_qwen, QWEN_HW), "qwen2_5_vl": (_build_qwen, QWEN_HW),
            "idefics3": (_build_idefics, IDEFICS_HW), "smolvlm": (_build_idefics, IDEFICS_HW)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, checkpoint directory, the loaded Hf live model, image path, its record)."""
    model_type = request.param
    build, (height, width) = FAMILIES[model_type]
    directory = tmp_path_factory.mktemp(model_type)
    checkpoint = str(directory / "checkpoint")
    build(checkpoint, model_type)
    image_path = str(directory / "image.png")
    Image.fromarray(random_image(height, width)).save(image_path)
    with pytest.MonkeyPatch.context() as patch:
        if model_type.startswith("qwen"):
            patch.setattr(hf, "AutoProcessor", QwenTestProcessor)
        model = load_model("hf", [checkpoint, "cpu", f"max_new_tokens={MAX_NEW_TOKENS}"], progress=False)
    record = model.data_setup(0, image_path, QUESTION)
    return model_type, checkpoint, model, image_path, record


def _patch_coords(record):
    """[(position, (x, y, g))] of every image token that is a patch, in sequence order."""
    image_positions = [i for i, m in enumerate(record["modality"]) if m == "image"]
    return [(i, (c[0], c[1], c[2] if len(c) == 3 else 0))
            for i, c in zip(image_positions, record["img_coords"]) if c is not None]


def _grids(record):
    return record.get("grids") or [{"rows": record["grid"][0], "cols": record["grid"][1],
                                     "box": [0, 0, record["image"].shape[1], record["image"].shape[0]]}]


def _cell_box(grid, x, y):
    """The pixel box [left, top, right, bottom) of cell (x, y) of a grid on the stored image."""
    left, top, right, bottom = grid["box"]
    width, height = (right - left) / grid["cols"], (bottom - top) / grid["rows"]
    return [round(left + x * width), round(top + y * height), round(left + (x + 1) * width),
            round(top + (y + 1) * height)]


def test_record_is_valid_and_shaped_like_the_language_model(family):
    model_type, _, model, _, record = family
    validate_record(record)
    n = len(record["tokens"])
    assert model.dimensions() == (N_LAYERS, N_HEADS, HIDDEN)
    assert record["attention"].shape == (N_LAYERS, N_HEADS, n, n)
    assert record["hidden_states"].shape == (N_LAYERS + 1, n, HIDDEN)
    np.testing.assert_allclose(record["attention"].sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.triu(record["attention"], k=1)).max() == 0.0  # causal: no query sees a later key


def test_coordinates_are_unique_and_inside_their_grid(family):
    model_type, _, _, _, record = family
    grids = _grids(record)
    patches = [c for _, c in _patch_coords(record)]
    assert len(set(patches)) == len(patches)
    assert all(0 <= x < grids[g]["cols"] and 0 <= y < grids[g]["rows"] for x, y, g in patches)
    # every cell of every grid is some token's: nothing of the image is left out
    assert len(patches) == sum(g["rows"] * g["cols"] for g in grids)


def test_grids_match_the_family_layout(family):
    model_type, _, _, _, record = family
    height, width = FAMILIES[model_type][1]
    assert record["image"].shape == (height, width, 3)
    if model_type.startswith("qwen"):
        assert "grids" not in record
        assert record["grid"] == (height // (QWEN_PATCH * QWEN_MERGE), width // (QWEN_PATCH * QWEN_MERGE))
    else:
        rows, cols = height // TILE, width // TILE
        expected = [{"name": f"tile {r},{c}", "rows": SIDE, "cols": SIDE,
                     "box": [(c - 1) * TILE, (r - 1) * TILE, c * TILE, r * TILE]}
                    for r in range(1, rows + 1) for c in range(1, cols + 1)]
        expected.append({"name": "thumbnail", "rows": SIDE, "cols": SIDE, "box": [0, 0, width, height]})
        assert record["grids"] == expected
        assert record["grid"] == (SIDE, SIDE)


def test_stored_image_is_the_image_the_model_saw(family):
    """The image is a fixed point of the family's resize, so what the vision tower saw (rebuilt from
    pixel_values) is the file's pixels, up to the processor's float rounding."""
    _, _, _, image_path, record = family
    original = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)
    assert np.abs(record["image"].astype(np.int16) - original).max() <= 1


def test_text_tokens_hold_the_question_and_the_answer_is_generated_text(family):
    model_type, _, model, _, record = family
    text_tokens = [t for t, m in zip(record["tokens"], record["modality"]) if m == "text"]
    assert set(QUESTION.split()) <= set(text_tokens)
    generated = record["generated"]
    assert 1 <= generated <= MAX_NEW_TOKENS
    assert all(m == "text" for m in record["modality"][-generated:])
    # image-side tokens are one run inside the prompt, before the question
    image_positions = [i for i, m in enumerate(record["modality"]) if m == "image"]
    assert image_positions == list(range(image_positions[0], image_positions[-1] + 1))
    assert image_positions[-1] < record["tokens"].index("what")


def test_image_placeholder_is_never_generated(family):
    """Unsuppressed, greedy decoding's first answer token would be the image placeholder (the fixture
    made it the favourite); the stored answer holds none of the suppressed tokens."""
    model_type, _, model, image_path, record = family
    inputs = model.prompt(Image.open(image_path).convert("RGB"), QUESTION)
    image_token_id = model.model.config.image_token_id
    with torch.no_grad():
        assert int(model.model(**inputs).logits[0, -1].argmax()) == image_token_id
    tokenizer = model.processor.tokenizer
    suppressed = set(tokenizer.convert_ids_to_tokens(model.adapter.suppressed_token_ids(model.processor, model.model)))
    assert tokenizer.convert_ids_to_tokens(image_token_id) in suppressed
    assert not suppressed & set(record["tokens"][-record["generated"]:])


def test_special_tokens_are_the_markers(family):
    """Chat and image markers are special, the question's words and the image patches are not."""
    model_type, _, _, _, record = family
    special = {t for t, s in zip(record["tokens"], record["special"]) if s}
    image_side = [t for t, m in zip(record["tokens"], record["modality"]) if m == "image"]
    no_patch = {t for t, c in zip(image_side, record["img_coords"]) if c is None}
    patch = {t for t, c in zip(image_side, record["img_coords"]) if c is not None}
    if model_type.startswith("qwen"):
        assert no_patch == {"<|vision_start|>", "<|vision_end|>"}
        assert patch == {"<|image_pad|>"}
        assert {"<|im_start|>", "<|im_end|>"} <= special
    else:
        assert no_patch == {"<fake_token_around_image>", "<global-img>", "\n"} | {
            f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2, 3)}
        assert patch == {"<image>"}
        assert "<s>" in special
    assert no_patch <= special
    assert not special & (patch | set(QUESTION.split()))


def _embedding_changes(model, image_path, record, box):
    """Per prompt position, how much hidden state 0 (the LM's input embedding) moves when the pixels
    of ``box`` on the stored image are inverted (the stored image is the file's, see above)."""
    pixels = np.asarray(Image.open(image_path).convert("RGB")).copy()
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255 - pixels[top:bottom, left:right]
    inputs = model.prompt(Image.fromarray(pixels), QUESTION)
    prompt_len = len(record["tokens"]) - record["generated"]
    assert inputs["input_ids"].shape[1] == prompt_len
    with torch.no_grad():
        embeddings = model.model(**inputs, output_hidden_states=True).hidden_states[0][0].numpy()
    return np.abs(embeddings - record["hidden_states"][0, :prompt_len]).max(-1)


def test_each_image_token_shows_its_own_cell(family):
    """Inverting the pixels of one token's cell moves that token's input embedding and no other token of
    its grid; on Idefics3 the thumbnail token that moves most is the one whose cell holds the change.
    The cells tried span the grid (corners, the middle, other rows, other tiles, other Qwen2.5 windows)."""
    model_type, _, model, image_path, record = family
    grids = _grids(record)
    patches = _patch_coords(record)
    position_of = {c: i for i, c in patches}
    tried = [(0, 0, 0), (grids[0]["cols"] - 1, grids[0]["rows"] - 1, 0), (grids[0]["cols"] // 2, 1, 0)]
    if not model_type.startswith("qwen"):
        tried += [(1, 2, 4), (SIDE - 1, 0, 2)]  # tile 2,2 and tile 1,3
    thumbnail = len(grids) - 1
    for x, y, g in tried:
        moved = _embedding_changes(model, image_path, record, _cell_box(grids[g], x, y))
        same_grid = [(c, i) for c, i in position_of.items() if c[2] == g]
        assert [c for c, i in same_grid if moved[i] > 1e-6] == [(x, y, g)]
        if g != thumbnail and len(grids) > 1:
            left, top, right, bottom = _cell_box(grids[g], x, y)
            cx, cy = (left + right) / 2, (top + bottom) / 2
            box = grids[thumbnail]["box"]
            expected = (int(cx * SIDE / box[2]), int(cy * SIDE / box[3]), thumbnail)
            thumbnail_tokens = [(c, i) for c, i in position_of.items() if c[2] == thumbnail]
            assert max(thumbnail_tokens, key=lambda ci: moved[ci[1]])[0] == expected


def test_qwen25_windows_reorder_the_patches_that_the_tokens_follow_in_row_major_order():
    """The Qwen2.5-VL test model's tower does reorder its blocks (window_index is not the identity),
    so the row-major order the cell test finds is the tower putting them back, not the absence of windows."""
    rows, cols = QWEN_HW[0] // QWEN_PATCH, QWEN_HW[1] // QWEN_PATCH
    window_index, _ = get_vision_window_index(torch.tensor([[1, rows, cols]]), spatial_merge_size=QWEN_MERGE,
                                              window_size=QWEN_WINDOW, patch_size=QWEN_PATCH)
    n_blocks = rows * cols // QWEN_MERGE ** 2
    assert sorted(window_index.tolist()) == list(range(n_blocks))
    assert window_index.tolist() != list(range(n_blocks))


def test_extractor_writes_the_examples(family, tmp_path):
    model_type, checkpoint, _, image_path, _ = family
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": image_path, "text": QUESTION, "label": "red"}) + "\n")
    out = str(tmp_path / "db")
    with pytest.MonkeyPatch.context() as patch:
        if model_type.startswith("qwen"):
            patch.setattr(hf, "AutoProcessor", QwenTestProcessor)
        status = extract_main(["-m", "hf", checkpoint, "cpu", f"max_new_tokens={MAX_NEW_TOKENS}",
                               "--pairs", str(pairs), "--out", out, "--no-progress"])
    assert status == 0
    with VliLmdb(out) as db:
        assert (db.n_layers, db.n_heads, db.hidden_size) == (N_LAYERS, N_HEADS, HIDDEN)
        info = db.example(db.example_ids()[0])
        assert info.prediction["label"] == "red"
        assert "what" in info.tokens


# The layout functions on hand-made prompts


def test_qwen_layout_of_a_hand_made_prompt():
    start, pad, end = 7, 8, 9
    ids = [1, 2, start] + [pad] * 6 + [end, 3]
    coords, grids, is_image = qwen_image_layout(ids, [[1, 4, 6]], merge_size=2, patch_size=14, image_token_id=pad,
                                                vision_start_id=start, vision_end_id=end)
    assert is_image.tolist() == [False, False] + [True] * 8 + [False]
    assert coords == [None, (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), None]
    assert grids == [{"name": "image 2x3", "rows": 2, "cols": 3, "box": [0, 0, 84, 56]}]
    with pytest.raises(ValueError, match="5 image tokens"):
        qwen_image_layout(ids[:-3] + [end, 3], [[1, 4, 6]], 2, 14, pad, start, end)


def test_idefics3_layout_of_a_hand_made_prompt():
    tile = ["<image>"] * 4
    tokens = (["User:", "<fake_token_around_image>", "<row_1_col_1>", *tile, "<fake_token_around_image>",
               "<row_1_col_2>", *tile, "\n", "\n", "<fake_token_around_image>", "<global-img>", *tile,
               "<fake_token_around_image>", "what"])
    coords, grids, is_image = idefics3_image_layout(tokens, tile_size=10)
    assert is_image.tolist() == [False] + [True] * (len(tokens) - 2) + [False]
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert coords == ([None, None, *[(x, y, 0) for x, y in cells], None, None, *[(x, y, 1) for x, y in cells],
                       None, None, None, None, *[(x, y, 2) for x, y in cells], None])
    assert grids == [{"name": "tile 1,1", "box": [0, 0, 10, 10], "rows": 2, "cols": 2},
                     {"name": "tile 1,2", "box": [10, 0, 20, 10], "rows": 2, "cols": 2},
                     {"name": "thumbnail", "box": [0, 0, 20, 10], "rows": 2, "cols": 2}]
    unsplit = ["<fake_token_around_image>", "<global-img>", *(["<image>"] * 9), "<fake_token_around_image>"]
    coords, grids, _ = idefics3_image_layout(unsplit, tile_size=12)
    assert grids == [{"name": "image", "box": [0, 0, 12, 12], "rows": 3, "cols": 3}]
    assert coords[2:5] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    with pytest.raises(ValueError, match="not a square grid"):
        idefics3_image_layout(unsplit[:-2] + unsplit[-1:], tile_size=12)


def test_adapters_serve_their_model_types():
    for model_type, adapter in [("qwen2_vl", Qwen2VLAdapter), ("qwen2_5_vl", Qwen25VLAdapter),
                                ("idefics3", Idefics3Adapter), ("smolvlm", Idefics3Adapter)]:
        assert type(hf.adapter_for(model_type)) is adapter
        assert model_type in adapter.model_types
