"""Live models: the VL_Model interface, load_model, and the ViLT adapter on a tiny random checkpoint."""
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import app.database.models as models_pkg
from app.database.database import VliLmdb
from app.database.models import ImageLoadError, ModelLoadError, VL_Model, available_models, load_model, run_data_setup
from app.database.models.vl_model import load_image
from app.database.records import validate_record
from helpers import fast_tsne  # noqa: F401 (autouse fixture: t-SNE is A's, tested there)
from tiny_vilt import ANSWERS, VOCAB, build_tiny_vilt

PATCH = 16  # tiny_vilt: 16-px patches, shortest edge resized to 64 px
QUESTION = "what color is the circle ?"


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"))


@pytest.fixture(scope="module")
def vqa(vqa_dir):
    return load_model("vilt", [vqa_dir], progress=False)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A 50 x 80 image: resized to 64 x 102 -> cut to 64 x 96 -> 4 x 6 patches."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "pair.png"
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(path)
    return str(path)


def check_vilt_record(record, ex_id=0, grid=(4, 6), n_layers=2, n_heads=4, hidden=32):
    rows, cols = grid
    tokens, txt_len = record["tokens"], record["txt_len"]
    n = len(tokens)
    assert record["ex_id"] == ex_id
    assert tokens[0] == "[CLS]" and tokens[txt_len - 1] == "[SEP]"
    assert tokens[txt_len] == "[CLS]" and record["img_coords"][0] is None  # ViLT's image [CLS]
    coords = record["img_coords"][1:]
    assert len(record["img_coords"]) == n - txt_len
    assert len(set(coords)) == len(coords), "patch coordinates must be unique"
    assert all(0 <= x < cols and 0 <= y < rows for x, y in coords), "every patch inside the grid"
    assert coords == sorted(coords, key=lambda c: (c[1], c[0])), "patches in row-major order"
    assert record["image"].shape == (rows * PATCH, cols * PATCH, 3) and record["image"].dtype == np.uint8
    assert record["attention"].shape == (n_layers, n_heads, n, n)
    np.testing.assert_allclose(record["attention"].sum(-1), 1.0, atol=1e-4)
    assert record["hidden_states"].shape == (n_layers + 1, n, hidden)
    validate_record(record)


# --------------------------------------------------------------------------------------------- images
def test_load_image_converts_to_rgb_uint8(tmp_path):
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (7, 5), (10, 20, 30, 40)).save(rgba)
    grey = tmp_path / "g.jpg"
    Image.new("L", (4, 3), 99).save(grey)
    a, g = load_image(rgba), load_image(str(grey))
    assert a.shape == (5, 7, 3) and a.dtype == np.uint8 and tuple(a[0, 0]) == (10, 20, 30)
    assert g.shape == (3, 4, 3) and g.dtype == np.uint8


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(truncated)


def test_vl_model_is_abstract():
    with pytest.raises(TypeError):
        VL_Model()

    class NoSetup(VL_Model):
        pass

    with pytest.raises(TypeError):
        NoSetup()


# --------------------------------------------------------------------------------------------- load_model
@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A folder searched by load_model like app/database/models/, for modules a test writes."""
    folder = tmp_path / "user_models"
    folder.mkdir()
    monkeypatch.setattr(models_pkg, "__path__", [*models_pkg.__path__, str(folder)])
    written = []

    def write(name, source):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(f"app.database.models.{name}")

    yield write
    for module in written:
        sys.modules.pop(module, None)


USER_MODEL = """
    import numpy as np
    from app.database.models.vl_model import VL_Model

    class My_Model(VL_Model):
        '''A user's model: 2 x 2 patches, random attention, "red" as the answer.'''

        def __init__(self, n_layers, answer="red"):
            self.n_layers = int(n_layers)
            self.answer = answer

        def data_setup(self, ex_id, image_location, input_text):
            image = self.load_image(image_location)
            tokens = ["[CLS]"] + input_text.split() + ["[SEP]"] + ["IMG"] * 4
            n, txt_len = len(tokens), len(input_text.split()) + 2
            rng = np.random.default_rng(ex_id)
            att = rng.random((self.n_layers, 2, n, n)).astype(np.float32)
            return {"ex_id": ex_id, "image": image, "tokens": tokens, "txt_len": txt_len,
                    "img_coords": [(0, 0), (1, 0), (0, 1), (1, 1)],
                    "attention": att / att.sum(-1, keepdims=True),
                    "hidden_states": rng.normal(size=(self.n_layers + 1, n, 8)).astype(np.float32),
                    "prediction": {"answer": self.answer, "score": 0.9, "label": None}}
