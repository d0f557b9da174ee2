"""The capture API (app/database/models/capture.py): attention and hidden states recorded from any
PyTorch model while the user's own forward pass runs, checked against softmax(q k^T / sqrt(d))
computed by hand from the modules' weights and against transformers' own output_attentions."""
from __future__ import annotations

import copy
import os
import re
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from app.database.models.capture import capture, record_local  # noqa: E402
from app.database.records import RecordError, validate_record  # noqa: E402
from helpers import softmax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, LAYERS = 16, 2, 2


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
               + len(m._forward_pre_hooks_with_kwargs) for m in model.modules())


def heads_attention(x: np.ndarray, wq, bq, wk, bk, n_heads: int, mask=None) -> np.ndarray:
    """(heads, n, n) = softmax(q k^T / sqrt(d) + mask) per head, from (n, width) inputs and weights."""
    q = (x @ wq.T + bq).reshape(len(x), n_heads, -1).transpose(1, 0, 2)
    k = (x @ wk.T + bk).reshape(len(x), n_heads, -1).transpose(1, 0, 2)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    return softmax(scores if mask is None else scores + mask)


def numpy_of(tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


# -- models --------------------------------------------------------------------------------------

def encoder(norm_first=False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()


class Attention(nn.Module):
    """A faithful replica of timm's vision_transformer.Attention (timm needs torchvision, which does
    not load with this CPU torch): fused scaled_dot_product_attention or the explicit softmax."""

    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        batch, length, channels = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, length, channels)))


class Block(nn.Module):
    def __init__(self, dim, qk_norm, fused_attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, HEADS, qk_norm, fused_attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(x)


class TimmStyleViT(nn.Module):
    def __init__(self, qk_norm=False, fused_attn=True):
        super().__init__()
        torch.manual_seed(1)
        self.patch_embed = nn.Conv2d(3, WIDTH, 4, 4)
        self.blocks = nn.ModuleList(Block(WIDTH, qk_norm, fused_attn) for _ in range(LAYERS))

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


def tiny_transformers(name: str, attn_implementation="eager"):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, ViTConfig, ViTModel  # noqa: PLC0415
    torch.manual_seed(2)
    shape = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=32)
    if name == "bert":
        model = BertModel(BertConfig(vocab_size=30, max_position_embeddings=16, **shape),
                          add_pooling_layer=False)
        inputs = {"input_ids": torch.tensor([[2, 5, 7, 9, 11, 3]])}
    elif name == "vit":
        model = ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=3, **shape), add_pooling_layer=False)
        inputs = {"pixel_values": torch.randn(1, 3, 8, 8)}
    else:
        model = LlamaModel(LlamaConfig(vocab_size=30, num_key_value_heads=1, max_position_embeddings=16, **shape))
        inputs = {"input_ids": torch.tensor([[1, 4, 6, 8, 10]])}
    model.set_attn_implementation(attn_implementation)
    return model.eval(), inputs


@pytest.fixture(scope="module")
def transformers_models():
    return {name: tiny_transformers(name) for name in ("bert", "vit", "llama")}


# -- transformers --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_transformers_attention_and_hidden_states_equal_their_own_outputs(transformers_models, name):
    model, inputs = transformers_models[name]
    reference = copy.deepcopy(model)  # output_attentions installs transformers' own hooks on its model
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=True, output_hidden_states=True)
        plain = model(**inputs).last_hidden_state
        with capture(model) as cap:
            captured = model(**inputs).last_hidden_state
    assert torch.equal(captured, plain)
    assert hook_count(model) == 0
    assert len(cap.attentions) == LAYERS and cap.blocks in ("encoder.layer", "layers")
    for got, want in zip(cap.attentions, expected.attentions):
        np.testing.assert_array_equal(got, want.numpy())
    n = expected.attentions[0].shape[-1]
    hidden_reference = list(expected.hidden_states)
    if name == "llama":  # transformers' last hidden state is after the final norm; capture's is the block's
        hidden_reference[-1] = None
    for got, want in zip(cap.hidden_states, hidden_reference):
        if want is not None:
            np.testing.assert_array_equal(got, want.numpy())
    record = cap.to_record(3, np.zeros((8, 8, 3), np.uint8), [f"t{i}" for i in range(n)], txt_len=n)
    assert record["attention"].shape == (LAYERS, HEADS, n, n)
    assert record["hidden_states"].shape == (LAYERS + 1, n, WIDTH)
    validate_record(record)


