"""``-m hf`` with LLaVA-1.5, LLaVA-NeXT and PaliGemma: tiny random checkpoints built offline.

The vision towers are built so that each image feature depends on its own patch's pixels only (the
projected output of the patch embedding, position embeddings zeroed): then the feature that lands at a
token position tells, independently of the adapter, which pixels of the stored image that token is.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from app.database.database import VliLmdb
from app.database.extract import main as extract_main
from app.database.models import ModelLoadError, load_model, run_data_setup
from app.database.models.hf import Hf, parse_options
from tests.hf_tiny import capture_inputs_embeds, chat_template, random_image, word_tokenizer
from tests.tiny_vilt import build_tiny_vilt

QUESTION = "what color is the square ?"
WORDS = ["USER:", "ASSISTANT:", "[INST]", "[/INST]", "what", "color", "is", "the", "square", "?", "red",
         "blue", "green", "a", "circle"]
MAX_NEW_TOKENS = 4
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # PaliGemma's processor
IMAGE_HW = {"llava": (40, 60), "llava_next": (16, 72), "llava_next_tall": (72, 16), "paligemma": (30, 50)}


def _clip(image_size: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=image_size, patch_size=patch, projection_dim=16)


def _llama(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def _build_llava(path):
    tokenizer = word_tokenizer(WORDS)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template())
    config = LlavaConfig(vision_config=_clip(42, 14), text_config=_llama(len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.embeddings.position_embedding.weight.data.zero_()
    return model, processor


def _build_llava_next(path):
    tokenizer = word_tokenizer(WORDS)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=_clip(28, 7), text_config=_llama(len(tokenizer)),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    model = LlavaNextForConditionalGeneration(config)
    model.model.vision_tower.embeddings.position_embedding.weight.data.zero_()
    return model, processor  # no chat template: the family's plain [INST] prompt


def _build_paligemma(path):
    tokenizer = word_tokenizer(WORDS)
    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=0, num_attention_heads=2,
                                image_size=28, patch_size=7, projection_dim=32)
    text = GemmaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=2, eos_token_id=3,
                       pad_token_id=0)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             projection_dim=32)
    model = PaliGemmaForConditionalGeneration(config)
    model.model.vision_tower.embeddings.position_embedding.weight.data.zero_()
    return model, processor


BUILDERS = {"llava": _build_llava, "llava_next": _build_llava_next, "paligemma": _build_paligemma}


def _patch_feature(model, family: str, pixels: torch.Tensor) -> torch.Tensor:
    """The projected feature of one patch (1, 3, p, p), computed from the weights: the patch embedding,
    the tower's per-token layer norm (CLIP: before its one layer, whose input vision_feature_layer=-2 selects;
    SigLIP: after its zero layers), then the projector."""
    tower = model.model.vision_tower
    embedded = tower.embeddings.patch_embedding(pixels).flatten(1)[None]  # (1, 1, hidden)
    if family == "paligemma":
        return model.model.multi_modal_projector(tower.post_layernorm(embedded))[0, 0]
    return model.model.multi_modal_projector(tower.pre_layrnorm(embedded))[0, 0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    paths = {}
    for family, build in BUILDERS.items():
        path = tmp_path_factory.mktemp(family)
        model, processor = build(path)
        model.generation_config.eos_token_id = 3
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths[family] = str(path)
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (height, width) in IMAGE_HW.items():
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(random_image(height, width, seed=len(paths))).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def models(checkpoints):
    return {family: load_model("hf", [path, f"max_new_tokens={MAX_NEW_TOKENS}"], progress=False)
            for family, path in checkpoints.items()}


@pytest.fixture(scope="module")
def records(models, images):
    return {family: run_data_setup(model, 3, images[family], QUESTION, label="red")
            for family, model in models.items()}


FAMILIES = list(BUILDERS)


def _prefix_len(family, record):
    """PaliGemma attends bidirectionally over its prefix (image and prompt); the others are causal."""
    n = len(record["tokens"])
    return n - record["generated"] if family == "paligemma" else 0


@pytest.mark.parametrize("family", FAMILIES)
def test_record_shapes_tokens_and_generation(family, models, records):
    model, record = models[family], records[family]
    n_layers, n_heads, hidden = model.dimensions()
    tokens = record["tokens"]
    n = len(tokens)
    assert record["attention"].shape == (n_layers, n_heads, n, n) == (2, 2, n, n)
    assert record["hidden_states"].shape == (n_layers + 1, n, hidden) == (3, n, 32)
    np.testing.assert_allclose(record["attention"].sum(-1), 1.0, atol=1e-5)
    prefix = _prefix_len(family, record)
    later = np.triu(np.ones((n, n), dtype=bool), 1)
    later[:prefix, :prefix] = False
    assert np.abs(record["attention"][:, :, later]).max() == 0.0  # no query sees a later token
    if prefix:
        assert record["attention"][:, :, 0, prefix - 1].min() > 0  # the prefix really is bidirectional

    modality = record["modality"]
    assert len(modality) == n and len(record["special"]) == n
    assert record["txt_len"] == modality.count("text")
    assert modality.count("image") == len(record["img_coords"])
    text_tokens = [t for t, m in zip(tokens, modality) if m == "text"]
    assert set(QUESTION.split()) <= set(text_tokens)
    assert all(tokens[i] == "<image>" for i, m in enumerate(modality) if m == "image")

    generated = record["generated"]
    assert generated == MAX_NEW_TOKENS  # a random model never says </s> (checked separately)
    assert modality[-generated:] == ["text"] * generated
    assert "<image>" not in tokens[-generated:]
    assert record["prediction"]["answer"] == " ".join(tokens[-generated:])
    assert record["prediction"]["label"] == "red" and isinstance(record["accuracy"], bool)
    assert 0.0 < record["prediction"]["score"] < 1.0
    assert record["notes"] == [f"the answer was cut at max_new_tokens={MAX_NEW_TOKENS} (no end token)"]
    assert record["text"] == QUESTION
    special = {t for t, flag, m in zip(tokens, record["special"], modality) if flag and m == "text"}
    assert special == ({"<s>"} if "<s>" in tokens else set())  # BOS (chat template, PaliGemma), no words
    assert not any(record["special"][-generated:])


def test_image_placeholder_is_never_generated(checkpoints, images):
    """A model whose favourite token is <image>: generation must pick something else every time."""
    hf = load_model("hf", [checkpoints["llava"], "max_new_tokens=3"], progress=False)
    image_id = hf.model.config.image_token_id
    with torch.no_grad():
        hf.model.lm_head.bias = torch.nn.Parameter(torch.zeros(hf.model.lm_head.out_features))
        hf.model.lm_head.bias[image_id] = 100.0
        inputs = hf.prompt(Image.fromarray(hf.load_image(images["llava"])), QUESTION)
        assert int(hf.model(**inputs).logits[0, -1].argmax()) == image_id
    record = hf.data_setup(0, images["llava"], QUESTION)
    assert record["generated"] == 3 and "<image>" not in record["tokens"][-3:]


@pytest.mark.parametrize("family", FAMILIES)
def test_coordinates_unique_and_inside_their_grids(family, records):
    record = records[family]
    grids = record.get("grids") or [{"rows": record["grid"][0], "cols": record["grid"][1],
                                     "box": [0, 0, record["image"].shape[1], record["image"].shape[0]]}]
    assert record["grid"] == (grids[0]["rows"], grids[0]["cols"])
    patches = [(c[2] if len(c) == 3 else 0, c[0], c[1]) for c in record["img_coords"] if c is not None]
    assert len(set(patches)) == len(patches)
    for g, x, y in patches:
        assert 0 <= x < grids[g]["cols"] and 0 <= y < grids[g]["rows"]
    covered = sum(grid["rows"] * grid["cols"] for grid in grids)
    assert len(patches) == covered  # every patch of every grid is some token
    height, width = record["image"].shape[:2]
    for grid in grids:
        left, top, right, bottom = grid["box"]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_layout_of_each_family(records):
    llava, paligemma, nxt = records["llava"], records["paligemma"], records["llava_next"]
    assert llava["image"].shape == (42, 42, 3) and llava["grid"] == (3, 3) and "grids" not in llava
    assert paligemma["image"].shape == (28, 28, 3) and paligemma["grid"] == (4, 4)
    assert paligemma["modality"][:16] == ["image"] * 16  # the image is PaliGemma's prefix
    # 16x72 fits 28x56 best: base 4x4; high-res 4x8 patches, padding rows 0 and 3 removed; a newline per row
    assert nxt["grids"] == [{"name": "base 4x4", "rows": 4, "cols": 4, "box": [0, 0, 28, 28]},
                            {"name": "high-res 2x8", "rows": 2, "cols": 8, "box": [28, 7, 84, 21]}]
    assert nxt["image"].shape == (28, 84, 3)
    coords = nxt["img_coords"]
    assert coords[16:25] == [(x, 0, 1) for x in range(8)] + [None] and coords[-1] is None and len(coords) == 34


def _check_features_sit_on_their_patches(hf, family, record, image_path):
    """Each image token's language-model input is the feature of the stored image's pixels at its (x, y)."""
    image = Image.fromarray(hf.load_image(image_path))
    inputs = hf.prompt(image, QUESTION)
    with capture_inputs_embeds(hf.model.model.language_model) as seen, torch.no_grad():
        hf.model(**inputs)
    embeds = seen[0][0]
    processor = hf.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    grids = record.get("grids") or [{"box": [0, 0, 0, 0]}]
    patch = hf.model.config.vision_config.patch_size
    positions = [i for i, m in enumerate(record["modality"]) if m == "image"]
    checked = []
    with torch.no_grad():
        for position, coord in zip(positions, record["img_coords"]):
            if coord is None:
                continue
            x, y, g = coord if len(coord) == 3 else (*coord, 0)
            left, top = grids[g]["box"][:2]
            crop = record["image"][top + y * patch: top + (y + 1) * patch, left + x * patch: left + (x + 1) * patch]
            pixels = (torch.tensor(crop, dtype=torch.float32).permute(2, 0, 1) / 255 - mean) / std
            expected = _patch_feature(hf.model, family, pixels[None])
            torch.testing.assert_close(embeds[position], expected, atol=1e-4, rtol=1e-4)
            checked.append(expected)
    features = torch.stack(checked)
    assert torch.cdist(features, features).add(torch.eye(len(checked))).min() > 1e-2  # all patches differ


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_sit_on_their_patches(family, models, records, images):
    _check_features_sit_on_their_patches(models[family], family, records[family], images[family])


def test_llava_next_tall_image_unpads_columns(models, images):
    hf = models["llava_next"]
    record = hf.data_setup(4, images["llava_next_tall"], QUESTION)
    assert record["grids"][1] == {"name": "high-res 8x2", "rows": 8, "cols": 2, "box": [35, 0, 49, 56]}
    assert record["image"].shape == (56, 56, 3)
    _check_features_sit_on_their_patches(hf, "llava_next", record, images["llava_next_tall"])


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_rows_are_the_attention_generate_computed(family, models, records, images):
    hf, record = models[family], records[family]
    inputs = hf.prompt(Image.fromarray(hf.load_image(images[family])), QUESTION)
    out = hf.generate(inputs, output_attentions=True, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.sequences.shape[1] == prompt_len + record["generated"]
    ids = hf.processor.tokenizer.convert_tokens_to_ids(record["tokens"])
    assert out.sequences[0].tolist() == ids
    attention = record["attention"]
    first = torch.cat(out.attentions[0]).float().numpy()  # the prompt's own pass
    np.testing.assert_allclose(attention[:, :, :prompt_len, :prompt_len], first, atol=1e-5)
    for step in range(1, record["generated"]):  # step k's query is the (k-1)-th generated token
        row = torch.cat(out.attentions[step]).float().numpy()[:, :, 0]
        position = prompt_len + step - 1
        np.testing.assert_allclose(attention[:, :, position, : position + 1], row, atol=1e-5)


def test_score_is_the_probability_of_the_greedy_output(models, records, images):
    hf, record = models["llava"], records["llava"]
    inputs = hf.prompt(Image.fromarray(hf.load_image(images["llava"])), QUESTION)
    out = hf.generate(inputs, output_logits=True, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    chosen = out.sequences[0, prompt_len:]
    expected = np.prod([float(step[0].softmax(-1)[token]) for step, token in zip(out.logits, chosen)])
    assert record["prediction"]["score"] == pytest.approx(expected, rel=1e-4)


def test_stops_at_the_end_token_and_leaves_it_out(checkpoints, models, records, images):
    """With the first answer token made the end token, the answer is empty and the score is its probability."""
    hf = load_model("hf", [checkpoints["llava"]], progress=False)
    first = hf.processor.tokenizer.convert_tokens_to_ids(records["llava"]["tokens"][-MAX_NEW_TOKENS])
    hf.model.generation_config.eos_token_id = first
    record = hf.data_setup(0, images["llava"], QUESTION)
    full = records["llava"]
    prompt_len = len(full["tokens"]) - full["generated"]
    assert record["generated"] == 0 and record["prediction"]["answer"] == "" and "notes" not in record
    assert record["tokens"] == full["tokens"][:prompt_len]
    inputs = hf.prompt(Image.fromarray(hf.load_image(images["llava"])), QUESTION)
    with torch.no_grad():
        probability = float(hf.model(**inputs).logits[0, -1].softmax(-1)[first])
    assert record["prediction"]["score"] == pytest.approx(probability, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_database_accepts_the_record(family, records, tmp_path):
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        assert db.add_record(records[family]) == 3
        info = db.example(3)
        assert info.grid == records[family]["grid"]
        assert db.n_layers == 2 and db.n_heads == 2
    finally:
        db.close()


def test_batch_extractor(checkpoints, images, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": images[name], "text": QUESTION, "label": "red"}) + "\n"
                             for name in ("llava_next", "llava_next_tall")))
    out = tmp_path / "db"
    assert extract_main(["-m", "hf", checkpoints["llava_next"], "max_new_tokens=2", "--pairs", str(pairs),
                         "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    db = VliLmdb(out)
    try:
        assert len(db.example_ids()) == 2
    finally:
        db.close()


def test_options_and_errors(checkpoints, tmp_path):
    assert parse_options(["dtype=bfloat16", "max_new_tokens=7"]) == {"max_new_tokens": 7, "dtype": torch.bfloat16,
                                                                     "relevancy": True, "patch_lens": True}
    assert parse_options(["relevancy=0", "patch_lens=0"])["relevancy"] is False
    assert parse_options(["relevancy=0", "patch_lens=0"])["patch_lens"] is False
    for words, message in ((["temperature=1"], "unknown option 'temperature'"),
                           (["max_new_tokens=0"], "max_new_tokens=0: expected a positive integer"),
                           (["relevancy=yes"], "relevancy=yes: expected 0 or 1"),
                           (["dtype=int8"], "dtype=int8: expected one of auto, float32, float16, bfloat16"),
                           (["cpu", "cuda"], "several devices")):
        with pytest.raises(ModelLoadError, match=message) as error:
            load_model("hf", [checkpoints["llava"], *words], progress=False)
        assert "\n" not in str(error.value)
    hf = load_model("hf", [checkpoints["paligemma"], "dtype=float32", "cpu"], progress=False)
    assert isinstance(hf, Hf) and hf.model.dtype == torch.float32 and hf.max_new_tokens == 32

    LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model("hf", [str(tmp_path)], progress=False)
    message = str(error.value)
    assert "\n" not in message and "unsupported model_type 'llama'" in message
    for supported in ("llava", "llava_next", "paligemma", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "vilt"):
        assert supported in message


def test_auto_device_spreads_the_model_with_accelerate(checkpoints, models, records, images, monkeypatch):
    """``-m hf CHECKPOINT auto``: loaded with device_map="auto" (accelerate places the modules; here all on
    the CPU), and the record is the same."""
    placements = []

    def spy(*args, **kwargs):  # the adapter's AutoModelForImageTextToText.from_pretrained
        placements.append(kwargs.get("device_map"))
        return LlavaForConditionalGeneration.from_pretrained(*args, **kwargs)

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", spy)
    hf = load_model("hf", [checkpoints["llava"], "auto", f"max_new_tokens={MAX_NEW_TOKENS}"], progress=False)
    assert placements == ["auto"] and hf.model.device.type == "cpu"
    record = run_data_setup(hf, 3, images["llava"], QUESTION, label="red")
    assert record["tokens"] == records["llava"]["tokens"]
    np.testing.assert_allclose(record["attention"], records["llava"]["attention"], atol=1e-6)


def test_vilt_checkpoint_goes_to_vilt(tmp_path):
    from app.database.models.vilt import Vilt

    model = load_model("hf", [build_tiny_vilt(tmp_path / "vilt"), "cpu"], progress=False)
    assert isinstance(model, Vilt) and model.dimensions() == (2, 4, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_where_the_answer_starts(family, models, records, images):
    """Every layer's top tokens at the prompt's last position; the last layer is the model's own first
    answer token, and each layer's probabilities are those of norm + LM head computed here."""
    hf, record = models[family], records[family]
    lens = record["logit_lens"]
    assert len(lens) == len(record["hidden_states"]) and all(len(layer) == 10 for layer in lens)
    first_answer = record["tokens"][len(record["tokens"]) - record["generated"]]
    tokenizer = hf.processor.tokenizer
    suppressed = {tokenizer.decode([i]) for i in hf.adapter.suppressed_token_ids(hf.processor, hf.model)}
    greedy = next(token for token, _ in lens[-1] if token not in suppressed)  # what generate() picked
    assert greedy.strip() == first_answer.strip()
    position = len(record["tokens"]) - record["generated"] - 1
    states = torch.tensor(record["hidden_states"][1][position])
    with torch.no_grad():
        probs = hf.model.lm_head(hf.model.get_decoder().norm(states)).softmax(-1)
    top = probs.topk(10)
    np.testing.assert_allclose([p for _, p in lens[1]], top.values.numpy(), rtol=1e-4)
    assert lens[-1][0][1] >= lens[-1][1][1]
