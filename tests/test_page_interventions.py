"""The "Interventions" panel's callbacks through Flask's test client, on an app with a tiny ViLT and a
database of its records: what each button shows agrees with the model run directly, crafted values are
refused (no update), and a change of example clears the results."""
import base64
import copy
import time

import numpy as np
import pytest
from dash import html

from app import ids
from app.database.database import VliLmdb
from app.database.models import load_model
from app.interventions import FRACTIONS, patching_columns
from app.panels import interventions
from app.server import create_app
from helpers import fast_tsne  # noqa: F401 (autouse: t-SNE is tested elsewhere)
from test_page_validation import NO_UPDATE, Page
from tiny_vilt import build_tiny_vilt

QUESTIONS = ["what color is the circle ?", "what color is the square ?", "how many are there ?"]


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
    return load_model("vilt", [build_tiny_vilt(tmp_path_factory.mktemp("tiny-vqa"), seed=1)], progress=False)


@pytest.fixture(scope="module")
def records(vilt, tmp_path_factory):
    from test_interventions import write_image

    folder = tmp_path_factory.mktemp("images")
    return [vilt.data_setup(i, write_image(folder / f"{i}.png", i), q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture
def page(tmp_path, records, vilt, request):
    db = VliLmdb(tmp_path / "db", read_only=False)
    for record in records:
        db.add_record(copy.deepcopy(record))
    app = create_app(db, model=vilt)
    request.addfinalizer(app.vli_context.jobs.shutdown)
    request.addfinalizer(db.close)
    assert any(ids.IV_ABLATION in output for output in app.callback_map)  # placed by app/server.py
    page = Page(app)
    page.db = db
    return page


def texts(node) -> str:
    """All the text of a component tree in Dash's JSON."""
    if isinstance(node, list):
        return " ".join(texts(n) for n in node)
    if isinstance(node, dict):
        return texts(node.get("props", {}).get("children"))
    return "" if node is None else str(node)


def patches_of(record):
    return [xy for xy in record["img_coords"] if xy is not None]


def test_the_panel_needs_a_model_that_reruns_examples(tmp_path, vilt):
    class Context:
        model = None

    assert not interventions.available(Context())
    Context.model = vilt
    assert interventions.available(Context())
    mlm = load_model("vilt", [build_tiny_vilt(tmp_path / "mlm", head="ViltForMaskedLM")], progress=False)
    Context.model = mlm
    assert not interventions.available(Context())


def test_each_intervention_is_defined_in_the_page(page):
    """The panel says what each intervention changes and what its cells are, under its heading."""
    shown = texts(page.client.get("/_dash-layout").json)
    assert "A zeroed head's output (its context, at the input of the attention output projection) is 0" in shown
    assert "A removed patch is masked out of the attention of every layer" in shown
    assert "per layer and head: that head's output, at every position" in shown


def test_ablation_shows_the_answers_before_and_after(page, vilt, records):
    record = records[0]
    status, response = page.post(f"{ids.IV_ABLATION}.children", f"{ids.IV_ABLATE}.n_clicks", {
        f"{ids.IV_ABLATE}.n_clicks": 1, f"{ids.HEAD_STORE}.data": {"layer": 1, "head": None},
        f"{ids.IV_HEADS}.value": ["0-2"]})
    assert status == 200
    shown = texts(response[ids.IV_ABLATION]["children"])
    heads = [(0, 2)] + [(1, h) for h in range(4)]
    after = vilt.ablate(record["image"], record["text"], heads, patches=patches_of(record))
    before = vilt.predict(record["image"], record["text"], patches_of(record))
    assert "Zeroed: layer 1 head 3, layer 2 (all heads)" in shown
    for answer, score in before["top"] + after["top"]:
        assert f"{answer} {score:.3f}" in shown


@pytest.mark.parametrize("values", [
    {f"{ids.IV_HEADS}.value": ["2-0"]}, {f"{ids.IV_HEADS}.value": ["0-4"]}, {f"{ids.IV_HEADS}.value": ["-1-0"]},
    {f"{ids.IV_HEADS}.value": "0-1"}, {f"{ids.IV_HEADS}.value": [3]}, {f"{ids.IV_HEADS}.value": ["0-1"] * 11},
    {f"{ids.HEAD_STORE}.data": {"layer": 5, "head": 0}}, {f"{ids.IV_USE_SELECTED}.value": "selected"},
    {f"{ids.EXAMPLE_SELECT}.value": 7}, {f"{ids.EXAMPLE_SELECT}.value": "0"},
])
def test_ablation_refuses_crafted_values(page, values):
    status, _ = page.post(f"{ids.IV_ABLATION}.children", f"{ids.IV_ABLATE}.n_clicks",
                          {f"{ids.IV_ABLATE}.n_clicks": 1, **values})
    assert status == NO_UPDATE


def test_ablation_with_no_head_says_so(page):
    status, response = page.post(f"{ids.IV_ABLATION}.children", f"{ids.IV_ABLATE}.n_clicks", {
        f"{ids.IV_ABLATE}.n_clicks": 1, f"{ids.IV_USE_SELECTED}.value": [], f"{ids.IV_HEADS}.value": []})
    assert status == 200 and "pick heads" in texts(response[ids.IV_ABLATION]["children"])


def test_a_new_example_clears_the_results(page):
    status, response = page.post(f"{ids.IV_ABLATION}.children", f"{ids.EXAMPLE_SELECT}.value",
                                 {f"{ids.EXAMPLE_SELECT}.value": 1})
    assert status == 200 and response[ids.IV_ABLATION]["children"] is None
    status, response = page.post(f"{ids.IV_JOB}.data", f"{ids.EXAMPLE_SELECT}.value",
                                 {f"{ids.EXAMPLE_SELECT}.value": 1})
    assert status == 200 and response[ids.IV_JOB]["data"] is None  # the run polled is forgotten
    status, response = page.post(f"{ids.IV_RUN_STATUS}.children", f"{ids.IV_JOB}.data", {f"{ids.IV_JOB}.data": None})
    assert status == 200 and response[ids.IV_POLL]["disabled"] is True
    for graph in (ids.IV_PATCH_GRAPH, ids.IV_PATCH_HEADS_GRAPH, ids.IV_SWEEP_GRAPH):
        assert response[graph]["style"] == {"display": "none"}
    assert response[ids.IV_SWEEP_RUN]["data"] is None and response[ids.IV_PATCHING_RUN]["data"] is None


def run_in_background(page, button, values=None, polls=600):
    """Press ``button`` (its callback names the run: IV_JOB), then poll as IV_POLL does until the poll is
    switched off; (the progress fractions seen, the last response)."""
    status, response = page.post(f"{ids.IV_JOB}.data", f"{button}.n_clicks",
                                 {f"{button}.n_clicks": 1, **(values or {})})
    assert status == 200
    job = response[ids.IV_JOB]["data"]
    seen = []
    for n in range(polls):
        status, response = page.post(f"{ids.IV_RUN_STATUS}.children", f"{ids.IV_POLL}.n_intervals",
                                     {f"{ids.IV_JOB}.data": job, f"{ids.IV_POLL}.n_intervals": n})
        assert status == 200
        if response[ids.IV_POLL]["disabled"]:
            return seen, response
        progress = response[ids.IV_RUN_STATUS]["children"][0]
        assert progress["type"] == "Progress"
        seen.append(progress["props"]["value"])
        time.sleep(0.05)
    raise AssertionError(f"the run of {button} did not finish in {polls} polls")


def test_the_head_sweep_draws_each_heads_effect(page, vilt, records):
    """"Ablate each head": progress while it runs, then the layers x heads heatmap of the score change,
    equal to ablating each head alone; a click on a cell selects that head in the head summary."""
    record = records[0]
    seen, response = run_in_background(page, ids.IV_SWEEP)
    assert all(0 <= f <= 1 for f in seen)
    trace = response[ids.IV_SWEEP_GRAPH]["figure"]["data"][0]
    original = vilt.predict(record["image"], record["text"], patches_of(record))
    expected = np.array([[vilt.ablate(record["image"], record["text"], [(l, h)], patches=patches_of(record))
                          ["scores"][original["index"]] for h in range(4)] for l in range(2)]) - original["score"]
    z = np.frombuffer(base64.b64decode(trace["z"]["bdata"]), dtype=np.float32).reshape(2, 4)
    assert np.allclose(z, expected, atol=1e-5) and response[ids.IV_SWEEP_GRAPH]["style"] == {}
    assert f"Re-run answer '{original['answer']}'" in texts(response[ids.IV_SWEEP_TEXT]["children"])
    assert response[ids.IV_SWEEP_RUN]["data"] == {"ex": 0}
    assert ids.IV_PATCH_GRAPH not in response  # the other run's figures stay as they are
    status, response = page.post(f"{ids.HEAD_STORE}.data", f"{ids.IV_SWEEP_GRAPH}.clickData", {
        f"{ids.IV_SWEEP_GRAPH}.clickData": {"points": [{"x": 3, "y": 1, "curveNumber": 0}]}})
    assert status == 200 and response[ids.HEAD_STORE]["data"] == {"layer": 1, "head": 3}
    for point in ({"x": 4, "y": 0}, {"x": 0, "y": 2}, {"x": "1", "y": 0}):
        status, _ = page.post(f"{ids.HEAD_STORE}.data", f"{ids.IV_SWEEP_GRAPH}.clickData", {
            f"{ids.IV_SWEEP_GRAPH}.clickData": {"points": [point]}})
        assert status == NO_UPDATE


def test_deletion_curve_of_the_attention_panels_method(page, vilt, records):
    record = records[0]
    status, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_DELETION}.n_clicks", {
        f"{ids.IV_DELETION}.n_clicks": 1, f"{ids.ATT_METHOD}.value": "rollout"})
    assert status == 200
    trace = response[ids.IV_DELETION_GRAPH]["figure"]["data"][0]
    assert trace["x"] == pytest.approx([100 * f for f in FRACTIONS])
    # the rollout of the [CLS] query through every layer, from the record, most relevant patch first
    attention = record["attention"].astype(np.float64)
    n = attention.shape[-1]
    rollout = np.eye(n)
    for layer in attention:
        step = 0.5 * layer.mean(axis=0) + 0.5 * np.eye(n)
        rollout = (step / step.sum(-1, keepdims=True)) @ rollout
    patches = np.arange(record["txt_len"] + 1, n)
    order = patches[np.argsort(-rollout[0, patches], kind="stable")]
    sets = [order[: int(round(f * len(patches)))].tolist() for f in FRACTIONS]
    original = vilt.predict(record["image"], record["text"], patches_of(record))
    runs = vilt.mask_patches(record["image"], record["text"], sets, patches=patches_of(record))
    assert trace["y"] == pytest.approx([r["scores"][original["index"]] for r in runs], abs=1e-3)
    assert response[ids.IV_DELETION_GRAPH]["style"] == {}


