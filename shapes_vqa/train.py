"""Train a small ViLT on the synthetic shapes VQA task and save it (model + processor).

    python -m shapes_vqa.train                      # the bundled shapes_vqa/vilt-shapes/ (defaults)
    python -m shapes_vqa.train --quick --out DIR    # seconds-long smoke run (tests)

The defaults are the recipe of the bundled model: one seeded run from random weights on the CPU,
two threads, through CURRICULUM (position questions first, see there); training_report.json in the
model folder gives its accuracy per stage and its time.

Each stage's examples are rendered once into uint8 tensors; the training loop feeds the model pixel
values normalised exactly as the saved ``ViltImageProcessor`` does (the scenes are already at the
processor's size, so its resize is the identity; tests check that the two agree), through the same
computation as ViLT's ``visual_embed`` minus its per-image loops; the loss is cross-entropy over the
answers. Two choices matter besides the curriculum: weights start at 1/sqrt(width) instead of
BERT's 0.02 (scaled for width 768, it leaves a width-64 model's attention so flat that it answers
from the question alone for well over a thousand steps; see init_image_embeddings for the image
side), and the peak learning rate is 5e-4 (in our runs at 2e-3, even position questions about a
single direction stayed at chance).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (BertTokenizer, ViltConfig, ViltForQuestionAnswering,
                          ViltImageProcessorPil, ViltProcessor)

from shapes_vqa import scenes

DEFAULT_OUT = Path(__file__).resolve().parent / "vilt-shapes"
PATCH_SIZE = scenes.CELL  # 16: one patch per grid cell, so each shape is one image token
MAX_TEXT_LEN = 16  # position embeddings: room beyond the templates for questions users type
TRAIN_TEXT_LEN = 11  # questions are padded to this in training: the longest template with [CLS], [SEP]
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
TRAIN_SEED, EVAL_SEED = 0, 1  # make_heldout uses a third seed


def build_processor() -> ViltProcessor:
    """A word-level BERT tokenizer over the templates' vocabulary + an image processor that keeps
    scenes at SCENE_SIZE (shortest_edge = SCENE_SIZE, a multiple of size_divisor=32)."""
    assert scenes.SCENE_SIZE % 32 == 0 and scenes.SCENE_SIZE % PATCH_SIZE == 0
    vocab = {word: i for i, word in enumerate(scenes.vocabulary())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=MAX_TEXT_LEN)
    # the Pillow implementation (saved under ViLT's usual name): the default one needs torchvision
    image_processor = ViltImageProcessorPil(size={"shortest_edge": scenes.SCENE_SIZE}, size_divisor=32,
                                            image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(processor: ViltProcessor, hidden: int = 64, layers: int = 4,
                heads: int = 4) -> ViltForQuestionAnswering:
    labels = list(scenes.ANSWERS)
    config = ViltConfig(
        vocab_size=len(processor.tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_TEXT_LEN, image_size=scenes.SCENE_SIZE, patch_size=PATCH_SIZE,
        max_image_length=-1,  # keep every patch (ViLT samples a subset when this is smaller)
        num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={a: i for i, a in enumerate(labels)},
        pad_token_id=processor.tokenizer.pad_token_id,
        problem_type="single_label_classification",  # trained with softmax cross-entropy
        # 1/sqrt(width) instead of BERT's 0.02, which is scaled for width 768: at width 64 it starts
        # the attention so flat that the model trains for many hundred steps without looking at
        # the image at all
        initializer_range=hidden ** -0.5,
        # what VL-InterpreT's "Add example" panel tells users to upload (ViLT adapter's input_hint)
        vl_interpret_hint="scenes like those in shapes_vqa/heldout/ (96×96, one to four coloured shapes on "
                          "a dark noisy background)",
    )
    config._attn_implementation = "eager"  # ViLT's attention is eager-only; attentions returnable
    model = ViltForQuestionAnswering(config)
    init_image_embeddings(model)
    return model


def init_image_embeddings(model: ViltForQuestionAnswering) -> None:
    """Make where a patch is as visible as what it shows. The patch projection starts at
    1/sqrt(fan-in) (3 x 16 x 16 pixels, not the width), and the patch position embeddings, which
    ViLT starts at zero, start from 2-D sine-cosine codes whose frequencies suit the 6 x 6 grid
    (0.2 to 2 radians per patch: MAE's 1/10000^k spread leaves most of them constant over six
    patches). With the defaults a patch's content varies about four times as much as its
    position code from patch to patch (measured at initialisation). Both stay trainable."""
    emb = model.vilt.embeddings
    projection = emb.patch_embeddings.projection
    with torch.no_grad():
        projection.weight.normal_(0.0, projection.weight[0].numel() ** -0.5)
    positions = emb.position_embeddings  # (1, 1 + grid * grid, hidden); [0] is the image [CLS]
    hidden, grid = positions.shape[-1], scenes.SCENE_SIZE // PATCH_SIZE
    assert hidden % 4 == 0, "hidden size must split into sin/cos x row/column"
    freqs = torch.logspace(math.log10(0.2), math.log10(2.0), hidden // 4, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos):
        angles = pos.flatten()[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    with torch.no_grad():
        positions[0, 1:] = torch.cat([code(rows), code(cols)], dim=1).to(positions.dtype)


def encode(examples: list[scenes.Example], processor: ViltProcessor) -> dict[str, torch.Tensor]:
    """Examples -> uint8 images (N, H, W, 3), padded token ids / mask (N, L), label ids (N,)."""
    tok = processor.tokenizer([e.question for e in examples], padding="max_length",
                              max_length=TRAIN_TEXT_LEN, truncation=True, return_tensors="pt")
    label2id = {a: i for i, a in enumerate(scenes.ANSWERS)}
    return {
        "images": torch.from_numpy(np.stack([e.scene.image for e in examples])),
        "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
        "labels": torch.tensor([label2id[e.answer] for e in examples]),
    }


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), normalised like the saved image processor."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What ViLT's ``visual_embed`` computes for whole, unpadded scenes with every patch kept
    (image [CLS] + patches + position embeddings), without its per-image loops and random patch
    order. The model's output does not depend on the patch order (tests check that both paths
    give the same logits)."""
    emb = model.vilt.embeddings
    patches = emb.patch_embeddings(pixel_values).flatten(2).transpose(1, 2)
    cls = emb.cls_token.expand(patches.shape[0], -1, -1)
    return emb.dropout(torch.cat([cls, patches], dim=1) + emb.position_embeddings)


