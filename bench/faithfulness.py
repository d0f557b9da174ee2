"""How faithful is each map of what the model uses: Chefer et al.'s perturbation test, measured.

    python bench/faithfulness.py [-n 200] [--model shapes_vqa/vilt-shapes] [--quick]

For ``n`` held-out shapes questions (a seed never trained on) the bundled ViLT answers each question,
then image patches are removed (masked out of the attention, as Chefer et al. 2021 do: the token is
gone, nothing is painted over) in the order of a map's relevance for the answer, at 0 %, 10 %, … 90 % of
the patches: most relevant first (positive test: a faithful map makes the accuracy fall fast, so a
lower area under the curve is better) and least relevant first (negative test: a faithful map keeps
the answer, so a higher area is better). Accuracy is against the true answer. Maps, all as the pooled
[CLS] query's row over the image patches (what the VQA head reads):

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
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from app.database.analysis import attention_rollout, auc, deletion_order, gradient_relevancy  # noqa: E402
from app.database.models import load_model  # noqa: E402
from shapes_vqa import scenes  # noqa: E402

FAITHFULNESS_SEED = 3  # training uses 0 and 1, the held-out files 2
FRACTIONS = np.round(np.arange(0, 1.0, 0.1), 2)
METHODS = ("attention", "rollout", "relevancy", "random")


def answer_and_maps(model, image: np.ndarray, question: str, rng: np.random.Generator):
    """The model's inputs with its image embedding fixed, and each map's relevance per image patch."""
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
    return fixed, mask, answer, maps


def accuracy_curves(model, examples, rng) -> dict:
    """{(method, positive): accuracy per fraction}, over ``examples``."""
    labels = {a: i for i, a in model.config.id2label.items()}
    correct = {(m, p): np.zeros(len(FRACTIONS)) for m in METHODS for p in (True, False)}
    for ex in examples:
        fixed, mask, _, maps = answer_and_maps(model, ex.scene.image, ex.question, rng)
        truth = int(labels[ex.answer])
        n_patches = len(next(iter(maps.values())))
        for method, relevance in maps.items():
            for positive in (True, False):
                order = deletion_order(relevance, positive=positive)
                for f, fraction in enumerate(FRACTIONS):
                    removed = order[: int(round(fraction * n_patches))]
                    kept = mask.clone()
                    kept[0, 1 + removed] = 0  # mask column 0 is the image [CLS]
                    with torch.no_grad():
                        logits = model.net(**fixed, pixel_mask=kept, return_dict=True).logits[0]
                    correct[(method, positive)][f] += int(logits.argmax()) == truth
    return {key: value / len(examples) for key, value in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="held-out questions (at least 200 for the README table)")
    parser.add_argument("--model", default="shapes_vqa/vilt-shapes")
    parser.add_argument("--quick", action="store_true", help="20 questions")
    args = parser.parse_args()
    n = 20 if args.quick else args.n
    torch.set_num_threads(1)
    model = load_model("vilt", [args.model], progress=False)
    examples = scenes.generate(n, FAITHFULNESS_SEED)
    start = time.perf_counter()
    curves = accuracy_curves(model, examples, np.random.default_rng(0))
    print(f"{n} held-out questions (seed {FAITHFULNESS_SEED}), {args.model}, {time.perf_counter() - start:.0f} s")
    print("fraction of patches removed: " + " ".join(f"{f:5.1f}" for f in FRACTIONS))
    for positive in (True, False):
        print("positive (most relevant first; lower AUC = more faithful)" if positive else
              "negative (least relevant first; higher AUC = more faithful)")
        for method in METHODS:
            curve = curves[(method, positive)]
            print(f"  {method:10s} AUC {auc(FRACTIONS, curve):.3f}   " + " ".join(f"{c:5.2f}" for c in curve))


if __name__ == "__main__":
    main()
