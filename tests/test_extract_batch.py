"""``--batch-size``: the batch contract of VL_Model, ``Hf``'s batched generation, and the extractor with it.

For every ``-m hf`` family (tiny random checkpoints built offline by the builders of tests/test_hf_llava.py
and tests/test_hf_qwen_idefics.py), the records of one ``data_setup_batch`` call must be the records of the
same pairs run alone, field by field: the same tokens, layout and answer, and attention, hidden states and
relevancy equal at the float16 the database stores (one float16 step either way: the padded batch sums
over other lengths). A pair whose image is broken fails alone inside the batch.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_tiny import random_image
from PIL import Image
from test_hf_llava import BUILDERS as LLAVA_BUILDERS
from test_hf_qwen_idefics import FAMILIES as QWEN_IDEFICS_FAMILIES
from test_hf_qwen_idefics import QwenTestProcessor

import app.database.models.hf as hf_module
from app.database import extract as extract_mod
from app.database.database import VliLmdb
from app.database.models import _hf_batch, load_model, run_data_setup
from app.database.models.vl_model import ImageLoadError, VL_Model, run_data_setup_batch
from helpers import fast_tsne  # noqa: F401 (autouse fixture: t-SNE is tested elsewhere)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # PaliGemma's processor
FLOAT16_STEP = dict(rtol=2.0 ** -10, atol=2.0 ** -14)  # one float16 rounding either way
MAX_NEW_TOKENS = 4
TEXTS = ["what color is the square ?", "what is the circle ?", "is the square red ?", "what ?",
         "the circle is a square ?"]
# sizes that LLaVA-NeXT and Idefics3 cut into different numbers of tiles (so several batches of them)
SIZES = [(40, 60), (16, 72), (72, 16), (30, 50), (56, 56)]
ONE_BATCH = ("llava", "paligemma", "qwen2_vl", "qwen2_5_vl")  # fixed views, or flattened patches
FAMILIES = sorted(LLAVA_BUILDERS) + sorted(QWEN_IDEFICS_FAMILIES)


def _build(model_type: str, folder) -> str:
    torch.manual_seed(0)
    if model_type in LLAVA_BUILDERS:
        model, processor = LLAVA_BUILDERS[model_type](folder)
        model.generation_config.eos_token_id = 3
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return str(folder)
    checkpoint = folder / "checkpoint"
    QWEN_IDEFICS_FAMILIES[model_type][0](str(checkpoint), model_type)
    return str(checkpoint)


def _load(model_type: str, checkpoint: str, *options: str):
    with pytest.MonkeyPatch.context() as patch:
        if model_type.startswith("qwen"):  # Qwen2VLProcessor needs torchvision: the tests' stand-in
            patch.setattr(hf_module, "AutoProcessor", QwenTestProcessor)
        return load_model("hf", [checkpoint, "cpu", f"max_new_tokens={MAX_NEW_TOKENS}", *options], progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, (height, width) in enumerate(SIZES):
        paths.append(str(folder / f"{k}.png"))
        Image.fromarray(random_image(height, width, seed=k)).save(paths[-1])
    (folder / "broken.png").write_text("not a PNG")
    return paths, str(folder / "broken.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(model_type)``: the folder of that family's tiny checkpoint, built when first asked for."""
    built = {}

    def folder(model_type: str) -> str:
        if model_type not in built:
            built[model_type] = _build(model_type, tmp_path_factory.mktemp(model_type))
        return built[model_type]

    return folder


def _items(images, broken_at: int | None = 2):
    paths, broken = images
    items = [(10 + k, path, text, "red") for k, (path, text) in enumerate(zip(paths, TEXTS))]
    if broken_at is not None:
        items.insert(broken_at, (99, broken, "what color is the square ?", None))
    return items


def _spy_on_generate(monkeypatch, hf) -> list:
    """The batch size of every ``generate`` call made from now on."""
    rows, real = [], hf.generate

    def generate(inputs, **kwargs):
        rows.append(int(inputs["input_ids"].shape[0]))
        return real(inputs, **kwargs)

    monkeypatch.setattr(hf, "generate", generate)
    return rows


