"""Hugging Face decoder vision-language models as live models: ``-m hf CHECKPOINT [DEVICE] [OPTION ...]``.

``CHECKPOINT`` is a Hub id or a local directory written by ``save_pretrained`` (model and processor);
the family is chosen from its ``config.model_type`` (see :data:`ADAPTERS`). ``DEVICE`` is a torch device
(``cpu`` by default). Options are ``key=value`` words (see :class:`Hf`), e.g.::

    python run_app.py -d my_db -m hf llava-hf/llava-1.5-7b-hf cuda max_new_tokens=64 dtype=float16

What one example is: the prompt (the checkpoint's chat template with one user turn, the image and the
text, and the generation prompt; the family's plain prompt when it has no template), then the answer the
model generates greedily. The attention and hidden states are the language model's, from ONE forward
pass over the whole sequence (prompt + answer), so every generated token has its own attention row, the
same row ``generate`` computes for it. The closing end token is not stored (it predicts nothing and is
no content); its probability is part of the score.

Evidence in the record beyond attention: the gradient relevancy of every generated token
(:meth:`Hf._relevancy`, optional ``relevancy=0``), the logit lens where the answer starts and the per-patch
logit lens (``patch_lens``, optional ``patch_lens=0``). Interventions (head ablation, patch removal,
activation patching) re-run a stored example: see :meth:`Hf.predict` and the methods after it.

A family is an :class:`HfAdapter` subclass in a private module (``_hf_llava.py``, ``_hf_qwen.py``, ...);
it knows how its processor builds the prompt and where each image token's patch lies.
"""
import importlib
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from app.database.analysis import gradient_relevancy
from app.database.models._interventions import (TOP_ANSWERS, heads_by_layer, heads_per_row, hooked,
                                                recording_context, zeroing_heads)
from app.database.models.vl_model import VL_Model

# config.model_type -> "module:Class" of its adapter, imported only when a checkpoint needs it
ADAPTERS = {
    "llava": "app.database.models._hf_llava:LlavaAdapter",
    "llava_next": "app.database.models._hf_llava:LlavaNextAdapter",
    "paligemma": "app.database.models._hf_llava:PaliGemmaAdapter",
    "qwen2_vl": "app.database.models._hf_qwen:Qwen2VLAdapter",
    "qwen2_5_vl": "app.database.models._hf_qwen:Qwen25VLAdapter",
    "idefics3": "app.database.models._hf_idefics:Idefics3Adapter",
    "smolvlm": "app.database.models._hf_idefics:Idefics3Adapter",
}
DELEGATED = {"vilt": "app.database.models.vilt:Vilt"}  # encoder models with a live model of their own
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MAX_NEW_TOKENS = 32
AUTO_DEVICE = "auto"  # the device word for a model spread over every GPU (device_map="auto")
LENS_TOP = 10  # tokens per layer in the logit lens (records.MAX_LENS_ANSWERS)
LENS_CHUNK = 256  # image tokens per LM-head call of the per-patch lens (a (chunk, vocab) array at a time)
RERUN_BATCH = 16  # rows per forward pass of a batched re-run (removal sets, patching columns)
# on/off options (word=0|1, default on) for the evidence that costs: what each adds to a record
FLAG_OPTIONS = {"relevancy": "the gradient relevancy of every generated token (one backward pass each)",
                "patch_lens": "the per-patch logit lens (the LM head on every image token after every layer)"}
HINT_KEY = "vl_interpret_hint"  # optional config.json key: what images the checkpoint expects


@dataclass
class ImageLayout:
    """Where the image is in one prompt, as :meth:`HfAdapter.image_layout` finds it.

    ``stored_image``: (H, W, 3) uint8, the image as the model saw it (after resize / crop / pad; several
    views side by side), so that every grid's ``box`` is exactly the region its patches cover.
    ``is_image``: (n_prompt,) bool, which prompt positions are image modality (patches, and image-side
    tokens that are no patch: newlines, start / end markers).
    ``coords``: one entry per True of ``is_image``, in sequence order: ``(x, y)`` (column, row on grid 0),
    ``(x, y, g)`` (on grid ``g``) or None (no patch).
    ``grids``: ``[{"name", "rows", "cols", "box": [left, top, right, bottom]}, ...]``, at least one.
    """
    stored_image: np.ndarray
    is_image: np.ndarray
    coords: list
    grids: list


@dataclass
class _Rerun:
    """A stored example ready for the interventions: the forward inputs over its prompt and the answer the
    unchanged model generates (batch of 1), and where its image tokens are."""
    inputs: dict
    prompt_len: int
    is_image: np.ndarray  # (n,) bool, over prompt + answer
    tokens: list


