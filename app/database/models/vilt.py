"""ViLT (Kim et al. 2021) as a live model: ``run_app.py -m vilt CHECKPOINT [DEVICE]``.

``CHECKPOINT`` is a Hugging Face Hub id (``dandelin/vilt-b32-finetuned-vqa``, needs internet the
first time) or a local directory written by ``save_pretrained`` (model and processor). The head is
chosen from the checkpoint's ``config.architectures``:

======================================  ===========================================================
``ViltForQuestionAnswering``            prediction: top answer, its probability (sigmoid, as ViLT's
                                        VQA heads are trained; softmax when the config's
                                        ``problem_type`` is ``single_label_classification``)
``ViltForImageAndTextRetrieval``        prediction: "match" / "no match", the raw rank logit
``ViltForMaskedLM``                     prediction: the tokens filled in at ``[MASK]`` positions
``ViltModel``                           no prediction
======================================  ===========================================================

Token order in a record: the text tokens of the processor's tokenizer (``[CLS] ... [SEP]``, never
padding), then ViLT's image ``[CLS]`` (coordinate ``None``), then the image patches in row-major order.
A text longer than the model's ``max_position_embeddings`` tokens is cut: the record's ``text`` is what
the model kept, and a ``notes`` entry says what was left out. The record's ``grid`` is the image's whole
patch grid, also when ``max_image_length`` samples fewer patches than it holds.

An optional ``"vl_interpret_hint"`` string in the checkpoint's ``config.json`` says what images the
model expects (:meth:`Vilt.input_hint`, shown in the "Add example" help).

ViLT's ``ViltEmbeddings.visual_embed`` shuffles the patches (``torch.multinomial`` over the valid
patches, and samples a subset when ``config.max_image_length`` is positive) and returns the
``patch_index`` (row, col) of every token it kept, which ``ViltModel.forward`` then discards. So
:meth:`Vilt.data_setup` calls ``visual_embed`` itself, passes its output to the model as
``image_embeds`` (with its patch mask as ``pixel_mask``, which is exactly what ``ViltEmbeddings``
does with ``image_embeds``), and uses the returned ``patch_index`` to know the real patch of every
image token. The tokens, attention and hidden states are then permuted into row-major order.
"""
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoConfig,
    ViltForImageAndTextRetrieval,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
    ViltModel,
    ViltProcessor,
)

from app.database.analysis import gradient_relevancy
from app.database.models._interventions import (TOP_ANSWERS, heads_by_layer, heads_per_row, hooked,
                                                recording_context, zeroing_heads)
from app.database.models.vl_model import VL_Model, pixels_to_image, same_answer

HEADS = {
    "ViltForQuestionAnswering": ViltForQuestionAnswering,
    "ViltForImageAndTextRetrieval": ViltForImageAndTextRetrieval,
    "ViltForMaskedLM": ViltForMaskedLM,
    "ViltModel": ViltModel,
}
IMAGE_CLS = "[CLS]"
RELEVANCY_HEADS = ("ViltForQuestionAnswering", "ViltForImageAndTextRetrieval")  # a score to explain
HINT_KEY = "vl_interpret_hint"  # optional config.json key: what images the checkpoint expects
CUT_TEXT_CHARS = 200  # how much of a cut text the note quotes


@dataclass
class _Rerun:
    """A stored example's inputs, ready for the model: its image tokens in the stored order."""
    fixed: dict  # input_ids, attention_mask, token_type_ids, image_embeds (batch of 1)
    pixel_mask: torch.Tensor  # (1, 1 + patches): image [CLS], then the patches
    txt_len: int
    tokens: list


