"""A tiny random ViLT checkpoint, written with ``save_pretrained`` like a real one (tests only).

``build_tiny_vilt(path, head)`` writes config, weights, vocab.txt, tokenizer and image processor
into ``path`` so that ``load_model("vilt", [path])`` loads it exactly as it would a Hub checkpoint.
Images are resized to a shortest edge of 64 px with 16-px patches: a 64 x 96 image is 4 x 6 patches.
"""
import os

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "shape", "how", "many",
         "are", "there", "a", "an", "of", "red", "green", "blue", "circle", "square", "triangle", "left",
         "right", "?", "1", "2", "3"]
ANSWERS = ["red", "green", "blue", "circle", "square", "triangle", "1", "2", "3"]
HEADS = ("ViltForQuestionAnswering", "ViltForImageAndTextRetrieval", "ViltForMaskedLM", "ViltModel")


def build_tiny_vilt(path, head="ViltForQuestionAnswering", seed=0, max_image_length=-1):
    """Write a tiny random ViLT with the given head class name into ``path``; return ``str(path)``."""
    import transformers
    from transformers import BertTokenizer, ViltConfig, ViltProcessor

    path = str(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(os.path.join(path, "vocab.txt"))
    image_processor_cls = getattr(transformers, "ViltImageProcessorPil", None) or transformers.ViltImageProcessor
    image_processor = image_processor_cls(size={"shortest_edge": 64}, size_divisor=16)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    config = ViltConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=64, patch_size=16, max_position_embeddings=40, max_image_length=max_image_length,
        num_labels=len(ANSWERS), id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, head)(config)
    model.save_pretrained(path)
    return path
