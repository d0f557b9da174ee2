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


class HfAdapter:
    """How one family of Hugging Face VLMs is prompted and where its image tokens lie.

    Interface (stable: the adapters in ``_hf_*.py`` implement it; :class:`Hf` calls nothing else)::

        model_types: tuple[str, ...]           config.model_type values this adapter handles
        model_class                            transformers class load() uses (AutoModelForImageTextToText)
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
        stacked[layer] = tensor[0].float().cpu().numpy()
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
    """``["max_new_tokens=8", "dtype=float16"]`` -> {"max_new_tokens": 8, "dtype": torch.float16}."""
    options = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "dtype": "auto"}
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
        else:
            raise ValueError(f"unknown option {key!r} (options: max_new_tokens=N, dtype={'|'.join(DTYPES)})")
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

    Record: tokens in sequence order with ``modality``, ``img_coords``, ``grid`` (``grids`` when the
    family has several), ``special``, ``generated`` (the answer's tokens, last), ``logit_lens`` (where the
    answer starts, every layer: :meth:`_logit_lens`); ``prediction``: the
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
            sequence = self.generate(inputs)
            sequence, end_token = self._without_end_token(sequence)
            prompt_len = int(inputs["input_ids"].shape[1])
            generated = int(sequence.shape[1]) - prompt_len
            with torch.no_grad():  # logits only where they predict the answer: the vocabulary is large
                out = self.model(**self.adapter.full_inputs(self.model, inputs, sequence),
                                 output_attentions=True, output_hidden_states=True, return_dict=True,
                                 logits_to_keep=generated + 1)
        if not out.attentions or out.hidden_states is None:
            raise RuntimeError(f"example {ex_id}: the model returned no attentions / hidden states")
        ids = sequence[0].tolist()
        self._check_layout(ex_id, layout, prompt_len)
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
            "attention": _stacked(out.attentions),
            "hidden_states": _stacked(out.hidden_states),
            "prediction": {"answer": answer, "score": self._score(out.logits[0], ids[prompt_len:], end_token),
                           "label": None if label is None else str(label)},
            "logit_lens": self._logit_lens(out.hidden_states, prompt_len - 1, out.logits[0, 0]),
            "text": input_text,
        }
        if len(layout.grids) > 1:
            record["grids"] = layout.grids
        if notes:
            record["notes"] = notes
        return record

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
        head, norm = self.model.get_output_embeddings(), self.model.get_decoder().norm
        tokenizer = self.processor.tokenizer
        lens = []
        with torch.no_grad():
            for layer, states in enumerate(hidden_states):
                logits = final_logits if layer == len(hidden_states) - 1 else head(norm(states[0, position]))
                top = logits.float().softmax(-1).topk(LENS_TOP)
                lens.append([[tokenizer.decode([int(token)]), float(p)] for p, token in zip(top.values, top.indices)])
        return lens

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
