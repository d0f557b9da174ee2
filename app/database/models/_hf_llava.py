"""LLaVA-1.5, LLaVA-NeXT and PaliGemma for ``-m hf`` (see :class:`app.database.models.hf.HfAdapter`).

All three put one ``<image>`` placeholder per image feature in the prompt, which the model overwrites
with the projected vision features in order. So the ``k``-th placeholder is the ``k``-th feature, and
its patch follows from how the family orders its features:

- LLaVA-1.5: the vision tower's patch grid ((crop size / patch)^2) row-major, over the processor's
  centre crop, which is the stored image; with ``vision_feature_select_strategy="full"`` the tower's
  [CLS] feature comes first (coordinate None).
- LLaVA-NeXT (anyres): the base view (the whole image resized to the tower's square) row-major, then
  the high-resolution grid: the tiles of the best-fitting resolution stitched together, the rows and
  columns of padding removed (transformers' ``unpad_image``), row-major, each row closed by an
  ``image_newline`` feature (coordinate None). The stored image is the base view and the stitched
  tiles side by side; each grid's box is the region its patches cover there.
- PaliGemma: the SigLIP patch grid row-major over the whole image resized (no crop); the image tokens
  are the prompt's prefix.
"""
import numpy as np
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from app.database.models.hf import HfAdapter, ImageLayout
from app.database.models.vl_model import pixels_to_image


def _placeholders(inputs, model) -> np.ndarray:
    """Which prompt positions hold the image placeholder (the positions the model fills with features)."""
    return (inputs["input_ids"][0] == model.config.image_token_id).cpu().numpy()


def _row_major(rows: int, cols: int, grid=None) -> list:
    """(x, y) or, with ``grid``, (x, y, grid) of a rows x cols grid in row-major order."""
    return [(x, y) if grid is None else (x, y, grid) for y in range(rows) for x in range(cols)]


def _grid(name: str, rows: int, cols: int, left: int, top: int, patch: int) -> dict:
    return {"name": f"{name} {rows}x{cols}", "rows": rows, "cols": cols,
            "box": [left, top, left + cols * patch, top + rows * patch]}


def _check_count(family: str, is_image: np.ndarray, coords: list):
    if int(is_image.sum()) != len(coords):
        raise ValueError(f"{family}: the prompt has {int(is_image.sum())} image placeholders, the image "
                         f"{len(coords)} features")


def _single_grid_layout(family: str, inputs, processor, model, features_before: int) -> ImageLayout:
    """One square view, its patches row-major after ``features_before`` features that are no patch."""
    pixel_values = inputs["pixel_values"][0]  # (3, H, W)
    patch = int(model.config.vision_config.patch_size)
    rows, cols = int(pixel_values.shape[-2]) // patch, int(pixel_values.shape[-1]) // patch
    is_image = _placeholders(inputs, model)
    coords = [None] * features_before + _row_major(rows, cols)
    _check_count(family, is_image, coords)
    return ImageLayout(stored_image=pixels_to_image(pixel_values, processor.image_processor),
                       is_image=is_image, coords=coords, grids=[_grid("image", rows, cols, 0, 0, patch)])


class LlavaAdapter(HfAdapter):
    """LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``) and other ``llava`` checkpoints."""

    model_types = ("llava",)

    def plain_prompt(self, processor, text: str) -> str:
        return f"USER: {processor.image_token}\n{text} ASSISTANT:"

    def image_layout(self, inputs, processor, model, image) -> ImageLayout:
        # "full" keeps the tower's extra features ([CLS]) in front of the patches; "default" drops them
        full = model.config.vision_feature_select_strategy == "full"
        extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0) if full else 0
        return _single_grid_layout("llava", inputs, processor, model, extra)


class PaliGemmaAdapter(HfAdapter):
    """PaliGemma (``google/paligemma-3b-mix-224``) and PaliGemma 2: the prompt is the text itself (the
    processor adds the image prefix, BOS and the closing newline)."""

    model_types = ("paligemma",)

    def plain_prompt(self, processor, text: str) -> str:
        return f"{processor.image_token}{text}"

    def image_layout(self, inputs, processor, model, image) -> ImageLayout:
        return _single_grid_layout("paligemma", inputs, processor, model, 0)


class LlavaNextAdapter(HfAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (``llava-hf/llava-v1.6-mistral-7b-hf``): base view + high-resolution grid."""

    model_types = ("llava_next",)
    reruns_stored_image = False  # the stored image is the two views side by side, not the image it was made of

    def plain_prompt(self, processor, text: str) -> str:
        return f"[INST] {processor.image_token}\n{text} [/INST]"

    def image_layout(self, inputs, processor, model, image) -> ImageLayout:
        config = model.config
        side_px = int(config.vision_config.image_size)
        patch = int(config.vision_config.patch_size)
        if side_px % patch:
            raise ValueError(f"llava_next: vision image_size {side_px} is not a multiple of patch_size {patch}")
        side = side_px // patch
        original_size = [int(v) for v in inputs["image_sizes"][0].tolist()]  # (height, width)
        best_h, best_w = select_best_resolution(original_size, config.image_grid_pinpoints)
        tiles_h, tiles_w = best_h // side_px, best_w // side_px
        views = [pixels_to_image(view, processor.image_processor)
                 for view in inputs["pixel_values"][0][: 1 + tiles_h * tiles_w]]
        tiles = np.concatenate([np.concatenate(views[1 + r * tiles_w: 1 + (r + 1) * tiles_w], axis=1)
                                for r in range(tiles_h)], axis=0)
        stored = np.zeros((max(side_px, tiles.shape[0]), side_px + tiles.shape[1], 3), dtype=np.uint8)
        stored[:side_px, :side_px] = views[0]
        stored[: tiles.shape[0], side_px:] = tiles

        # the high-resolution feature map is tiles_h*side x tiles_w*side patches; unpad it as the model does
        rows_cols = torch.stack(torch.meshgrid(torch.arange(tiles_h * side), torch.arange(tiles_w * side),
                                               indexing="ij"))
        kept = unpad_image(rows_cols, original_size)
        top, left = int(kept[0, 0, 0]), int(kept[1, 0, 0])
        rows, cols = int(kept.shape[1]), int(kept.shape[2])
        high_res = []
        for y in range(rows):
            high_res += [(x, y, 1) for x in range(cols)] + [None]  # None: the row's image_newline
        coords = _row_major(side, side) + high_res
        is_image = _placeholders(inputs, model)
        _check_count("llava_next", is_image, coords)
        grids = [_grid("base", side, side, 0, 0, patch),
                 _grid("high-res", rows, cols, side_px + left * patch, top * patch, patch)]
        return ImageLayout(stored_image=stored, is_image=is_image, coords=coords, grids=grids)
