"""The evidence ``-m hf`` stores and the interventions it runs, on tiny random decoder VLMs built offline
(the builders of tests/test_hf_llava.py and tests/test_hf_qwen_idefics.py), each checked against a
computation made here without the adapter's code: autograd with ``retain_grad`` and the relevancy rule in
numpy, the LM head applied by hand, weights zeroed by hand, and the language model run layer by layer.
"""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

import app.database.models.hf as hf_module
from app import ids
from app.database.database import VliLmdb
from app.database.models import load_model
from app.database.records import validate_record
from app.interventions import FRACTIONS, Interventions, deletion_sets, patch_positions
from app.server import create_app
from helpers import fast_tsne  # noqa: F401 (autouse: t-SNE is tested elsewhere)
from hf_tiny import random_image
from test_hf_llava import IMAGE_HW, _build_llava, _build_llava_next, _build_paligemma
from test_hf_qwen_idefics import IDEFICS_HW, QWEN_HW, QwenTestProcessor, _build_idefics, _build_qwen
from test_page_interventions import run_in_background, texts
from test_page_validation import Page

# the words of both builders' tokenizers; the two questions have as many tokens (activation patching)
QUESTION, OTHER_QUESTION = "what color is the square", "what color is the red"
MAX_NEW_TOKENS = 3
BUILT_IN_MEMORY = {"llava": _build_llava, "llava_next": _build_llava_next, "paligemma": _build_paligemma}
SAVED = {"qwen2_vl": (_build_qwen, QWEN_HW), "idefics3": (_build_idefics, IDEFICS_HW)}
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # PaliGemma's processor


def _load(family: str, folder, *options) -> hf_module.Hf:
    """The tiny checkpoint of ``family`` written to ``folder`` and loaded as ``-m hf`` loads it."""
    checkpoint = str(folder / "checkpoint")
    torch.manual_seed(0)
    if family in SAVED:
        SAVED[family][0](checkpoint, family)
    else:
        model, processor = BUILT_IN_MEMORY[family](checkpoint)
        model.generation_config.eos_token_id = 3
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        if family.startswith("qwen"):
            patch.setattr(hf_module, "AutoProcessor", QwenTestProcessor)
        return load_model("hf", [checkpoint, f"max_new_tokens={MAX_NEW_TOKENS}", *options], progress=False)


def _image(folder, family: str, seed: int = 0) -> str:
    height, width = SAVED[family][1] if family in SAVED else IMAGE_HW[family]
    path = str(folder / f"image{seed}.png")
    Image.fromarray(random_image(height, width, seed=seed)).save(path)
    return path


def _sensitive(hf):
    """The random model with its attention outputs and LM head scaled up, so that a head or a patch moves the
    answer's logits well beyond float noise (at init the residual stream hides the attention)."""
    with torch.no_grad():
        for layer in hf.model.get_decoder().layers:
            layer.self_attn.o_proj.weight *= 20
        hf.model.get_output_embeddings().weight *= 10
    return hf


@pytest.fixture(scope="module", params=["llava", "paligemma", "qwen2_vl", "idefics3"])
def family(request, tmp_path_factory):
    """(family, the loaded Hf model made sensitive, image path, its record for QUESTION)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = _sensitive(_load(request.param, folder))
    image = _image(folder, request.param)
    return request.param, model, image, model.data_setup(0, image, QUESTION)


def _full_inputs(hf, image_path, text, record):
    """The inputs of the forward pass over the record's sequence (its prompt, then its answer)."""
    inputs = hf.prompt(Image.open(image_path).convert("RGB"), text)
    ids = torch.tensor([hf.processor.tokenizer.convert_tokens_to_ids(record["tokens"])])
    return hf.adapter.full_inputs(hf.model, inputs, ids), ids[0].tolist()


def _prompt_len(record) -> int:
    return len(record["tokens"]) - record["generated"]


def _image_positions(record) -> list:
    return [i for i, m in enumerate(record["modality"]) if m == "image"]