def test_bert_first_layer_attention_is_softmax_of_its_query_and_key(transformers_models):
    model, inputs = transformers_models["bert"]
    with torch.no_grad(), capture(model) as cap:
        model(**inputs)
    embeddings = numpy_of(model.embeddings(input_ids=inputs["input_ids"])[0])
    own = model.encoder.layer[0].attention.self
    expected = heads_attention(embeddings, numpy_of(own.query.weight), numpy_of(own.query.bias),
                               numpy_of(own.key.weight), numpy_of(own.key.bias), HEADS)
    np.testing.assert_allclose(cap.attentions[0][0], expected, atol=1e-5)
    assert cap.attention_names[0] == "encoder.layer.0.attention.self"
    assert cap.attention_modules["encoder.layer.1.attention.self"] == "transformers"


def test_llama_attention_is_causal(transformers_models):
    model, inputs = transformers_models["llama"]
    with torch.no_grad(), capture(model) as cap:
        model(**inputs)
    for weights in cap.attentions:
        assert np.all(np.triu(weights[0], k=1) == 0) and np.allclose(weights.sum(-1), 1, atol=1e-5)


def test_a_transformers_model_under_sdpa_gives_no_weights_and_to_record_says_to_load_it_eager():
    model, inputs = tiny_transformers("bert", attn_implementation="sdpa")
    with torch.no_grad(), capture(model) as cap:
        model(**inputs)
    assert cap.attentions == []
    with pytest.raises(RecordError, match=r"field 'attention'.*2 modules \('encoder.layer.0.attention.self'.*"
                                          r"attn_implementation='eager'"):
        cap.to_record(0, np.zeros((4, 4, 3), np.uint8), ["a"] * 6, txt_len=6)


# -- torch.nn.MultiheadAttention -----------------------------------------------------------------

def encoder_layer_inputs(model: nn.TransformerEncoder, x: torch.Tensor, layer: int, mask) -> np.ndarray:
    """The input of block ``layer``, run block by block (independent of capture's hooks)."""
    with torch.no_grad():
        for block in model.layers[:layer]:
            x = block(x, src_mask=mask)
    return numpy_of(x[0])


def mha_weights_by_hand(attention: nn.MultiheadAttention, x: np.ndarray, mask=None) -> np.ndarray:
    wq, wk, _ = numpy_of(attention.in_proj_weight).reshape(3, WIDTH, WIDTH)
    bq, bk, _ = numpy_of(attention.in_proj_bias).reshape(3, WIDTH)
    return heads_attention(x, wq, bq, wk, bk, attention.num_heads, mask)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_attention_is_softmax_of_its_projections(norm_first):
    model = encoder(norm_first)
    x = torch.randn(1, 7, WIDTH)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    plain = model(x, mask=causal)  # grad enabled: the standard path, with and without capture
    with capture(model) as cap:
        captured = model(x, mask=causal)
    assert torch.equal(plain, captured) and hook_count(model) == 0
    assert cap.blocks == "layers" and len(cap.attentions) == LAYERS and cap.attentions[0].shape == (1, HEADS, 7, 7)
    for layer, block in enumerate(model.layers):
        inputs = encoder_layer_inputs(model, x, layer, causal)
        if norm_first:
            inputs = numpy_of(block.norm1(torch.from_numpy(inputs).float()))
        expected = mha_weights_by_hand(block.self_attn, inputs, mask=causal.double().numpy())
        np.testing.assert_allclose(cap.attentions[layer][0], expected, atol=1e-5)
        np.testing.assert_allclose(cap.hidden_states[layer][0], encoder_layer_inputs(model, x, layer, causal), atol=1e-6)
    np.testing.assert_array_equal(cap.hidden_states[-1], plain.detach().numpy())


def test_the_users_own_multihead_call_keeps_its_arguments_and_result():
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(WIDTH, HEADS, dropout=0.5, batch_first=True).train()
    x = torch.randn(1, 5, WIDTH)
    torch.manual_seed(4)
    plain_output, plain_mean = attention(x, x, x)  # averaged weights after dropout
    torch.manual_seed(4)
    with capture(attention) as cap:
        output, mean = attention(x, x, x)
        after = torch.rand(3)  # the random stream goes on as without capture
    torch.manual_seed(4)
    attention(x, x, x)
    assert torch.equal(after, torch.rand(3))
    assert torch.equal(output, plain_output) and torch.equal(mean, plain_mean) and attention.training
    np.testing.assert_allclose(cap.attentions[0][0], mha_weights_by_hand(attention, numpy_of(x[0])), atol=1e-5)