def _checkpoint_location(model: str) -> str:
    """A local directory as a path; anything that looks like a path but is missing is an error
    (instead of Hugging Face's "not a valid repo id"); everything else is a Hub id."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    first = path.split("/")[0]
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or (first and os.path.isdir(first)):
        raise FileNotFoundError(f"no checkpoint directory {model} (a folder written by save_pretrained)")
    return model


class Vilt(VL_Model):
    """A ViLT checkpoint, run on one (image, text) pair at a time.

    ``checkpoint``: a Hub id or a local directory with the model and its processor.
    ``device``: a torch device string (``cpu``, ``cuda``, ``cuda:1``).
    """

    def __init__(self, checkpoint: str, device: str = "cpu"):
        model = _checkpoint_location(checkpoint)
        config = AutoConfig.from_pretrained(model)
        if config.model_type != "vilt":
            raise ValueError(f"{model} is a {config.model_type!r} checkpoint, not a ViLT one")
        architecture = (config.architectures or ["ViltModel"])[0]
        if architecture not in HEADS:
            raise ValueError(f"unsupported ViLT head {architecture} (supported: {', '.join(HEADS)})")
        self.architecture = architecture
        self.processor = ViltProcessor.from_pretrained(model)
        # ViLT's attention is its own eager implementation; ask for it explicitly so that a future
        # SDPA default never silently drops the attention maps.
        net = HEADS[architecture].from_pretrained(model, attn_implementation="eager")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = net.config
        self.vilt = net if isinstance(net, ViltModel) else net.vilt
        self._lock = threading.Lock()  # one forward pass at a time (data_setup may run in threads)

    def dimensions(self) -> tuple[int, int, int]:
        return (int(self.config.num_hidden_layers), int(self.config.num_attention_heads),
                int(self.config.hidden_size))

    def input_hint(self):
        hint = getattr(self.config, HINT_KEY, None)
        return " ".join(hint.split()) if isinstance(hint, str) and hint.strip() else None

    # ------------------------------------------------------------------------------------------
    def data_setup(self, ex_id: int, image_location: str, input_text: str, label=None) -> dict:
        """Run ViLT on the image file and the text; return one record (see the module docstring).

        ``label``: the expected answer (VQA: an answer string; retrieval: "match" / "no match";
        MLM: the expected filled-in tokens). When given, ``accuracy`` is whether the prediction
        equals it (case and surrounding whitespace ignored).
        """
        image = self.load_image(image_location)
        max_length = int(self.config.max_position_embeddings)
        inputs = self._inputs(image, input_text)
        input_ids = inputs["input_ids"]
        explained = self.architecture in RELEVANCY_HEADS
        with self._lock:
            with torch.no_grad():
                image_embeds, image_mask, (patch_index, (rows, cols)) = self.vilt.embeddings.visual_embed(
                    inputs["pixel_values"], inputs["pixel_mask"], max_image_length=self.config.max_image_length
                )
            with torch.set_grad_enabled(explained):  # the relevancy needs the attentions' gradients
                out = self.net(
                    input_ids=input_ids,
                    attention_mask=inputs["attention_mask"],
                    token_type_ids=inputs.get("token_type_ids"),
                    image_embeds=image_embeds,
                    pixel_mask=image_mask,
                    output_attentions=True,
                    output_hidden_states=True,
                    return_dict=True,
                )
            if out.attentions is None or out.hidden_states is None:
                raise RuntimeError("the ViLT model returned no attentions / hidden states")
            relevancy = self._relevancy(out) if explained else None

        txt_len = int(input_ids.shape[1])
        text_tokens = self.processor.tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
        # patch_index: (1, n_patches, 2) as (row, col) of each image token after the image [CLS].
        rc = patch_index[0].cpu().numpy().astype(int)
        valid = image_mask[0, 1:].cpu().numpy().astype(bool)  # all True for one unpadded image
        if len({(r, c) for r, c in rc[valid]}) != int(valid.sum()):
            raise RuntimeError("ViLT's visual embedding returned a patch twice")
        order = sorted(np.flatnonzero(valid), key=lambda i: (rc[i, 0], rc[i, 1]))
        # indices into the model's sequence: text, image [CLS], then the kept patches row-major
        perm = np.concatenate([np.arange(txt_len), [txt_len], txt_len + 1 + np.asarray(order, dtype=int)])
        perm = perm.astype(int)

        attention = torch.stack([a[0] for a in out.attentions]).detach().float().cpu().numpy()  # (L, H, n, n)
        hidden = torch.stack([h[0] for h in out.hidden_states]).detach().float().cpu().numpy()  # (L+1, n, d)
        attention = attention[:, :, perm][:, :, :, perm]
        hidden = hidden[:, perm]
        if not valid.all():  # padding patches were dropped: renormalise over the kept keys
            attention = attention / attention.sum(-1, keepdims=True)

        coords = [(int(rc[i, 1]), int(rc[i, 0])) for i in order]  # (x, y) = (col, row)
        patch_tokens = [f"IMG_{x},{y}" for x, y in coords]
        seen_text, notes = self._seen_text(input_text, txt_len, max_length)
        record = {
            "ex_id": int(ex_id),
            "image": self._seen_image(inputs, int(rows), int(cols)),
            "tokens": list(text_tokens) + [IMAGE_CLS] + patch_tokens,
            "txt_len": txt_len,
            "img_coords": [None] + coords,
            "grid": (int(rows), int(cols)),  # the whole grid, also when patches were sampled
            "attention": np.ascontiguousarray(attention, dtype=np.float32),
            "hidden_states": np.ascontiguousarray(hidden, dtype=np.float32),
            "text": seen_text,
        }
        if notes:
            record["notes"] = notes
        if relevancy is not None:
            record["relevancy"] = np.ascontiguousarray(relevancy[perm][:, perm], dtype=np.float32)
        if self.architecture == "ViltForQuestionAnswering":
            record["logit_lens"] = self._logit_lens(out.hidden_states)
        prediction = self._prediction(out, input_ids[0])
        if prediction is not None:
            prediction["label"] = None if label is None else str(label)
            record["prediction"] = prediction
            if label is not None:
                record["accuracy"] = same_answer(prediction["answer"], label)
        return record

    def _inputs(self, image, text: str) -> dict:
        """The processor's tensors for one pair, on the model's device, cut to the model's length."""
        inputs = self.processor(
            images=image,
            text=text,
            return_tensors="pt",
            padding=False,
            truncation=True,
            max_length=int(self.config.max_position_embeddings),
        )
        # a processor configured to pad anyway: keep only the real tokens, never store [PAD]
        real = inputs["attention_mask"][0].bool()
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in inputs:
                inputs[key] = inputs[key][:, real]
        return {k: v.to(self.device) for k, v in inputs.items()}

    # ------------------------------------------------------------------------------------------
    def _seen_text(self, input_text: str, txt_len: int, max_length: int) -> tuple[str, list[str]]:
        """The text the model saw (``input_text`` itself unless the tokenizer cut it) and a note
        saying what was left out, so that the page never shows words the model did not read."""
        tokenizer = self.processor.tokenizer
        content = tokenizer(input_text, add_special_tokens=False)["input_ids"]
        kept = txt_len - tokenizer.num_special_tokens_to_add(pair=False)
        if len(content) <= kept:
            return input_text, []
        if getattr(tokenizer, "truncation_side", "right") == "left":
            seen, cut = content[len(content) - kept:], content[: len(content) - kept]
        else:
            seen, cut = content[:kept], content[kept:]
        left_out = tokenizer.decode(cut)
        if len(left_out) > CUT_TEXT_CHARS:
            left_out = left_out[: CUT_TEXT_CHARS - 1] + "…"
        note = f"the text was cut to the model's {max_length} tokens: '{left_out}' was left out"
        return tokenizer.decode(seen), [note]

    def _seen_image(self, inputs, rows: int, cols: int) -> np.ndarray:
        """The processor's output, de-normalised to 0-255 RGB and cut to the patch grid."""
        ph, pw = self.vilt.embeddings.patch_embeddings.projection.weight.shape[-2:]
        seen = pixels_to_image(inputs["pixel_values"][0], self.processor.image_processor)
        return np.ascontiguousarray(seen[: rows * ph, : cols * pw])

    def _relevancy(self, out) -> np.ndarray:
        """Chefer et al.'s gradient relevancy (n, n), in the model's token order, of the score the
        prediction is made from: the top answer's logit (VQA) or the match logit (retrieval)."""
        logits = out.logits[0]
        score = logits[int(logits.argmax())] if self.architecture == "ViltForQuestionAnswering" else logits[0]
        gradients = torch.autograd.grad(score, out.attentions)
        return gradient_relevancy(torch.stack([a[0] for a in out.attentions]).detach().float().cpu().numpy(),
                                  torch.stack([g[0] for g in gradients]).float().cpu().numpy())

    def _logit_lens(self, hidden_states, top: int = 5) -> list:
        """The answers each layer's pooled token would give (nostalgebraist's logit lens for a classifier
        head): the model's own final layernorm, pooler and classifier applied to the hidden state of
        [CLS] after every layer; at the last layer this is exactly the model's output."""
        single = getattr(self.config, "problem_type", None) == "single_label_classification"
        lens = []
        with torch.no_grad():
            for states in hidden_states:
                logits = self.net.classifier(self.vilt.pooler(self.vilt.layernorm(states)))[0]
                probs = logits.softmax(-1) if single else torch.sigmoid(logits)
                best = probs.topk(min(top, probs.numel()))
                lens.append([[str(self.config.id2label.get(int(i), str(int(i)))), float(p)]
                             for p, i in zip(best.values, best.indices)])
        return lens

    def _prediction(self, out, input_ids):
        if self.architecture == "ViltForQuestionAnswering":
            logits = out.logits[0].detach().float()
            single = getattr(self.config, "problem_type", None) == "single_label_classification"
            probs = logits.softmax(-1) if single else torch.sigmoid(logits)
            idx = int(probs.argmax())
            answer = self.config.id2label.get(idx, str(idx))
            return {"answer": str(answer), "score": float(probs[idx])}
        if self.architecture == "ViltForImageAndTextRetrieval":
            score = float(out.logits[0, 0].detach())
            return {"answer": "match" if score > 0 else "no match", "score": score}
        if self.architecture == "ViltForMaskedLM":
            mask_id = self.processor.tokenizer.mask_token_id
            positions = (input_ids == mask_id).nonzero().flatten().tolist() if mask_id is not None else []
            if not positions:
                return None
            probs = out.logits[0, positions].detach().float().softmax(-1)
            best, ids = probs.max(-1)
            words = self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            return {"answer": " ".join(words), "score": float(best.prod())}
        return None

    # ------------------------------------------------------------------------------------------
    # Interventions on a stored example (see VL_Model): the model re-run on its image and text with
    # its image tokens in the stored order (patches row-major, or as ``patches`` lists them), so that a
    # token position means the same token in the record and in the re-run.
    @property
    def supports_interventions(self) -> bool:
        return self.architecture in RELEVANCY_HEADS  # a prediction made from a score

    def predict(self, image, text: str, patches=None) -> dict:
        with self._lock:
            run = self._rerun(image, text, patches)
            return self._rerun_prediction(self._logits(run)[0], run)

    def ablate(self, image, text: str, heads, patches=None) -> dict:
        by_layer = heads_by_layer(heads, int(self.config.num_hidden_layers), int(self.config.num_attention_heads))
        hooks = [(self._head_outputs(layer), "pre", zeroing_heads(zeroed, self._head_dim))
                 for layer, zeroed in by_layer.items()]
        with self._lock:
            run = self._rerun(image, text, patches)
            with hooked(hooks):
                logits = self._logits(run)
            return self._rerun_prediction(logits[0], run)

    def ablate_each_head(self, image, text: str, patches=None, progress=None) -> dict:
        """One forward pass per layer, a batch of one row per head, row h with head h zeroed."""
        heads = list(range(int(self.config.num_attention_heads)))
        n_layers = len(self.vilt.encoder.layer)
        with self._lock:
            run = self._rerun(image, text, patches)
            original = self._rerun_prediction(self._logits(run)[0], run)
            scores = np.zeros((n_layers, len(heads)), dtype=np.float32)
            answers = []
            for layer in range(n_layers):
                with hooked([(self._head_outputs(layer), "pre", heads_per_row(heads, self._head_dim))]):
                    logits = self._logits(run, run.pixel_mask.repeat(len(heads), 1))
                predictions = [self._rerun_prediction(row, run) for row in logits]
                scores[layer] = [p["scores"][original["index"]] for p in predictions]
                answers.append([p["answer"] for p in predictions])
                if progress is not None:
                    progress(layer + 1, n_layers)
            return {"original": original, "scores": scores, "answers": answers}

    def mask_patches(self, image, text: str, removed_sets, patches=None) -> list:
        """Removing an image token sets its ``pixel_mask`` entry to 0: no token attends to it any more
        (as Chefer et al.'s perturbation test and bench/faithfulness.py do; nothing is painted over)."""
        with self._lock:
            run = self._rerun(image, text, patches)
            n = len(run.tokens)
            masks = run.pixel_mask.repeat(len(removed_sets), 1)
            for row, removed in enumerate(removed_sets):
                for position in removed:
                    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                            or not run.txt_len <= position < n:
                        raise ValueError(f"removed token {position!r}: not an image token position "
                                         f"({run.txt_len}..{n - 1})")
                    masks[row, int(position) - run.txt_len] = 0
            logits = self._logits(run, masks) if len(removed_sets) else []
            return [self._rerun_prediction(row, run) for row in logits]

    def patch_activations(self, clean, corrupted, columns, progress=None) -> dict:
        with self._lock:
            source, target = self._pair(clean, corrupted)
            n = len(source.tokens)
            columns = [[int(p) for p in column] for column in columns]
            bad = [column for column in columns if not column or not all(0 <= p < n for p in column)]
            if bad:
                raise ValueError(f"columns: {bad[0]} is not a non-empty list of positions in 0..{n - 1}")
            states, clean_logits = self._logits(source, hidden_states=True)
            clean_prediction = self._rerun_prediction(clean_logits[0], source)
            corrupted_prediction = self._rerun_prediction(self._logits(target)[0], target)
            answer = clean_prediction["index"]
            n_layers = len(self.vilt.encoder.layer)
            patched = np.zeros((n_layers, len(columns)), dtype=np.float32)
            for layer, module in enumerate(self.vilt.encoder.layer):
                clean_state = states[layer + 1][0]  # the output of this layer (hidden_states[0]: the embeddings)

                def patch_in(_module, _args, output, clean_state=clean_state):
                    hidden = output[0].clone()
                    for row, positions in enumerate(columns):
                        hidden[row, positions] = clean_state[positions]
                    return (hidden, *output[1:])

                with hooked([(module, "post", patch_in)]):
                    logits = self._logits(target, target.pixel_mask.repeat(len(columns), 1))
                patched[layer] = logits[:, answer].float().cpu().numpy()
                if progress is not None:
                    progress(layer + 1, n_layers)
            return {"clean": clean_prediction, "corrupted": corrupted_prediction, "patched": patched}

    def patch_heads(self, clean, corrupted, progress=None) -> dict:
        """The clean run's contexts are recorded at every layer's ``attention.output.dense``; then one
        forward pass of the corrupted run per layer, row h with head h's context from the clean run."""
        heads = list(range(int(self.config.num_attention_heads)))
        n_layers = len(self.vilt.encoder.layer)
        with self._lock:
            source, target = self._pair(clean, corrupted)
            contexts = [None] * n_layers
            with hooked([(self._head_outputs(layer), "pre", recording_context(contexts, layer))
                         for layer in range(n_layers)]):
                clean_prediction = self._rerun_prediction(self._logits(source)[0], source)
            corrupted_prediction = self._rerun_prediction(self._logits(target)[0], target)
            answer = clean_prediction["index"]
            patched = np.zeros((n_layers, len(heads)), dtype=np.float32)
            for layer in range(n_layers):
                patch_in = heads_per_row(heads, self._head_dim, contexts[layer])
                with hooked([(self._head_outputs(layer), "pre", patch_in)]):
                    logits = self._logits(target, target.pixel_mask.repeat(len(heads), 1))
                patched[layer] = logits[:, answer].float().cpu().numpy()
                if progress is not None:
                    progress(layer + 1, n_layers)
            return {"clean": clean_prediction, "corrupted": corrupted_prediction, "patched": patched}

    def _pair(self, clean, corrupted) -> tuple:
        """The re-runs of a clean and a corrupted ``(image, text, patches)``, refused unless their tokens
        line up (patching needs the same positions)."""
        source, target = self._rerun(*clean), self._rerun(*corrupted)
        if (source.txt_len, len(source.tokens)) != (target.txt_len, len(target.tokens)):
            raise ValueError(f"the clean input has {source.txt_len} text and {len(source.tokens) - source.txt_len} "
                             f"image tokens, the corrupted one {target.txt_len} and "
                             f"{len(target.tokens) - target.txt_len}: positions would not match")
        return source, target

    def _head_outputs(self, layer: int):
        """The module whose input is layer ``layer``'s heads' contexts side by side, (batch, n, heads * dim)."""
        return self.vilt.encoder.layer[layer].attention.output.dense

    @property
    def _head_dim(self) -> int:
        return int(self.config.hidden_size) // int(self.config.num_attention_heads)

    def _rerun(self, image, text: str, patches=None) -> _Rerun:
        """The inputs for ``image`` and ``text``: every valid patch embedded (no sampling), then the image
        tokens put in the stored order. ViLT's encoder has no notion of order beyond the position
        embeddings already added to each token, so the order changes nothing but the positions."""
        inputs = self._inputs(image, text)
        with torch.no_grad():
            embeds, mask, (patch_index, (rows, cols)) = self.vilt.embeddings.visual_embed(
                inputs["pixel_values"], inputs["pixel_mask"], max_image_length=-1)
        found = {(int(c), int(r)): i for i, ((r, c), valid) in
                 enumerate(zip(patch_index[0].tolist(), mask[0, 1:].tolist())) if valid}
        if patches is None:
            patches = sorted(found, key=lambda xy: (xy[1], xy[0]))
        patches = [tuple(int(v) for v in xy) for xy in patches]
        missing = [xy for xy in patches if xy not in found]
        if missing:
            raise ValueError(f"patches: {missing[0]} is not a patch of the image's {int(rows)} x {int(cols)} "
                             "patch grid (rows x cols)")
        keep = torch.tensor([0] + [1 + found[xy] for xy in patches], device=embeds.device)
        input_ids = inputs["input_ids"]
        fixed = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"],
                 "token_type_ids": inputs.get("token_type_ids"), "image_embeds": embeds[:, keep]}
        text_tokens = self.processor.tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
        return _Rerun(fixed={k: v for k, v in fixed.items() if v is not None}, pixel_mask=mask[:, keep],
                      txt_len=int(input_ids.shape[1]),
                      tokens=list(text_tokens) + [IMAGE_CLS] + [f"IMG_{x},{y}" for x, y in patches])

    def _logits(self, run: _Rerun, pixel_mask=None, hidden_states: bool = False):
        """The logits (batch, answers) of ``run``, one row per row of ``pixel_mask`` (default: the
        run's own); with ``hidden_states``, (the hidden states, the logits)."""
        mask = run.pixel_mask if pixel_mask is None else pixel_mask
        batch = mask.shape[0]
        fixed = {k: v.expand(batch, *v.shape[1:]) for k, v in run.fixed.items()}
        with torch.no_grad():
            out = self.net(**fixed, pixel_mask=mask, output_hidden_states=hidden_states, return_dict=True)
        return (out.hidden_states, out.logits) if hidden_states else out.logits

    def _rerun_prediction(self, logits, run: _Rerun) -> dict:
        """A prediction dict (see VL_Model) of one row of logits: VQA scores are the answers'
        probabilities, as in :meth:`_prediction`; retrieval has one score, the match logit."""
        logits = logits.detach().float().cpu()
        if self.architecture == "ViltForQuestionAnswering":
            single = getattr(self.config, "problem_type", None) == "single_label_classification"
            scores = logits.softmax(-1) if single else torch.sigmoid(logits)
            order = scores.argsort(descending=True)[:TOP_ANSWERS].tolist()
            names = [str(self.config.id2label.get(i, str(i))) for i in order]
            answer, index = names[0], order[0]
        else:
            scores, index = logits, 0
            answer = "match" if float(logits[0]) > 0 else "no match"
            order, names = [0], [answer]
        return {"answer": answer, "score": float(scores[index]), "index": int(index),
                "top": [[name, float(scores[i])] for name, i in zip(names, order)],
                "logits": logits.numpy(), "scores": scores.numpy(), "tokens": run.tokens}