def _patches(record) -> list:
    return [c[:2] for c in record["img_coords"] if c is not None]


def _hooks(hf) -> set:
    """Every forward (pre-)hook on the model (transformers keeps hooks of its own that record attentions)."""
    return {(name, kind, key) for name, module in hf.model.named_modules()
            for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)) for key in hooks}


# ----------------------------------------------------------------------------- gradient relevancy


def test_relevancy_row_of_each_query_is_its_generated_tokens_relevancy(family):
    """Row q = Chefer et al.'s rule (numpy, here) on the attentions of the full forward pass and their
    gradients (retain_grad, one backward per generated token) for the logit of the token generated at q."""
    name, hf, image, record = family
    full, ids = _full_inputs(hf, image, QUESTION, record)
    out = hf.model(**full, output_attentions=True)
    for attention in out.attentions:
        attention.retain_grad()
    n, prompt_len = len(ids), _prompt_len(record)
    assert record["generated"] >= 2  # several generated tokens, several rows
    queries = range(prompt_len - 1, n - 1)
    for query in queries:
        for attention in out.attentions:
            attention.grad = None
        out.logits[0, query, ids[query + 1]].backward(retain_graph=True)
        weights = np.stack([a[0].detach().numpy() for a in out.attentions]).astype(np.float64)
        gradients = np.stack([a.grad[0].numpy() for a in out.attentions]).astype(np.float64)
        relevancy = np.eye(n)
        for layer in range(len(weights)):
            relevancy = relevancy + np.clip(gradients[layer] * weights[layer], 0, None).mean(axis=0) @ relevancy
        np.testing.assert_allclose(record["relevancy"][query], relevancy[query], rtol=1e-4, atol=1e-7)
        assert np.abs(relevancy[query] - np.eye(n)[query]).max() > 1e-4  # the gradients did something
    others = [q for q in range(n) if q not in queries]
    assert record["relevancy"].dtype == np.float32 and record["relevancy"].shape == (n, n)
    assert not record["relevancy"][others].any()  # queries that generated no stored token: zero rows


def test_relevancy_and_patch_lens_can_be_left_out(tmp_path):
    hf = _load("llava", tmp_path, "relevancy=0", "patch_lens=0")
    image = _image(tmp_path, "llava")
    bare = hf.data_setup(0, image, QUESTION)
    hf.relevancy = hf.patch_lens = True
    full = hf.data_setup(0, image, QUESTION)
    assert "relevancy" not in bare and "patch_lens" not in bare and {"relevancy", "patch_lens"} <= set(full)
    assert bare["tokens"] == full["tokens"]
    np.testing.assert_allclose(bare["attention"], full["attention"], atol=1e-6)  # gradients changed nothing
    assert bare["prediction"]["score"] == pytest.approx(full["prediction"]["score"], rel=1e-5)


# ----------------------------------------------------------------------------- per-patch logit lens


def test_patch_lens_is_the_lm_head_on_every_image_token(family, tmp_path):
    """One [word, p] per image token and hidden-state layer: the final norm and LM head applied here to the
    stored hidden states; at the last layer, the model's own output distribution at those positions."""
    name, hf, image, record = family
    lens, positions = record["patch_lens"], _image_positions(record)
    assert len(lens) == len(record["hidden_states"]) and all(len(layer) == len(positions) for layer in lens)
    tokenizer = hf.processor.tokenizer
    head, norm = hf.model.get_output_embeddings(), hf.model.get_decoder().norm
    with torch.no_grad():
        for layer in range(len(lens) - 1):
            states = torch.tensor(record["hidden_states"][layer][positions])
            best = head(norm(states)).softmax(-1).max(-1)
            assert [w for w, _ in lens[layer]] == [tokenizer.decode([i]) for i in best.indices.tolist()]
            np.testing.assert_allclose([p for _, p in lens[layer]], best.values.numpy(), rtol=1e-5)
        full, _ = _full_inputs(hf, image, QUESTION, record)
        best = hf.model(**full).logits[0, positions].softmax(-1).max(-1)
    assert [w for w, _ in lens[-1]] == [tokenizer.decode([i]) for i in best.indices.tolist()]
    np.testing.assert_allclose([p for _, p in lens[-1]], best.values.numpy(), rtol=1e-5)
    validate_record(copy.deepcopy(record))
    with VliLmdb(tmp_path / "db", read_only=False) as db:  # the database takes the whole record
        assert db.add_record(copy.deepcopy(record)) == 0