"""


def test_custom_user_model_end_to_end(user_models, image_path, tmp_path):
    user_models("my_model", USER_MODEL)
    model = load_model("my_model", ["3"], progress=False)
    assert type(model).__name__ == "My_Model" and model.n_layers == 3
    record = run_data_setup(model, 5, image_path, "what color", label=" Red ")
    assert record["accuracy"] is True and record["prediction"]["label"] == " Red "
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        assert db.add_record(record) == 5
        info = db.example(5)
        assert info.accuracy is True and info.grid == (2, 2) and db.n_layers == 3
    finally:
        db.close()


def test_load_model_errors_are_one_line(user_models):
    user_models("no_class", "x = 1\n")
    user_models("not_sub", "class Not_Sub:\n    def __init__(self, *a): pass\n")
    user_models("broken", "import this_package_does_not_exist_c2\n")
    user_models("raises", """
        from app.database.models.vl_model import VL_Model
        class Raises(VL_Model):
            def __init__(self, path):
                raise OSError(f"no checkpoint at {path}\\n(details)")
            def data_setup(self, ex_id, image_location, input_text):
                return {}
    """)
    cases = {
        ("nosuchmodel", ()): "no model module app/database/models/nosuchmodel.py",
        ("no_class", ()): "defines no class No_Class",
        ("not_sub", ()): "is not a subclass of app.database.models.vl_model.VL_Model",
        ("broken", ()): "needs 'this_package_does_not_exist_c2'",
        ("raises", ("/nowhere",)): "cannot load model Raises(/nowhere): no checkpoint at /nowhere (details)",
        ("../etc", ()): "invalid model name",
        ("capture", ()): "app/database/models/capture.py is not a model",
    }
    for (name, params), expected in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_model(name, params, progress=False)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    with pytest.raises(ModelLoadError, match="available: .*vilt"):
        load_model("nosuchmodel", [], progress=False)
    assert "capture" not in available_models() and "vl_model" not in available_models()


def test_load_model_reports_progress(vqa_dir, capsys):
    load_model("VILT", [vqa_dir])  # the name is case-insensitive: module vilt, class Vilt
    err = capsys.readouterr().err
    assert "Loading model Vilt(" in err and "Loaded model Vilt in" in err


def test_vilt_bad_checkpoint_is_a_model_load_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(ModelLoadError, match=f"cannot load model Vilt.*no checkpoint directory {missing}"):
        load_model("vilt", [missing], progress=False)
    (tmp_path / "shapes").mkdir()
    monkeypatch.chdir(tmp_path)  # "shapes/vilt" names a folder of an existing folder: a path, not a Hub id
    with pytest.raises(ModelLoadError, match="no checkpoint directory shapes/vilt"):
        load_model("vilt", ["shapes/vilt"], progress=False)
    not_vilt = tmp_path / "bert"
    not_vilt.mkdir()
    (not_vilt / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="a 'bert' checkpoint, not a ViLT one"):
        load_model("vilt", [str(not_vilt)], progress=False)


# --------------------------------------------------------------------------------------------- ViLT
def test_vilt_vqa_record(vqa, image_path, tmp_path):
    record = vqa.data_setup(0, image_path, QUESTION, label="red")
    check_vilt_record(record)
    assert record["tokens"][: record["txt_len"]] == ["[CLS]", *QUESTION.split(), "[SEP]"]
    assert record["text"] == QUESTION
    pred = record["prediction"]
    assert pred["answer"] in ANSWERS and 0.0 < pred["score"] < 1.0 and pred["label"] == "red"
    assert record["accuracy"] == (pred["answer"] == "red")
    assert "accuracy" not in vqa.data_setup(1, image_path, QUESTION)
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        assert db.add_record(record) == 0
        info = db.example(0)
        assert info.grid == (4, 6) and info.image_size == (64, 96)
        assert info.prediction["answer"] == pred["answer"] and info.text == QUESTION
        assert db.n_layers == 2 and db.n_heads == 4
    finally:
        db.close()


@pytest.mark.parametrize("problem_type", [None, "single_label_classification"])
def test_vilt_vqa_score_is_the_answer_probability(tmp_path, image_path, problem_type):
    """The score is the top answer's probability from the stock forward pass (patches in ViLT's own
    order): a sigmoid per answer, as ViLT's VQA heads are trained, or a softmax over the answers
    for a checkpoint trained with one label per question (the bundled shapes model)."""
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltProcessor

    path = build_tiny_vilt(tmp_path / "vqa")
    if problem_type:
        config = ViltConfig.from_pretrained(path)
        config.problem_type = problem_type
        config.save_pretrained(path)
    model = load_model("vilt", [path], progress=False)
    pred = model.data_setup(0, image_path, QUESTION)["prediction"]
    enc = ViltProcessor.from_pretrained(path)(images=Image.open(image_path).convert("RGB"), text=QUESTION,
                                              return_tensors="pt")
    with torch.no_grad():
        logits = ViltForQuestionAnswering.from_pretrained(path).eval()(**enc).logits[0].double().numpy()
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() if problem_type \
        else 1 / (1 + np.exp(-logits))
    assert pred["answer"] == ANSWERS[int(probs.argmax())]
    assert pred["score"] == pytest.approx(probs.max(), abs=1e-5)


def test_vilt_recovers_the_shuffled_patch_order(vqa, image_path):
    """visual_embed shuffles the patches with torch.multinomial; the record must not depend on it."""
    pixel = torch.rand(1, 3, 64, 96)
    mask = torch.ones(1, 64, 96, dtype=torch.long)
    emb = vqa.vilt.embeddings
    orders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        orders.append(emb.visual_embed(pixel, mask, max_image_length=-1)[2][0][0].tolist())
    assert orders[0] != orders[1], "precondition: ViLT really shuffles the patches"
    torch.manual_seed(1)
    a = vqa.data_setup(0, image_path, QUESTION)
    torch.manual_seed(2)
    b = vqa.data_setup(0, image_path, QUESTION)
    assert a["img_coords"] == b["img_coords"] and a["tokens"] == b["tokens"]
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-5)
    np.testing.assert_allclose(a["hidden_states"], b["hidden_states"], atol=1e-4)
    assert a["prediction"]["answer"] == b["prediction"]["answer"]


def test_vilt_coordinates_name_the_real_patches(vqa_dir, image_path):
    """With position embeddings zeroed, a patch token's embedding is the projection of its pixels."""
    model = load_model("vilt", [vqa_dir], progress=False)
    emb = model.vilt.embeddings
    with torch.no_grad():
        emb.position_embeddings.zero_()
    record = model.data_setup(0, image_path, QUESTION)
    pixels = model.processor(images=load_image(image_path), text=QUESTION, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        projected = emb.patch_embeddings.projection(pixels)[0]  # (d, rows, cols)
        image_type = emb.token_type_embeddings.weight[1]
        expected_cls = (emb.cls_token[0, 0] + image_type).numpy()
        projected, image_type = projected.numpy(), image_type.numpy()
    layer0 = record["hidden_states"][0]
    txt_len = record["txt_len"]
    np.testing.assert_allclose(layer0[txt_len], expected_cls, atol=1e-5)
    for i, (x, y) in enumerate(record["img_coords"][1:]):
        expected = projected[:, y, x] + image_type
        np.testing.assert_allclose(layer0[txt_len + 1 + i], expected, atol=1e-4, err_msg=f"patch ({x}, {y})")


def test_vilt_stores_the_image_the_model_saw(vqa, image_path):
    record = vqa.data_setup(0, image_path, QUESTION)
    pixels = vqa.processor(images=load_image(image_path), text=QUESTION, return_tensors="pt")["pixel_values"]
    seen = ((pixels[0].numpy() * 0.5 + 0.5) * 255).transpose(1, 2, 0)  # mean = std = 0.5 in tiny_vilt
    assert np.abs(record["image"].astype(float) - seen).max() <= 0.51
    # the stored image is already at the model's size: processing it again changes nothing
    again = vqa.processor(images=record["image"], text=QUESTION, return_tensors="pt")["pixel_values"]
    assert again.shape == pixels.shape


@pytest.mark.parametrize("head", ["ViltForImageAndTextRetrieval", "ViltForMaskedLM", "ViltModel"])
def test_vilt_other_heads(head, tmp_path, image_path):
    model = load_model("vilt", [build_tiny_vilt(tmp_path / head, head=head)], progress=False)
    assert model.architecture == head
    text = "what color is the [MASK] ?" if head == "ViltForMaskedLM" else QUESTION
    record = model.data_setup(3, image_path, text, label="match")
    check_vilt_record(record, ex_id=3)
    pred = record.get("prediction")
    if head == "ViltModel":
        assert pred is None and "accuracy" not in record
    elif head == "ViltForImageAndTextRetrieval":
        assert pred["answer"] in ("match", "no match") and np.isfinite(pred["score"])
        assert record["accuracy"] == (pred["answer"] == "match")
    else:
        assert pred["answer"] in VOCAB and 0 < pred["score"] <= 1
    if head == "ViltForMaskedLM":  # no [MASK]: nothing to predict
        assert "prediction" not in model.data_setup(4, image_path, QUESTION)


def test_vilt_max_image_length_samples_patches(tmp_path, image_path):
    model = load_model("vilt", [build_tiny_vilt(tmp_path / "m", max_image_length=10)], progress=False)
    record = model.data_setup(0, image_path, QUESTION)
    check_vilt_record(record)
    assert len(record["img_coords"]) == 1 + 10


def test_vilt_truncates_long_text(vqa, image_path):
    record = vqa.data_setup(0, image_path, " ".join(["red circle"] * 40))
    assert record["txt_len"] == 40 and record["tokens"][39] == "[SEP]"
    check_vilt_record(record)


def test_vilt_unreadable_image(vqa, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        vqa.data_setup(0, str(bad), QUESTION)


def test_vilt_unsupported_head(tmp_path):
    path = build_tiny_vilt(tmp_path / "tok", head="ViltForTokenClassification")
    with pytest.raises(ModelLoadError, match="unsupported ViLT head ViltForTokenClassification"):
        load_model("vilt", [path], progress=False)


def test_the_custom_model_in_docs_works(user_models, image_path, tmp_path):
    """docs/models.md's "Your own model class" example, as a user would save it."""
    import os
    import re

    docs = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "models.md")).read()
    source = next(block for block in re.findall(r"```python\n(.*?)```", docs, re.S)
                  if block.startswith("# app/database/models/my_model.py"))
    user_models("my_model", source)
    model = load_model("my_model", ["2"], progress=False)
    record = run_data_setup(model, 0, image_path, "what color is it", label="red")
    assert record["accuracy"] is True
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        assert db.add_record(record) == 0 and db.example(0).grid == (2, 2)
    finally:
        db.close()