@pytest.mark.parametrize("method", ["saliency", None, 3])
def test_deletion_refuses_an_unknown_method(page, method):
    status, _ = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_DELETION}.n_clicks",
                          {f"{ids.IV_DELETION}.n_clicks": 1, f"{ids.ATT_METHOD}.value": method})
    assert status == NO_UPDATE


def test_removing_the_selected_patches(page, vilt, records):
    record = records[0]
    txt_len = record["txt_len"]
    selection = {"ex": 0, "tokens": [1, txt_len + 2, txt_len + 3]}  # a text token: not removed
    status, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_MASK}.n_clicks", {
        f"{ids.IV_MASK}.n_clicks": 1, f"{ids.SEL_STORE}.data": selection})
    assert status == 200
    shown = texts(response[ids.IV_MASKING]["children"])
    masked = vilt.mask_patches(record["image"], record["text"], [[txt_len + 2, txt_len + 3]],
                               patches=patches_of(record))[0]
    assert "Removed 2 patches." in shown and f"{masked['answer']} {masked['score']:.3f}" in shown
    status, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_MASK}.n_clicks", {
        f"{ids.IV_MASK}.n_clicks": 1, f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [1]}})
    assert status == 200 and "Select image patches" in texts(response[ids.IV_MASKING]["children"])
    status, _ = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_MASK}.n_clicks", {
        f"{ids.IV_MASK}.n_clicks": 1, f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [10 ** 6]}})
    assert status == NO_UPDATE


