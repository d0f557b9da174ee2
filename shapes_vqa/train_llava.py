"""Train a tiny LLaVA (CLIP-style vision tower + projector + Llama-style decoder) on the shapes VQA
task, answering by generating the answer words, and save it (model + processor).

    python -m shapes_vqa.train_llava                      # the bundled shapes_vqa/llava-shapes/
    python -m shapes_vqa.train_llava --quick --out DIR    # seconds-long smoke run (tests)

The saved folder is a stock transformers LLaVA: ``LlavaForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained`` load it offline (no torchvision needed: the image processor is
the Pillow one, the tokenizer a word-level ``tokenizers`` model with a chat template).

The defaults are the recipe of the bundled model: one seeded run from random weights on the CPU, two
threads, through the ViLT's curriculum (shapes_vqa.train, position questions first) with the same two
choices that mattered there: weights start at 1/sqrt(width) and the peak learning rate is 5e-4. One
image token per CELL-px patch (6 x 6 for a scene), so each shape lies under exactly one image token.
The loss is teacher-forced next-token cross-entropy on the answer words and the EOS after the prompt;
evaluation generates greedily and compares the words before EOS with the label, case-insensitively.
training_report.json in the model folder gives accuracy per stage, wall and CPU time and the seed.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import (AddedToken, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from shapes_vqa import scenes
from shapes_vqa import train as vilt_train

DEFAULT_OUT = Path(__file__).resolve().parent / "llava-shapes"
PATCH_SIZE = scenes.CELL  # one image token per grid cell: each shape is one image token
GRID = scenes.SCENE_SIZE // PATCH_SIZE
IMAGE_TOKEN, BOS, EOS, PAD, UNK = "<image>", "<s>", "</s>", "<pad>", "<unk>"
ROLE_WORDS = ("user", "assistant", ":")
# "user: <image> what color is the circle? assistant:" -> the answer words, EOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_NEW_TOKENS = 4  # answers are one word; room to see whether the model stops
TRAIN_SEED, EVAL_SEED = vilt_train.TRAIN_SEED, vilt_train.EVAL_SEED  # the ViLT's seeds
CURRICULUM = vilt_train.CURRICULUM
INPUT_HINT = ("scenes like those in shapes_vqa/heldout/ (96×96, one to four coloured shapes on a dark noisy "
              "background); questions as in shapes_vqa/heldout/pairs.jsonl")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the templates' words, the answers and the chat roles (lower-cased,
    "?" and ":" split off), with <image> as an added special token. No post-processor: the chat
    template writes the BOS itself."""
    words = set(scenes.vocabulary()[len(scenes.SPECIAL_TOKENS):]) | set(scenes.ANSWERS) | set(ROLE_WORDS)
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS] + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor() -> LlavaProcessor:
    """The tokenizer + a Pillow CLIP image processor whose resize and crop keep scenes at SCENE_SIZE,
    normalised to [-1, 1] like the ViLT's; <image> expands into one token per patch (the vision
    tower's CLS is counted by num_additional_image_tokens and dropped by the "default" strategy)."""
    size = scenes.SCENE_SIZE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(vilt_train.IMAGE_MEAN), image_std=list(vilt_train.IMAGE_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(processor: LlavaProcessor, hidden: int = 64, vision_layers: int = 2, text_layers: int = 4,
                heads: int = 4) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, image_size=scenes.SCENE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=hidden, initializer_range=hidden ** -0.5)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=128, initializer_range=hidden ** -0.5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         image_seq_length=GRID * GRID, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", vl_interpret_hint=INPUT_HINT)
    config._attn_implementation = "eager"  # faster than SDPA at this size, and attentions returnable
    model = LlavaForConditionalGeneration(config)
    init_vision_embeddings(model)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id, generation.max_new_tokens, generation.do_sample = tokenizer.pad_token_id, MAX_NEW_TOKENS, False
    return model


