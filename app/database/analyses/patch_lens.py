"""The per-patch logit lens: what each image token "says" at every layer.

A decoder adapter (``-m hf``) applies the language model's final norm and LM head to every image
token's hidden state after every layer and keeps the top word and its probability (the record field
``patch_lens``, validated by :mod:`app.database.records`). Most patches of a layer share a few words,
so one example's lens is stored compactly under its own key (table ``patch_lens``, key ``E``), never
in the description that every click reads:

``uint32`` little-endian header length, the header (JSON: ``words``, the example's distinct words;
``index``, the dtype of the indices, ``<u2`` or ``<u4``; ``shape``, ``[hidden-state layers, image
tokens]``), then the indices into ``words`` ``(layers, image tokens)``, then the probabilities as
float16 ``(layers, image tokens)``; image tokens in stored order. The description says
``"patch_lens": true`` (``ExampleInfo.has_patch_lens``), so that the page knows without reading it.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

import numpy as np

from app.database import records
from app.database.analyses import MODEL, Analysis, ExampleArrays, Stored, register
from app.database.keys import example_key

__all__ = ["PatchLensLayer", "PatchLensAnalysis", "PATCH_LENS", "encode", "decode_layer"]

_HEADER_LENGTH = 4


class PatchLensLayer(NamedTuple):
    """One hidden-state layer of an example's per-patch logit lens."""

    tokens: np.ndarray          # (m,) int: the stored positions of the example's image tokens
    words: list[str]            # (m,) the top word of each
    probabilities: np.ndarray   # (m,) float32: its probability


def encode(lens: records.PatchLens) -> bytes:
    """The stored value of ``lens`` (see the module docstring)."""
    flat = [word for row in lens.words for word in row]
    vocabulary = list(dict.fromkeys(flat))
    position = {word: i for i, word in enumerate(vocabulary)}
    index_type = "<u2" if len(vocabulary) <= 2 ** 16 else "<u4"
    index = np.fromiter((position[word] for word in flat), dtype=index_type, count=len(flat))
    header = json.dumps({"words": vocabulary, "index": index_type,
                         "shape": [lens.n_layers, lens.n_tokens]}).encode()
    return (len(header).to_bytes(_HEADER_LENGTH, "little") + header + index.tobytes()
            + lens.probabilities.astype("<f2").tobytes())


def decode_layer(raw, layer: int) -> tuple[list[str], np.ndarray]:
    """The words and float32 probabilities of hidden-state layer ``layer`` of a stored value."""
    raw = memoryview(raw)
    size = int.from_bytes(raw[:_HEADER_LENGTH], "little")
    header = json.loads(bytes(raw[_HEADER_LENGTH:_HEADER_LENGTH + size]))
    layers, tokens = header["shape"]
    if not 0 <= layer < layers:
        raise IndexError(f"patch lens layer {layer} out of range 0..{layers - 1}")
    itemsize = np.dtype(header["index"]).itemsize
    start = _HEADER_LENGTH + size
    index = np.frombuffer(raw, header["index"], tokens, offset=start + layer * tokens * itemsize)
    probabilities = np.frombuffer(raw, "<f2", tokens, offset=start + layers * tokens * itemsize + layer * tokens * 2)
    words = header["words"]
    return [words[i] for i in index.tolist()], probabilities.astype(np.float32)


class PatchLensAnalysis(Analysis):
    name = "patch_lens"
    needs = (MODEL,)
    field = "patch_lens"
    table = "patch_lens"
    what = "per-patch logit lens"
    optional = True

    def compute(self, example: ExampleArrays) -> Stored:
        r = example.record
        if r.patch_lens is None:
            return Stored()
        return Stored({example_key(r.ex_id): encode(r.patch_lens)}, {"patch_lens": True})

    def read(self, db, ex_id: int, layer: int) -> Optional[PatchLensLayer]:
        """What each image token says at hidden-state layer ``layer`` (0 = embeddings .. n_layers), image
        tokens in stored order; None when the example has no per-patch logit lens."""
        info = db.example(ex_id)
        layer = db._check_layer(layer, hidden=True)
        if not info.has_patch_lens:
            return None
        with db._read() as txn:
            words, probabilities = decode_layer(db._get(txn, self.table, example_key(info.ex_id), info.ex_id,
                                                        self.what), layer)
        return PatchLensLayer(np.flatnonzero(~info.is_text), words, probabilities)


PATCH_LENS = register(PatchLensAnalysis())