def test_the_fused_fast_path_is_off_only_inside_the_block():
    model = encoder()
    x = torch.randn(1, 6, WIDTH)
    with torch.no_grad():
        fused = model(x)
        with capture(model) as cap:
            assert not torch.backends.mha.get_fastpath_enabled()
            standard = model(x)
    assert torch.backends.mha.get_fastpath_enabled()
    assert len(cap.attentions) == LAYERS  # the fused layer never calls self_attn: it must be off
    np.testing.assert_allclose(standard.numpy(), fused.numpy(), atol=1e-5)


def test_overlapping_captures_keep_the_fast_path_off_until_the_last_one_closes():
    first, second = capture(encoder()), capture(encoder())
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="already open"):
        first.__enter__()
    first.__exit__(None, None, None)
    assert not torch.backends.mha.get_fastpath_enabled()
    second.__exit__(None, None, None)
    assert torch.backends.mha.get_fastpath_enabled()


# -- timm-style Attention ------------------------------------------------------------------------

def layer_norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("fused_attn, qk_norm", [(True, False), (False, False), (True, True)])
def test_timm_attention_is_softmax_of_q_k_from_its_qkv(fused_attn, qk_norm):
    model = TimmStyleViT(qk_norm, fused_attn).eval()
    pixels = torch.randn(1, 3, 8, 8)
    plain = model(pixels)
    with capture(model) as cap:
        captured = model(pixels)
    assert torch.equal(plain, captured) and hook_count(model) == 0
    assert cap.attention_modules == {"blocks.0.attn": "timm Attention", "blocks.1.attn": "timm Attention"}
    for layer, block in enumerate(model.blocks):
        x = numpy_of(block.norm1(torch.from_numpy(cap.hidden_states[layer][0])))
        qkv = x @ numpy_of(block.attn.qkv.weight).T + numpy_of(block.attn.qkv.bias)
        q, k = (qkv[:, i * WIDTH:(i + 1) * WIDTH].reshape(4, HEADS, -1).transpose(1, 0, 2) for i in (0, 1))
        if qk_norm:  # a fresh LayerNorm: weight 1, bias 0
            q, k = layer_norm(q), layer_norm(k)
        expected = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]))
        np.testing.assert_allclose(cap.attentions[layer][0], expected, atol=1e-5)


# -- modules the user names ----------------------------------------------------------------------

class WeightsInOutput(nn.Module):
    def forward(self, x):
        weights = torch.softmax(x @ x.transpose(-2, -1), dim=-1)
        return weights @ x, weights


class WeightsKept(nn.Module):
    def forward(self, x):
        self.kept = torch.softmax(-x @ x.transpose(-2, -1), dim=-1)
        return self.kept @ x


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = WeightsInOutput()
        self.second = WeightsKept()

    def forward(self, x):
        return self.second(self.first(x)[0])


def test_named_modules_give_weights_by_the_documented_contract():
    model = Named()
    x = torch.randn(1, 4, 3)
    with capture(model, attention_modules=[WeightsInOutput, "second"],
                 weights_of=lambda module, inputs, output: module.kept if module is model.second else output[1]) as cap:
        model(x)
    first_input = x[0].numpy().astype(np.float64)
    second_input = model.first(x)[0][0].detach().numpy().astype(np.float64)
    np.testing.assert_allclose(cap.attentions[0][0], softmax(first_input @ first_input.T), atol=1e-6)
    np.testing.assert_allclose(cap.attentions[1][0], softmax(-second_input @ second_input.T), atol=1e-6)
    assert cap.attention_names == ["first", "second"]


def test_a_named_module_without_weights_in_its_output_is_an_error_naming_weights_of():
    model = Named()
    with pytest.raises(ValueError, match="WeightsKept returned Tensor.*weights_of="), capture(model, ["second"]):
        model(torch.randn(1, 4, 3))
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="no module named 'third'"):
        capture(model, ["third"])
    with pytest.raises(ValueError, match="no module of class Linear"):
        capture(model, [nn.Linear])


