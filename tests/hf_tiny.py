"""Tiny offline pieces for Hugging Face VLM tests (tests only; nothing is downloaded).

``word_tokenizer(words, added_special)``: a whitespace word-level tokenizer (every word of ``words`` is
one token, anything else ``<unk>``) with BOS / EOS / PAD / UNK and extra special tokens such as image
placeholders or chat markers, which stay whole even when written without spaces around them.
``chat_template(image)``: a Jinja chat template that writes ``{bos}USER: {image}{text} ASSISTANT:``.
``random_image(height, width)``: an image whose patches all differ.
``capture_inputs_embeds(module)``: the ``inputs_embeds`` a language model receives (image features
merged in), for checking which feature lands at which position.
"""
from __future__ import annotations

import contextlib

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def word_tokenizer(words, added_special=("<image>",), template: str | None = None) -> PreTrainedTokenizerFast:
    """Ids: the four special tokens of :data:`SPECIAL` (0-3), then ``words``, then ``added_special``."""
    vocab = {token: i for i, token in enumerate([*SPECIAL.values(), *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in added_special],
                         special_tokens=True)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def chat_template(image: str = "<image>") -> str:
    """``{bos}ROLE: content ...`` per message, an image part written as ``image`` and a space, then
    ``ASSISTANT:`` as the generation prompt."""
    return ("{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + image + " {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 noise: every patch differs from every other."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@contextlib.contextmanager
def capture_inputs_embeds(language_model):
    """``with capture_inputs_embeds(model.model.language_model) as seen:`` -> ``seen`` holds the
    ``inputs_embeds`` of every call made inside the block."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