def forward(model, data, idx):
    image = image_embeddings(model, pixel_values(data["images"][idx]))
    return model(input_ids=data["input_ids"][idx], attention_mask=data["attention_mask"][idx],
                 image_embeds=image, pixel_mask=torch.ones(image.shape[:2], dtype=torch.long))


@torch.no_grad()
def evaluate(model, data, qtypes: list[str], batch: int = 256) -> dict[str, float]:
    """Accuracy overall ("all") and per question type (the model's train/eval mode is kept)."""
    was_training = model.training
    model.eval()
    preds = []
    for s in range(0, len(qtypes), batch):
        idx = torch.arange(s, min(s + batch, len(qtypes)))
        preds.append(forward(model, data, idx).logits.argmax(-1))
    right = (torch.cat(preds) == data["labels"]).numpy()
    model.train(was_training)
    per = defaultdict(list)
    for ok, q in zip(right, qtypes):
        per[q].append(ok)
    out = {"all": float(right.mean())}
    out.update({q: float(np.mean(v)) for q, v in sorted(per.items())})
    return out


def optimise(model, opt, loss) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1 (both shapes models train so)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def batches(n: int, batch: int, gen: torch.Generator):
    """Endless random batches of indices into n examples, epoch after epoch."""
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


@dataclass(frozen=True)
class Stage:
    """One part of the curriculum: ``steps`` batches drawn from ``n_examples`` fresh examples of
    the question types ``qtypes``, whose position questions ask about ``directions`` only."""

    name: str
    qtypes: tuple[str, ...]
    directions: tuple[str, ...]
    steps: int
    n_examples: int


ALL_DIRECTIONS = tuple(scenes.DIRECTIONS)
# Relations first, then everything. Trained on every question type from the start, position
# stays at chance (50 %: the model answers one of the two named shapes, from the text alone):
# until it tells the direction words apart, "further left" and "further right" (and "higher" and
# "lower") pull its attention to opposite ends of the grid and their gradients cancel. One
# direction alone is learned within a few hundred steps, a second one on the other axis then
# quickly, and the opposite directions after that; colour, shape, existence and count come last
# and fast, on top of a model that already finds named shapes.
CURRICULUM = (
    Stage("position: further left", ("position",), ("further left",), 800, 10000),
    Stage("position: further left, higher", ("position",), ("further left", "higher"), 800, 10000),
    Stage("position: all directions", ("position",), ALL_DIRECTIONS, 1400, 10000),
    Stage("all questions", scenes.QUESTION_TYPES, ALL_DIRECTIONS, 5000, 40000),
)


