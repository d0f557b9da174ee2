"""Interventions on a tiny ViLT: head ablation, patch removal and activation patching against
computations made without the adapter's hooks, hooks always removed, and the cached results of
app.interventions read from a database of the model's records."""
import copy
import time

import numpy as np
import pytest
import torch
from PIL import Image

from app import figures
from app.database.database import VliLmdb
from app.database.models import load_model
from app.interventions import FRACTIONS, InterventionError, Interventions, patching_columns, stored_input
from helpers import fast_tsne  # noqa: F401 (autouse: t-SNE is tested elsewhere)
from test_figures import decode
from tiny_vilt import build_tiny_vilt

QUESTIONS = ["what color is the circle ?", "what color is the square ?", "how many are there ?"]


def sensitive(model):
    """The tiny random ViLT with its attention outputs scaled up, so that zeroing a head or patching
    a state moves the logits well beyond float noise (at init the residual stream hides the heads)."""
    with torch.no_grad():
        for layer in model.vilt.encoder.layer:
            layer.attention.output.dense.weight *= 40
        model.net.classifier[-1].weight *= 20
    return model


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
    return sensitive(load_model("vilt", [build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"))], progress=False))


def write_image(path, seed, size=(80, 50)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def records(vilt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [vilt.data_setup(i, write_image(folder / f"{i}.png", i), q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture
def db(tmp_path, records):
    db = VliLmdb(tmp_path / "db", read_only=False)
    for record in records:
        db.add_record(copy.deepcopy(record))
    yield db
    db.close()


def patches_of(record):
    return [xy for xy in record["img_coords"] if xy is not None]


def row_major_inputs(model, record):
    """The model's inputs for a record, built here: the processor, every patch embedded, the image
    tokens put in the record's order by their patch_index (not by the adapter's code)."""
    inputs = model.processor(images=record["image"], text=record["text"], return_tensors="pt")
    embeds, mask, (index, _) = model.vilt.embeddings.visual_embed(inputs["pixel_values"], inputs["pixel_mask"],
                                                                  max_image_length=-1)
    where = {(int(c), int(r)): i for i, (r, c) in enumerate(index[0].tolist())}
    keep = [0] + [1 + where[xy] for xy in patches_of(record)]
    fixed = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "token_type_ids": inputs["token_type_ids"]}
    return fixed, embeds[:, keep], mask[:, keep]


def logits_of(net, fixed, embeds, mask):
    with torch.no_grad():
        return net(**fixed, image_embeds=embeds, pixel_mask=mask).logits[0].numpy()


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.net.modules())


# ----------------------------------------------------------------------------- the adapter


def test_rerun_matches_the_stored_record(vilt, records):
    record = records[0]
    prediction = vilt.predict(record["image"], record["text"], patches_of(record))
    assert prediction["tokens"] == record["tokens"]
    assert prediction["answer"] == record["prediction"]["answer"]
    assert prediction["score"] == pytest.approx(record["prediction"]["score"], abs=1e-3)
    assert np.allclose(prediction["logits"], logits_of(vilt.net, *row_major_inputs(vilt, record)), atol=1e-5)


@pytest.mark.parametrize("heads", [[(0, 1)], [(1, 0), (1, 3)], [(0, h) for h in range(4)] + [(1, 2)]])
def test_ablation_equals_zeroed_value_weights(vilt, records, heads):
    """Zeroing a head's context at the output projection's input = a model whose value projection
    for that head is zero (its context is then exactly zero)."""
    record = records[0]
    reference = copy.deepcopy(vilt.net)
    head_dim = 32 // 4
    with torch.no_grad():
        for layer, head in heads:
            value = reference.vilt.encoder.layer[layer].attention.attention.value
            value.weight[head * head_dim:(head + 1) * head_dim] = 0
            value.bias[head * head_dim:(head + 1) * head_dim] = 0
    expected = logits_of(reference, *row_major_inputs(vilt, record))
    ablated = vilt.ablate(record["image"], record["text"], heads, patches=patches_of(record))
    original = vilt.predict(record["image"], record["text"], patches_of(record))
    assert np.allclose(ablated["logits"], expected, atol=1e-4)
    assert np.abs(ablated["logits"] - original["logits"]).max() > 1e-2  # the ablation did something
    assert no_hooks(vilt)


def test_ablation_refuses_heads_out_of_range(vilt, records):
    record = records[0]
    for heads in ([(2, 0)], [(0, 4)], [(-1, 0)], [(0, "1")]):
        with pytest.raises(ValueError, match=r"heads: .* \(2 layers x 4 heads"):
            vilt.ablate(record["image"], record["text"], heads)


def test_hooks_are_removed_when_the_run_fails(vilt, records, monkeypatch):
    record = records[0]

    def broken(*_args, **_kwargs):
        raise RuntimeError("out of memory (pretend)")

    monkeypatch.setattr(vilt.net.classifier, "forward", broken)
    with pytest.raises(RuntimeError, match="pretend"):
        vilt.ablate(record["image"], record["text"], [(0, 0), (1, 2)])
    assert no_hooks(vilt)
    monkeypatch.undo()
    corrupted = (records[1]["image"], records[1]["text"], patches_of(records[1]))
    clean = (record["image"], record["text"], patches_of(record))
    monkeypatch.setattr(vilt.vilt.pooler, "forward", broken)
    with pytest.raises(RuntimeError, match="pretend"):
        vilt.patch_activations(clean, corrupted, [[0]])
    assert no_hooks(vilt)


def test_masking_equals_the_tokens_left_out(vilt, records):
    """A patch whose mask entry is 0 is gone: the same logits as a sequence without those tokens."""
    record = records[0]
    txt_len = record["txt_len"]
    removed = [txt_len + 1, txt_len + 5, txt_len + 6, txt_len + 20]
    fixed, embeds, mask = row_major_inputs(vilt, record)
    kept = [i for i in range(embeds.shape[1]) if txt_len + i not in removed]
    expected = logits_of(vilt.net, fixed, embeds[:, kept], mask[:, kept])
    runs = vilt.mask_patches(record["image"], record["text"], [[], removed], patches=patches_of(record))
    assert np.allclose(runs[1]["logits"], expected, atol=1e-4)
    assert np.allclose(runs[0]["logits"], logits_of(vilt.net, fixed, embeds, mask), atol=1e-4)
    assert np.abs(runs[1]["logits"] - runs[0]["logits"]).max() > 1e-3
    with pytest.raises(ValueError, match="not an image token position"):
        vilt.mask_patches(record["image"], record["text"], [[0]])


def test_activation_patching_equals_a_run_layer_by_layer(vilt, records):
    """Each entry = the corrupted run computed layer by layer here (no hooks), with the chosen
    positions of one layer's output replaced by the clean run's; all positions restore the clean run."""
    clean, bad = records[0], records[1]
    assert len(clean["tokens"]) == len(bad["tokens"])
    n = len(clean["tokens"])
    columns = [[1], [3, 4], list(range(clean["txt_len"], n)), list(range(n))]
    result = vilt.patch_activations((clean["image"], clean["text"], patches_of(clean)),
                                    (bad["image"], bad["text"], patches_of(bad)), columns)
    answer = result["clean"]["index"]
    fixed, embeds, mask = row_major_inputs(vilt, clean)
    with torch.no_grad():
        clean_states = vilt.net(**fixed, image_embeds=embeds, pixel_mask=mask, output_hidden_states=True).hidden_states
        fixed, embeds, mask = row_major_inputs(vilt, bad)
        start = vilt.net(**fixed, image_embeds=embeds, pixel_mask=mask, output_hidden_states=True).hidden_states[0]
        expected = np.zeros((2, len(columns)), dtype=np.float32)
        for patched_layer in range(2):
            for c, positions in enumerate(columns):
                h = start.clone()
                for layer, module in enumerate(vilt.vilt.encoder.layer):
                    h = module(h)[0]  # an all-ones attention mask adds nothing
                    if layer == patched_layer:
                        h[:, positions] = clean_states[layer + 1][:, positions]
                logits = vilt.net.classifier(vilt.vilt.pooler(vilt.vilt.layernorm(h)))[0]
                expected[patched_layer, c] = float(logits[answer])
    assert np.allclose(result["patched"], expected, atol=1e-4)
    assert np.allclose(result["patched"][:, -1], result["clean"]["logits"][answer], atol=1e-4)
    assert abs(result["clean"]["logits"][answer] - result["corrupted"]["logits"][answer]) > 1e-2
    assert no_hooks(vilt)


def test_the_head_sweep_is_one_ablation_per_head(vilt, records):
    """Row h of a layer's batch zeroes head h alone: the same scores and answers as ablating each head by
    itself (each of which is a model with that head's value weights zeroed, as tested above); the progress
    follows the layers."""
    record = records[0]
    reported = []
    sweep = vilt.ablate_each_head(record["image"], record["text"], patches_of(record),
                                  progress=lambda done, total: reported.append((done, total)))
    original = vilt.predict(record["image"], record["text"], patches_of(record))
    assert sweep["original"]["answer"] == original["answer"] and reported == [(1, 2), (2, 2)]
    assert sweep["scores"].shape == (2, 4) and sweep["scores"].dtype == np.float32
    for layer in range(2):
        for head in range(4):
            alone = vilt.ablate(record["image"], record["text"], [(layer, head)], patches=patches_of(record))
            assert sweep["scores"][layer, head] == pytest.approx(alone["scores"][original["index"]], abs=1e-5)
            assert sweep["answers"][layer][head] == alone["answer"]
    assert np.abs(sweep["scores"] - original["score"]).max() > 1e-3  # some head matters
    assert no_hooks(vilt)


def _layer(module, hidden, head=None, context=None):
    """One ViLT layer computed here from its parts (no hooks): attention, output projection, residuals and
    MLP; with ``head``, that head's slice of the context (the output projection's input) is ``context``'s.
    Returns (the layer's output, its context)."""
    attention = module.attention
    own = attention.attention(module.layernorm_before(hidden))[0]
    used = own
    if head is not None:
        used = own.clone()
        used[..., head * 8:(head + 1) * 8] = context[..., head * 8:(head + 1) * 8]  # head_dim 32 / 4
    hidden = attention.output(used, hidden) + hidden
    return module.output(module.intermediate(module.layernorm_after(hidden)), hidden), own


def test_head_patching_equals_a_run_layer_by_layer(vilt, records):
    """Each entry = the corrupted run computed here layer by layer with one head's context of one layer
    taken from the clean run's."""
    clean, bad = records[0], records[1]
    reported = []
    result = vilt.patch_heads((clean["image"], clean["text"], patches_of(clean)),
                              (bad["image"], bad["text"], patches_of(bad)),
                              progress=lambda done, total: reported.append((done, total)))
    answer = result["clean"]["index"]
    layers = vilt.vilt.encoder.layer

    def start(record):
        fixed, embeds, mask = row_major_inputs(vilt, record)
        return vilt.net(**fixed, image_embeds=embeds, pixel_mask=mask, output_hidden_states=True).hidden_states[0]

    def logits(hidden):
        return vilt.net.classifier(vilt.vilt.pooler(vilt.vilt.layernorm(hidden)))[0]

    with torch.no_grad():
        hidden, contexts = start(clean), []
        for module in layers:
            hidden, context = _layer(module, hidden)
            contexts.append(context)
        assert float(logits(hidden)[answer]) == pytest.approx(float(result["clean"]["logits"][answer]), abs=1e-4)
        expected = np.zeros((2, 4), dtype=np.float32)
        for patched_layer in range(2):
            for head in range(4):
                hidden = start(bad)
                for layer, module in enumerate(layers):
                    hidden, _ = _layer(module, hidden, *((head, contexts[layer]) if layer == patched_layer else ()))
                expected[patched_layer, head] = float(logits(hidden)[answer])
    assert np.allclose(result["patched"], expected, atol=1e-4)
    assert np.abs(result["patched"] - result["corrupted"]["logits"][answer]).max() > 1e-2  # a head matters
    assert reported == [(1, 2), (2, 2)] and no_hooks(vilt)


# ----------------------------------------------------------------------------- app.interventions


class Counting:
    """The model, counting its runs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return method(*args, **kwargs)
        return counted


def test_deletion_curve_removes_the_most_attended_patches_first(vilt, db, records):
    record = records[0]
    runs = Interventions(db, vilt)
    curve = runs.deletion_curve(0, "attention")
    txt_len = record["txt_len"]
    patches = np.arange(txt_len + 1, len(record["tokens"]))  # after the text and the image [CLS]
    relevance = record["attention"][-1].mean(axis=0)[0, patches]  # the [CLS] row, last layer, mean of heads
    order = patches[np.argsort(-relevance, kind="stable")]
    sets = [sorted(order[: int(round(f * len(patches)))].tolist()) for f in FRACTIONS]
    expected = vilt.mask_patches(record["image"], record["text"], sets, patches=patches_of(record))
    answer = curve.original["index"]
    # float16 storage can swap near-equal attention values: compare where the order is clear
    assert curve.removed == tuple(len(s) for s in sets)
    assert curve.scores[0] == pytest.approx(curve.original["score"], abs=1e-6)
    assert np.allclose(curve.scores, [r["scores"][answer] for r in expected], atol=1e-3)
    assert curve.answers == tuple(r["answer"] for r in expected)


def test_rollout_and_relevancy_read_the_database(vilt, db):
    runs = Interventions(db, vilt)
    for method in ("rollout", "relevancy"):
        curve = runs.deletion_curve(1, method)
        assert len(curve.scores) == len(FRACTIONS)
    with pytest.raises(InterventionError, match="method"):
        runs.deletion_curve(1, "saliency")


def test_results_are_cached(vilt, db, records):
    model = Counting(vilt)
    runs = Interventions(db, model)
    first = runs.ablation(0, [(0, 1), (0, 1)])
    again = runs.ablation(0, [(0, 1)])
    assert again is first and model.calls == 1
    masked = runs.masked(0, [records[0]["txt_len"] + 2, 0])  # the text token is not a patch
    assert runs.masked(0, [records[0]["txt_len"] + 2]) is masked and model.calls == 2


def test_patching_refuses_different_token_layouts(vilt, db):
    runs = Interventions(db, vilt)
    with pytest.raises(InterventionError, match=r"example 2 has \d+ text and \d+ image tokens, example 0"):
        runs.patching(0, 2)
    result = runs.patching(0, 1)
    names, columns = patching_columns(db.example(0))
    assert result.columns == tuple(names) and result.difference.shape == (2, len(columns))
    assert np.allclose(result.recovered[:, -1], 1, atol=1e-3)  # every position patched: the clean run


def test_background_runs_report_progress_then_their_results(vilt, db):
    """request() starts a sweep or patching in the background, says how far it is, then "done" with the
    results cached (the same as asked directly); a refused run says why once, then is tried again."""
    runs = Interventions(db, vilt)
    try:
        seen = []
        for kind, args in (("sweep", (0,)), ("patching", (0, 1))):
            status = runs.request(kind, *args)
            while status["state"] == "running":
                seen.append(status["fraction"])
                time.sleep(0.01)
                status = runs.request(kind, *args)
            assert status == {"state": "done"}
        assert seen and all(0 <= f <= 1 for f in seen)
        sweep = runs.head_sweep(0)
        assert runs.head_sweep(0) is sweep and sweep.scores.shape == (2, 4)
        direct = vilt.ablate_each_head(*stored_input(db, 0))
        assert np.array_equal(sweep.scores, direct["scores"]) and sweep.answers == tuple(map(tuple, direct["answers"]))
        heads = runs.head_patching(0, 1)
        assert heads.per == "head" and heads.columns == ("head 1", "head 2", "head 3", "head 4")
        assert heads.difference.shape == (2, 4) and runs.patching(0, 1).per == "position"
        for _ in range(2):  # said, then run (and refused) again
            status = runs.request("patching", 0, 2)
            while status["state"] == "running":
                time.sleep(0.01)
                status = runs.request("patching", 0, 2)
            assert status["state"] == "error" and "activation patching needs the same tokens" in status["message"]
        with pytest.raises(InterventionError, match="no background run 'ablation'"):
            runs.request("ablation", 0)
    finally:
        runs.shutdown()


def test_a_record_of_another_tokenizer_is_refused(vilt, tmp_path, records):
    record = copy.deepcopy(records[0])
    record["tokens"] = ["[CLS]", "which"] + record["tokens"][2:]
    with VliLmdb(tmp_path / "other", read_only=False) as db:
        db.add_record(record)
        with pytest.raises(InterventionError, match="example 0: .*field tokens"):
            Interventions(db, vilt).original(0)


# ----------------------------------------------------------------------------- figures


def test_deletion_curve_figure():
    fig = figures.deletion_curve_figure(FRACTIONS, np.linspace(0.9, 0.1, 10), ["red"] * 9 + ["blue"], "red",
                                        "rollout")
    trace = fig.data[0]
    assert list(trace.x) == pytest.approx([10 * i for i in range(10)])
    assert list(trace.y) == pytest.approx(np.linspace(0.9, 0.1, 10))
    assert "'blue'" in trace.text[-1] and fig.layout.yaxis.range == (0, 1.05)
    with pytest.raises(ValueError, match="one value each"):
        figures.deletion_curve_figure(FRACTIONS, [0.5], ["red"], "red", "rollout")


def test_activation_patching_figure():
    difference = np.array([[0.5, -2.0], [1.0, 0.0]], dtype=np.float32)
    fig = figures.activation_patching_figure(difference, ["3 red", "all positions"], difference / 2.0, "red")
    trace = fig.data[0]
    assert (trace.zmin, trace.zmax) == (-2.0, 2.0)  # centred on 0
    assert list(trace.y) == ["layer 1", "layer 2"]
    assert trace.text[0][1] == "layer 1, all positions: -2.000 (-100 % recovered)"
    with pytest.raises(ValueError, match="expected"):
        figures.activation_patching_figure(difference, ["one"], None, "red")


def test_head_figures_are_laid_out_as_the_head_summary():
    """Layer 1 at the top, x = head and y = layer as 0-based numbers (what a click reads), 1-based ticks."""
    scores = np.array([[0.5, 0.75, 0.25], [0.625, 0.625, 0.0]], dtype=np.float32)
    answers = [["red", "red", "blue"], ["red", "red", "green"]]
    fig = figures.head_ablation_sweep_figure(scores, answers, "red", 0.625)
    trace = fig.data[0]
    assert np.allclose(decode(trace.z), scores - 0.625) and (trace.zmin, trace.zmax) == (-0.625, 0.625)
    assert trace.text[0][2] == "layer 1, head 3 zeroed: 'red' 0.625 → 0.250 (-0.375); the answer becomes 'blue'"
    assert trace.text[1][0] == "layer 2, head 1 zeroed: 'red' 0.625 → 0.625 (+0)"
    assert fig.layout.yaxis.autorange == "reversed" and list(fig.layout.xaxis.ticktext) == ["1", "2", "3"]
    difference = np.array([[0.5, -1.0, 0.0], [2.0, 0.0, 0.25]], dtype=np.float32)
    trace = figures.head_patching_figure(difference, difference / 2.0, "red").data[0]
    assert np.allclose(decode(trace.z), difference) and (trace.zmin, trace.zmax) == (-2.0, 2.0)
    assert trace.text[1][0] == "layer 2, head 1: +2.000 (100 % recovered)"
    with pytest.raises(ValueError, match="expected"):
        figures.head_ablation_sweep_figure(scores, answers[:1], "red", 0.625)
    with pytest.raises(ValueError, match="expected"):
        figures.head_patching_figure(difference, difference[:1], "red")


def test_the_notes_say_what_the_runs_found():
    from app.interventions import (DeletionCurve, HeadSweep, Patching, ablation_note, deletion_note, patching_note,
                                   sweep_note)

    red = {"answer": "red", "score": 0.6123, "index": 0, "logits": np.array([2.0, 0.5])}
    blue = {"answer": "blue", "score": 0.4551, "index": 1, "logits": np.array([0.25, 1.0])}
    assert ablation_note("layer 2 (all heads)", red, blue) == \
        "Head ablation: zeroing layer 2 (all heads) changed the answer from 'red' (0.612) to 'blue' (0.455)."
    assert ablation_note("layer 1 head 2", red, {**red, "score": 0.59}) == \
        "Head ablation: zeroing layer 1 head 2 kept the answer 'red' (0.612 → 0.590)."
    curve = DeletionCurve("relevancy", (0.0, 0.5), (0, 4), (0.6123, 0.1), ("red", "blue"), red)
    assert deletion_note(curve) == ("Deletion curve (relevancy, most relevant patches first): the score of 'red' "
                                    "with 0 % 0.612, 50 % 0.100; with 50 % removed the answer is 'blue'.")
    difference = np.array([[0.1, 1.5, -2.0], [0.2, 0.9, 1.75]], dtype=np.float32)
    margin = 2.0 - 0.25
    result = Patching(0, 3, "position", ("1 what", "all patches", "all positions"), difference, difference / margin,
                      red, blue)
    top = np.argsort(-difference.ravel())[:3]  # the cells that recover the most
    assert [divmod(int(i), 3) for i in top] == [(1, 2), (0, 1), (1, 1)]
    assert patching_note(result) == (
        "Activation patching from this example ('red') into example 3 ('blue'): the logit of 'red' is +1.750 "
        "higher in the clean run; patched in, the most is recovered by layer 2 at all positions (+1.750, 100 %); "
        "layer 1 at all patches (+1.500, 86 %); layer 2 at all patches (+0.900, 51 %).")
    heads = Patching(0, 3, "head", ("head 1", "head 2", "head 3"), difference, difference / margin, red, blue)
    assert patching_note(heads, n_cells=1) == (
        "Activation patching of each head's output from this example ('red') into example 3 ('blue'): the logit "
        "of 'red' is +1.750 higher in the clean run; patched in, the most is recovered by layer 2 head 3 "
        "(+1.750, 100 %).")
    scores = np.array([[0.5, 0.1], [0.7, 0.6]], dtype=np.float32)
    sweep = HeadSweep(scores, (("red", "blue"), ("red", "red")), red)
    assert sweep_note(sweep, n_heads=2) == (
        "Head ablation sweep (each of 4 heads zeroed alone): the score of 'red' is lowest with layer 1 head 2 "
        "(0.612 → 0.100, answer 'blue'); layer 1 head 1 (0.612 → 0.500); 1 of 4 heads change the answer alone.")