def assert_same_record(alone: dict, batched: dict) -> None:
    assert sorted(batched) == sorted(alone)
    for key, expected in alone.items():
        got = batched[key]
        if isinstance(expected, np.ndarray) and expected.dtype.kind == "f":
            assert got.shape == expected.shape, key
            np.testing.assert_allclose(got.astype(np.float16).astype(np.float32),
                                       expected.astype(np.float16).astype(np.float32), err_msg=key, **FLOAT16_STEP)
        elif isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(got, expected, err_msg=key)
        elif key == "prediction":
            assert {**got, "score": None} == {**expected, "score": None}
            assert got["score"] == pytest.approx(expected["score"], rel=1e-5)
        elif key in ("logit_lens", "patch_lens"):  # per layer, [[word, probability], ...]
            assert [[w for w, _ in layer] for layer in got] == [[w for w, _ in layer] for layer in expected], key
            np.testing.assert_allclose([[p for _, p in layer] for layer in got],
                                       [[p for _, p in layer] for layer in expected], atol=1e-6, err_msg=key)
        else:
            assert got == expected, key


@pytest.mark.parametrize("model_type", FAMILIES)
def test_batched_records_are_the_records_of_the_pairs_run_alone(model_type, checkpoint, images, monkeypatch):
    hf = _load(model_type, checkpoint(model_type))
    items = _items(images)
    alone = [run_data_setup(hf, *item) for item in items if item[0] != 99]
    rows = _spy_on_generate(monkeypatch, hf)
    batched = run_data_setup_batch(hf, items)

    assert len(batched) == len(items)
    assert isinstance(batched[2], ImageLoadError) and "broken.png" in str(batched[2])  # fails alone
    assert sum(rows) == len(alone)
    if model_type in ONE_BATCH:
        assert rows == [len(alone)]
    else:  # one batch per number of tiles, and some of them really batched
        assert len(rows) > 1 and max(rows) > 1
    for expected, got in zip(alone, batched[:2] + batched[3:]):
        assert got["ex_id"] == expected["ex_id"] and "relevancy" in got and got["accuracy"] is not None
        assert_same_record(expected, got)


def test_answers_of_different_lengths_share_a_batch(checkpoint, images, monkeypatch):
    """A second end token that some pairs generate at once, some later and some never: a row that has
    ended goes on being padded in the batch, and each record stops where its pair alone stops."""
    hf = _load("llava", checkpoint("llava"))
    tokenizer = hf.processor.tokenizer
    hf.model.generation_config.eos_token_id = [3, tokenizer.convert_tokens_to_ids("USER:")]
    items = _items(images, broken_at=None)
    alone = [run_data_setup(hf, *item) for item in items]
    lengths = [record["generated"] for record in alone]
    assert 0 in lengths and MAX_NEW_TOKENS in lengths and len(set(lengths)) >= 3, lengths  # what is tested
    rows = _spy_on_generate(monkeypatch, hf)
    batched = run_data_setup_batch(hf, items)
    assert rows == [len(items)]  # one batch, not the one-by-one fallback
    for expected, got in zip(alone, batched):
        assert_same_record(expected, got)
    assert "relevancy" not in batched[lengths.index(0)]  # nothing generated, nothing to explain


def test_a_batch_that_fails_as_a_whole_runs_its_pairs_alone(checkpoint, images, monkeypatch):
    hf = _load("llava", checkpoint("llava"), "relevancy=0")
    items = _items(images)
    alone = [run_data_setup(hf, *item) for item in items if item[0] != 99]
    real = hf.generate

    def out_of_memory_for_batches(inputs, **kwargs):
        if inputs["input_ids"].shape[0] > 1:
            raise RuntimeError("out of memory")
        return real(inputs, **kwargs)

    monkeypatch.setattr(hf, "generate", out_of_memory_for_batches)
    batched = run_data_setup_batch(hf, items)
    assert isinstance(batched[2], ImageLoadError)
    for expected, got in zip(alone, batched[:2] + batched[3:]):
        assert "relevancy" not in got
        assert_same_record(expected, got)


def test_padding_that_receives_attention_fails_the_batch():
    """(batch 2, heads 1, queries 3, keys 3): row 0 has 2 real tokens and gives its pad column nothing;
    row 1's second query gives the pad column 0.1."""
    weights = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]]] * 2)[:, None]
    weights[1, 0, 1] = torch.tensor([0.2, 0.7, 0.1])
    _hf_batch._check_no_padding_attended(7, [weights], 0, 2)
    with pytest.raises(RuntimeError, match="example 8: 0.1 of a query's attention reached the padding"):
        _hf_batch._check_no_padding_attended(8, [weights], 1, 2)
    _hf_batch._check_no_padding_attended(9, [weights], 1, 3)  # a row without padding