def test_activation_patching(page, vilt, records):
    clean, bad = records[0], records[1]
    seen, response = run_in_background(page, ids.IV_PATCH, {f"{ids.IV_CORRUPTED}.value": 1})
    trace = response[ids.IV_PATCH_GRAPH]["figure"]["data"][0]
    names, columns = patching_columns(page.db.example(0))
    assert trace["x"] == names
    result = vilt.patch_activations((clean["image"], clean["text"], patches_of(clean)),
                                    (bad["image"], bad["text"], patches_of(bad)), columns)
    answer = result["clean"]["index"]
    expected = result["patched"] - result["corrupted"]["logits"][answer]
    z = np.frombuffer(base64.b64decode(trace["z"]["bdata"]), dtype=np.float32).reshape(expected.shape)
    assert np.allclose(z, expected, atol=1e-5)
    assert f"Clean (example 0): '{result['clean']['answer']}'" in texts(response[ids.IV_PATCHING]["children"])
    assert response[ids.IV_PATCHING_RUN]["data"] == {"ex": 0, "corrupted": 1}
    heads = vilt.patch_heads((clean["image"], clean["text"], patches_of(clean)),
                             (bad["image"], bad["text"], patches_of(bad)))
    trace = response[ids.IV_PATCH_HEADS_GRAPH]["figure"]["data"][0]
    z = np.frombuffer(base64.b64decode(trace["z"]["bdata"]), dtype=np.float32).reshape(2, 4)
    assert np.allclose(z, heads["patched"] - heads["corrupted"]["logits"][answer], atol=1e-5)
    assert ids.IV_SWEEP_GRAPH not in response
    status, response = page.post(f"{ids.HEAD_STORE}.data", f"{ids.IV_PATCH_HEADS_GRAPH}.clickData", {
        f"{ids.IV_PATCH_HEADS_GRAPH}.clickData": {"points": [{"x": 0, "y": 1}]}})
    assert status == 200 and response[ids.HEAD_STORE]["data"] == {"layer": 1, "head": 0}