# ----------------------------------------------------------------------------- interventions


def _answer_logits(model, full, prompt_len: int) -> np.ndarray:
    with torch.no_grad():
        return model(**full).logits[0, prompt_len - 1].float().numpy()


def test_rerun_is_the_stored_sequence(family):
    name, hf, image, record = family
    assert hf.supports_interventions
    prediction = hf.predict(record["image"], record["text"], _patches(record))
    assert prediction["tokens"] == record["tokens"]
    first_answer = record["tokens"][_prompt_len(record)]
    assert hf.processor.tokenizer.convert_ids_to_tokens(prediction["index"]) == first_answer
    full, _ = _full_inputs(hf, image, QUESTION, record)
    expected = _answer_logits(hf.model, full, _prompt_len(record))
    np.testing.assert_allclose(prediction["logits"], expected, atol=1e-4)
    scores = torch.tensor(expected).softmax(-1).numpy()
    np.testing.assert_allclose(prediction["scores"], scores, atol=1e-5)
    assert prediction["score"] == pytest.approx(float(scores[prediction["index"]]), abs=1e-5)
    assert prediction["top"][0] == [prediction["answer"], pytest.approx(prediction["score"])]
    with pytest.raises(ValueError, match="patches: .* image tokens"):
        hf.predict(record["image"], record["text"], _patches(record)[1:])


@pytest.mark.parametrize("heads", [[(0, 1)], [(1, 0), (1, 1)]])
def test_ablation_equals_zeroed_output_projection_columns(family, heads):
    """Zeroing a head's slice at the input of o_proj = a model whose o_proj has zero weight columns for it;
    both heads of layer 2 = that layer's attention output zeroed."""
    name, hf, image, record = family
    hooks = _hooks(hf)
    reference = copy.deepcopy(hf.model)
    with torch.no_grad():
        for layer, head in heads:
            attention = reference.get_decoder().layers[layer].self_attn
            attention.o_proj.weight[:, head * attention.head_dim:(head + 1) * attention.head_dim] = 0
    full, _ = _full_inputs(hf, image, QUESTION, record)
    expected = _answer_logits(reference, full, _prompt_len(record))
    ablated = hf.ablate(record["image"], record["text"], heads, patches=_patches(record))
    original = _answer_logits(hf.model, full, _prompt_len(record))
    np.testing.assert_allclose(ablated["logits"], expected, atol=1e-4)
    assert np.abs(ablated["logits"] - original).max() > 1e-2  # the ablation did something
    assert ablated["tokens"] == record["tokens"] and _hooks(hf) == hooks
    with pytest.raises(ValueError, match=r"heads: \(2, 0\) is not a \(layer, head\) pair .*2 layers x 2 heads"):
        hf.ablate(record["image"], record["text"], [(2, 0)])


def test_the_head_sweep_is_one_ablation_per_head(family):
    """The sweep's batched rows (row h zeroes head h at o_proj's input) give what ablating each head alone
    gives (which is zeroed o_proj columns, as tested above), with progress per layer, hooks removed."""
    name, hf, image, record = family
    hooks, reported = _hooks(hf), []
    sweep = hf.ablate_each_head(record["image"], record["text"], _patches(record),
                                progress=lambda done, total: reported.append((done, total)))
    original = hf.predict(record["image"], record["text"], _patches(record))
    assert sweep["original"]["answer"] == original["answer"] and reported == [(1, 2), (2, 2)]
    for layer in range(2):
        for head in range(2):
            alone = hf.ablate(record["image"], record["text"], [(layer, head)], patches=_patches(record))
            assert sweep["scores"][layer, head] == pytest.approx(alone["scores"][original["index"]], abs=1e-5)
            assert sweep["answers"][layer][head] == alone["answer"]
    assert _hooks(hf) == hooks