def init_vision_embeddings(model: LlavaForConditionalGeneration) -> None:
    """Make where a patch is as visible as what it shows, as the ViLT's init_image_embeddings does:
    the patch projection starts at 1/sqrt(fan-in) and the patch position embeddings (CLIP starts
    them at random) at 2-D sine-cosine codes whose frequencies suit the 6 x 6 grid. Both stay
    trainable."""
    emb = model.model.vision_tower.embeddings
    hidden = emb.embed_dim
    assert hidden % 4 == 0, "hidden size must split into sin/cos x row/column"
    freqs = torch.logspace(math.log10(0.2), math.log10(2.0), hidden // 4, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")

    def code(pos):
        angles = pos.flatten()[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    with torch.no_grad():
        emb.patch_embedding.weight.normal_(0.0, emb.patch_embedding.weight[0].numel() ** -0.5)
        positions = emb.position_embedding.weight  # (1 + GRID * GRID, hidden); [0] is the CLS
        positions[1:] = torch.cat([code(rows), code(cols)], dim=1).to(positions.dtype)


def prompt(processor: LlavaProcessor, question: str) -> str:
    """The chat prompt for one image and ``question``, ending where the answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode(examples: list[scenes.Example], processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """Examples -> uint8 images (N, H, W, 3) and right-padded prompt + answer + EOS token ids,
    attention mask and labels (N, L) (labels -100 except on the answer words and EOS), plus each
    prompt's length. Each distinct question goes once through the processor (image expansion
    included); there are a few dozen."""
    tokenizer = processor.tokenizer
    prompt_ids = {}
    for ex in examples:
        if ex.question not in prompt_ids:
            enc = processor(images=[ex.scene.image], text=[prompt(processor, ex.question)])
            prompt_ids[ex.question] = list(enc["input_ids"][0])
    sequences, starts = [], []
    for ex in examples:
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids[ex.question] + answer)
        starts.append(len(prompt_ids[ex.question]))
    length = max(map(len, sequences))
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, start:len(seq)] = input_ids[i, start:len(seq)]
        mask[i, :len(seq)] = 1
    return {"images": torch.from_numpy(np.stack([e.scene.image for e in examples])), "input_ids": input_ids,
            "attention_mask": mask, "labels": labels, "prompt_len": torch.tensor(starts)}


@torch.no_grad()
def generate(model, data: dict[str, torch.Tensor], batch: int = 256) -> list[list[int]]:
    """Greedily generated token ids (MAX_NEW_TOKENS each, padded after EOS) for every encoded
    example. Prompts of one length go together, so no batch needs padding."""
    was_training = model.training
    model.eval()
    generated = [None] * len(data["prompt_len"])
    for length in data["prompt_len"].unique().tolist():
        same = torch.nonzero(data["prompt_len"] == length).flatten()
        for s in range(0, len(same), batch):
            idx = same[s:s + batch]
            ids = data["input_ids"][idx, :length]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=vilt_train.pixel_values(data["images"][idx]),
                                 do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            for i, row in zip(idx.tolist(), out[:, length:].tolist()):
                generated[i] = row
    model.train(was_training)
    return generated


def answer_text(tokenizer, generated: list[int]) -> str:
    """The answer: the generated words before the first EOS."""
    if tokenizer.eos_token_id in generated:
        generated = generated[:generated.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def evaluate(model, processor, data, examples: list[scenes.Example]) -> dict[str, float]:
    """Accuracy overall ("all") and per question type of greedy generation, compared with the
    labels case-insensitively (the model's train/eval mode is kept)."""
    per = defaultdict(list)
    for row, ex in zip(generate(model, data), examples):
        per[ex.qtype].append(answer_text(processor.tokenizer, row).lower() == ex.answer.lower())
    out = {"all": float(np.mean([ok for oks in per.values() for ok in oks]))}
    out.update({q: float(np.mean(v)) for q, v in sorted(per.items())})
    return out


def train(out: Path, curriculum=CURRICULUM, n_eval: int = 1000, batch: int = 64, lr: float = 5e-4,
          hidden: int = 64, vision_layers: int = 2, text_layers: int = 4, heads: int = 4,
          seed: int = TRAIN_SEED, threads: int = 2, eval_every: int = 0) -> dict:
    """Train from random weights through ``curriculum`` (one warm-up and cosine learning-rate
    schedule over all its steps), report held-out accuracy, save model and processor to ``out``."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0, cpu0 = time.time(), time.process_time()
    processor = build_processor()
    eval_ex = scenes.generate(n_eval, seed + 1000 + EVAL_SEED)
    eval_data = encode(eval_ex, processor)

    model = build_model(processor, hidden, vision_layers, text_layers, heads)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    total = sum(st.steps for st in curriculum)
    warmup = max(1, total // 20)
    bar = tqdm(total=total, desc="train", mininterval=5)
    step, stages_report = 0, []
    for k, st in enumerate(curriculum):
        # each stage's scenes are rendered when it starts: one stage's tensors in memory at a time
        data = encode(scenes.generate(st.n_examples, seed + 10 * k, qtypes=st.qtypes,
                                      directions=st.directions), processor)
        bar.set_description(st.name)
        for _, idx in zip(range(st.steps), vilt_train.batches(st.n_examples, batch, gen)):
            for g in opt.param_groups:
                g["lr"] = vilt_train.lr_at(step, total, lr, warmup)
            width = int(data["attention_mask"][idx].sum(1).max())  # drop columns that are padding only
            loss = model(input_ids=data["input_ids"][idx, :width], attention_mask=data["attention_mask"][idx, :width],
                         pixel_values=vilt_train.pixel_values(data["images"][idx]),
                         labels=data["labels"][idx, :width]).loss
            vilt_train.optimise(model, opt, loss)
            step += 1
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if eval_every and step % eval_every == 0 and step < total:
                accuracy = evaluate(model, processor, eval_data, eval_ex)
                tqdm.write(f"step {step}: {vilt_train.format_accuracy(accuracy)}")
        acc = evaluate(model, processor, eval_data, eval_ex)
        tqdm.write(f"end of {st.name!r} (step {step}): {vilt_train.format_accuracy(acc)}")
        stages_report.append({"stage": st.name, "qtypes": list(st.qtypes), "directions": list(st.directions),
                              "steps": st.steps, "n_examples": st.n_examples, "accuracy": acc})
        del data
    bar.close()
    wall_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    print(f"held-out accuracy ({n_eval} examples): {vilt_train.format_accuracy(acc)}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"accuracy": acc, "n_eval": n_eval, "eval_seed": seed + 1000 + EVAL_SEED,
              "wall_seconds": round(wall_s, 1), "cpu_seconds": round(cpu_s, 1), "steps": total,
              "curriculum": stages_report, "batch": batch, "lr": lr, "hidden": hidden,
              "vision_layers": vision_layers, "text_layers": text_layers, "heads": heads, "seed": seed,
              "threads": threads, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved to {out} (wall {wall_s:.0f} s, CPU {cpu_s:.0f} s)", flush=True)
    return report


def main(argv=None) -> dict:
    p = vilt_train.training_arguments(__doc__.split("\n")[0], DEFAULT_OUT, eval_every=1000)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=4)
    a = p.parse_args(argv)
    curriculum = vilt_train.chosen_curriculum(a)
    if a.quick:
        a.vision_layers, a.text_layers = 1, 2
    return train(a.out, curriculum, a.n_eval, a.batch, a.lr, a.hidden, a.vision_layers, a.text_layers,
                 a.heads, a.seed, a.threads, a.eval_every)


if __name__ == "__main__":
    main()