def test_activation_patching_refuses_other_token_counts(page):
    _, response = run_in_background(page, ids.IV_PATCH, {f"{ids.IV_CORRUPTED}.value": 2})
    assert "example 2 has 7 text and 25 image tokens, example 0 8 and 25" in \
        texts(response[ids.IV_RUN_STATUS]["children"])
    assert ids.IV_PATCH_GRAPH not in response
    for corrupted in (0, None):
        status, response = page.post(f"{ids.IV_JOB}.data", f"{ids.IV_PATCH}.n_clicks", {
            f"{ids.IV_PATCH}.n_clicks": 1, f"{ids.IV_CORRUPTED}.value": corrupted})
        assert status == 200 and "Pick" in texts(response[ids.IV_RUN_STATUS]["children"])
        assert ids.IV_JOB not in response  # nothing to poll
    for corrupted in (9, "1", 1.5, True):
        status, _ = page.post(f"{ids.IV_JOB}.data", f"{ids.IV_PATCH}.n_clicks", {
            f"{ids.IV_PATCH}.n_clicks": 1, f"{ids.IV_CORRUPTED}.value": corrupted})
        assert status == NO_UPDATE


@pytest.mark.parametrize("job", [{"kind": "sweep", "ex": 9}, {"kind": "sweep"}, {"kind": "ablation", "ex": 0},
                                 {"kind": "patching", "ex": 0, "corrupted": 0}, {"kind": "sweep", "ex": 0, "x": 1},
                                 "sweep", [0]])
def test_a_crafted_job_is_refused(page, job):
    status, _ = page.post(f"{ids.IV_RUN_STATUS}.children", f"{ids.IV_POLL}.n_intervals",
                          {f"{ids.IV_JOB}.data": job, f"{ids.IV_POLL}.n_intervals": 1})
    assert status == NO_UPDATE


def save(page, values):
    return page.post(f"{ids.IV_SAVE_STATUS}.children", f"{ids.IV_SAVE_NOTE}.n_clicks",
                     {f"{ids.IV_SAVE_NOTE}.n_clicks": 1, **values})


def stored_values(db):
    """Every value of every table but the examples' descriptions (``info``), as bytes."""
    values = {}
    with db._read() as txn:
        for name, table in db._dbs.items():
            if name != "info" and table is not None:
                values[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=table)]
    return values