def _ranges(positions) -> str:
    """"3-38, 41" of sorted positions."""
    runs, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            runs.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(runs) or "none"


def _layout(run: _Rerun) -> tuple:
    return len(run.tokens), run.prompt_len, tuple(np.flatnonzero(run.is_image).tolist())


def _layout_text(run: _Rerun) -> str:
    return (f"{len(run.tokens)} tokens ({run.prompt_len} of the prompt, image tokens at "
            f"{_ranges(np.flatnonzero(run.is_image))})")


def _masking_keys(removed: torch.Tensor):
    """A keyword pre-hook for a decoder attention: row ``b`` of ``removed`` ((batch, n) bool) marks the keys
    that no query of batch row ``b`` may attend to, except each such token to itself (a query with no key left
    would be a row of the mask's minimum only). ``attention_mask`` is the eager additive mask (or None)."""
    def hook(_module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, n = removed.shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.zeros((batch, 1, n, n), dtype=hidden.dtype, device=hidden.device)
        blocked = removed[:, None, None, :] & ~torch.eye(n, dtype=torch.bool)
        kwargs["attention_mask"] = mask.expand(batch, *mask.shape[1:]).masked_fill(
            blocked.to(mask.device), torch.finfo(mask.dtype).min)
        return args, kwargs
    return hook


def _layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns the tensor; older layers a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _patching_in(clean_state: torch.Tensor, columns: list):
    """A forward hook for a decoder layer: batch row ``c`` gets ``clean_state`` (n, hidden) at the positions
    ``columns[c]``."""
    def hook(_module, _args, output):
        hidden = _layer_output(output).clone()
        for row, positions in enumerate(columns):
            hidden[row, positions] = clean_state[positions]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


class HfAdapter:
    """How one family of Hugging Face VLMs is prompted and where its image tokens lie.

    Interface (stable: the adapters in ``_hf_*.py`` implement it; :class:`Hf` calls nothing else)::

        model_types: tuple[str, ...]           config.model_type values this adapter handles
        model_class                            transformers class load() uses (AutoModelForImageTextToText)
        reruns_stored_image: bool              whether the stored image, given to the processor again, gives
                                               the same image tokens (what the interventions need); default True
        load(checkpoint, device, dtype) -> (model, processor)
            dtype: a torch.dtype or "auto"; the model in eval mode on ``device`` (a torch.device, or
            "auto": spread over the GPUs by accelerate's device_map="auto"), eager attention
        prompt_inputs(processor, image: PIL.Image, text: str) -> BatchFeature   (batch of 1, "pt" tensors)
            default: the processor's chat template (one user turn: the image, then the text; the
            generation prompt added), else plain_prompt(processor, text); training labels dropped
        plain_prompt(processor, text) -> str   the family's prompt without a chat template
        image_layout(inputs, processor, model, image) -> ImageLayout            (abstract)
            inputs: what prompt_inputs returned (on the model's device)
        suppressed_token_ids(processor, model) -> list[int]
            tokens never generated; default: the image placeholder (config.image_token_id / _index)
        special_token_ids(processor, model) -> set[int]
            tokens marked special in the record; default: the tokenizer's special and special added
            tokens (chat-template markers, image start / end) and the suppressed tokens
        full_inputs(model, inputs, sequence) -> dict
            the inputs of the one forward pass over ``sequence`` (1, n): the prompt's inputs extended
            to the generated tokens by the model's own generation rule (attention mask, token types)

    Helper for image_layout: :func:`pixels_to_image` turns one view of ``pixel_values`` back into pixels.
    """

    model_types: tuple = ()
    model_class = AutoModelForImageTextToText
    reruns_stored_image = True  # the stored image through the processor again gives the same image tokens

    def load(self, checkpoint: str, device, dtype):
        # eager attention: under SDPA transformers silently returns no attention maps
        placement = {"device_map": "auto"} if device == AUTO_DEVICE else {}
        model = self.model_class.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager", **placement)
        processor = AutoProcessor.from_pretrained(checkpoint)
        return (model if placement else model.to(device)).eval(), processor

    def prompt_inputs(self, processor, image: Image.Image, text: str):
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            prompt = self.plain_prompt(processor, text)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels
        return inputs

    def plain_prompt(self, processor, text: str) -> str:
        raise NotImplementedError(f"{type(self).__name__}: the processor has no chat template and the family "
                                  "no plain prompt")

    def image_layout(self, inputs, processor, model, image: Image.Image) -> ImageLayout:
        raise NotImplementedError(f"{type(self).__name__} does not locate its image tokens")

    def suppressed_token_ids(self, processor, model) -> list:
        ids = {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index")}
        return sorted(int(i) for i in ids if i is not None)

    def special_token_ids(self, processor, model) -> set:
        tokenizer = processor.tokenizer
        added = {int(i) for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        return added | {int(i) for i in tokenizer.all_special_ids} | set(self.suppressed_token_ids(processor, model))

    def full_inputs(self, model, inputs, sequence: torch.Tensor) -> dict:
        prompt = dict(inputs)
        grown = model._update_model_kwargs_for_generation(
            {}, prompt, num_new_tokens=int(sequence.shape[1] - inputs["input_ids"].shape[1]))
        grown["input_ids"] = sequence
        return grown


def _stacked(per_layer) -> np.ndarray:
    """float32 (layers, ...) of a model's per-layer (1, ...) tensors, copied to the CPU one layer at a
    time (a long LLaVA-NeXT prompt has gigabytes of attention)."""
    stacked = np.empty((len(per_layer), *per_layer[0].shape[1:]), dtype=np.float32)
    for layer, tensor in enumerate(per_layer):
        stacked[layer] = tensor[0].detach().float().cpu().numpy()
    return stacked


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _model_type(checkpoint: str) -> str:
    return AutoConfig.from_pretrained(checkpoint).model_type


def adapter_for(model_type: str) -> HfAdapter:
    """The adapter of a ``config.model_type``; ValueError naming the supported ones otherwise."""
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS) + sorted(DELEGATED))
        raise ValueError(f"unsupported model_type {model_type!r} for -m hf (supported: {supported})")
    return _import(ADAPTERS[model_type])()


def split_device(words) -> tuple:
    """(device, options) of the words after the checkpoint: the one word without "=" is the device
    ("cpu" when none), in any place, as the extractor's ``--device`` appends it after the options."""
    devices = [word for word in words if "=" not in word]
    if len(devices) > 1:
        raise ValueError(f"several devices {devices}: give one device (e.g. cuda) and key=value options")
    return (devices[0] if devices else "cpu"), [word for word in words if "=" in word]


def parse_options(words) -> dict:
    """``["max_new_tokens=8", "dtype=float16", "relevancy=0"]`` -> {"max_new_tokens": 8, "dtype": torch.float16,
    "relevancy": False, "patch_lens": True}."""
    options = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "dtype": "auto", **dict.fromkeys(FLAG_OPTIONS, True)}
    for word in words:
        key, _, value = word.partition("=")
        if key == "max_new_tokens":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"max_new_tokens={value}: expected a positive integer")
            options[key] = int(value)
        elif key == "dtype":
            if value not in DTYPES:
                raise ValueError(f"dtype={value}: expected one of {', '.join(DTYPES)}")
            options[key] = DTYPES[value]
        elif key in FLAG_OPTIONS:
            if value not in ("0", "1"):
                raise ValueError(f"{key}={value}: expected 0 or 1 (whether records get {FLAG_OPTIONS[key]})")
            options[key] = value == "1"
        else:
            flags = ", ".join(f"{flag}=0|1" for flag in FLAG_OPTIONS)
            raise ValueError(f"unknown option {key!r} (options: max_new_tokens=N, dtype={'|'.join(DTYPES)}, {flags})")
    return options