# --------------------------------------------------------------------------------------------- item 9, 14, 21, 24
def test_load_model_says_which_parameters_the_class_takes(user_models):
    user_models("two_args", """
        from app.database.models.vl_model import VL_Model
        class Two_Args(VL_Model):
            def __init__(self, path, n_layers=2, *extra):
                pass
            def data_setup(self, ex_id, image_location, input_text):
                return {}
    """)
    with pytest.raises(ModelLoadError) as info:
        load_model("vilt", [], progress=False)
    assert str(info.value) == "Vilt needs CHECKPOINT [DEVICE]: -m vilt CHECKPOINT [DEVICE]"
    with pytest.raises(ModelLoadError, match=r"^Vilt needs CHECKPOINT \[DEVICE\]"):
        load_model("vilt", ["a", "cpu", "extra"], progress=False)
    with pytest.raises(ModelLoadError) as info:
        load_model("two_args", [], progress=False)
    assert str(info.value) == "Two_Args needs PATH [N_LAYERS] [EXTRA ...]: -m two_args PATH [N_LAYERS] [EXTRA ...]"


def test_dimensions_and_input_hint(vqa, vqa_dir, image_path, tmp_path, user_models):
    record = vqa.data_setup(0, image_path, QUESTION)
    n_layers, n_heads = record["attention"].shape[:2]
    assert vqa.dimensions() == (n_layers, n_heads, record["hidden_states"].shape[2]) == (2, 4, 32)
    assert vqa.input_hint() is None
    import json
    import shutil

    hinted = tmp_path / "hinted"
    shutil.copytree(vqa_dir, hinted)
    config = json.loads((hinted / "config.json").read_text())
    config["vl_interpret_hint"] = "  scenes like those in data/val/\n(64×96)  "
    (hinted / "config.json").write_text(json.dumps(config))
    assert load_model("vilt", [str(hinted)], progress=False).input_hint() == "scenes like those in data/val/ (64×96)"
    user_models("my_model", USER_MODEL)
    user = load_model("my_model", ["3"], progress=False)
    assert user.dimensions() is None and user.input_hint() is None  # VL_Model's defaults: unknown


