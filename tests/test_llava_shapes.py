"""The bundled generative VLM of the shapes task (shapes_vqa/llava-shapes/, trained by
shapes_vqa/train_llava.py): processor layout, the training script, held-out accuracy through the
user's loading path, the "truth" test on its language model's attention, and the faithfulness of what -m hf
stores for it.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from helpers import faithfulness_aucs
from shapes_vqa import make_heldout, scenes
from shapes_vqa import train as vilt_train
from shapes_vqa import train_llava

MODEL_DIR = train_llava.DEFAULT_OUT
HELDOUT = make_heldout.DEFAULT_OUT
GRID = scenes.SCENE_SIZE // scenes.CELL
PROMPT_HEAD = ["<s>", "user", ":"]  # what the chat template writes before the image tokens
N_IMAGE = GRID * GRID


def _messages(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# --------------------------------------------------------------------------- processor / training


@pytest.fixture(scope="module")
def processor():
    return train_llava.build_processor()


def test_prompt_is_one_token_per_word_and_one_image_token_per_patch(processor):
    tokenizer = processor.tokenizer
    for ex in scenes.generate(25, seed=9):
        enc = processor(images=[ex.scene.image], text=[train_llava.prompt(processor, ex.question)])
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        assert tokens == PROMPT_HEAD + ["<image>"] * N_IMAGE + scenes.question_words(ex.question) + ["assistant", ":"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(answer) == [ex.answer]
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(tokenizer("What COLOR is the Circle?")["input_ids"])


def test_training_inputs_are_what_the_processor_gives(processor):
    """encode() + pixel_values() (the training loop's inputs) against the stock processor call;
    the scenes keep their size, so the image processor only normalises them."""
    exs = scenes.generate(10, seed=1)
    data = train_llava.encode(exs, processor)
    for i, ex in enumerate(exs):
        enc = processor(images=[ex.scene.image], text=[train_llava.prompt(processor, ex.question)],
                        return_tensors="pt")
        start = int(data["prompt_len"][i])
        assert torch.equal(data["input_ids"][i, :start], enc["input_ids"][0])
        assert enc["pixel_values"].shape == (1, 3, scenes.SCENE_SIZE, scenes.SCENE_SIZE)
        expected = (torch.from_numpy(ex.scene.image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert torch.allclose(enc["pixel_values"][0], expected, atol=1e-5)
        assert torch.allclose(vilt_train.pixel_values(data["images"][i:i + 1])[0], expected, atol=1e-5)
        # the loss sees the answer word and EOS only, then padding
        labelled = data["labels"][i][data["labels"][i] != -100].tolist()
        assert processor.tokenizer.convert_ids_to_tokens(labelled) == [ex.answer, "</s>"]
        assert int(data["attention_mask"][i].sum()) == start + 2


def test_image_features_fill_the_image_tokens(processor):
    """The vision tower's 6 x 6 patch features (CLS dropped) replace exactly the 36 <image> tokens."""
    model = train_llava.build_model(processor, hidden=32, vision_layers=1, text_layers=1).eval()
    ex = scenes.generate(1, seed=3)[0]
    enc = processor(images=[ex.scene.image], text=[train_llava.prompt(processor, ex.question)], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        out = model(**enc, output_hidden_states=True)
    assert features[0].shape == (N_IMAGE, 32)
    image_positions = torch.nonzero(enc["input_ids"][0] == processor.image_token_id).flatten()
    assert image_positions.tolist() == list(range(len(PROMPT_HEAD), len(PROMPT_HEAD) + N_IMAGE))
    assert torch.allclose(out.hidden_states[0][0, image_positions], features[0], atol=1e-6)


def test_curriculum_is_the_vilts():
    assert train_llava.CURRICULUM is vilt_train.CURRICULUM


def test_quick_training_run_saves_a_loadable_model(tmp_path):
    report = train_llava.main(["--quick", "--out", str(tmp_path)])
    assert set(report["accuracy"]) == {"all", *scenes.QUESTION_TYPES}
    assert [st["stage"] for st in report["curriculum"]] == [st.name for st in train_llava.CURRICULUM]
    assert report["steps"] == sum(st["steps"] for st in report["curriculum"])
    assert report["wall_seconds"] > 0 and report["cpu_seconds"] > 0
    assert json.loads((tmp_path / "training_report.json").read_text()) == report
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.text_config.num_hidden_layers == 2
    assert loaded.apply_chat_template(_messages("how many circles are there?"), add_generation_prompt=True) \
        == "<s>user: <image> how many circles are there? assistant:"


# --------------------------------------------------------------------------- bundled model


@pytest.fixture(scope="module")
def bundled():
    assert (MODEL_DIR / "model.safetensors").exists(), "run python -m shapes_vqa.train_llava"
    torch.manual_seed(0)
    return (AutoProcessor.from_pretrained(MODEL_DIR),
            LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, attn_implementation="eager").eval())


def test_bundled_model_is_small_and_tiny():
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 3e6
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] <= 2 and config["text_config"]["num_hidden_layers"] <= 4
    assert config["vision_config"]["patch_size"] == scenes.CELL


