"""How faithful is each map of what the model uses: Chefer et al.'s perturbation test, measured.

    python bench/faithfulness.py [-n 200] [-m vilt|hf] [--model DIR] [--quick]

For ``n`` held-out shapes questions (a seed never trained on) a bundled model answers each question,
then image patches are removed (masked out of the attention, as Chefer et al. 2021 do: the token is
gone, nothing is painted over) in the order of a map's relevance for the answer, at 0 %, 10 %, … 90 % of
the patches: most relevant first (positive test: a faithful map makes the accuracy fall fast, so a
lower area under the curve is better) and least relevant first (negative test: a faithful map keeps
the answer, so a higher area is better). Accuracy is against the true answer.

``-m vilt`` (default: ``shapes_vqa/vilt-shapes``): the maps are the pooled [CLS] query's row over the
image patches (what the VQA head reads). ``-m hf`` (default: the generative ``shapes_vqa/llava-shapes``,
through the ``-m hf`` live model): the record it stores, the maps being the row of the prompt's last token
(which generates the answer word), and the patches removed by ``Hf.mask_patches``; the answer is the
first generated token (every shapes answer is one word, one token). Maps:

* attention: the last layer's attention, mean of heads;
* rollout: the attention rollout through all layers (Abnar & Zuidema 2020);
* relevancy: Chefer et al.'s gradient relevancy of the answer's logit;
* random: a random order (seeded).

Prints the accuracy curve of each map and direction and the AUC (trapezoid over the fractions).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from app.database.analysis import attention_rollout, auc, deletion_order, gradient_relevancy  # noqa: E402
from app.database.models import load_model  # noqa: E402
from shapes_vqa import scenes  # noqa: E402

FAITHFULNESS_SEED = 3  # training uses 0 and 1, the held-out files 2
FRACTIONS = np.round(np.arange(0, 1.0, 0.1), 2)
METHODS = ("attention", "rollout", "relevancy", "random")
MODELS = {"vilt": "shapes_vqa/vilt-shapes", "hf": "shapes_vqa/llava-shapes"}  # -m: the bundled checkpoints


def vilt_maps(model, image: np.ndarray, question: str, rng: np.random.Generator):
    """(each map's relevance per image patch {method: (patches,)}; a function of a list of removed-patch
    lists (indices into the patches) giving the answer after each removal; the answer a true answer is)."""
    inputs = model.processor(images=image, text=question, return_tensors="pt")
    vilt = model.vilt
    with torch.no_grad():
        embeds, mask, _ = vilt.embeddings.visual_embed(inputs["pixel_values"], inputs["pixel_mask"],
                                                       max_image_length=model.config.max_image_length)
    fixed = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 token_type_ids=inputs.get("token_type_ids"), image_embeds=embeds)
    out = model.net(**fixed, pixel_mask=mask, output_attentions=True, return_dict=True)
    logits = out.logits[0]
    answer = int(logits.argmax())
    gradients = torch.autograd.grad(logits[answer], out.attentions)
    attention = torch.stack([a[0] for a in out.attentions]).detach().numpy()
    cls = 0  # the text [CLS]: ViLT's pooler reads it
    txt_len = inputs["input_ids"].shape[1]
    patches = np.arange(txt_len + 1, attention.shape[-1])  # after the text and the image [CLS]
    maps = {
        "attention": attention[-1].mean(axis=0)[cls, patches],
        "rollout": attention_rollout(attention)[-1][cls, patches],
        "relevancy": gradient_relevancy(attention, torch.stack([g[0] for g in gradients]).numpy())[cls, patches],
        "random": rng.random(len(patches)),
    }
    labels = {a: i for i, a in model.config.id2label.items()}

    def answers_after(removed_sets):
        answers = []
        for removed in removed_sets:
            kept = mask.clone()
            kept[0, 1 + removed] = 0  # mask column 0 is the image [CLS]
            with torch.no_grad():
                answers.append(int(model.net(**fixed, pixel_mask=kept, return_dict=True).logits[0].argmax()))
        return answers
    return maps, answers_after, lambda answer: labels[answer]


def hf_maps(model, image: np.ndarray, question: str, rng: np.random.Generator, folder: str):
    """:func:`vilt_maps` for a ``-m hf`` live model, from the record ``data_setup`` stores for the scene
    (written as a PNG into ``folder``); the answers are words."""
    path = os.path.join(folder, "scene.png")
    Image.fromarray(image).save(path)
    record = model.data_setup(0, path, question)
    query = len(record["tokens"]) - record["generated"] - 1  # the prompt's last token: it generates the answer
    image_tokens = [i for i, m in enumerate(record["modality"]) if m == "image"]
    patches = np.array([i for i, c in zip(image_tokens, record["img_coords"]) if c is not None])
    attention = record["attention"]
    maps = {
        "attention": attention[-1].mean(axis=0)[query, patches],
        "rollout": attention_rollout(attention)[-1][query, patches],
        "relevancy": record["relevancy"][query, patches],
        "random": rng.random(len(patches)),
    }

    def answers_after(removed_sets):
        runs = model.mask_patches(record["image"], question, [patches[removed].tolist() for removed in removed_sets])
        return [run["answer"].strip() for run in runs]
    return maps, answers_after, lambda answer: answer


def accuracy_curves(family: str, model, examples, rng) -> dict:
    """{(method, positive): accuracy per fraction}, over ``examples``."""
    correct = {(m, p): np.zeros(len(FRACTIONS)) for m in METHODS for p in (True, False)}
    with tempfile.TemporaryDirectory() as folder:
        for ex in examples:
            if family == "hf":
                maps, answers_after, truth_of = hf_maps(model, ex.scene.image, ex.question, rng, folder)
            else:
                maps, answers_after, truth_of = vilt_maps(model, ex.scene.image, ex.question, rng)
            truth = truth_of(ex.answer)
            keys, removed_sets = [], []
            for method, relevance in maps.items():
                for positive in (True, False):
                    order = deletion_order(relevance, positive=positive)
                    for f, fraction in enumerate(FRACTIONS):
                        keys.append((method, positive, f))
                        removed_sets.append(order[: int(round(fraction * len(relevance)))])
            for (method, positive, f), answer in zip(keys, answers_after(removed_sets)):
                correct[(method, positive)][f] += answer == truth
    return {key: value / len(examples) for key, value in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="held-out questions (at least 200 for the README table)")
    parser.add_argument("-m", dest="family", choices=sorted(MODELS), default="vilt",
                        help="the live model: vilt (the bundled ViLT) or hf (the bundled generative LLaVA)")
    parser.add_argument("--model", help="its checkpoint (default: the bundled one of -m)")
    parser.add_argument("--quick", action="store_true", help="20 questions")
    args = parser.parse_args()
    n = 20 if args.quick else args.n
    torch.set_num_threads(1)
    torch.manual_seed(0)  # ViLT's visual_embed shuffles its patches with torch's generator: the random map repeats
    checkpoint = args.model or MODELS[args.family]
    # the generative model: no per-patch logit lens, which this test does not read
    model = load_model(args.family, [checkpoint] + (["patch_lens=0"] if args.family == "hf" else []), progress=False)
    examples = scenes.generate(n, FAITHFULNESS_SEED)
    start = time.perf_counter()
    curves = accuracy_curves(args.family, model, examples, np.random.default_rng(0))
    print(f"{n} held-out questions (seed {FAITHFULNESS_SEED}), -m {args.family} {checkpoint}, "
          f"{time.perf_counter() - start:.0f} s")
    print("fraction of patches removed: " + " ".join(f"{f:5.1f}" for f in FRACTIONS))
    for positive in (True, False):
        print("positive (most relevant first; lower AUC = more faithful)" if positive else
              "negative (least relevant first; higher AUC = more faithful)")
        for method in METHODS:
            curve = curves[(method, positive)]
            print(f"  {method:10s} AUC {auc(FRACTIONS, curve):.3f}   " + " ".join(f"{c:5.2f}" for c in curve))


if __name__ == "__main__":
    main()
