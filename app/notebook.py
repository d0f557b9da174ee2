"""VL-InterpreT in a Jupyter notebook: show the app in a cell, and store a model's outputs as examples.

    from app import notebook

    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)  # one example
    notebook.add_example("my_database", outputs, tokens=tokens, txt_len=txt_len,
                         img_coords=img_coords, grid=(rows, cols), image=image)
    notebook.show("my_database")                  # the app, inline in the cell

:func:`show` uses Dash's Jupyter mode (``Dash.run(jupyter_mode=...)``), which serves the app from a
thread of the kernel; running it again on the same port replaces the previous one. It opens the
database for writing, so that :func:`add_example` can add to a database while it is shown (LMDB
allows one environment per file and process); new examples appear when the page reloads.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from app.database.database import VliLmdb

__all__ = ["add_example", "record_from_outputs", "show"]

DEFAULT_PORT = 8050  # Dash's own default: leaves 6006 to a `vl-interpret` running beside the notebook
DEFAULT_HEIGHT = 900  # pixels; the page is laid out for a window about 900 pixels high


def show(db_path, model=None, params: Sequence[str] = (), *, mode: str = "inline", port: int = DEFAULT_PORT,
         host: str = "127.0.0.1", height: int = DEFAULT_HEIGHT, width: str = "100%", allow_paths: bool = False):
    """Show the app on the database at ``db_path`` in the notebook; return the Dash app.

    ``model``: None (browse only), a loaded :class:`~app.database.models.VL_Model`, or a model name
    with its ``params``, as ``run_app.py -m NAME PARAM ...`` takes them (``"vilt",
    ["shapes_vqa/vilt-shapes"]``). ``mode``: Dash's ``jupyter_mode`` ("inline", "external", "tab",
    "jupyterlab"). Raises DatabaseError when ``db_path`` is not a database, ValueError when the
    model's layers, heads or hidden size differ from the database's.
    """
    from app.server import create_app, model_mismatch, open_database  # noqa: PLC0415 - Dash only here

    if isinstance(model, str):
        from app.database.models import load_model  # noqa: PLC0415 - live models only when asked

        model = load_model(model, list(params))
    db = open_database(db_path, writable=True)
    mismatch = model_mismatch(db, model) if model is not None else None
    if mismatch:
        db.close()
        raise ValueError(mismatch)
    dash_app = create_app(db, model=model, allow_paths=allow_paths)
    dash_app.run(jupyter_mode=mode, jupyter_height=height, jupyter_width=width, host=host, port=port)
    return dash_app


def add_example(db_path, record_or_outputs, *, tokens: Optional[Sequence[str]] = None,
                txt_len: Optional[int] = None, img_coords: Optional[Sequence] = None,
                grid: Optional[tuple[int, int]] = None, image: Any = None, ex_id: Optional[int] = None,
                **fields) -> int:
    """Validate, preprocess and store one example in the database at ``db_path`` (created when
    missing); return its example id.

    ``record_or_outputs`` is either a record dict in the database format (README, "The database
    format"; the keyword fields given are added to it), or a Hugging Face model output of one example,
    run with ``output_attentions=True, output_hidden_states=True``: see :func:`record_from_outputs`
    for what else it needs. ``ex_id`` defaults to the next free id. Raises RecordError (naming the
    example and the field; nothing is written) for a record the database refuses, ValueError for
    outputs that cannot be converted.
    """
    given = {name: value for name, value in dict(tokens=tokens, txt_len=txt_len, img_coords=img_coords,
                                                 grid=grid, image=image, ex_id=ex_id).items()
             if value is not None}
    with VliLmdb(db_path, read_only=False) as db:
        if is_model_output(record_or_outputs):
            if ex_id is None:
                ex_id = db.reserve_example_id()
            record = record_from_outputs(record_or_outputs, ex_id, tokens=tokens, txt_len=txt_len,
                                         img_coords=img_coords, grid=grid, image=image, **fields)
        elif isinstance(record_or_outputs, Mapping):
            record = {**record_or_outputs, **given, **fields}
            if record.get("ex_id") is None:
                record["ex_id"] = db.reserve_example_id()
            if record.get("image") is not None:
                record["image"] = as_image(record["image"])
        else:
            raise TypeError(f"expected a record dict or a model output with .attentions and .hidden_states, "
                            f"got {type(record_or_outputs).__name__}")
        return db.add_record(record)


def is_model_output(obj) -> bool:
    """Whether ``obj`` looks like a transformers ``ModelOutput`` (attributes ``attentions`` and
    ``hidden_states``) rather than a record dict (``attention``, singular); a ``ModelOutput`` is
    itself a dict, so the attributes decide."""
    return hasattr(obj, "attentions") and hasattr(obj, "hidden_states")


def record_from_outputs(outputs, ex_id: int, *, tokens: Sequence[str], txt_len: Optional[int] = None,
                        img_coords: Optional[Sequence] = None, grid: Optional[tuple[int, int]] = None,
                        image: Any = None, **fields) -> dict:
    """The record of one example from a Hugging Face model output: ``outputs.attentions``, one
    (1, heads, n, n) tensor per layer, becomes ``attention`` (layers, heads, n, n), and
    ``outputs.hidden_states``, (1, n, hidden) before the first layer and after each layer, becomes
    ``hidden_states`` (layers + 1, n, hidden), as float32 numpy arrays (torch tensors on any device
    and of any float dtype, or numpy arrays).

    ``tokens`` (n strings) lists the model's sequence: either text first and ``txt_len`` counting
    the text tokens, or in any order with ``modality=[...]`` ("text" / "image" per token, in
    ``fields``, as a decoder VLM's prompt needs); ``img_coords`` gives each image token's
    (x, y) patch in the grid (None for an image-side special token), ``grid`` the (rows, cols) of the
    patch grid and ``image`` the image the model saw (an (H, W, 3) array, a PIL image or a file path).
    ``fields`` are further record fields (``prediction``, ``text``, ``accuracy``, ``notes``,
    ``custom_metrics``...). The shapes are checked against ``tokens`` when the record is stored.
    """
    record = {
        "ex_id": ex_id,
        "tokens": [str(token) for token in tokens],
        "img_coords": img_coords,
        "attention": _stack_layers(outputs, "attentions", "output_attentions", ex_id, per_layer_ndim=3),
        "hidden_states": _stack_layers(outputs, "hidden_states", "output_hidden_states", ex_id,
                                       per_layer_ndim=2),
        **fields,
    }
    if txt_len is not None:
        record["txt_len"] = txt_len
    if grid is not None:
        record["grid"] = tuple(grid)
    if image is not None:
        record["image"] = as_image(image)
    return record


def as_image(image) -> np.ndarray:
    """An (H, W, ...) array from an array, a PIL image, or the path of an image file."""
    if isinstance(image, (str, os.PathLike)):
        from app.database.models.vl_model import load_image  # noqa: PLC0415 - only for paths

        return load_image(image)
    return np.asarray(image)


def _as_float32(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU, maybe bfloat16 (which numpy lacks)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _stack_layers(outputs, name: str, flag: str, ex_id: int, per_layer_ndim: int) -> np.ndarray:
    """``outputs.<name>`` (one batch-of-one array per layer) stacked into one float32 array, without
    the batch axis; a ValueError naming the example and the layer otherwise."""
    layers = getattr(outputs, name)
    if layers is None:
        raise ValueError(f"example {ex_id}: outputs.{name} is None: run the model with {flag}=True")
    if len(layers) == 0:
        raise ValueError(f"example {ex_id}: outputs.{name} is empty")
    arrays = []
    for index, layer in enumerate(layers):
        array = _as_float32(layer)
        if array.ndim != per_layer_ndim + 1 or array.shape[0] != 1:
            expected = "(1, heads, n, n)" if per_layer_ndim == 3 else "(1, n, hidden)"
            raise ValueError(f"example {ex_id}: outputs.{name}[{index}] has shape {array.shape}, expected "
                             f"{expected}: run the model on one example at a time (batch size 1)")
        if arrays and array.shape[1:] != arrays[0].shape:
            raise ValueError(f"example {ex_id}: outputs.{name}[{index}] has shape {array.shape}, but "
                             f"outputs.{name}[0] has {(1, *arrays[0].shape)}")
        arrays.append(array[0])
    return np.stack(arrays)
