"""How long the Interventions panel's runs take on the bundled models, on this machine.

    python bench/interventions.py [-m vilt hf] [--reps 3]

For each bundled model and its database (``-m vilt``: shapes_vqa/vilt-shapes over example_database2;
``-m hf``: the generative shapes_vqa/llava-shapes through ``-m hf`` over example_database3), the first
example is the clean run and the next one with the same token layout the corrupted run; each run is timed
on a fresh ``app.interventions.Interventions`` (no cached result), as the panel's first press pays it:
the unchanged re-run, one head zeroed, the deletion curve (10 removal sets), the full head ablation sweep
(every head zeroed alone), activation patching per layer x position and per layer x head. Prints the
median and the slowest of ``--reps`` runs in seconds, with the model's size.

``--vilt-base`` also times the model's side of the same runs (where all the time goes) on a random ViLT of
the size of dandelin/vilt-b32-finetuned-vqa (12 layers x 12 heads, hidden 768, 3 129 answers, 32-px
patches) on a 384 x 576 image: 216 patches and the question's tokens, as the real model sees a VQA image.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ROOT, machine  # noqa: E402

BUNDLED = {"vilt": ("example_database2", ["shapes_vqa/vilt-shapes"]),
           "hf": ("example_database3", ["shapes_vqa/llava-shapes"])}
RUNS = {
    "re-run": lambda runs, clean, corrupted: runs.original(clean),
    "one head zeroed": lambda runs, clean, corrupted: runs.ablation(clean, [(0, 0)]),
    "deletion curve": lambda runs, clean, corrupted: runs.deletion_curve(clean, "rollout"),
    "head ablation sweep": lambda runs, clean, corrupted: runs.head_sweep(clean),
    "patching, layer x position": lambda runs, clean, corrupted: runs.patching(clean, corrupted),
    "patching, layer x head": lambda runs, clean, corrupted: runs.head_patching(clean, corrupted),
}


def pair(db) -> tuple[int, int]:
    """The first example and the next one with as many text and image tokens (patching needs that)."""
    ids = db.example_ids()
    first = db.example(ids[0])
    for other in ids[1:]:
        info = db.example(other)
        if (info.txt_len, info.n_tokens) == (first.txt_len, first.n_tokens):
            return ids[0], other
    raise SystemExit(f"no example of {db.path} has the token layout of example {ids[0]}")


def measure(name: str, reps: int) -> None:
    from app.database.database import VliLmdb  # noqa: PLC0415 - after sys.path
    from app.database.models import load_model  # noqa: PLC0415
    from app.interventions import Interventions  # noqa: PLC0415

    folder, params = BUNDLED[name]
    model = load_model(name, [os.path.join(ROOT, p) for p in params], progress=False)
    with VliLmdb(os.path.join(ROOT, folder)) as db:
        clean, corrupted = pair(db)
        info = db.example(clean)
        print(f"\n-m {name} ({params[0]}): {db.n_layers} layers x {db.n_heads} heads, {info.n_tokens} tokens; "
              f"examples {clean} (clean) and {corrupted} (corrupted); seconds, median / slowest of {reps}")
        Interventions(db, model).original(clean)  # warm-up: first forward pass, allocations
        for label, run in RUNS.items():
            times = []
            for _ in range(reps):
                runs = Interventions(db, model)
                start = time.perf_counter()
                run(runs, clean, corrupted)
                times.append(time.perf_counter() - start)
            times.sort()
            print(f"  {label:28s} {times[len(times) // 2]:8.3f} {times[-1]:8.3f}")


def measure_vilt_base(reps: int) -> None:
    """The runs of :func:`measure`, called on the model directly, for a ViLT-B/32-sized random model."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltProcessor  # noqa: PLC0415

    from app.database.models import load_model  # noqa: PLC0415
    from app.database.models.vilt import IMAGE_CLS  # noqa: PLC0415
    from bench.common import scratch_dir  # noqa: PLC0415

    path = scratch_dir("vli-vilt-base-")
    processor = ViltProcessor.from_pretrained(os.path.join(ROOT, "shapes_vqa/vilt-shapes"))
    processor.image_processor.size = {"shortest_edge": 384}
    processor.save_pretrained(path)
    answers = [f"answer {i}" for i in range(3129)]
    config = ViltConfig(vocab_size=len(processor.tokenizer), max_image_length=-1, num_labels=len(answers),
                        id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    torch.manual_seed(0)
    ViltForQuestionAnswering(config).save_pretrained(path)
    model = load_model("vilt", [path], progress=False)
    rng = np.random.default_rng(0)
    clean = (rng.integers(0, 256, (384, 576, 3), dtype=np.uint8), "what color is the circle ?", None)
    corrupted = (rng.integers(0, 256, (384, 576, 3), dtype=np.uint8), "what color is the square ?", None)
    tokens = model.predict(*clean)["tokens"]
    txt_len = tokens.index(IMAGE_CLS, 1)  # the image's [CLS], after the text's
    patches = list(range(txt_len + 1, len(tokens)))
    columns = [[i] for i in range(txt_len + 1)] + [patches, list(range(len(tokens)))]
    removal = [patches[: round(f * len(patches))] for f in np.arange(0, 1.0, 0.1)]
    print(f"\nViLT-B/32-sized random model: {config.num_hidden_layers} layers x {config.num_attention_heads} heads, "
          f"hidden {config.hidden_size}, {len(tokens)} tokens ({len(patches)} patches); the model's side only; "
          f"seconds, median / slowest of {reps}")
    runs = {
        "re-run": lambda: model.predict(*clean),
        "one head zeroed": lambda: model.ablate(*clean[:2], [(0, 0)]),
        "deletion curve": lambda: model.mask_patches(*clean[:2], removal),
        "head ablation sweep": lambda: model.ablate_each_head(*clean),
        "patching, layer x position": lambda: model.patch_activations(clean, corrupted, columns),
        "patching, layer x head": lambda: model.patch_heads(clean, corrupted),
    }
    model.predict(*clean)  # warm-up
    for label, run in runs.items():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"  {label:28s} {times[len(times) // 2]:8.3f} {times[-1]:8.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--models", nargs="+", choices=sorted(BUNDLED), default=sorted(BUNDLED, reverse=True))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vilt-base", action="store_true", help="also a ViLT-B/32-sized random model (minutes)")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    for name in args.models:
        measure(name, args.reps)
    if args.vilt_base:
        measure_vilt_base(args.reps)


if __name__ == "__main__":
    main()