def test_collate_pads_per_position_tensors_and_concatenates_the_others():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.full((1, 3, 2, 2), 1.0)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.full((1, 3, 2, 2), 2.0)}
    left = _hf_batch._collate([a, b], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    right = _hf_batch._collate([a, b], pad_id=0, left=False)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert _hf_batch._batch_signature(a) == _hf_batch._batch_signature(b)
    tiled = {**b, "pixel_values": torch.zeros(1, 5, 3, 2, 2)}
    assert _hf_batch._batch_signature(tiled) != _hf_batch._batch_signature(b)


# ------------------------------------------------------------------------ the contract, on hand-made models
class Shouting(VL_Model):
    """Answers the text in capitals; an image path containing "bad" is unreadable. No ``label`` argument,
    so the label and the accuracy are filled in by run_data_setup(_batch)."""

    def data_setup(self, ex_id, image_location, input_text):
        if "bad" in image_location:
            raise ImageLoadError(f"image not found: {image_location}")
        return {"ex_id": -1, "prediction": {"answer": input_text.upper(), "score": 1.0}}


ITEMS = [(0, "a.png", "red"), (1, "bad.png", "blue"), (2, "c.png", "green", "GREEN"), (3, "d.png", "x", "y")]


def _expected(ex_id, text, label):
    return {"ex_id": ex_id, "prediction": {"answer": text.upper(), "score": 1.0, **({"label": label} if label else {})},
            **({"accuracy": text.upper() == label.upper()} if label else {})}


def test_default_batch_runs_the_pairs_one_by_one_and_a_bad_pair_fails_alone():
    results = run_data_setup_batch(Shouting(), ITEMS)
    assert isinstance(results[1], ImageLoadError) and "bad.png" in str(results[1])
    assert results[0] == _expected(0, "red", None)
    assert results[2] == _expected(2, "green", "GREEN") and results[2]["accuracy"] is True
    assert results[3] == _expected(3, "x", "y") and results[3]["accuracy"] is False
    assert results[2] == run_data_setup(Shouting(), 2, "c.png", "green", label="GREEN")


def test_a_batch_method_that_raises_falls_back_to_one_by_one():
    class Failing(Shouting):
        def data_setup_batch(self, items):
            raise RuntimeError("out of memory")

    assert [str(r) if isinstance(r, Exception) else r for r in run_data_setup_batch(Failing(), ITEMS)] == \
           [str(r) if isinstance(r, Exception) else r for r in run_data_setup_batch(Shouting(), ITEMS)]


def test_a_batch_method_that_breaks_its_contract_fails_every_pair():
    class Short(Shouting):
        def data_setup_batch(self, items):
            return []

    class NotRecords(Shouting):
        def data_setup_batch(self, items):
            return ["record"] * len(items)

    results = run_data_setup_batch(Short(), ITEMS)
    assert all(isinstance(r, TypeError) and "returned 0 entries for 4 pairs" in str(r) for r in results)
    results = run_data_setup_batch(NotRecords(), ITEMS)
    assert all(isinstance(r, TypeError) and "returned str, not a dict" in str(r) for r in results)
    with pytest.raises(ValueError, match=r"expected items \(ex_id, image_location, text\[, label\]\)"):
        run_data_setup_batch(Shouting(), [(0, "a.png")])


# ------------------------------------------------------------------------ the extractor with --batch-size
LINES = [
    {"image": "0.png", "text": TEXTS[0], "label": "red"},
    {"image": "1.png", "text": TEXTS[1]},
    "{not json",
    {"image": "broken.png", "text": TEXTS[2]},
    {"image": "2.png"},
    "",
    {"image": "3.png", "text": TEXTS[3], "label": "a"},
    {"image": "4.png", "text": TEXTS[4]},
]


def _pairs_file(folder, images):
    path = folder / "pairs.jsonl"
    base = images[1].rsplit("/", 1)[0]
    lines = [line if isinstance(line, str) else json.dumps({**line, "image": f"{base}/{line['image']}"})
             for line in LINES]
    path.write_text("\n".join(lines) + "\n")
    return path


def _stored(out):
    """Per example: tokens, prediction, and every layer's attention and hidden states as the database reads them."""
    db = VliLmdb(out)
    try:
        return {i: (db.example(i).tokens, db.example(i).prediction,
                    [db.attention_matrix(i, layer, head) for layer in range(db.n_layers) for head in range(db.n_heads)],
                    [db.hidden_states(i, layer) for layer in range(db.n_layers + 1)])
                for i in db.example_ids()}
    finally:
        db.close()


def _extract(checkpoint, pairs, out, *extra):
    return extract_mod.main(["-m", "hf", checkpoint, f"max_new_tokens={MAX_NEW_TOKENS}", "--pairs", str(pairs),
                             "--out", str(out), "--no-progress", *extra])


def test_extract_with_batch_size_stores_and_reports_what_batch_size_1_does(checkpoint, images,
                                                                           tmp_path, capsys):
    checkpoint = checkpoint("llava")
    pairs = _pairs_file(tmp_path, images)
    assert _extract(checkpoint, pairs, tmp_path / "one") == 1
    one = capsys.readouterr().err
    assert _extract(checkpoint, pairs, tmp_path / "three", "--batch-size", "3") == 1
    three = capsys.readouterr().err
    summary = "4 added, 0 already in the database, 3 failed"
    assert summary in one and summary in three
    failed = [line for line in one.splitlines() if line.startswith("  line ")]
    assert len(failed) == 3 and failed == [line for line in three.splitlines() if line.startswith("  line ")]
    stored_one, stored_three = _stored(tmp_path / "one"), _stored(tmp_path / "three")
    assert sorted(stored_one) == sorted(stored_three) == [0, 1, 6, 7]  # example id = line number - 1
    for ex_id, (tokens, prediction, attention, hidden) in stored_one.items():
        tokens3, prediction3, attention3, hidden3 = stored_three[ex_id]
        assert tokens3 == tokens and prediction3 == {**prediction, "score": prediction3["score"]}
        assert prediction3["score"] == pytest.approx(prediction["score"], rel=1e-5)
        for expected, got in zip(attention + hidden, attention3 + hidden3):
            np.testing.assert_allclose(got, expected, **FLOAT16_STEP)


def test_batched_extraction_resumes_after_an_interruption(checkpoint, images, tmp_path,
                                                          monkeypatch, capsys):
    checkpoint = checkpoint("llava")
    pairs = _pairs_file(tmp_path, images)
    batches, real = [], extract_mod.run_data_setup_batch

    def interrupted(model, items):
        if batches:
            raise KeyboardInterrupt
        batches.append([item[0] for item in items])
        return real(model, items)

    monkeypatch.setattr(extract_mod, "run_data_setup_batch", interrupted)
    assert _extract(checkpoint, pairs, tmp_path / "db", "--batch-size", "2") == 130
    assert batches == [[0, 1]]
    assert sorted(_stored(tmp_path / "db")) == [0, 1]
    monkeypatch.setattr(extract_mod, "run_data_setup_batch", real)
    capsys.readouterr()
    assert _extract(checkpoint, pairs, tmp_path / "db", "--batch-size", "2") == 1
    assert "2 added, 2 already in the database, 3 failed" in capsys.readouterr().err
    assert sorted(_stored(tmp_path / "db")) == [0, 1, 6, 7]


def test_a_torchrun_shard_with_batches_takes_the_same_lines(checkpoint, images, tmp_path):
    hf = _load("llava", checkpoint("llava"), "relevancy=0")
    pairs = _pairs_file(tmp_path, images)
    reports = {}
    for batch_size in (1, 2):
        out = tmp_path / f"shard-{batch_size}"
        db = VliLmdb(out, read_only=False)
        try:
            reports[batch_size] = extract_mod.extract(hf, str(pairs), db, str(out), first_id=10, progress=False,
                                                      log=lambda msg: None, rank=1, world=2, batch_size=batch_size)
        finally:
            db.close()
    assert reports[2] == reports[1]
    assert reports[2].added == [11, 17] and sorted(reports[2].failed) == [4]  # lines 2, 4, 6, 8: 6 is blank


def test_batch_size_must_be_positive(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    for value in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as stop:
            extract_mod.main(["-m", "hf", "x", "--pairs", str(pairs), "--out", str(tmp_path / "db"),
                              "--batch-size", value])
        assert stop.value.code == 2
        assert f"--batch-size: expected a positive integer, got {value!r}" in capsys.readouterr().err