def test_the_results_shown_are_saved_as_notes(page, vilt, records):
    db = page.db
    before_values, before_info = stored_values(db), db.example(0)
    runs = {}
    _, response = page.post(f"{ids.IV_ABLATION}.children", f"{ids.IV_ABLATE}.n_clicks", {
        f"{ids.IV_ABLATE}.n_clicks": 1, f"{ids.IV_USE_SELECTED}.value": [], f"{ids.IV_HEADS}.value": ["1-all", "0-2"]})
    runs[ids.IV_ABLATION_RUN] = response[ids.IV_ABLATION_RUN]["data"]
    assert runs[ids.IV_ABLATION_RUN] == {"ex": 0, "heads": ["0-2", "1-0", "1-1", "1-2", "1-3"]}
    _, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_DELETION}.n_clicks", {
        f"{ids.IV_DELETION}.n_clicks": 1, f"{ids.ATT_METHOD}.value": "rollout"})
    runs[ids.IV_CURVE_RUN] = response[ids.IV_CURVE_RUN]["data"]
    scores = response[ids.IV_DELETION_GRAPH]["figure"]["data"][0]["y"]
    _, response = run_in_background(page, ids.IV_PATCH, {f"{ids.IV_CORRUPTED}.value": 1})
    runs[ids.IV_PATCHING_RUN] = response[ids.IV_PATCHING_RUN]["data"]
    _, response = run_in_background(page, ids.IV_SWEEP)
    runs[ids.IV_SWEEP_RUN] = response[ids.IV_SWEEP_RUN]["data"]
    status, response = save(page, {f"{store}.data": value for store, value in runs.items()})
    assert status == 200 and response[ids.IV_SAVE_STATUS]["children"] == "Saved 5 notes with example 0."
    notes = db.example(0).notes
    assert len(notes) == len(before_info.notes) + 5
    ablation, curve, patching, head_patching, sweep = notes[-5:]
    assert "Activation patching of each head's output from this example" in head_patching
    assert "Head ablation sweep (each of 8 heads zeroed alone)" in sweep
    record = records[0]
    heads = [(0, 2)] + [(1, h) for h in range(4)]
    original = vilt.predict(record["image"], record["text"], patches_of(record))
    ablated = vilt.ablate(record["image"], record["text"], heads, patches=patches_of(record))
    assert "Head ablation: zeroing layer 1 head 3, layer 2 (all heads) " in ablation
    assert f"'{original['answer']}'" in ablation and f"{ablated['score']:.3f}" in ablation
    assert "Deletion curve (rollout, most relevant patches first)" in curve
    assert all(f"{100 * f:.0f} % {s:.3f}" in curve for f, s in zip(FRACTIONS, scores))
    assert "into example 1" in patching
    assert any("note" in texts(child) and ablation in texts(child) for child in response[ids.PREDICTION]["children"])
    # the example's data are as they were; only its notes grew
    assert stored_values(db) == before_values
    assert db.example(0).tokens == before_info.tokens and db.example(0).prediction == before_info.prediction
    # saving the same results again adds nothing
    status, response = save(page, {f"{store}.data": value for store, value in runs.items()})
    assert response[ids.IV_SAVE_STATUS]["children"] == "The results shown are saved already."
    assert len(db.example(0).notes) == len(notes)


def test_saving_removed_patches_names_them(page, records):
    txt_len = records[0]["txt_len"]
    _, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_MASK}.n_clicks", {
        f"{ids.IV_MASK}.n_clicks": 1, f"{ids.SEL_STORE}.data": {"ex": 0, "tokens": [txt_len + 3, txt_len + 2]}})
    mask = response[ids.IV_MASK_RUN]["data"]
    status, _ = save(page, {f"{ids.IV_MASK_RUN}.data": mask})
    cells = [page.db.example(0).coords[t] for t in (txt_len + 2, txt_len + 3)]
    assert f"removing 2 patches (x, y: ({cells[0][0]}, {cells[0][1]}), ({cells[1][0]}, {cells[1][1]}))" \
        in page.db.example(0).notes[-1]


def test_nothing_to_save_says_so(page):
    status, response = save(page, {})
    assert status == 200 and "nothing to save" in response[ids.IV_SAVE_STATUS]["children"]
    # a run shown for another example is not this one's
    status, response = save(page, {f"{ids.IV_CURVE_RUN}.data": {"ex": 1, "method": "rollout"}})
    assert "nothing to save" in response[ids.IV_SAVE_STATUS]["children"]
    assert page.db.example(0).notes == ()


@pytest.mark.parametrize("values", [
    {f"{ids.IV_ABLATION_RUN}.data": {"ex": 0, "heads": ["9-0"]}},
    {f"{ids.IV_ABLATION_RUN}.data": {"ex": 0, "heads": []}},
    {f"{ids.IV_ABLATION_RUN}.data": {"ex": 0, "heads": ["0-1"], "note": "forged"}},
    {f"{ids.IV_CURVE_RUN}.data": {"ex": 0, "method": "saliency"}},
    {f"{ids.IV_MASK_RUN}.data": {"ex": 0, "tokens": [10 ** 6]}},
    {f"{ids.IV_MASK_RUN}.data": {"ex": 0, "tokens": [1]}},
    {f"{ids.IV_PATCHING_RUN}.data": {"ex": 0, "corrupted": 0}},
    {f"{ids.IV_PATCHING_RUN}.data": {"ex": 0, "corrupted": 9}},
    {f"{ids.IV_PATCHING_RUN}.data": "forged"},
    {f"{ids.IV_SWEEP_RUN}.data": {"ex": 0, "heads": []}},
    {f"{ids.IV_SWEEP_RUN}.data": [0]},
])
def test_saving_refuses_crafted_runs(page, values):
    status, _ = save(page, values)
    assert status == NO_UPDATE
    assert page.db.example(0).notes == ()
