"""Idefics3 and SmolVLM for the Hugging Face decoder-VLM entry point (``-m hf CHECKPOINT``).

How the image reaches the language model (image_processing_idefics3.py, processing_idefics3.py,
modeling_idefics3.py; SmolVLM's files are the same in these respects):

- The image is resized (longest edge to ``size``) and then up to whole multiples of the tile size
  ``T = max_image_size["longest_edge"]``; when it is larger than one tile it is cut into
  ``rows x cols`` tiles of ``T x T`` (row-major), followed by the whole image squeezed to ``T x T``
  (the global thumbnail). An image of one tile is passed as that tile alone.
- Each tile goes through the vision encoder on its own; the connector's ``pixel_shuffle`` folds
  every ``scale_factor x scale_factor`` block of patches into one token, giving ``image_seq_len =
  side**2`` tokens per tile, row-major over a ``side x side`` grid of the tile.
- The prompt holds, per tile, ``<fake_token_around_image><row_r_col_c>`` and its ``<image>``
  tokens, a newline after each row of tiles, then ``\\n<fake_token_around_image><global-img>``, the
  thumbnail's ``<image>`` tokens and a closing ``<fake_token_around_image>``. Everything from the
  first to the last ``<fake_token_around_image>`` is image-side; the markers and newlines are no
  patch (coordinate None).

The stored image is the resized image before splitting, rebuilt exactly by putting the tiles of
``pixel_values`` back together (un-normalised); each tile's grid has that tile's box on it, the
thumbnail's grid the whole image.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from app.database.models.hf import HfAdapter, ImageLayout
from app.database.models.vl_model import pixels_to_image

__all__ = ["Idefics3Adapter", "idefics3_image_layout", "idefics3_seen_image"]

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
TILE_TOKEN = re.compile(r"<row_(\d+)_col_(\d+)>")


def _tiles_shape(tokens) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles, from the last ``<row_r_col_c>`` marker; ``(0, 0)`` for an image
    that was not split (as the processor counts them)."""
    markers = [m for m in map(TILE_TOKEN.fullmatch, tokens) if m]
    return (int(markers[-1][1]), int(markers[-1][2])) if markers else (0, 0)


def idefics3_image_layout(tokens, tile_size: int, image_token: str = IMAGE_TOKEN,
                          fake_token: str = FAKE_TOKEN, global_token: str = GLOBAL_TOKEN):
    """``(coords, grids, is_image)`` of a prompt with one image, from its token strings.

    One grid per tile (``"tile r,c"``, its ``T x T`` box on the stored image) and one for the
    thumbnail (the whole image), in the order the prompt gives them; the k-th ``<image>`` token of a
    grid is ``(k % side, k // side, g)``.
    """
    tokens = list(tokens)
    fakes = [i for i, t in enumerate(tokens) if t == fake_token]
    if len(fakes) < 2:
        raise ValueError(f"tokens: expected the image between {fake_token} markers, found {len(fakes)}")
    n_rows, n_cols = _tiles_shape(tokens)
    split = n_rows > 0
    width, height = (n_cols * tile_size, n_rows * tile_size) if split else (tile_size, tile_size)
    is_image = np.zeros(len(tokens), dtype=bool)
    is_image[fakes[0]: fakes[-1] + 1] = True

    grids, counts, members = [], [], []   # members: (grid, k) of the k-th <image> of a grid, or None
    for token in tokens[fakes[0]: fakes[-1] + 1]:
        tile = TILE_TOKEN.fullmatch(token)
        if tile:
            r, c = int(tile[1]), int(tile[2])
            grids.append({"name": f"tile {r},{c}",
                          "box": [(c - 1) * tile_size, (r - 1) * tile_size, c * tile_size, r * tile_size]})
            counts.append(0)
        elif token == global_token:
            grids.append({"name": "thumbnail" if split else "image", "box": [0, 0, width, height]})
            counts.append(0)
        elif token == image_token:
            if not grids:
                raise ValueError(f"tokens: an {image_token} token before any tile or {global_token} marker")
            members.append((len(grids) - 1, counts[-1]))
            counts[-1] += 1
            continue
        members.append(None)
    for grid, count in zip(grids, counts):
        side = math.isqrt(count)
        if count == 0 or side * side != count:
            raise ValueError(f"tokens: {grid['name']} has {count} {image_token} tokens, not a square grid")
        grid["rows"] = grid["cols"] = side
    coords = [None if m is None else (m[1] % grids[m[0]]["cols"], m[1] // grids[m[0]]["cols"], m[0])
              for m in members]
    return coords, grids, is_image


def idefics3_seen_image(pixel_values: torch.Tensor, tokens, image_processor) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 resized image the tiles were cut from: the ``rows x cols`` tiles of
    ``pixel_values`` (``(1, frames, 3, T, T)``, tiles row-major then the thumbnail) put side by side,
    or the single frame when the image was not split."""
    frames = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    n_rows, n_cols = _tiles_shape(tokens)
    if n_rows and len(frames) != n_rows * n_cols + 1:
        raise ValueError(f"pixel_values: {len(frames)} frames for {n_rows}x{n_cols} tiles and a thumbnail")
    n_rows, n_cols = max(n_rows, 1), max(n_cols, 1)
    n_tiles = n_rows * n_cols
    tile_size = frames.shape[-1]
    chw = (frames[:n_tiles].reshape(n_rows, n_cols, 3, tile_size, tile_size)
           .permute(2, 0, 3, 1, 4).reshape(3, n_rows * tile_size, n_cols * tile_size))
    return pixels_to_image(chw, image_processor)


class Idefics3Adapter(HfAdapter):
    """Idefics3 and SmolVLM: one grid per tile and one for the thumbnail, found from the prompt's
    marker tokens (the processor's own names for them: SmolVLM lets a tokenizer rename them)."""

    model_types = ("idefics3", "smolvlm")

    @staticmethod
    def _markers(processor) -> dict:
        return {"image_token": processor.image_token, "fake_token": processor.fake_image_token,
                "global_token": getattr(processor, "global_image_token", None) or processor.global_image_tag}

    def image_layout(self, inputs, processor, model, image) -> ImageLayout:
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        pixel_values = inputs["pixel_values"]
        coords, grids, is_image = idefics3_image_layout(tokens, int(pixel_values.shape[-1]),
                                                        **self._markers(processor))
        stored = idefics3_seen_image(pixel_values, tokens, processor.image_processor)
        return ImageLayout(stored_image=stored, is_image=is_image, coords=coords, grids=grids)

    def suppressed_token_ids(self, processor, model) -> list:
        """The image placeholder, the image markers and every ``<row_r_col_c>``: never an answer."""
        tokenizer = processor.tokenizer
        markers = set(self._markers(processor).values())
        ids = {i for token, i in tokenizer.get_added_vocab().items()
               if token in markers or TILE_TOKEN.fullmatch(token)}
        return sorted(ids | set(super().suppressed_token_ids(processor, model)))
