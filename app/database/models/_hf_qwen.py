"""Qwen2-VL and Qwen2.5-VL for the Hugging Face decoder-VLM entry point (``-m hf CHECKPOINT``).

How the image reaches the language model:

- The processor resizes the image with ``smart_resize`` to a multiple of ``patch_size * merge_size``
  on each side (and within its pixel budget), cuts it into ``patch_size`` patches and writes them to
  ``pixel_values`` block by block: the ``merge_size x merge_size`` patches of one merged block are
  consecutive, the blocks row-major (``patchify`` in image_processing_pil_qwen2_vl.py).
- The vision tower's ``PatchMerger`` turns each run of ``merge_size**2`` patches into one LM token,
  so the LM sees a ``(grid_h / merge, grid_w / merge)`` grid (``image_grid_thw`` holds the patch grid)
  in row-major order: one ``<|image_pad|>`` per merged block, between ``<|vision_start|>`` and
  ``<|vision_end|>`` (image-side tokens that are no patch: coordinate None).
- Qwen2.5-VL's tower reorders the blocks into attention windows (``get_vision_window_index``) and
  puts them back (``argsort(window_index)``) after the merger, so its LM tokens are in the same
  row-major order (tests/test_hf_qwen_idefics.py proves it by perturbing single blocks).

The stored image is rebuilt from ``pixel_values`` (un-normalised), so it is exactly the resized image
the vision tower saw, whichever image processor (the torchvision or the PIL one) made it.
"""
from __future__ import annotations

import numpy as np
import torch

from app.database.models.hf import HfAdapter, ImageLayout
from app.database.models.vl_model import pixels_to_image

__all__ = ["Qwen2VLAdapter", "Qwen25VLAdapter", "qwen_image_layout", "qwen_seen_image"]


def _one_image_grid(image_grid_thw) -> tuple[int, int, int]:
    thw = np.asarray(image_grid_thw.cpu() if torch.is_tensor(image_grid_thw) else image_grid_thw).reshape(-1, 3)
    if len(thw) != 1:
        raise ValueError(f"image_grid_thw: expected one image, got {len(thw)}")
    return tuple(int(v) for v in thw[0])


def qwen_seen_image(pixel_values: torch.Tensor, image_grid_thw, image_processor) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 image the vision tower saw, un-patchified from ``pixel_values``.

    Inverts ``patchify``: rows of ``pixel_values`` are ordered (block row, block col, row in block,
    col in block), each row (channel, temporal copy, patch row, patch col).
    """
    _, grid_h, grid_w = _one_image_grid(image_grid_thw)
    patch = image_processor.patch_size
    merge = image_processor.merge_size
    temporal = image_processor.temporal_patch_size
    expected = (grid_h * grid_w, 3 * temporal * patch * patch)
    if tuple(pixel_values.shape) != expected:
        raise ValueError(f"pixel_values: expected shape {expected} for a {grid_h}x{grid_w} patch grid, "
                         f"got {tuple(pixel_values.shape)}")
    blocks = pixel_values.reshape(
        grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, 0]
    # (channel, block row, row in block, patch row, block col, col in block, patch col)
    chw = blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)
    return pixels_to_image(chw, image_processor)


def qwen_image_layout(input_ids, image_grid_thw, merge_size: int, patch_size: int, image_token_id: int,
                      vision_start_id: int, vision_end_id: int):
    """``(coords, grids, is_image)`` of a prompt with one image.

    ``is_image`` marks ``<|vision_start|>``, the ``<|image_pad|>`` run and ``<|vision_end|>``; the k-th
    pad is merged block ``(k % cols, k // cols)`` of the ``(grid_h / merge, grid_w / merge)`` grid,
    whose box is the whole resized image.
    """
    ids = np.asarray(input_ids.cpu() if torch.is_tensor(input_ids) else input_ids).reshape(-1)
    _, grid_h, grid_w = _one_image_grid(image_grid_thw)
    rows, cols = grid_h // merge_size, grid_w // merge_size
    pads = np.flatnonzero(ids == image_token_id)
    if len(pads) != rows * cols:
        raise ValueError(f"input_ids: {len(pads)} image tokens, but image_grid_thw {[grid_h, grid_w]} with "
                         f"merge size {merge_size} needs {rows * cols}")
    if len(pads) and pads[-1] - pads[0] + 1 != len(pads):
        raise ValueError("input_ids: the image tokens are not one contiguous run")
    is_image = np.isin(ids, [image_token_id, vision_start_id, vision_end_id])
    patch_numbers = np.cumsum(ids == image_token_id) - 1   # k for the k-th pad
    coords = [(int(k % cols), int(k // cols)) if token_id == image_token_id else None
              for token_id, k in zip(ids[is_image], patch_numbers[is_image])]
    grids = [{"name": f"image {rows}x{cols}", "rows": rows, "cols": cols,
              "box": [0, 0, grid_w * patch_size, grid_h * patch_size]}]
    return coords, grids, is_image


class Qwen2VLAdapter(HfAdapter):
    """Qwen2-VL: one grid of merged blocks over the resized image; the merge and patch sizes are the
    image processor's (the ones that built ``pixel_values`` and the ``<|image_pad|>`` run)."""

    model_types = ("qwen2_vl",)

    def image_layout(self, inputs, processor, model, image) -> ImageLayout:
        image_processor = processor.image_processor
        config = model.config
        coords, grids, is_image = qwen_image_layout(
            inputs["input_ids"][0], inputs["image_grid_thw"], image_processor.merge_size,
            image_processor.patch_size, config.image_token_id, config.vision_start_token_id,
            config.vision_end_token_id)
        stored = qwen_seen_image(inputs["pixel_values"], inputs["image_grid_thw"], image_processor)
        return ImageLayout(stored_image=stored, is_image=is_image, coords=coords, grids=grids)

    def suppressed_token_ids(self, processor, model) -> list:
        """The image and video placeholders and the vision start / end markers: never an answer."""
        config = model.config
        ids = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id}
        return sorted(int(i) for i in ids if i is not None)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: its window reordering is undone inside the vision tower, so the layout is Qwen2-VL's."""

    model_types = ("qwen2_5_vl",)