class Hf(VL_Model):
    """A Hugging Face decoder VLM (LLaVA-1.5, LLaVA-NeXT, PaliGemma, Qwen2-VL, Qwen2.5-VL, Idefics3,
    SmolVLM), run on one (image, text) pair at a time; a ViLT checkpoint is handed to :class:`Vilt`.

    ``checkpoint``: a Hub id or a local ``save_pretrained`` directory (model and processor).
    ``device_and_options``: a torch device string (``cpu`` by default, ``cuda``, ``cuda:1``, or ``auto``:
    a model too large for one GPU spread over all of them with accelerate's ``device_map="auto"``) and
    ``key=value`` options, in any order:

    - ``max_new_tokens=N``: the longest answer generated (default 32); a longer one is cut, with a note.
    - ``dtype=auto|float32|float16|bfloat16``: the weights' dtype (default ``auto``: the checkpoint's).
    - ``relevancy=0|1``: store the gradient relevancy of every generated token (default 1; it costs one
      backward pass per generated token, and gradients need the forward pass's activations kept).
    - ``patch_lens=0|1``: store the per-patch logit lens (default 1; the LM head on every image token
      after every layer: cheap for small models, a few TFLOP for a 7B model's 2 000 image tokens).

    Record: tokens in sequence order with ``modality``, ``img_coords``, ``grid`` (``grids`` when the
    family has several), ``special``, ``generated`` (the answer's tokens, last), ``logit_lens`` (where the
    answer starts, every layer: :meth:`_logit_lens`), ``relevancy`` (:meth:`_relevancy`), ``patch_lens``
    (:meth:`_patch_lens`); ``prediction``: the
    answer (the generated text, stripped) and its score, the probability of the whole greedy output
    (the product of the probabilities of every generated token, the closing end token included).
    """

    def __new__(cls, checkpoint: str, *device_and_options: str):
        model_type = _model_type(checkpoint)
        if model_type in DELEGATED:
            device, options = split_device(device_and_options)
            if options:
                raise ValueError(f"{model_type} checkpoints take no options (-m hf CHECKPOINT [DEVICE])")
            return _import(DELEGATED[model_type])(checkpoint, device)
        return super().__new__(cls)

    def __init__(self, checkpoint: str, *device_and_options: str):
        device, options = split_device(device_and_options)
        settings = parse_options(options)
        self.adapter = adapter_for(_model_type(checkpoint))
        self.max_new_tokens = settings["max_new_tokens"]
        self.relevancy, self.patch_lens = settings["relevancy"], settings["patch_lens"]
        self.model, self.processor = self.adapter.load(
            checkpoint, device if device == AUTO_DEVICE else torch.device(device), settings["dtype"])
        self.text_config = self.model.config.get_text_config()
        self._lock = threading.Lock()  # one run at a time (data_setup may be called from threads)

    def dimensions(self) -> tuple[int, int, int]:
        config = self.text_config
        return int(config.num_hidden_layers), int(config.num_attention_heads), int(config.hidden_size)

    def input_hint(self):
        hint = getattr(self.model.config, HINT_KEY, None)
        return " ".join(hint.split()) if isinstance(hint, str) and hint.strip() else None

    def prompt(self, image: Image.Image, text: str):
        """The model inputs for one pair, on the model's device (floating tensors in its dtype)."""
        inputs = self.adapter.prompt_inputs(self.processor, image, text)
        device = self.model.device  # with device_map="auto": where the embeddings are
        return {k: v.to(device, self.model.dtype) if v.is_floating_point() else v.to(device)
                for k, v in inputs.items()}

    def generate(self, inputs: dict, **generate_kwargs):
        """Greedy generation exactly as :meth:`data_setup` runs it (extra keywords go to ``generate``)."""
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        with torch.no_grad():
            return self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                suppress_tokens=self.adapter.suppressed_token_ids(self.processor, self.model) or None,
                pad_token_id=pad[0] if isinstance(pad, list) else pad, **generate_kwargs)

    def data_setup(self, ex_id: int, image_location: str, input_text: str, label=None) -> dict:
        """Generate the answer to ``input_text`` about the image and record the whole sequence.

        ``label``: the expected answer, stored as the prediction's label.
        """
        image = Image.fromarray(self.load_image(image_location))
        with self._lock:
            inputs = self.prompt(image, input_text)
            layout = self.adapter.image_layout(inputs, self.processor, self.model, image)
            prompt_len = int(inputs["input_ids"].shape[1])
            self._check_layout(ex_id, layout, prompt_len)
            sequence = self.generate(inputs)
            sequence, end_token = self._without_end_token(sequence)
            generated = int(sequence.shape[1]) - prompt_len
            explained = self.relevancy and generated > 0
            with torch.set_grad_enabled(explained):  # the relevancy needs the attentions' gradients
                # logits only where they predict the answer: the vocabulary is large
                out = self.model(**self.adapter.full_inputs(self.model, inputs, sequence),
                                 output_attentions=True, output_hidden_states=True, return_dict=True,
                                 logits_to_keep=generated + 1, use_cache=False)
            if not out.attentions or out.hidden_states is None:
                raise RuntimeError(f"example {ex_id}: the model returned no attentions / hidden states")
            ids = sequence[0].tolist()
            attention = _stacked(out.attentions)
            relevancy = self._relevancy(out, attention, ids, prompt_len) if explained else None
        return self._record(ex_id, input_text, label, layout, ids, end_token, attention, out.hidden_states,
                            out.logits[0].detach(), relevancy)

    def _record(self, ex_id: int, input_text: str, label, layout: ImageLayout, ids: list, end_token, attention,
                hidden_states, logits: torch.Tensor, relevancy) -> dict:
        """The record of one pair from its forward pass over prompt + answer: ``ids`` the sequence (without
        the closing end token, ``end_token``: its id or None), ``attention`` the stacked attentions,
        ``hidden_states`` the model's per-layer (1, n, hidden) tensors, ``logits`` (generated + 1, vocab)
        from the prompt's last position on, ``relevancy`` (n, n) or None."""
        prompt_len = len(layout.is_image)  # checked against the prompt (_check_layout)
        generated = len(ids) - prompt_len
        is_image = np.concatenate([layout.is_image.astype(bool), np.zeros(generated, dtype=bool)])
        special_ids = self.adapter.special_token_ids(self.processor, self.model)
        tokenizer = self.processor.tokenizer
        answer = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()
        notes = [] if end_token is not None else [
            f"the answer was cut at max_new_tokens={self.max_new_tokens} (no end token)"]
        record = {
            "ex_id": int(ex_id),
            "image": layout.stored_image,
            "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
            "txt_len": int((~is_image).sum()),
            "modality": ["image" if flag else "text" for flag in is_image],
            "img_coords": [None if c is None else tuple(int(v) for v in c) for c in layout.coords],
            "grid": (int(layout.grids[0]["rows"]), int(layout.grids[0]["cols"])),
            "generated": generated,
            "special": self._special(ids, is_image, layout.coords, special_ids),
            "attention": attention,
            "hidden_states": _stacked(hidden_states),
            "prediction": {"answer": answer, "score": self._score(logits, ids[prompt_len:], end_token),
                           "label": None if label is None else str(label)},
            "logit_lens": self._logit_lens(hidden_states, prompt_len - 1, logits[0]),
            "text": input_text,
        }
        if relevancy is not None:
            record["relevancy"] = relevancy
        if self.patch_lens and is_image.any():
            record["patch_lens"] = self._patch_lens(hidden_states, np.flatnonzero(is_image))
        if len(layout.grids) > 1:
            record["grids"] = layout.grids
        if notes:
            record["notes"] = notes
        return record

    # ------------------------------------------------------------------------------------------
    # Interventions on a stored example (see VL_Model): the model re-run on its stored image and text, then
    # on the answer the unchanged model generates for them, so that every token position means the same
    # token as in the record. A re-run's prediction is about the answer's first token, where the answer
    # starts (the prompt's last position, as the logit lens): "logits" and "scores" (the model's
    # probabilities) range over the vocabulary, "answer" is the most probable token generation may pick
    # (the suppressed image placeholders never are), "index" its id. The language model's layers and heads
    # are the ones intervened on.
    @property
    def supports_interventions(self) -> bool:
        return self.adapter.reruns_stored_image

    def predict(self, image, text: str, patches=None) -> dict:
        with self._lock:
            run = self._rerun(image, text, patches)
            return self._rerun_prediction(self._answer_logits(run)[0], run)

    def ablate(self, image, text: str, heads, patches=None) -> dict:
        """The heads are zeroed at the input of their attention's output projection ``o_proj``."""
        config = self.text_config
        by_layer = heads_by_layer(heads, int(config.num_hidden_layers), int(config.num_attention_heads))
        layers = self._decoder_layers()
        hooks = [(layers[layer].self_attn.o_proj, "pre", zeroing_heads(zeroed, int(layers[layer].self_attn.head_dim)))
                 for layer, zeroed in by_layer.items()]
        with self._lock:
            run = self._rerun(image, text, patches)
            with hooked(hooks):
                logits = self._answer_logits(run)
            return self._rerun_prediction(logits[0], run)

    def ablate_each_head(self, image, text: str, patches=None, progress=None) -> dict:
        """Per layer, batches of up to RERUN_BATCH rows, row r with head r zeroed at ``o_proj``'s input."""
        layers = self._decoder_layers()
        n_heads = int(self.text_config.num_attention_heads)
        with self._lock:
            run = self._rerun(image, text, patches)
            original = self._rerun_prediction(self._answer_logits(run)[0], run)
            scores = np.zeros((len(layers), n_heads), dtype=np.float32)
            answers = []
            for layer, module in enumerate(layers):
                predictions = []
                for start in range(0, n_heads, RERUN_BATCH):
                    heads = list(range(start, min(start + RERUN_BATCH, n_heads)))
                    hook = heads_per_row(heads, int(module.self_attn.head_dim))
                    with hooked([(module.self_attn.o_proj, "pre", hook)]):
                        logits = self._answer_logits(run, len(heads))
                    predictions += [self._rerun_prediction(row, run) for row in logits]
                scores[layer] = [p["scores"][original["index"]] for p in predictions]
                answers.append([p["answer"] for p in predictions])
                if progress is not None:
                    progress(layer + 1, len(layers))
            return {"original": original, "scores": scores, "answers": answers}

    def mask_patches(self, image, text: str, removed_sets, patches=None) -> list:
        """Removing an image token masks it out of the language model's attention in every layer: no other
        token attends to it (its key column gets the mask's minimum, as padding does; its own row keeps
        its diagonal, so that it stays finite), every position and embedding unchanged. This is the
        perturbation of Chefer et al. (2021), and of the ViLT adapter, for a decoder: the token is gone
        from what every later token reads. Deleting the tokens from the sequence instead would move every
        later token to another rotary position, and replacing their embeddings (zeros, a mean, a blurred
        patch) feeds the model a baseline it never saw, which still reaches the answer through attention."""
        with self._lock:
            run = self._rerun(image, text, patches)
            n = len(run.tokens)
            removed = torch.zeros((len(removed_sets), n), dtype=torch.bool)
            for row, positions in enumerate(removed_sets):
                for position in positions:
                    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                            or not 0 <= position < n or not run.is_image[position]:
                        image_positions = np.flatnonzero(run.is_image)
                        raise ValueError(f"removed token {position!r}: not an image token position (image tokens "
                                         f"are at {_ranges(image_positions)} of 0..{n - 1})")
                    removed[row, int(position)] = True
            predictions = []
            layers = self._decoder_layers()
            for rows in removed.split(RERUN_BATCH) if len(removed_sets) else ():
                with hooked([(layer.self_attn, "pre_kwargs", _masking_keys(rows)) for layer in layers]):
                    logits = self._answer_logits(run, len(rows))
                predictions += [self._rerun_prediction(row, run) for row in logits]
            return predictions

    def patch_activations(self, clean, corrupted, columns, progress=None) -> dict:
        """The clean answer's logit is its first token's, where the answer starts; a layer's output is its
        decoder layer's (the residual stream after it). Positions after the prompt's last token cannot change
        that logit (the model is causal), so patching them gives the corrupted run's logit."""
        with self._lock:
            source, target = self._pair(clean, corrupted)
            n = len(source.tokens)
            columns = [[int(p) for p in column] for column in columns]
            bad = [column for column in columns if not column or not all(0 <= p < n for p in column)]
            if bad:
                raise ValueError(f"columns: {bad[0]} is not a non-empty list of positions in 0..{n - 1}")
            layers = self._decoder_layers()
            clean_states = [None] * len(layers)

            def recording(layer):
                def hook(_module, _args, output):
                    clean_states[layer] = _layer_output(output)[0].clone()
                return hook

            with hooked([(module, "post", recording(layer)) for layer, module in enumerate(layers)]):
                clean_prediction = self._rerun_prediction(self._answer_logits(source)[0], source)
            corrupted_prediction = self._rerun_prediction(self._answer_logits(target)[0], target)
            answer = clean_prediction["index"]
            patched = np.zeros((len(layers), len(columns)), dtype=np.float32)
            for layer, module in enumerate(layers):
                for start in range(0, len(columns), RERUN_BATCH):
                    chunk = columns[start:start + RERUN_BATCH]
                    with hooked([(module, "post", _patching_in(clean_states[layer], chunk))]):
                        logits = self._answer_logits(target, len(chunk))
                    patched[layer, start:start + len(chunk)] = logits[:, answer].cpu().numpy()
                if progress is not None:
                    progress(layer + 1, len(layers))
            return {"clean": clean_prediction, "corrupted": corrupted_prediction, "patched": patched}

    def patch_heads(self, clean, corrupted, progress=None) -> dict:
        """The clean run's contexts are recorded at every ``o_proj``'s input, then patched in one head per
        row of the corrupted run's batch, at every position (only the prompt's can change the answer's logit)."""
        layers = self._decoder_layers()
        n_heads = int(self.text_config.num_attention_heads)
        with self._lock:
            source, target = self._pair(clean, corrupted)
            contexts = [None] * len(layers)
            with hooked([(module.self_attn.o_proj, "pre", recording_context(contexts, layer))
                         for layer, module in enumerate(layers)]):
                clean_prediction = self._rerun_prediction(self._answer_logits(source)[0], source)
            corrupted_prediction = self._rerun_prediction(self._answer_logits(target)[0], target)
            answer = clean_prediction["index"]
            patched = np.zeros((len(layers), n_heads), dtype=np.float32)
            for layer, module in enumerate(layers):
                for start in range(0, n_heads, RERUN_BATCH):
                    heads = list(range(start, min(start + RERUN_BATCH, n_heads)))
                    hook = heads_per_row(heads, int(module.self_attn.head_dim), contexts[layer])
                    with hooked([(module.self_attn.o_proj, "pre", hook)]):
                        logits = self._answer_logits(target, len(heads))
                    patched[layer, start:start + len(heads)] = logits[:, answer].cpu().numpy()
                if progress is not None:
                    progress(layer + 1, len(layers))
            return {"clean": clean_prediction, "corrupted": corrupted_prediction, "patched": patched}

    def _pair(self, clean, corrupted) -> tuple:
        """The re-runs of a clean and a corrupted ``(image, text, patches)``, refused unless their tokens
        line up (patching needs the same positions)."""
        source, target = self._rerun(*clean), self._rerun(*corrupted)
        if _layout(source) != _layout(target):
            raise ValueError(f"the clean input has {_layout_text(source)}, the corrupted one "
                             f"{_layout_text(target)}: positions would not match")
        return source, target

    def _decoder_layers(self):
        return self.model.get_decoder().layers

    def _rerun(self, image, text: str, patches=None) -> _Rerun:
        """The inputs of the forward pass over a stored example: the stored image (the one the model saw) and
        text through the prompt, then the answer the unchanged model generates greedily, as in
        :meth:`data_setup`. ``patches``, when given, are the image tokens' (x, y) in stored order: a decoder's
        image tokens are in the model's own order, so they must be exactly the ones this image gives."""
        picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        inputs = self.prompt(picture, text)
        layout = self.adapter.image_layout(inputs, self.processor, self.model, picture)
        if patches is not None:
            own = [tuple(int(v) for v in c[:2]) for c in layout.coords if c is not None]
            given = [tuple(int(v) for v in xy[:2]) for xy in patches]
            if given != own:
                raise ValueError(f"patches: {len(given)} image patches given, but the model puts {len(own)} image "
                                 f"tokens on this image{'' if len(given) != len(own) else ' in another order'} "
                                 "(was the example made by another model or from another image?)")
        sequence, _ = self._without_end_token(self.generate(inputs))
        prompt_len = int(inputs["input_ids"].shape[1])
        ids = sequence[0].tolist()
        is_image = np.concatenate([layout.is_image.astype(bool), np.zeros(len(ids) - prompt_len, dtype=bool)])
        return _Rerun(inputs=self.adapter.full_inputs(self.model, inputs, sequence), prompt_len=prompt_len,
                      is_image=is_image, tokens=[str(t) for t in self.processor.tokenizer.convert_ids_to_tokens(ids)])

    def _answer_logits(self, run: _Rerun, rows: int = 1) -> torch.Tensor:
        """float32 (rows, vocab): the logits where the answer starts, of ``rows`` copies of the run (the hooks
        of the caller may change each copy)."""
        inputs = {k: v.repeat(rows, *[1] * (v.dim() - 1)) if torch.is_tensor(v) and rows > 1 else v
                  for k, v in run.inputs.items()}  # batch dim first; Qwen's flat patches repeat per image
        with torch.no_grad():
            out = self.model(**inputs, return_dict=True, use_cache=False,
                             logits_to_keep=len(run.tokens) - run.prompt_len + 1)
        return out.logits[:, 0].float()

    def _rerun_prediction(self, logits: torch.Tensor, run: _Rerun) -> dict:
        """A prediction dict (see VL_Model and the comment above) of the logits where the answer starts."""
        logits = logits.detach().float().cpu()
        scores = logits.softmax(-1)
        allowed = torch.ones(len(scores), dtype=torch.bool)
        allowed[self.adapter.suppressed_token_ids(self.processor, self.model)] = False
        top = self._top_words(scores, TOP_ANSWERS, allowed)
        index = int(torch.where(allowed, scores, -1.0).argmax())
        return {"answer": top[0][0], "score": float(scores[index]), "index": index, "top": top,
                "logits": logits.numpy(), "scores": scores.numpy(), "tokens": run.tokens}

    def data_setup_batch(self, items) -> list:
        """Several pairs at once (the extractor's ``--batch-size``; contract: ``VL_Model.data_setup_batch``):
        answers generated together, records from one forward pass, each the record :meth:`data_setup` writes
        for that pair alone (app/database/models/_hf_batch.py)."""
        from app.database.models._hf_batch import data_setup_batch  # noqa: PLC0415 - it imports this module
        return data_setup_batch(self, items)

    def _without_end_token(self, sequence: torch.Tensor):
        """(the sequence without the end token that closed the answer, that token's id or None when
        generation ran to max_new_tokens)."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        last = int(sequence[0, -1])
        return (sequence[:, :-1], last) if last in eos else (sequence, None)

    def _logit_lens(self, hidden_states, position: int, final_logits: torch.Tensor) -> list:
        """The logit lens (nostalgebraist 2020) where the answer starts: the language model's final norm
        and LM head applied to every layer's hidden state at ``position`` (the prompt's last token, which
        predicts the answer's first); per hidden-state layer, the top tokens and their probabilities. The
        last layer's hidden state is already normed: its lens is the model's own output (``final_logits``)."""
        lens = []
        with torch.no_grad():
            for layer, states in enumerate(hidden_states):
                last = layer == len(hidden_states) - 1
                logits = final_logits if last else self._lens_logits(states[0, position], normed=False)
                lens.append(self._top_words(logits.float().softmax(-1), LENS_TOP))
        return lens

    def _patch_lens(self, hidden_states, positions) -> list:
        """The per-patch logit lens: at every hidden-state layer, for every image token (``positions``, in
        sequence order), the top word of the same final norm and LM head as :meth:`_logit_lens` and its
        probability: ``[[[word, p], ...per image token], ...per layer]``. At the last layer it is the model's
        own output distribution at those positions (what it would predict after each image token)."""
        tokenizer = self.processor.tokenizer
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        lens, words = [], {}
        with torch.no_grad():
            for layer, states in enumerate(hidden_states):
                last = layer == len(hidden_states) - 1
                best = [self._lens_logits(states[0, chunk.to(states.device)], normed=last).float().softmax(-1).max(-1)
                        for chunk in positions.split(LENS_CHUNK)]
                tokens = torch.cat([b.indices for b in best]).tolist()
                probs = torch.cat([b.values for b in best]).tolist()
                for token in set(tokens) - set(words):
                    words[token] = tokenizer.decode([token])
                lens.append([[words[token], float(p)] for token, p in zip(tokens, probs)])
        return lens

    def _lens_logits(self, states: torch.Tensor, normed: bool) -> torch.Tensor:
        """The language model's own head on hidden states ``(..., hidden)``: its final norm (unless the states
        are ``normed``: the last hidden-state layer already is), the LM head, and the final logit
        soft-capping where the text model has one (Gemma 2), as its forward pass applies them."""
        states = states if normed else self.model.get_decoder().norm(states)
        logits = self.model.get_output_embeddings()(states)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _top_words(self, probs: torch.Tensor, k: int, allowed=None) -> list:
        """``[[word, p], ...]``: the ``k`` most probable tokens of ``probs`` (vocab,), decoded; with ``allowed``
        (a bool mask over the vocabulary), only those tokens."""
        candidates = probs if allowed is None else torch.where(allowed, probs, -1.0)
        top = candidates.topk(k)
        return [[self.processor.tokenizer.decode([int(token)]), float(probs[token])] for token in top.indices]

    def _relevancy(self, out, attention: np.ndarray, ids: list, prompt_len: int) -> np.ndarray:
        """Chefer et al.'s gradient relevancy of every generated token, (n, n) float32, rows = queries.

        Row ``q`` (the prompt's last token through the last-but-one position) is the relevancy map of the
        token the model generated from position ``q``: :func:`~app.database.analysis.gradient_relevancy` of
        that token's logit at ``q``, through the attentions of the one forward pass over prompt + answer
        (``out``, computed with gradients; ``attention``: its stacked attentions). The other rows are zero:
        those queries generated no stored token (the prompt's earlier positions predict nothing, the last
        position only the end token, which is not stored). One backward pass per generated token."""
        n = len(ids)
        relevancy = np.zeros((n, n), dtype=np.float32)
        for offset, query in enumerate(range(prompt_len - 1, n - 1)):
            target = out.logits[0, offset, ids[query + 1]]  # out.logits starts at the prompt's last position
            gradients = torch.autograd.grad(target, out.attentions, retain_graph=True)
            relevancy[query] = gradient_relevancy(attention, _stacked(gradients))[query]
        return relevancy

    @staticmethod
    def _score(logits: torch.Tensor, answer_ids: list, end_token) -> float:
        """The probability of the greedy output: every generated token's probability multiplied, the
        closing end token's included. ``logits``: the forward pass's last len(answer_ids) + 1 positions,
        from the prompt's last token (which predicts the first answer token) on."""
        probs = logits.float().softmax(-1)
        predicted = answer_ids + ([] if end_token is None else [end_token])
        return float(np.prod([float(probs[i, token]) for i, token in enumerate(predicted)]))

    @staticmethod
    def _special(ids: list, is_image: np.ndarray, coords: list, special_ids: set) -> list:
        """Per token: a text token is special when its id is (template markers, BOS); an image token
        when it is no patch (the record format decides image tokens by their coordinate alone)."""
        no_patch = iter([c is None for c in coords])
        return [next(no_patch) if image else token in special_ids for token, image in zip(ids, is_image)]

    @staticmethod
    def _check_layout(ex_id: int, layout: ImageLayout, prompt_len: int):
        """An adapter's layout must describe this prompt: one flag per position, one coordinate per image token."""
        if layout.is_image.shape != (prompt_len,):
            raise RuntimeError(f"example {ex_id}: image_layout flags {layout.is_image.shape[0]} positions, "
                               f"the prompt has {prompt_len}")
        if len(layout.coords) != int(layout.is_image.sum()):
            raise RuntimeError(f"example {ex_id}: image_layout gives {len(layout.coords)} coordinates for "
                               f"{int(layout.is_image.sum())} image tokens")