def train(out: Path, curriculum=CURRICULUM, n_eval: int = 1000, batch: int = 64, lr: float = 5e-4,
          hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = TRAIN_SEED, threads: int = 2,
          eval_every: int = 0) -> dict:
    """Train from random weights through ``curriculum`` (one warm-up and cosine learning-rate
    schedule over all its steps), report held-out accuracy, save model and processor to ``out``."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0 = time.time()
    processor = build_processor()
    eval_ex = scenes.generate(n_eval, seed + 1000 + EVAL_SEED)
    eval_data, eval_types = encode(eval_ex, processor), [e.qtype for e in eval_ex]
    del eval_ex

    model = build_model(processor, hidden, layers, heads)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    total = sum(st.steps for st in curriculum)
    warmup = max(1, total // 20)
    bar = tqdm(total=total, desc="train", mininterval=5)
    step, stages_report, render_s = 0, [], time.time() - t0  # the held-out set's so far
    for k, st in enumerate(curriculum):
        # each stage's scenes are rendered when it starts: one stage's tensors in memory at a time
        t_render = time.time()
        data = encode(scenes.generate(st.n_examples, seed + 10 * k, qtypes=st.qtypes,
                                      directions=st.directions), processor)
        render_s += time.time() - t_render
        bar.set_description(st.name)
        for _, idx in zip(range(st.steps), batches(st.n_examples, batch, gen)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, warmup)
            loss = torch.nn.functional.cross_entropy(forward(model, data, idx).logits, data["labels"][idx])
            optimise(model, opt, loss)
            step += 1
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if eval_every and step % eval_every == 0 and step < total:
                tqdm.write(f"step {step}: {format_accuracy(evaluate(model, eval_data, eval_types))}")
        acc = evaluate(model, eval_data, eval_types)
        tqdm.write(f"end of {st.name!r} (step {step}): {format_accuracy(acc)}")
        stages_report.append({"stage": st.name, "qtypes": list(st.qtypes), "directions": list(st.directions),
                              "steps": st.steps, "n_examples": st.n_examples, "accuracy": acc})
        del data
    bar.close()
    train_s = time.time() - t0 - render_s
    print(f"rendered {sum(st.n_examples for st in curriculum)} + {n_eval} examples in {render_s:.0f} s",
          flush=True)
    print(f"held-out accuracy ({n_eval} examples): {format_accuracy(acc)}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_processor().save_pretrained(out)  # a fresh one: encoding left padding to 11 set in the tokenizer
    report = {"accuracy": acc, "train_seconds": round(train_s, 1), "steps": total,
              "steps_per_second": round(total / train_s, 2), "curriculum": stages_report,
              "batch": batch, "n_eval": n_eval, "lr": lr, "hidden": hidden, "layers": layers,
              "heads": heads, "seed": seed, "threads": threads,
              "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved to {out} (train {train_s:.0f} s, total {time.time() - t0:.0f} s)", flush=True)
    return report


def format_accuracy(acc: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def training_arguments(description: str, default_out: Path, eval_every: int) -> argparse.ArgumentParser:
    """The options both shapes models' training scripts take (each adds its own layer counts)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    p.add_argument("--stage-steps", type=int, nargs=len(CURRICULUM), metavar="STEPS",
                   help=f"steps of each curriculum stage (default: {' '.join(str(st.steps) for st in CURRICULUM)})")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (one per core; on cores busy with other work, use 1)")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    return p


def chosen_curriculum(args) -> tuple:
    """CURRICULUM with the --stage-steps given; --quick: a few tiny steps per stage (and a small model)."""
    curriculum = CURRICULUM
    if args.stage_steps:
        curriculum = tuple(replace(st, steps=n) for st, n in zip(curriculum, args.stage_steps))
    if args.quick:
        curriculum = tuple(replace(st, steps=2, n_examples=16) for st in curriculum)
        args.batch, args.n_eval, args.hidden, args.eval_every = 8, 16, 32, 0
    return curriculum


def main(argv=None) -> dict:
    p = training_arguments(__doc__.split("\n")[0], DEFAULT_OUT, eval_every=500)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args(argv)
    curriculum = chosen_curriculum(a)
    if a.quick:
        a.layers = 2
    return train(a.out, curriculum, a.n_eval, a.batch, a.lr, a.hidden, a.layers, a.heads, a.seed,
                 a.threads, a.eval_every)


if __name__ == "__main__":
    main()