def test_vilt_grid_is_the_whole_grid_when_patches_are_sampled(tmp_path, image_path):
    """With max_image_length, the sampled patches may miss the last row or column: the grid is
    still the image's 4 x 6 (64 x 96 px in 16-px patches), not guessed from the largest coordinate."""
    model = load_model("vilt", [build_tiny_vilt(tmp_path / "m", max_image_length=3)], progress=False)
    for seed in range(20):
        torch.manual_seed(seed)
        record = model.data_setup(0, image_path, QUESTION)
        coords = record["img_coords"][1:]
        if max(x for x, _ in coords) < 5 or max(y for _, y in coords) < 3:
            break
    else:
        pytest.fail("no sample of 3 patches missed the last row or column")
    assert record["grid"] == (64 // PATCH, 96 // PATCH) == (4, 6)
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        db.add_record(record)
        assert db.example(0).grid == (4, 6)
    finally:
        db.close()


def test_vilt_stores_the_text_the_model_saw_and_says_what_was_cut(vqa, image_path, tmp_path):
    record = vqa.data_setup(0, image_path, " ".join(["red circle"] * 40))  # 80 words; 40 tokens kept
    assert record["txt_len"] == 40
    kept = record["tokens"][1:39]  # between [CLS] and [SEP]
    assert kept == ["red", "circle"] * 19 and record["text"] == " ".join(["red circle"] * 19)
    (note,) = record["notes"]
    assert note.startswith("the text was cut to the model's 40 tokens: 'red circle red circle")
    assert note.endswith("…' was left out") and len(note) < 300  # 21 x "red circle" left out, quoted in part
    assert "notes" not in vqa.data_setup(0, image_path, QUESTION)
    db = VliLmdb(tmp_path / "db", read_only=False)
    try:
        db.add_record(record)
        assert db.example(0).text == record["text"] and list(db.example(0).notes) == [note]
    finally:
        db.close()


def test_vilt_never_stores_padding(vqa, image_path, monkeypatch):
    """A processor that pads (a checkpoint's settings) gives the same record as one that does not."""
    plain = vqa.data_setup(0, image_path, QUESTION)

    class Padding:
        def __init__(self, inner):
            self.inner, self.tokenizer, self.image_processor = inner, inner.tokenizer, inner.image_processor

        def __call__(self, **kwargs):
            return self.inner(**{**kwargs, "padding": "max_length"})

    monkeypatch.setattr(vqa, "processor", Padding(vqa.processor))
    padded = vqa.data_setup(0, image_path, QUESTION)
    assert "[PAD]" not in padded["tokens"] and padded["tokens"] == plain["tokens"]
    assert padded["txt_len"] == len(QUESTION.split()) + 2
    np.testing.assert_allclose(padded["attention"], plain["attention"], atol=1e-5)


def test_vilt_stores_the_gradient_relevancy_of_its_answer(vqa, image_path, tmp_path):
    """Chefer et al.'s relevancy (app.database.analysis, checked against autograd there) for the top
    answer's logit, in the stored token order: the same whatever order visual_embed shuffled the
    patches into, which a wrong permutation would break."""
    torch.manual_seed(1)
    a = vqa.data_setup(0, image_path, QUESTION)
    torch.manual_seed(2)
    b = vqa.data_setup(0, image_path, QUESTION)
    n = len(a["tokens"])
    assert a["relevancy"].shape == (n, n)
    np.testing.assert_allclose(a["relevancy"], b["relevancy"], rtol=1e-4, atol=1e-6)
    assert (a["relevancy"] >= 0).all() and np.all(np.diag(a["relevancy"]) >= 1 - 1e-6)  # R = I + ...
    assert not np.allclose(a["relevancy"], np.eye(n))
    db = VliLmdb(tmp_path / "db", read_only=False)
    db.add_record(a)
    np.testing.assert_allclose(db.relevancy(0, [0]), a["relevancy"][0], rtol=1e-6)
    assert db.relevancy(0, [0, 1]).shape == (n,)
    db.close()


def test_vilt_logit_lens_reproduces_the_answer_at_the_last_layer(vqa, image_path, tmp_path):
    record = vqa.data_setup(0, image_path, QUESTION)
    lens = record["logit_lens"]
    assert len(lens) == len(record["hidden_states"])  # embeddings, then every layer
    last_answer, last_probability = lens[-1][0]
    assert last_answer == record["prediction"]["answer"]
    assert last_probability == pytest.approx(record["prediction"]["score"], rel=1e-6)
    # independently: the stock model's own head on each layer's [CLS] state
    with torch.no_grad():
        hidden = torch.tensor(record["hidden_states"][1][None])  # stored order keeps [CLS] first
        logits = vqa.net.classifier(vqa.vilt.pooler(vqa.vilt.layernorm(hidden)))[0]
    probs = torch.sigmoid(logits)
    assert lens[1][0][0] == vqa.config.id2label[int(probs.argmax())]
    assert lens[1][0][1] == pytest.approx(float(probs.max()), rel=1e-5)
    db = VliLmdb(tmp_path / "db", read_only=False)
    db.add_record(record)
    assert db.example(0).logit_lens == [[[a, pytest.approx(p)] for a, p in layer] for layer in lens]
    db.close()
