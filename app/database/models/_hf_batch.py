"""Batched extraction for ``-m hf`` decoder VLMs: :meth:`Hf.data_setup_batch` (the extractor's ``--batch-size``).

Every record is the record :meth:`Hf.data_setup` writes for the same pair run alone (same tokens, same
layout, same answer; values within float rounding), built in four steps:

1. Per pair, exactly as ``data_setup``: the image, the prompt inputs (``Hf.prompt``), the image layout
   (the adapter's ``image_layout``, checked by ``Hf._check_layout``). A pair that fails here fails alone.
2. The pairs are grouped by the shapes of their tensors that are not one value per prompt position
   (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``): those are
   concatenated along their first dimension, which is each family's batched layout when the other
   dimensions agree. LLaVA-1.5 and PaliGemma (one fixed-size view) and Qwen2-VL / Qwen2.5-VL (patches
   flattened, split again by ``image_grid_thw``) batch every pair together; LLaVA-NeXT and Idefics3 /
   SmolVLM batch the pairs whose images were cut into the same number of tiles (one view per tile), and
   run each such set as its own batch.
3. Greedy generation of a group with the prompts LEFT-padded (``Hf.generate``, as transformers batches a
   decoder: every prompt ends in the same column, so the new tokens are appended in step; generate
   derives each row's positions, and Qwen's 3-D rotary positions, from the attention mask). Each row is
   cut after its first end token; ``Hf._without_end_token`` then drops it as for a pair alone.
4. One forward pass over the group's prompt + answer sequences (``adapter.full_inputs`` per pair),
   RIGHT-padded: every real token is then at the position it has alone (the model's default positions,
   0..n-1, PaliGemma's 1..n, Qwen's from the mask), causal attention never reaches the pads after a
   sequence, and the attention mask hides them from PaliGemma's bidirectional prefix (checked: a real
   query giving a pad any attention fails the group). Each record keeps its own first n rows and columns
   of attention and its first n hidden states; logits are kept only where they score the answers. The
   gradient relevancy (``Hf.relevancy``) takes one backward pass per answer step for the whole group.
   The record itself is ``Hf._record``'s, as for a pair alone, from that pair's share of the pass.

What differs from a run alone is float rounding: a padded key gets exactly zero weight, but the kernels
may sum in another order over the longer rows (about 1e-7 relative, below the float16 the database
stores). Greedy decoding could thus pick another token only where two candidates tie within that rounding.

A group whose batched run raises (out of memory, a family the steps above do not fit) is run again one
pair at a time with ``Hf.data_setup``, so that only a bad pair fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.database.analysis import gradient_relevancy
from app.database.models.hf import ImageLayout, _stacked
from app.database.models.vl_model import batch_item


@dataclass
class _Pair:
    """One pair prepared as ``Hf.data_setup`` prepares it (batch of 1 tensors on the model's device)."""

    index: int  # its place in the items
    ex_id: int
    image_location: str
    text: str
    label: object
    inputs: dict
    layout: ImageLayout

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def data_setup_batch(hf, items) -> list:
    """One record (or the exception of that pair) per item; see the module docstring."""
    results = [None] * len(items)
    groups: dict = {}
    failed_groups = []
    with hf._lock:
        for index, item in enumerate(items):
            try:
                pair = _prepare(hf, index, *batch_item(item))
            except Exception as e:  # noqa: BLE001 - that pair fails alone
                results[index] = e
                continue
            groups.setdefault(_batch_signature(pair.inputs), []).append(pair)
        for group in groups.values():
            try:
                records = _run_group(hf, group)
            except Exception:  # noqa: BLE001 - run its pairs alone below
                failed_groups.append(group)
                continue
            for pair, record in zip(group, records):
                results[pair.index] = record
    for group in failed_groups:  # outside the lock, which data_setup takes itself
        for pair in group:
            try:
                results[pair.index] = hf.data_setup(pair.ex_id, pair.image_location, pair.text, label=pair.label)
            except Exception as e:  # noqa: BLE001
                results[pair.index] = e
    return results


def _prepare(hf, index: int, ex_id: int, image_location: str, text: str, label) -> _Pair:
    image = Image.fromarray(hf.load_image(image_location))
    inputs = hf.prompt(image, text)
    layout = hf.adapter.image_layout(inputs, hf.processor, hf.model, image)
    pair = _Pair(index, int(ex_id), image_location, text, label, inputs, layout)
    hf._check_layout(ex_id, layout, pair.prompt_len)
    return pair


def _per_position(value: torch.Tensor, length: int) -> bool:
    """A (1, length) tensor: one value per sequence position (ids, attention mask, token types)."""
    return value.ndim == 2 and tuple(value.shape) == (1, length)


def _batch_signature(inputs: dict) -> tuple:
    """What pairs must share to be batched: the per-position keys, and the dtype and all dimensions
    but the first of every other tensor."""
    length = int(inputs["input_ids"].shape[1])
    return tuple(sorted((key, None if _per_position(value, length) else (tuple(value.shape[1:]), str(value.dtype)))
                        for key, value in inputs.items()))


def _collate(rows: list, pad_id: int, left: bool) -> dict:
    """One batch of single-pair inputs: per-position tensors padded (``input_ids`` with ``pad_id``, the
    attention mask and token types with 0) on the left or the right, the others concatenated."""
    lengths = [int(row["input_ids"].shape[1]) for row in rows]
    longest = max(lengths)
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if not _per_position(values[0], lengths[0]):
            batch[key] = torch.cat(values, dim=0)
            continue
        padded = values[0].new_full((len(rows), longest), pad_id if key == "input_ids" else 0)
        for i, (value, length) in enumerate(zip(values, lengths)):
            if left:
                padded[i, longest - length:] = value[0]
            else:
                padded[i, :length] = value[0]
        batch[key] = padded
    return batch


def _pad_id(hf) -> int:
    """The id the prompts are padded with (masked out, so any id that is no image placeholder)."""
    tokenizer = hf.processor.tokenizer
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return sorted(_end_ids(hf))[0]


def _end_ids(hf) -> set:
    eos = hf.model.generation_config.eos_token_id
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


def _answer(row: torch.Tensor, end_ids: set) -> torch.Tensor:
    """A row's generated tokens up to and with its first end token (a batch goes on generating, and
    pads, after a row has ended)."""
    ends = [k for k, token in enumerate(row.tolist()) if token in end_ids]
    return row[: ends[0] + 1] if ends else row


def _run_group(hf, group: list) -> list:
    """The records of a group of pairs that batch together (steps 3 and 4 of the module docstring)."""
    pad_id = _pad_id(hf)
    prompts = _collate([pair.inputs for pair in group], pad_id, left=True)
    output = hf.generate(prompts)
    end_ids = _end_ids(hf)
    width = int(prompts["input_ids"].shape[1])
    sequences, end_tokens = [], []
    for pair, row in zip(group, output):
        sequence = torch.cat([pair.inputs["input_ids"], _answer(row[width:], end_ids)[None]], dim=1)
        sequence, end_token = hf._without_end_token(sequence)
        sequences.append(sequence)
        end_tokens.append(end_token)
    lengths = [int(sequence.shape[1]) for sequence in sequences]
    generated = [n - pair.prompt_len for pair, n in zip(group, lengths)]

    full = _collate([hf.adapter.full_inputs(hf.model, pair.inputs, sequence)
                     for pair, sequence in zip(group, sequences)], pad_id, left=False)
    # logits only where they score an answer: from each prompt's last token to its sequence's end
    scored = [list(range(pair.prompt_len - 1, n)) for pair, n in zip(group, lengths)]
    keep = sorted(set().union(*scored))
    column = {position: k for k, position in enumerate(keep)}
    explained = hf.relevancy and max(generated) > 0
    with torch.set_grad_enabled(explained):  # the relevancy needs the attentions' gradients
        out = hf.model(**full, output_attentions=True, output_hidden_states=True, return_dict=True,
                       logits_to_keep=torch.tensor(keep, device=full["input_ids"].device), use_cache=False)
    if not out.attentions or out.hidden_states is None:
        raise RuntimeError("the model returned no attentions / hidden states")
    for row, (pair, n) in enumerate(zip(group, lengths)):
        _check_no_padding_attended(pair.ex_id, out.attentions, row, n)
    attentions = [_stacked([layer[i:i + 1, :, :n, :n] for layer in out.attentions]) for i, n in enumerate(lengths)]
    relevancies = (_relevancies(out, attentions, sequences, group, column) if explained
                   else [None] * len(group))

    return [hf._record(pair.ex_id, pair.text, pair.label, pair.layout, sequence[0].tolist(), end_token, attention,
                       [states[i:i + 1, :n] for states in out.hidden_states],
                       out.logits[i, [column[p] for p in positions]].detach(), relevancy)
            for i, (pair, sequence, end_token, attention, relevancy, n, positions)
            in enumerate(zip(group, sequences, end_tokens, attentions, relevancies, lengths, scored))]


def _check_no_padding_attended(ex_id: int, attentions, row: int, n: int) -> None:
    """A real query of row ``row`` must give the padding after its ``n`` tokens no weight at all."""
    leaked = max((float(layer[row, :, :n, n:].detach().sum(-1).max()) for layer in attentions
                  if n < layer.shape[-1]), default=0.0)
    if leaked > 0:
        raise RuntimeError(f"example {ex_id}: {leaked:.3g} of a query's attention reached the padding")


def _relevancies(out, attentions: list, sequences: list, group: list, column: dict) -> list:
    """``Hf._relevancy`` of every row of the batch, with one backward pass per answer step instead of one
    per generated token: the rows do not interact, so the gradient of the sum of their step-``k`` targets
    gives each row the gradient of its own target. Row ``q`` of a record is the relevancy of the token
    generated from position ``q``; the other rows are zero (see ``Hf._relevancy``)."""
    ids = [sequence[0].tolist() for sequence in sequences]
    queries = [range(pair.prompt_len - 1, len(row) - 1) for pair, row in zip(group, ids)]
    maps = [np.zeros((len(row), len(row)), dtype=np.float32) if len(q) else None for row, q in zip(ids, queries)]
    for step in range(max(len(q) for q in queries)):
        rows = [i for i, q in enumerate(queries) if step < len(q)]
        target = sum(out.logits[i, column[queries[i][step]], ids[i][queries[i][step] + 1]] for i in rows)
        gradients = torch.autograd.grad(target, out.attentions, retain_graph=True)
        for i in rows:
            n, query = len(ids[i]), queries[i][step]
            own = _stacked([gradient[i:i + 1, :, :n, :n] for gradient in gradients])
            maps[i][query] = gradient_relevancy(attentions[i], own)[query]
    return maps