# -- hooks and threads ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "encoder", "timm"])
def test_every_hook_is_removed_after_an_exception_inside_a_block(kind):
    if kind == "bert":
        model, inputs = tiny_transformers("bert")
        blocks, call = model.encoder.layer, lambda: model(**inputs)
    elif kind == "encoder":
        model = encoder()
        blocks, call = model.layers, lambda: model(torch.randn(1, 3, WIDTH))
    else:
        model = TimmStyleViT()
        blocks, call = model.blocks, lambda: model(torch.randn(1, 3, 8, 8))

    def fail(*args, **kwargs):
        raise RuntimeError("inside the block")

    blocks[-1].forward = fail
    with pytest.raises(RuntimeError, match="inside the block"), capture(model) as cap:
        call()
    assert hook_count(model) == 0 and torch.backends.mha.get_fastpath_enabled()
    assert len(cap.attentions) == LAYERS - 1  # the blocks before the failing one ran


def test_a_capture_records_only_its_own_thread():
    model = encoder()
    x = torch.randn(1, 4, WIDTH)
    with capture(model) as cap:
        other = threading.Thread(target=model, args=(torch.randn(1, 9, WIDTH),))
        other.start()
        other.join()
        model(x)
    assert [a.shape for a in cap.attentions] == [(1, HEADS, 4, 4)] * LAYERS
    assert [h.shape for h in cap.hidden_states] == [(1, 4, WIDTH)] * (LAYERS + 1)


# -- record_local --------------------------------------------------------------------------------

SEEN_PROFILE = []


@record_local("weights")
def attend(q, k, v):
    SEEN_PROFILE.append((sys.gettrace(), sys.getprofile()))
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


class SelfAttend(nn.Module):
    def forward(self, x):
        return attend(x, x, x) + attend(-x, x, x)


def test_record_local_records_the_final_value_at_each_call_in_a_block():
    model = SelfAttend()
    x = torch.randn(1, 2, 5, 4)
    before = (sys.gettrace(), sys.getprofile())
    with capture(model) as cap:
        output = model(x)
    assert (sys.gettrace(), sys.getprofile()) == before
    assert torch.equal(output, model(x))
    q = x[0].numpy().astype(np.float64)
    first, second = cap.locals["attend"]
    np.testing.assert_allclose(first[0], softmax(q @ q.transpose(0, 2, 1) / 2), atol=1e-6)
    np.testing.assert_allclose(second[0], softmax(-q @ q.transpose(0, 2, 1) / 2), atol=1e-6)
    record = cap.to_record(0, np.zeros((4, 4, 3), np.uint8), list("abcde"), txt_len=5, attentions=[first, second],
                           hidden_states=[x[0, 0], x[0, 1], x[0, 0]])
    assert record["attention"].shape == (2, 2, 5, 5)


def test_outside_a_block_the_decorated_function_runs_directly(monkeypatch):
    def no_profiling(function):
        raise AssertionError("record_local set a profile function outside a capture block")

    monkeypatch.setattr(sys, "setprofile", no_profiling)
    SEEN_PROFILE.clear()
    x = torch.randn(3, 4)
    np.testing.assert_allclose(attend(x, x, x).numpy(), (torch.softmax(x @ x.T / 2, -1) @ x).numpy())
    assert SEEN_PROFILE == [(sys.gettrace(), sys.getprofile())]
    assert attend.__wrapped__.__name__ == "attend" and attend.__qualname__ == "attend"


def test_record_local_chains_to_the_profile_function_already_set_and_keeps_call_order():
    @record_local("depth")
    def countdown(depth):
        return depth if depth == 0 else countdown(depth - 1)

    events = []

    def outer_profile(frame, event, arg):
        if frame.f_code is countdown.__wrapped__.__code__:
            events.append(event)

    sys.setprofile(outer_profile)
    try:
        with capture(nn.Identity()) as cap:
            countdown(2)
        assert sys.getprofile() is outer_profile
    finally:
        sys.setprofile(None)
    assert cap.locals["test_record_local_chains_to_the_profile_function_already_set_and_keeps_call_order."
                      "<locals>.countdown"] == [2, 1, 0]
    assert events == ["call", "call", "call", "return", "return", "return"]


def test_record_local_refuses_what_it_cannot_record():
    def softmax_only(q):
        weights = q.softmax(-1)
        return weights

    with pytest.raises(ValueError, match="has no local variable 'attn' \\(its locals: q, weights\\)"):
        record_local("attn")(softmax_only)
    with pytest.raises(TypeError, match="is a generator"):
        record_local("weights")(lambda q: (yield q))

    @record_local("weights")
    def early(q):
        if q is None:
            return None
        weights = q
        return weights

    with capture(nn.Identity()) as cap, pytest.raises(ValueError, match="returned before assigning 'weights'"):
        early(None)
    assert sys.getprofile() is None and cap.locals[early.__qualname__] == [None]