def test_masked_patches_batched_equal_each_alone(family):
    """Several removal sets in one batched run give what each gives alone; nothing removed is the re-run;
    a removal changes the logits; a text position is refused."""
    name, hf, image, record = family
    positions = _image_positions(record)
    hooks = _hooks(hf)
    sets = [[], positions[:1], positions[1::3], positions]
    batched = hf.mask_patches(record["image"], record["text"], sets, patches=_patches(record))
    alone = [hf.mask_patches(record["image"], record["text"], [s])[0] for s in sets]
    for together, single in zip(batched, alone):
        np.testing.assert_allclose(together["logits"], single["logits"], atol=1e-4)
        assert np.isfinite(together["logits"]).all()
    original = hf.predict(record["image"], record["text"])
    np.testing.assert_allclose(batched[0]["logits"], original["logits"], atol=1e-4)
    assert np.abs(batched[-1]["logits"] - original["logits"]).max() > 1e-2
    assert _hooks(hf) == hooks
    assert hf.mask_patches(record["image"], record["text"], []) == []
    text_position = _prompt_len(record) - 1  # the generation prompt's last token
    with pytest.raises(ValueError, match=rf"removed token {text_position}: not an image token position \(image "
                                         rf"tokens are at {positions[0]}-"):
        hf.mask_patches(record["image"], record["text"], [[positions[0], text_position]])


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The sensitive tiny LLaVA, and records of two images and questions with the same token layout."""
    folder = tmp_path_factory.mktemp("llava-interventions")
    hf = _sensitive(_load("llava", folder))
    images = [_image(folder, "llava", seed) for seed in (0, 1)]
    records = [hf.data_setup(i, image, text) for i, (image, text) in enumerate(zip(images, (QUESTION, OTHER_QUESTION)))]
    return hf, images, records


def _layer_by_layer(hf, full, blocked=(), patch=None):
    """The Llama language model run here layer by layer on the input embeddings of ``full`` (no hooks, the
    causal mask built here, ``blocked`` key columns masked for every query but themselves); ``patch``:
    (layer, positions, states) puts ``states[layer]`` at those positions of that layer's output. Returns
    (the logits (n, vocab), every layer's output)."""
    decoder = hf.model.get_decoder()
    with torch.no_grad():
        hidden = hf.model(**full, output_hidden_states=True).hidden_states[0]
        n = hidden.shape[1]
        minimum = torch.finfo(hidden.dtype).min
        mask = torch.triu(torch.full((n, n), minimum), 1)
        for key in blocked:
            mask[[q for q in range(n) if q != key], key] = minimum
        position_ids = torch.arange(n)[None]
        rotary = decoder.rotary_emb(hidden, position_ids)
        outputs = []
        for layer, module in enumerate(decoder.layers):
            hidden = module(hidden, attention_mask=mask[None, None], position_ids=position_ids,
                            position_embeddings=rotary)
            if patch is not None and layer == patch[0]:
                hidden = hidden.clone()
                hidden[0, patch[1]] = patch[2][layer][0, patch[1]]
            outputs.append(hidden)
        return hf.model.get_output_embeddings()(decoder.norm(hidden))[0], outputs


def test_masking_equals_the_keys_masked_by_hand(llava):
    hf, images, records = llava
    record = records[0]
    full, _ = _full_inputs(hf, images[0], QUESTION, record)
    prompt_len = _prompt_len(record)
    unchanged, _ = _layer_by_layer(hf, full)
    np.testing.assert_allclose(unchanged[prompt_len - 1].numpy(), _answer_logits(hf.model, full, prompt_len),
                               atol=1e-4)  # the loop here is the model
    removed = _image_positions(record)[::2]
    expected, _ = _layer_by_layer(hf, full, blocked=removed)
    masked = hf.mask_patches(record["image"], record["text"], [removed], patches=_patches(record))[0]
    np.testing.assert_allclose(masked["logits"], expected[prompt_len - 1].numpy(), atol=1e-4)


def test_activation_patching_equals_a_run_layer_by_layer(llava):
    """Each entry = the corrupted run computed here layer by layer with one layer's output at the column's
    positions taken from the clean run; all positions restore the clean logit, the answer's positions
    (after the one that predicts it) change nothing."""
    hf, images, records = llava
    hooks = _hooks(hf)
    clean, corrupted = records
    n, prompt_len = len(clean["tokens"]), _prompt_len(clean)
    assert (n, prompt_len) == (len(corrupted["tokens"]), _prompt_len(corrupted))
    columns = [[prompt_len - 1], _image_positions(clean), list(range(prompt_len, n)), list(range(n))]
    result = hf.patch_activations((clean["image"], clean["text"], _patches(clean)),
                                  (corrupted["image"], corrupted["text"], _patches(corrupted)), columns)
    answer = result["clean"]["index"]
    clean_full, _ = _full_inputs(hf, images[0], QUESTION, clean)
    corrupted_full, _ = _full_inputs(hf, images[1], OTHER_QUESTION, corrupted)
    _, clean_states = _layer_by_layer(hf, clean_full)
    expected = np.zeros((2, len(columns)), dtype=np.float32)
    for layer in range(2):
        for c, positions in enumerate(columns):
            logits, _ = _layer_by_layer(hf, corrupted_full, patch=(layer, positions, clean_states))
            expected[layer, c] = float(logits[prompt_len - 1, answer])
    np.testing.assert_allclose(result["patched"], expected, atol=1e-4)
    clean_logit, corrupted_logit = result["clean"]["logits"][answer], result["corrupted"]["logits"][answer]
    np.testing.assert_allclose(result["patched"][:, -1], clean_logit, atol=1e-4)
    np.testing.assert_allclose(result["patched"][:, 2], corrupted_logit, atol=1e-4)
    assert abs(clean_logit - corrupted_logit) > 1e-2 and _hooks(hf) == hooks


def test_head_patching_is_the_clean_heads_output_patched_in(llava):
    """What is patched is a head's output: o_proj's input slice of head h is A_h @ V_h (the attention weights
    the model returns, times the values computed here from the layer's input); each entry = the corrupted
    run with that one slice of one layer replaced by the clean run's, by a hook written here (one head at a
    time, no batching)."""
    hf, images, records = llava
    hooks = _hooks(hf)
    clean, corrupted = records
    prompt_len = _prompt_len(clean)
    reported = []
    result = hf.patch_heads((clean["image"], clean["text"], _patches(clean)),
                            (corrupted["image"], corrupted["text"], _patches(corrupted)),
                            progress=lambda done, total: reported.append((done, total)))
    answer = result["clean"]["index"]
    clean_full, _ = _full_inputs(hf, images[0], QUESTION, clean)
    corrupted_full, _ = _full_inputs(hf, images[1], OTHER_QUESTION, corrupted)
    layers = hf.model.get_decoder().layers
    contexts = {}

    def keep(layer):
        def hook(_module, args):
            contexts[layer] = args[0][0].clone()
        return hook

    handles = [module.self_attn.o_proj.register_forward_pre_hook(keep(l)) for l, module in enumerate(layers)]
    try:
        with torch.no_grad():
            out = hf.model(**clean_full, output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    for layer, module in enumerate(layers):
        attention = module.self_attn
        d = attention.head_dim
        values = attention.v_proj(module.input_layernorm(out.hidden_states[layer]))[0].detach()  # (n, kv * d)
        groups = attention.config.num_attention_heads // attention.config.num_key_value_heads
        for head in range(2):
            kv = head // groups
            own = out.attentions[layer][0, head] @ values[:, kv * d:(kv + 1) * d]
            np.testing.assert_allclose(contexts[layer][:, head * d:(head + 1) * d].numpy(), own.numpy(), atol=1e-4)
    expected = np.zeros((2, 2), dtype=np.float32)
    for layer, module in enumerate(layers):
        d = module.self_attn.head_dim
        for head in range(2):
            def patch(_module, args, layer=layer, head=head, d=d):
                context = args[0].clone()
                context[0, :, head * d:(head + 1) * d] = contexts[layer][:, head * d:(head + 1) * d]
                return (context,)
            handle = module.self_attn.o_proj.register_forward_pre_hook(patch)
            try:
                expected[layer, head] = _answer_logits(hf.model, corrupted_full, prompt_len)[answer]
            finally:
                handle.remove()
    np.testing.assert_allclose(result["patched"], expected, atol=1e-4)
    assert np.abs(result["patched"] - result["corrupted"]["logits"][answer]).max() > 1e-2  # a head matters
    assert reported == [(1, 2), (2, 2)] and _hooks(hf) == hooks


def test_patching_refuses_other_layouts_and_positions(llava):
    hf, images, records = llava
    clean = (records[0]["image"], records[0]["text"], _patches(records[0]))
    with pytest.raises(ValueError, match=r"the clean input has \d+ tokens \(\d+ of the prompt, image tokens at "
                                         r"\d+-\d+\), the corrupted one .*positions would not match"):
        hf.patch_activations(clean, (records[1]["image"], "what color", None), [[0]])
    n = len(records[0]["tokens"])
    with pytest.raises(ValueError, match=rf"columns: \[{n}\] is not a non-empty list of positions in 0..{n - 1}"):
        hf.patch_activations(clean, clean, [[n]])


def test_hooks_are_removed_when_the_run_fails(llava, monkeypatch):
    hf, _, records = llava
    record = records[0]
    hooks = _hooks(hf)

    def broken(*_args, **_kwargs):
        raise RuntimeError("out of memory (pretend)")

    monkeypatch.setattr(hf.model.get_decoder().norm, "forward", broken)
    for run in (lambda: hf.ablate(record["image"], record["text"], [(0, 0)]),
                lambda: hf.mask_patches(record["image"], record["text"], [_image_positions(record)[:2]]),
                lambda: hf.patch_activations((record["image"], record["text"], None),
                                             (record["image"], record["text"], None), [[0]])):
        with pytest.raises(RuntimeError, match="pretend"):
            run()
        assert _hooks(hf) == hooks


def test_the_interventions_of_the_page_on_stored_decoder_examples(llava, tmp_path):
    """app.interventions on a database of the model's records: the deletion curve removes the patches by the
    row of the prompt's last token (which generates the answer), and patching every position recovers it all."""
    hf, _, records = llava
    with VliLmdb(tmp_path / "db", read_only=False) as db:
        for record in records:
            db.add_record(copy.deepcopy(record))
        runs = Interventions(db, hf)
        curve = runs.deletion_curve(0, "relevancy")
        record = records[0]
        info = db.example(0)
        positions = patch_positions(info)
        relevance = record["relevancy"][_prompt_len(record) - 1, positions]
        sets = deletion_sets(relevance, positions)
        expected = hf.mask_patches(record["image"], record["text"], sets, patches=_patches(record))
        answer = curve.original["index"]
        assert curve.removed == tuple(len(s) for s in sets) and len(curve.scores) == len(FRACTIONS)
        np.testing.assert_allclose(curve.scores, [r["scores"][answer] for r in expected], atol=1e-5)
        assert curve.scores[0] == pytest.approx(curve.original["score"], abs=1e-5)
        patching = runs.patching(0, 1)
        np.testing.assert_allclose(patching.recovered[:, -1], 1, atol=1e-3)


def test_llava_next_examples_are_not_rerun(tmp_path):
    """Its stored image is the base view and the high-resolution tiles side by side: not an image the
    processor turns into the same tokens, so the page offers no interventions."""
    assert not _load("llava_next", tmp_path).supports_interventions


def test_the_interventions_panel_runs_the_decoder(llava, tmp_path, request):
    """The page's buttons (Flask's test client) with -m hf loaded: ablation shows the re-run's top first
    tokens before and after, the deletion curve by relevancy plots the first answer token's probability, and
    activation patching draws one row per layer of the language model."""
    hf, _, records = llava
    db = VliLmdb(tmp_path / "db", read_only=False)
    request.addfinalizer(db.close)
    for record in records:
        db.add_record(copy.deepcopy(record))
    app = create_app(db, model=hf)
    request.addfinalizer(app.vli_context.jobs.shutdown)
    page = Page(app)
    record = records[0]
    status, response = page.post(f"{ids.IV_ABLATION}.children", f"{ids.IV_ABLATE}.n_clicks", {
        f"{ids.IV_ABLATE}.n_clicks": 1, f"{ids.HEAD_STORE}.data": {"layer": 1, "head": None}})
    assert status == 200
    after = hf.ablate(record["image"], record["text"], [(1, 0), (1, 1)], patches=_patches(record))
    shown = texts(response[ids.IV_ABLATION]["children"])
    assert all(f"{answer} {score:.3f}" in shown for answer, score in after["top"])
    status, response = page.post(f"{ids.IV_DELETION_GRAPH}.figure", f"{ids.IV_DELETION}.n_clicks", {
        f"{ids.IV_DELETION}.n_clicks": 1, f"{ids.ATT_METHOD}.value": "relevancy"})
    assert status == 200
    curve = Interventions(db, hf).deletion_curve(0, "relevancy")
    assert response[ids.IV_DELETION_GRAPH]["figure"]["data"][0]["y"] == pytest.approx(curve.scores, abs=1e-6)
    _, response = run_in_background(page, ids.IV_PATCH, {f"{ids.IV_CORRUPTED}.value": 1})
    assert response[ids.IV_PATCH_GRAPH]["figure"]["data"][0]["y"] == ["layer 1", "layer 2"]
    heads = response[ids.IV_PATCH_HEADS_GRAPH]["figure"]
    assert heads["layout"]["yaxis"]["ticktext"] == ["1", "2"] and heads["layout"]["xaxis"]["ticktext"] == ["1", "2"]
    patching_run = response[ids.IV_PATCHING_RUN]["data"]
    _, response = run_in_background(page, ids.IV_SWEEP)
    sweep = hf.ablate_each_head(record["image"], record["text"], _patches(record))
    assert sweep["original"]["answer"] in texts(response[ids.IV_SWEEP_TEXT]["children"])
    runs = {f"{ids.IV_PATCHING_RUN}.data": patching_run, f"{ids.IV_CURVE_RUN}.data": {"ex": 0, "method": "relevancy"},
            f"{ids.IV_SWEEP_RUN}.data": response[ids.IV_SWEEP_RUN]["data"]}
    status, response = page.post(f"{ids.IV_SAVE_STATUS}.children", f"{ids.IV_SAVE_NOTE}.n_clicks",
                                 {f"{ids.IV_SAVE_NOTE}.n_clicks": 1, **runs})
    assert response[ids.IV_SAVE_STATUS]["children"] == "Saved 4 notes with example 0."
    curve_note, patching_note, heads_note, sweep_note = db.example(0).notes[-4:]
    assert f"the score of '{curve.original['answer']}' with 0 % {curve.scores[0]:.3f}" in curve_note
    assert "Activation patching from this example" in patching_note and "into example 1" in patching_note
    assert "Activation patching of each head's output" in heads_note
    assert "Head ablation sweep (each of 4 heads zeroed alone)" in sweep_note