def test_bundled_training_report_meets_the_targets():
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert report["n_eval"] >= 300 and report["eval_seed"] != make_heldout.HELDOUT_SEED
    assert report["accuracy"]["all"] >= 0.9
    assert min(report["accuracy"][q] for q in scenes.QUESTION_TYPES) >= 0.85


def test_bundled_model_answers_heldout_questions_by_generating(bundled):
    """The user's path: PNG, chat template, processor, greedy generate; the answer is the words
    before EOS. Every answer ends with EOS and no generated token is <image>."""
    processor, model = bundled
    pairs = [json.loads(line) for line in (HELDOUT / "pairs.jsonl").read_text().splitlines()]
    eos, image_id = processor.tokenizer.eos_token_id, processor.image_token_id
    right, wrong = [], []
    for pair in pairs:
        image = Image.open(HELDOUT / pair["image"]).convert("RGB")
        enc = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": pair["text"]}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**enc, do_sample=False, max_new_tokens=6)[0, enc["input_ids"].shape[1]:].tolist()
        assert eos in generated, (pair, processor.tokenizer.convert_ids_to_tokens(generated))
        assert image_id not in generated, pair
        answer = processor.tokenizer.decode(generated[:generated.index(eos)], skip_special_tokens=True)
        right.append(answer.strip().lower() == pair["label"].lower())
        if not right[-1]:
            wrong.append((pair["text"], pair["label"], answer))
    assert len(pairs) == 30
    assert np.mean(right) >= 0.9, wrong


def test_bundled_model_is_90_percent_right_on_unseen_scenes(bundled):
    """The issue's target on 300 fresh scenes (a seed no training or evaluation run used), through
    the training script's batched generation; every question type, relative position included."""
    processor, model = bundled
    exs = scenes.generate(300, seed=31337)
    data = train_llava.encode(exs, processor)
    generated = train_llava.generate(model, data)
    eos, image_id = processor.tokenizer.eos_token_id, processor.image_token_id
    assert all(row[1] == eos for row in generated), "one answer word, then EOS"
    assert not any(image_id in row for row in generated)
    answers = [train_llava.answer_text(processor.tokenizer, row) for row in generated]
    per = {q: np.mean([a == e.answer for a, e in zip(answers, exs) if e.qtype == q]) for q in scenes.QUESTION_TYPES}
    assert np.mean([a == e.answer for a, e in zip(answers, exs)]) >= 0.9, per
    assert min(per.values()) >= 0.85, per
    assert train_llava.evaluate(model, processor, data, exs) == {
        "all": np.mean([a == e.answer for a, e in zip(answers, exs)]), **per}


# --------------------------------------------------------------------------- the truth test