def test_record_local_is_per_thread():
    results = []
    with capture(nn.Identity()) as cap:
        worker = threading.Thread(target=lambda: results.append(attend(*[torch.ones(2, 2)] * 3)))
        worker.start()
        worker.join()
    assert len(results) == 1 and "attend" not in cap.locals


# -- to_record errors ----------------------------------------------------------------------------

def test_to_record_names_the_field_when_shapes_do_not_fit():
    model = encoder()
    with capture(model) as cap:
        model(torch.randn(1, 5, WIDTH))
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(RecordError, match=re.escape("example 7, field 'tokens': captured 2 attention calls "
                                                    "(2 of 5x5 queries x keys) but tokens has 4 entries")):
        cap.to_record(7, image, list("abcd"), txt_len=4)
    with pytest.raises(RecordError, match="field 'hidden_states': 2 given, but the attention has 2 layers: "
                                          "expected 3"):
        cap.to_record(7, image, list("abcde"), txt_len=5, hidden_states=cap.hidden_states[:2])
    with pytest.raises(RecordError, match="field 'attention': attentions\\[1\\] has shape \\(2, 5, 4\\)"):
        cap.to_record(7, image, list("abcde"), txt_len=5, attentions=[cap.attentions[0], np.ones((1, 2, 5, 4))])
    with pytest.raises(RecordError, match="field 'colour': is not a record field"):
        cap.to_record(7, image, list("abcde"), txt_len=5, colour="red")
    batched = capture(model)
    with batched:
        model(torch.randn(2, 5, WIDTH))
    with pytest.raises(RecordError, match="field 'attention': captured a batch of 2 examples"):
        batched.to_record(7, image, list("abcde"), txt_len=5)


def test_to_record_says_what_was_searched_when_no_attention_was_captured():
    model = nn.Sequential(nn.Linear(3, 3))
    with capture(model) as cap:
        model(torch.randn(1, 3))
    with pytest.raises(RecordError, match="no attention was captured: the model has no module of the kinds "
                                          "searched \\(transformers attention classes \\(eager\\), "
                                          "torch.nn.MultiheadAttention, timm Attention\\)"):
        cap.to_record(0, np.zeros((4, 4, 3), np.uint8), ["a"], txt_len=1)
    with capture(encoder()) as idle:
        pass
    with pytest.raises(RecordError, match="none of the 2 attention modules found \\('layers.0.self_attn'"):
        idle.to_record(0, np.zeros((4, 4, 3), np.uint8), ["a"], txt_len=1)


def test_to_record_passes_the_layout_fields_through_and_the_record_is_valid():
    model = TimmStyleViT().eval()
    image = np.zeros((8, 8, 3), np.uint8)
    with capture(model) as cap:
        model(torch.randn(1, 3, 8, 8))
    coords = [(x, y) for y in range(2) for x in range(2)]
    record = cap.to_record(5, image, [f"IMG_{x},{y}" for x, y in coords], modality=["image"] * 4,
                           img_coords=coords, grid=(2, 2), prediction={"answer": "cat", "score": 0.5, "label": "cat"})
    normal = validate_record(record)
    assert normal.grid == (2, 2) and normal.accuracy is True and normal.attention.dtype == np.float32
    assert "txt_len" not in record and record["modality"] == ["image"] * 4


# -- docs/models.md ------------------------------------------------------------------------------

def test_the_documented_examples_run_as_written(tmp_path, monkeypatch, capsys):
    with open(os.path.join(ROOT, "docs", "models.md"), encoding="utf-8") as f:
        blocks = re.findall(r"<!-- capture-example -->\n```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/models.md", "exec"), {"__name__": "docs_example"})  # noqa: S102
    assert capsys.readouterr().out.splitlines() == ["(4, 4) 2 2", "(1, 2, 5, 5) (2, 5, 8)"]
    from app.database.store import VliLmdb  # noqa: PLC0415
    with VliLmdb(tmp_path / "capture_database") as db:
        info = db.example(0)
        assert list(info.tokens[:7]) == ["[CLS]", "is", "there", "a", "red", "square", "[SEP]"] and info.txt_len == 7
        assert np.allclose(db.attention_matrix(0, 0, None).sum(-1), 1, atol=1e-2)