def _shape_patch(obj: scenes.SceneObject) -> int:
    """Index among the image tokens (row-major over the patch grid) of the one patch under ``obj``."""
    x0, y0, x1, y1 = obj.bbox
    col, row = x0 // scenes.CELL, y0 // scenes.CELL
    assert ((x1 - 1) // scenes.CELL, (y1 - 1) // scenes.CELL) == (col, row), "shape spans two patches"
    return row * GRID + col


@pytest.fixture(scope="module")
def truth_cases(bundled):
    """For every shape that a colour or position question names: the language model's attention
    (layers, heads, 3 queries) over the 36 image tokens, renormalised to the image, with the shape's
    patch and the scene's empty patches. The queries: the shape's word, the prompt's last token
    (whose output is the generated answer token) and the answer token fed back."""
    processor, model = bundled
    exs = [e for e in scenes.generate(80, seed=123) if e.qtype in ("color", "position")]
    data = train_llava.encode(exs, processor)
    generated = train_llava.generate(model, data)
    cases = []
    for i, ex in enumerate(exs):
        start = int(data["prompt_len"][i])
        ids = torch.tensor([data["input_ids"][i, :start].tolist() + generated[i][:1]])
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=vilt_train.pixel_values(data["images"][i:i + 1]),
                        output_attentions=True)
        att = torch.stack(out.attentions)[:, 0].numpy()  # (L, H, n, n)
        image = slice(len(PROMPT_HEAD), len(PROMPT_HEAD) + N_IMAGE)
        occupied = {_shape_patch(o) for o in ex.scene.objects}
        empty = [k for k in range(N_IMAGE) if k not in occupied]
        for w, obj in ex.refs.items():
            word = len(PROMPT_HEAD) + N_IMAGE + w
            assert processor.tokenizer.convert_ids_to_tokens(int(ids[0, word])) == ex.scene.objects[obj].shape
            queries = att[:, :, [word, start - 1, start], image]  # (L, H, 3, 36)
            cases.append((queries / queries.sum(-1, keepdims=True), _shape_patch(ex.scene.objects[obj]), empty))
    return cases


def test_named_shape_or_answer_attends_to_the_shapes_patch(truth_cases):
    """For every named shape: in at least one head of the language model, the shape's word or the
    answer (the token that generates it, or the answer token itself) puts more than half of its
    image attention on the shape's patch; the word alone does so for most shapes; a control (a
    random empty patch of the same scene) almost never gets that. The bundled model, on these 48
    shapes: 0.98 (word alone 0.71), control 0.0 (at most 0.11)."""
    rng = np.random.default_rng(0)
    best = np.array([att[..., patch].max() for att, patch, _ in truth_cases])
    word = np.array([att[:, :, 0, patch].max() for att, patch, _ in truth_cases])
    control = np.array([att[..., rng.choice(empty)].max() for att, _, empty in truth_cases])
    assert len(truth_cases) >= 40
    assert (best > 0.5).mean() >= 0.95, np.round(best, 2)
    assert (word > 0.5).mean() >= 0.6, np.round(word, 2)
    assert (control > 0.5).mean() <= 0.05, np.round(control, 2)


def test_evidence_of_the_live_model_is_faithful_on_the_bundled_model():
    """bench/faithfulness.py -m hf --quick: through -m hf (its stored attention, rollout and relevancy rows
    of the prompt's last token, and Hf.mask_patches), removing the patches a map ranks first hurts the
    bundled model's answers more than a random order, and removing the last-ranked ones first hurts less.
    On 20 questions: positive AUC 0.35 for every map against 0.67 at random, negative 0.87 against 0.56."""
    aucs = faithfulness_aucs("-m", "hf", "--quick")
    for method in ("attention", "rollout", "relevancy"):
        assert aucs[("positive", method)] < aucs[("positive", "random")] - 0.1, aucs
        assert aucs[("negative", method)] > aucs[("negative", "random")] + 0.1, aucs
